"""ExpandReduceFlow: a uniflow transform flow built from uniflow's ExpandOp and ReduceOp.

The contract, per input object:

* expand splits it into two objects: the first ``len // 2`` keys (in the order sent) and the rest;
* reduce pairs the i-th key of the first half with the i-th key of the second half into
  ``"k1 k2": "v1 v2"`` and carries the unpaired keys of the second half over unchanged.

The flow works on a whole job (a list of objects) at a time: one ExpandOp node pair and one
ReduceOp node per job rather than per item, because uniflow's ``Node`` bookkeeping per item
would cost more than the split/merge itself. This module is pure: no I/O and no globals.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import orjson
from uniflow.constants import OUTPUT_NAME, ROOT_NAME, TRANSFORM
from uniflow.flow.flow import Flow
from uniflow.node import Node
from uniflow.op.basic.expand_op import ExpandOp
from uniflow.op.basic.reduce_op import ReduceOp

JSONScalar = str | int | float | bool | None
JSONObject = Mapping[str, JSONScalar]


class KeyCollisionError(ValueError):
    """A merged key would overwrite another key of the same output object."""

    def __init__(self, key: str, item_index: int | None = None) -> None:
        # Both fields are passed to Exception so the error pickles across a process pool.
        super().__init__(key, item_index)
        self.key = key
        self.item_index = item_index

    def __str__(self) -> str:
        where = "" if self.item_index is None else f"input_data[{self.item_index}]: "
        return (
            f"{where}output key {self.key!r} would be written twice; "
            "merging would silently overwrite a value"
        )


class FlowStopped(Exception):
    """The flow was asked to stop (timed out, cancelled, or its claim was lost) and did."""


def never() -> bool:
    """A ``should_stop`` that never asks a flow to stop."""
    return False


def ignore(done_items: int) -> None:
    """An ``on_progress`` that listens to nothing."""


def as_text(value: JSONScalar) -> str:
    """Render a value for a merged value: strings as they are, anything else as JSON writes it."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def expand(obj: JSONObject) -> tuple[dict[str, JSONScalar], dict[str, JSONScalar]]:
    """Split one object into its first ``len // 2`` keys and the remaining keys."""
    items = list(obj.items())
    half = len(items) // 2
    return dict(items[:half]), dict(items[half:])


def reduce(first: JSONObject, second: JSONObject) -> dict[str, JSONScalar]:
    """Merge two halves: pair keys by position, carry unpaired second-half keys over.

    Raises KeyCollisionError instead of overwriting when two output keys coincide.
    """
    merged: dict[str, JSONScalar] = {}
    second_items = list(second.items())
    for (key1, value1), (key2, value2) in zip(first.items(), second_items, strict=False):
        _put(merged, f"{key1} {key2}", f"{as_text(value1)} {as_text(value2)}")
    for key, value in second_items[len(first) :]:
        _put(merged, key, value)
    return merged


def _put(target: dict[str, JSONScalar], key: str, value: JSONScalar) -> None:
    if key in target:
        raise KeyCollisionError(key)
    target[key] = value


def expand_items(items: Sequence[JSONObject]) -> list[list[dict[str, JSONScalar]]]:
    """ExpandOp function: one job's objects in, two value lists out (first and second halves)."""
    halves = [expand(obj) for obj in items]
    return [[first for first, _ in halves], [second for _, second in halves]]


def reduce_items(
    firsts: Sequence[JSONObject], seconds: Sequence[JSONObject]
) -> list[dict[str, JSONScalar]]:
    """ReduceOp function: merge the i-th first half with the i-th second half, in order."""
    merged = []
    for index, (first, second) in enumerate(zip(firsts, seconds, strict=True)):
        try:
            merged.append(reduce(first, second))
        except KeyCollisionError as error:
            raise KeyCollisionError(error.key, index) from None
    return merged


class ExpandReduceFlow(Flow):  # type: ignore[misc]  # uniflow ships no type hints
    """Split every object of a job in two halves and merge them back pairwise.

    Called with a list of objects, it returns ``{"output": [merged_objects], "root": Node}``,
    the shape of uniflow's other transform flows, so ``TransformServer`` can run it.
    """

    TAG = TRANSFORM

    def __init__(
        self, prompt_template: Any = None, model_config: Mapping[str, Any] | None = None
    ) -> None:
        # prompt_template and model_config are what TransformServer passes to every transform
        # flow; this flow calls no model, so it needs neither.
        super().__init__()
        self._expand_op = ExpandOp(name="expand_op", fn=expand_items)
        self._reduce_op = ReduceOp(name="reduce_op", fn=reduce_items)

    def run(self, nodes: Sequence[Node]) -> list[Node]:
        """Expand each node into two halves, then reduce each pair into one node."""
        output: list[Node] = []
        for node in nodes:
            first, second = self._expand_op(node)
            output.extend(self._reduce_op([(first, second)]))
        return output

    def _enter(self, value_dict: Any) -> list[Node]:
        # uniflow deep-copies the input here to protect it from ops that mutate; expand and
        # reduce only ever build new objects, so the copy (seconds on a large job) is skipped.
        self._root = Node(name=ROOT_NAME, value_dict=value_dict)
        return [self._root]

    def _exit(self, nodes: Sequence[Node]) -> dict[str, Any]:
        # The output objects were built by reduce and are referenced by nothing else.
        return {OUTPUT_NAME: [node.value_dict for node in nodes], ROOT_NAME: self._root}


def expand_reduce(items: Sequence[JSONObject]) -> list[dict[str, JSONScalar]]:
    """Run ExpandReduceFlow over one job's objects; one output object per input, in order."""
    result = ExpandReduceFlow()(items)
    _unlink(result[ROOT_NAME])
    output: list[dict[str, JSONScalar]] = result[OUTPUT_NAME][0]
    return output


def _unlink(root: Node) -> None:
    """Break the links between the flow's nodes, which point at each other both ways.

    Otherwise the nodes, and the objects they hold, live on as reference cycles until the
    garbage collector's next full pass; unlinked, they are freed as soon as they are dropped.
    """
    pending, seen = [root], set()
    while pending:
        node = pending.pop()
        if id(node) not in seen:
            seen.add(id(node))
            pending.extend(node.next_nodes)
            node.next_nodes.clear()
            node.prev_nodes.clear()


# A large job runs as consecutive flows over this many objects each: the job's objects are
# never all alive at once (memory, and the garbage collector's work, grow with what is alive),
# while uniflow's per-flow cost is still paid a few times per job rather than per object.
BATCH_ITEMS = 1_000


def expand_reduce_json(
    input_json: str,
    should_stop: Callable[[], bool] = never,
    on_progress: Callable[[int], None] = ignore,
) -> str:
    """Run the flow on a job's input JSON and return its result as JSON text.

    This is what a worker thread or process runs: text in, text out, so a large job crosses a
    process boundary as one string rather than as many small objects. Input in the layout of
    ``items_json`` (one object per line) is parsed and transformed a batch at a time; before
    each batch ``should_stop`` is asked whether to give up (raising FlowStopped), and after
    each ``on_progress`` is told how many objects are done.
    """
    parts: list[str] = []
    offset = 0
    for items in _batches(input_json):
        if should_stop():
            raise FlowStopped(f"stopped after {offset} objects")
        try:
            merged = expand_reduce(items)
        except KeyCollisionError as error:
            raise KeyCollisionError(error.key, offset + (error.item_index or 0)) from None
        if merged:
            parts.append(orjson.dumps(merged).decode()[1:-1])
        offset += len(items)
        on_progress(offset)
    return _bracketed(parts, ",")


def items_json(items: Sequence[JSONObject]) -> str:
    """A JSON array of these objects, one per line, so it can be read back a batch at a time.

    JSON escapes newlines inside strings, so every raw newline here separates two objects.
    """
    # Each bytes object orjson returns keeps its whole growth buffer (kilobytes for a small
    # object), so they are decoded one at a time rather than all kept until the join.
    return _bracketed([orjson.dumps(item).decode() for item in items], ",\n", "\n")


def _bracketed(parts: list[str], separator: str, padding: str = "") -> str:
    """``[`` + the parts joined + ``]`` in one join: megabytes are not copied once more."""
    if not parts:
        return "[]"
    parts[0] = "[" + padding + parts[0]
    parts[-1] = parts[-1] + padding + "]"
    return separator.join(parts)


def _batches(input_json: str) -> Iterator[list[JSONObject]]:
    if not input_json.startswith("[\n"):
        yield orjson.loads(input_json)
        return
    lines = input_json.split("\n")[1:-1]  # without the "[" and "]" lines
    for start in range(0, len(lines), BATCH_ITEMS):
        batch = ",".join(line.rstrip(",") for line in lines[start : start + BATCH_ITEMS])
        yield orjson.loads("[" + batch + "]")
