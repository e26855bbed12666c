"""``python -m expand_reduce_client``: the ``expand-reduce`` command (in the image, say)."""

from expand_reduce_client.cli import main

main()
