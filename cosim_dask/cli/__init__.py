"""The `cosim` command line: parse, call the library, render. The only layer that knows flags."""

from cosim_dask.cli.app import app, main

__all__ = ["app", "main"]
