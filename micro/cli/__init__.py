"""The ``micro`` command: run, call and inspect services, agents and flows."""

from micro.cli.main import main

__all__ = ["main"]
