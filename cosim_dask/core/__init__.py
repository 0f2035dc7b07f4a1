"""The NumPy core: similarities and a chunk's partial (kernel), losses, the parameterisations
(forms), the objective, solvers, score statistics that add across chunks (stats) and array
checks. Nothing here imports Dask, the pair store or the CLI."""
