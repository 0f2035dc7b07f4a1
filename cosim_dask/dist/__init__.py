"""The Dask side: connect to or start a cluster (cluster), deadlines on every wait (waits), the
reduction tree (tree), the work of a chunk task (tasks) and one pass over the chunks, in this
process or on the cluster (passes). Knows nothing of the CLI."""
