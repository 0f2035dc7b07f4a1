"""Run the `cosim` CLI in a process that SIGKILLs itself just before the N-th file-system
operation of the output policy (``kill_at=N``; 0 never kills). ``swap="renames"`` takes away the
atomic folder exchange, so folders are swapped by two renames (what a file system without
RENAME_EXCHANGE gets). The operations counted are the ones that change what a path holds:
publishing a finished temporary version (its fsync), exchanges, renames and removals.

Started once (``python crash_driver.py``), it imports the CLI and everything a training run
loads, then serves requests on stdin, one JSON line each (``{"argv": [...], "kill_at": N,
"swap": "exchange"}``): it forks a child per request, the child runs the command and is killed
(or exits), and the parent answers one JSON line (``{"returncode": ..., "stderr": ...}``, the
return code negative for a signal, as subprocess gives it). The fork spares every run the
seconds of a fresh interpreter's imports; the child is a whole process of its own, so the
SIGKILL is real. Used by tests/fit/test_crash.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import tempfile
import threading

from cosim_dask import outputs

_count = 0
_kill_at = 0


def _counted(fn):
    def op(*args, **kwargs):
        global _count
        _count += 1
        if _count == _kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return op


def _no_exchange(a, b):
    raise OSError(errno.EINVAL, "no RENAME_EXCHANGE on this file system")


for _name in ("_sync_tree", "_exchange", "_rename", "_remove"):
    setattr(outputs, _name, _counted(getattr(outputs, _name)))


def _child(request: dict, stderr_path: str) -> None:
    """In the forked child: count operations from zero, run the command, never return."""
    global _kill_at
    _kill_at = int(request.get("kill_at", 0))
    if request.get("swap") == "renames":
        outputs._exchange = _counted(_no_exchange)
    fd = os.open(stderr_path, os.O_WRONLY | os.O_TRUNC)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    code = 1
    try:
        from cosim_dask.cli import main

        main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    # What a run imports, imported once here so that every forked child has it for free.
    import distributed  # noqa: F401

    import cosim_dask.cli.app  # noqa: F401
    import cosim_dask.fit.train  # noqa: F401

    # Forking is only safe while this process runs one thread.
    assert threading.active_count() == 1, threading.enumerate()
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.NamedTemporaryFile("r", suffix=".stderr") as err:
            pid = os.fork()
            if pid == 0:
                _child(request, err.name)
            _, status = os.waitpid(pid, 0)
            code = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                    else os.WEXITSTATUS(status))
            replies.write(json.dumps({"returncode": code, "stderr": err.read()}) + "\n")
            replies.flush()


if __name__ == "__main__":
    serve()
