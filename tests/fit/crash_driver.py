"""Run the `cosim` CLI, SIGKILLing this process just before the N-th file-system operation
of the output policy (``COSIM_KILL_AT=N``; 0 never kills). ``COSIM_SWAP=renames`` takes away the
atomic folder exchange, so folders are swapped by two renames (what a file system without
RENAME_EXCHANGE gets). The operations counted are the ones that change what a path holds:
publishing a finished temporary version (its fsync), exchanges, renames and removals.
Prints nothing of its own; used by tests/fit/test_crash.py."""

from __future__ import annotations

import errno
import os
import signal
import sys

from cosim_dask import outputs

KILL_AT = int(os.environ.get("COSIM_KILL_AT", "0"))
_count = 0


def _counted(fn):
    def op(*args, **kwargs):
        global _count
        _count += 1
        if _count == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return op


if os.environ.get("COSIM_SWAP") == "renames":
    def _no_exchange(a, b):
        raise OSError(errno.EINVAL, "no RENAME_EXCHANGE on this file system")
    outputs._exchange = _no_exchange
for _name in ("_sync_tree", "_exchange", "_rename", "_remove"):
    setattr(outputs, _name, _counted(getattr(outputs, _name)))

if __name__ == "__main__":
    from cosim_dask.cli.app import app

    sys.argv[0] = "cosim"
    app()
