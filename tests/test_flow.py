"""ExpandReduceFlow: the split/merge contract, and the flow as uniflow runs it."""

import asyncio
import gc
import string
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from uniflow.constants import TRANSFORM
from uniflow.flow.flow import Flow
from uniflow.flow.flow_factory import FlowFactory
from uniflow.flow.server import TransformServer
from uniflow.op.basic.expand_op import ExpandOp
from uniflow.op.basic.reduce_op import ReduceOp

from app.flow import (
    ExpandReduceFlow,
    FlowStopped,
    KeyCollisionError,
    expand,
    expand_reduce,
    expand_reduce_json,
    items_json,
    reduce,
)
from app.workers import CpuWorkers, FlowControl

scalars = st.one_of(
    st.text(max_size=5),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
space_free_keys = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=6)


def test_expand_splits_first_half_of_keys_in_order_sent() -> None:
    assert expand({"d": 1, "c": 2, "b": 3, "a": 4, "e": 5}) == (
        {"d": 1, "c": 2},
        {"b": 3, "a": 4, "e": 5},
    )
    assert list(expand({"z": 1, "a": 2, "m": 3, "b": 4})[0]) == ["z", "a"]


def test_expand_of_one_key_leaves_first_half_empty() -> None:
    assert expand({"key1": "value1"}) == ({}, {"key1": "value1"})


def test_reduce_pairs_ith_keys_and_values_with_a_space() -> None:
    assert reduce({"1": "2", "3": "4"}, {"5": "6", "7": "8"}) == {"1 5": "2 6", "3 7": "4 8"}


@pytest.mark.parametrize(
    ("value", "text"),
    [(7, "7"), (-2.5, "-2.5"), (1.0, "1.0"), (True, "true"), (False, "false"), (None, "null")],
)
def test_reduce_writes_non_string_values_as_json_does(value: Any, text: str) -> None:
    assert reduce({"a": value}, {"b": "s"}) == {"a b": f"{text} s"}
    assert reduce({"a": "s"}, {"b": value}) == {"a b": f"s {text}"}


def test_reduce_uses_strings_as_they_are_not_quoted() -> None:
    assert reduce({"a": 'say "hi"'}, {"b": ""}) == {"a b": 'say "hi" '}


def test_unpaired_second_half_key_is_carried_over_with_its_type() -> None:
    assert reduce({"a": "x"}, {"b": "y", "c": 3}) == {"a b": "x y", "c": 3}
    assert reduce({}, {"only": None}) == {"only": None}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"1": "2", "3": "4", "5": "6", "7": "8"}, {"1 5": "2 6", "3 7": "4 8"}),
        ({"key1": "value1"}, {"key1": "value1"}),
        ({}, {}),
        ({"a": "x", "b": "y", "c": "z"}, {"a b": "x y", "c": "z"}),
    ],
)
def test_contract_examples(given: dict[str, Any], expected: dict[str, Any]) -> None:
    assert expand_reduce([given]) == [expected]


def test_merged_key_equal_to_carried_key_fails_and_names_the_key() -> None:
    with pytest.raises(KeyCollisionError) as caught:
        expand_reduce([{"ok": "1", "fine": "2"}, {"a": "1", "x": "2", "a x": "3"}])
    assert caught.value.key == "a x"
    assert caught.value.item_index == 1
    assert "'a x'" in str(caught.value)
    assert "input_data[1]" in str(caught.value)


def test_two_merged_keys_that_coincide_fail_rather_than_overwrite() -> None:
    # "a b" + "c" and "a" + "b c" both make "a b c".
    with pytest.raises(KeyCollisionError, match="'a b c'"):
        expand_reduce([{"a b": "1", "a": "2", "c": "3", "b c": "4"}])


def test_result_has_one_object_per_input_in_input_order() -> None:
    items: list[dict[str, Any]] = [{"k": str(i), "v": i} for i in range(50)]
    assert expand_reduce(items) == [{"k v": f"{i} {i}"} for i in range(50)]


def test_flow_does_not_modify_its_input() -> None:
    items = [{"a": "1", "b": "2", "c": "3"}]
    snapshot = orjson.dumps(items)
    expand_reduce(items)
    assert orjson.dumps(items) == snapshot


def test_json_entry_point_round_trips_text() -> None:
    assert orjson.loads(expand_reduce_json('[{"a": 1, "b": true}]')) == [{"a b": "1 true"}]


def test_collision_error_survives_pickling_across_processes() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(KeyCollisionError("a x", 4)))
    assert (error.key, error.item_index) == ("a x", 4)


@given(st.dictionaries(space_free_keys, scalars, max_size=30))
def test_n_keys_give_half_merged_keys_plus_the_odd_one_carried(obj: dict[str, Any]) -> None:
    n = len(obj)
    [merged] = expand_reduce([obj])
    spaced = [key for key in merged if " " in key]
    assert len(spaced) == n // 2
    assert len(merged) - len(spaced) == n - 2 * (n // 2)


@given(st.dictionaries(space_free_keys, scalars, max_size=30))
def test_with_space_free_keys_every_input_key_is_in_exactly_one_output_key(
    obj: dict[str, Any],
) -> None:
    [merged] = expand_reduce([obj])
    parts = [part for key in merged for part in key.split(" ")]
    assert sorted(parts) == sorted(obj)


@given(st.lists(st.dictionaries(space_free_keys, scalars, max_size=8), max_size=10))
def test_flow_equals_per_object_expand_then_reduce(items: list[dict[str, Any]]) -> None:
    assert expand_reduce(items) == [reduce(*expand(obj)) for obj in items]


def test_flow_is_a_uniflow_transform_flow_built_from_expand_and_reduce_ops() -> None:
    flow = ExpandReduceFlow(None, {})
    assert isinstance(flow, Flow)
    assert ExpandReduceFlow.TAG == TRANSFORM
    assert FlowFactory.get("ExpandReduceFlow", flow_type=TRANSFORM) is ExpandReduceFlow
    assert isinstance(flow._expand_op, ExpandOp)
    assert isinstance(flow._reduce_op, ReduceOp)


def test_flow_records_its_graph_in_uniflow_nodes() -> None:
    flow = ExpandReduceFlow(None, {})
    output = flow([{"a": "1", "b": "2"}])
    root = output["root"]
    halves = root.next_nodes
    assert [node.value_dict for node in halves] == [[{"a": "1"}], [{"b": "2"}]]
    assert halves[0].next_nodes[0].value_dict == [{"a b": "1 2"}]
    assert output["output"] == [[{"a b": "1 2"}]]


def test_transform_server_runs_the_flow_by_name() -> None:
    server = TransformServer({"flow_name": "ExpandReduceFlow", "model_config": {}})
    outputs = server.run([{"1": "2", "3": "4", "5": "6", "7": "8"}, {"a": "x", "b": "y", "c": "z"}])
    assert [output["output"] for output in outputs] == [
        [[{"1 5": "2 6", "3 7": "4 8"}]],
        [[{"a b": "x y", "c": "z"}]],
    ]


@given(st.lists(st.dictionaries(st.text(max_size=4), scalars, max_size=6), min_size=1, max_size=40))
def test_one_object_per_line_layout_is_json_and_runs_in_batches(
    items: list[dict[str, Any]],
) -> None:
    text = items_json(items)
    assert orjson.loads(text) == items
    try:
        expected, collision = expand_reduce(items), None
    except KeyCollisionError as error:
        expected, collision = None, (error.key, error.item_index)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("app.flow.BATCH_ITEMS", 3)
        if collision is None:
            assert orjson.loads(expand_reduce_json(text)) == expected
        else:
            with pytest.raises(KeyCollisionError) as caught:
                expand_reduce_json(text)
            assert (caught.value.key, caught.value.item_index) == collision


def test_collision_in_a_later_batch_names_the_item_by_its_place_in_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("app.flow.BATCH_ITEMS", 2)
    items: list[dict[str, Any]] = [{"k": "v"}] * 5 + [{"a": "1", "x": "2", "a x": "3"}]
    with pytest.raises(KeyCollisionError) as caught:
        expand_reduce_json(items_json(items))
    assert caught.value.item_index == 5


def test_a_run_leaves_no_reference_cycles_behind() -> None:
    """uniflow's nodes link to each other both ways; left linked, a batch's objects would wait
    for a full garbage collection (30 ms in the server) instead of being freed at once."""
    items = [{"a": str(i), "b": "x", "c": "y"} for i in range(100)]
    gc.collect()
    gc.disable()
    try:
        assert expand_reduce(items)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_flow_asked_to_stop_gives_up_at_its_next_batch_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("app.flow.BATCH_ITEMS", 2)
    asked: list[int] = []

    def stop_before_the_third_batch() -> bool:
        asked.append(1)
        return len(asked) == 3

    items = [{"a": str(i), "b": "x"} for i in range(10)]
    with pytest.raises(FlowStopped, match="after 4 objects"):
        expand_reduce_json(items_json(items), should_stop=stop_before_the_third_batch)


@pytest.mark.parametrize("processes", [0, 1], ids=["thread", "worker-process"])
async def test_a_large_flow_asked_to_stop_stops_on_its_thread_or_in_its_process(
    processes: int,
) -> None:
    workers = CpuWorkers(processes=processes, threshold_bytes=1)
    workers.start()
    try:
        big = items_json([{"a": str(i), "b": "x", "c": "y"} for i in range(60_000)])
        stop = FlowControl()
        stop.stop()
        with pytest.raises(FlowStopped):
            await workers.run_flow(big, stop)
        # Not stopped: the same worker runs the next flow to the end.
        again = await workers.run_flow(items_json([{"a": "1", "b": "2"}]), FlowControl())
        assert orjson.loads(again)
    finally:
        workers.close()


async def test_stopping_a_finished_worker_process_flow_does_not_stop_the_next_one() -> None:
    workers = CpuWorkers(processes=1, threshold_bytes=1)
    workers.start()
    try:
        first = FlowControl()
        assert orjson.loads(await workers.run_flow(items_json([{"a": "1"}]), first))
        second = items_json([{"a": str(i), "b": "x"} for i in range(50_000)])
        running = asyncio.create_task(workers.run_flow(second, FlowControl()))
        await asyncio.sleep(0)  # one step: the second flow has its flag and is on its way
        first.stop()  # e.g. the first run's lease was lost while its outcome was recorded
        assert len(orjson.loads(await running)) == 50_000
    finally:
        workers.close()
