"""`python -m cosim_dask` runs the CLI."""

from cosim_dask.console import main

main()
