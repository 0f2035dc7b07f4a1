"""`python -m cosim_dask` runs the CLI."""

from cosim_dask.cli import main

main()
