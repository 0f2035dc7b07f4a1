"""`python -m cosim_dask` runs the CLI."""

from .cli import app

app(prog_name="cosim")
