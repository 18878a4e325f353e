"""``python -m micro.cli`` is the ``micro`` command."""

from micro.cli import main

main(prog_name="micro")
