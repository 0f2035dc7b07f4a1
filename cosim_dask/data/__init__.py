"""The pair store: its format (store), reading a worker's chunks (reader), ingest of .npy arrays
and pair lists, synthetic pairs, and the split of rows and chunks (split). Imports the core only."""
