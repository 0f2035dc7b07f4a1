"""Helpers shared by the tests: random SPD matrices and pairs, real Dask processes, file
hashes, one-line errors."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def random_spd(rng, d, cond=10.0):
    """A random symmetric positive-definite matrix with eigenvalues in [1, cond]."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.linspace(1.0, cond, d)) @ q.T


def random_pairs(rng, b, d, dtype=np.float64):
    x = rng.standard_normal((b, d)).astype(dtype)
    y = rng.standard_normal((b, d)).astype(dtype)
    t = rng.uniform(-1, 1, b)
    return x, y, t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_hash(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)) if p != path else ".":
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(folder: str | os.PathLike) -> list[str]:
    """Temporary, aside or lock files that a finished command must not leave behind."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock"))


def one_line_error(stderr: str, *fragments: str) -> str:
    """Exactly one ``error: `` line naming the problem, and no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def cosim_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cosim_dask", *map(str, args)]


@contextmanager
def dask_processes(workers: int = 2, *, tls: dict | None = None, extra_env: dict | None = None,
                   cwd: str | os.PathLike | None = None,
                   wrap: Callable[[list[str]], list[str]] | None = None,
                   ) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A ``dask scheduler`` and ``workers`` ``dask worker`` subprocesses on loopback.

    ``tls``: {"ca", "scheduler": (cert, key), "worker": (cert, key)} for a tls:// cluster.
    ``cwd``: the workers' working directory (default: this process's). ``wrap``: turns the
    worker command line into the one to run (e.g. inside ``unshare``).
    Yields the address and the processes (scheduler first); all are killed on exit.
    """
    port = free_port()
    scheme = "tls" if tls else "tcp"
    address = f"{scheme}://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           **(extra_env or {})}
    sched = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--dashboard-address", "127.0.0.1:0"]
    work = [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
            "--host", "127.0.0.1", "--no-dashboard"]
    if tls:
        sched += ["--protocol", "tls", "--tls-ca-file", tls["ca"],
                  "--tls-cert", tls["scheduler"][0], "--tls-key", tls["scheduler"][1]]
        work += ["--tls-ca-file", tls["ca"], "--tls-cert", tls["worker"][0],
                 "--tls-key", tls["worker"][1]]
    procs = [subprocess.Popen(sched, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        for _ in range(workers):
            procs.append(subprocess.Popen(wrap(work) if wrap else work, env=env, cwd=cwd,
                                          stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield address, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def cosim_main(*args, env: dict | None = None):
    """Run the ``cosim`` console entry point in-process on ``args``, as the user's shell
    does (usage errors as one line), and return a CliRunner result."""
    from typer.testing import CliRunner, Result

    from cosim_dask.cli import main

    runner = CliRunner()
    with runner.isolation(env=env) as (out, err, both):
        code, exception = 0, None
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            exception = exc if code else None
        except Exception as exc:  # --debug raises; the test reads it from the result
            code, exception = 1, exc
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return Result(runner=runner, stdout_bytes=out.getvalue(), stderr_bytes=err.getvalue(),
                      output_bytes=both.getvalue(), return_value=None, exit_code=code,
                      exception=exception)
