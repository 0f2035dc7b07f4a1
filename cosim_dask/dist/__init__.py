"""The Dask side: connect to or start a cluster (cluster), deadlines on every wait (waits), and
one pass over the chunks (passes: chunk tasks and the tree reduction). Knows nothing of the CLI."""
