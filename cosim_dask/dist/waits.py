"""Every wait on the cluster goes through :func:`guarded`: no wait outlives its scheduler.

A blocking request to a Dask cluster (a scatter, a pass's result, ``client.run``, a scheduler
query, a plugin registration, ...) waits as long as the request takes *while the scheduler
answers*: a long pass on a healthy cluster never times out. What ends a wait is the
scheduler going quiet. While a request is pending, the scheduler is probed every
:data:`WATCH_SECONDS` with a cheap request of its own (its list of workers) that waits at
most :data:`PROBE_TIMEOUT`; when no probe has been answered for :data:`SCHEDULER_DEADLINE`
seconds — the scheduler died, or it froze and keeps its connections open — the wait raises
:class:`SchedulerLostError`, and so does every later wait on that client, at once.

So a run whose scheduler stops answering ends within about ``SCHEDULER_DEADLINE +
WATCH_SECONDS`` seconds (32 s by default; ``COSIM_SCHEDULER_DEADLINE`` sets the deadline) of its
last answer, plus :data:`CLOSE_TIMEOUT` for closing.

Nothing here knows the CLI; the pure math knows nothing of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, TypeVar

from cosim_dask.errors import ANY, ClusterError, CosimError, SchedulerLostError, WorkerLostError

if TYPE_CHECKING:  # distributed costs ~1 s to import
    from distributed import Client

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name``, else ``default``."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


#: Seconds without an answer from the scheduler after which a wait gives up on it. Far above
#: any pause of a healthy scheduler (a probe is answered in about a millisecond), far below
#: "forever". ``COSIM_SCHEDULER_DEADLINE`` overrides it (a congested network, or a test).
SCHEDULER_DEADLINE = _seconds_from_env("COSIM_SCHEDULER_DEADLINE", 30.0)
#: How long one liveness probe waits for the scheduler's answer.
PROBE_TIMEOUT = min(5.0, SCHEDULER_DEADLINE)
#: How often a pending wait probes the scheduler.
WATCH_SECONDS = 2.0
#: Closing the client, and a LocalCluster, waits at most this long each.
CLOSE_TIMEOUT = 10.0
#: Starting a LocalCluster (no scheduler to probe yet) waits at most this long.
START_TIMEOUT = 120.0

#: Clients whose scheduler a wait gave up on: later waits fail at once.
_lost: weakref.WeakSet = weakref.WeakSet()


def gave_up_on(client: Client) -> bool:
    """True once a wait gave up on this client's scheduler."""
    return client in _lost


def scheduler_gone(client: Client) -> bool:
    """True once the client has lost its scheduler (reconnecting, closed, or given up on)."""
    return client.status not in ("running", "newly-created") or gave_up_on(client)


#: Each client's scheduler address, seen while it was connected: a closed client has none.
_addresses: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lost_scheduler_error(client: Client, why: str | None = None) -> SchedulerLostError:
    """The error of a lost scheduler, naming its address and what was seen."""
    why = why or f"client {client.status}"
    address = getattr(client.scheduler, "address", None) or _addresses.get(client, "?")
    return SchedulerLostError(f"lost the Dask scheduler at {address!r} ({why})")


def probe(client: Client, timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
    """The scheduler's workers ``{address: threads}``, or None when it does not answer within
    ``timeout`` seconds. A request of its own: a frozen scheduler keeps connections open, so
    the client's status alone never notices it."""
    if client.status in ("closed", "closing", "failed"):
        return None
    try:
        return client.sync(client.scheduler.ncores, callback_timeout=timeout)
    except Exception:  # noqa: BLE001 - no answer of any kind is what a probe reports
        return None


def guarded(client: Client, call: Callable[[], T], what: str, *,
            watch_workers: bool = False, deadline: float = SCHEDULER_DEADLINE) -> T:
    """``call()``, a blocking request to ``client``'s cluster, waited for only while the
    scheduler answers (see the module docstring for the bound).

    The call runs on a helper thread and its result, or its exception, is returned or raised
    here. A call that is still pending after :data:`WATCH_SECONDS` is watched: the scheduler
    is probed every :data:`WATCH_SECONDS`; after ``deadline`` seconds without an answer the
    client is marked lost and :class:`SchedulerLostError` is raised (the helper thread is
    left to end with the client). ``what`` names the wait in that message.

    ``watch_workers``: the workers are read before the call, and a worker that leaves while
    it is pending raises :class:`WorkerLostError` (a broadcast to every worker never ends when
    one of them dies during it: the scheduler keeps copying to the dead worker).
    """
    if gave_up_on(client):
        raise lost_scheduler_error(client, f"it stopped answering before {what}")
    with contextlib.suppress(AttributeError, TypeError):
        _addresses[client] = client.scheduler.address
    before = None
    if watch_workers:
        before = probe(client)
        if before is None:
            return _give_up(client, what)
    done, outcome = _in_thread(call, what)
    answered = time.monotonic()
    while not done.wait(WATCH_SECONDS):
        if client.status in ("closed", "failed"):
            return _give_up(client, what, f"client {client.status}")
        workers = probe(client)
        if done.is_set():
            break
        if workers is not None:
            answered = time.monotonic()
            if before is not None and set(before) - set(workers):
                gone = ", ".join(sorted(set(before) - set(workers)))
                raise WorkerLostError(f"worker {gone} left while {what}")
        elif time.monotonic() - answered >= deadline:
            return _give_up(client, what)
    if "error" in outcome:
        error = outcome["error"]
        # A worker that died during the request can also fail it (the one holding the first
        # copy of a broadcast): that too is a lost worker, not a broken request.
        after = probe(client) if before is not None and isinstance(error, Exception) else None
        if after is not None and set(before) - set(after):
            gone = ", ".join(sorted(set(before) - set(after)))
            raise WorkerLostError(f"worker {gone} left while {what}") from error
        raise error
    return outcome["value"]


#: Times a wait on a future is repeated after distributed cut it short while the future
#: itself was still pending or finished (see :func:`wait_future`).
WAIT_ATTEMPTS = 3


def wait_future(client: Client, future: Any, what: str) -> Any:
    """``future.result()`` through :func:`guarded`, and nothing else escapes but the
    future's own outcome or a one-line error.

    distributed runs the wait as a task on the client's event loop; when that task is
    cancelled (another wait on the same client cancelled by its timeout or a Ctrl-C cancels
    the gather the two share; the client's loop stopping) its ``sync`` helper ends with
    ``UnboundLocalError: cannot access local variable 'result'`` (it catches ``Exception``,
    and a cancelled task raises ``asyncio.CancelledError``, which is not one). That is the
    wait failing, not the work: the future's status tells which.

    - the task's own error (``status == "error"``: a chunk's error, ``KilledWorker``), a
      cancelled future (``concurrent.futures.CancelledError``), an ``OSError`` and every
      cosim error are raised as they are: the caller repeats the pass or reports them;
    - a wait cut short while the future is pending or finished is repeated, at most
      :data:`WAIT_ATTEMPTS` times (a finished result is still on the workers);
    - a scheduler lost meanwhile raises :class:`SchedulerLostError`;
    - a future cancelled or lost meanwhile raises ``CancelledError`` (the pass is repeated);
    - anything else becomes :class:`ClusterError` naming ``what``.
    """
    for attempt in range(1, WAIT_ATTEMPTS + 1):
        try:
            return guarded(client, future.result, what)
        except (CosimError, CancelledError, OSError):
            raise
        except (Exception, asyncio.CancelledError) as exc:
            status = getattr(future, "status", None)
            if status == "error":
                raise  # the work's own failure, for the caller to report
            if scheduler_gone(client):  # the wait failed because the scheduler went away
                raise lost_scheduler_error(client) from None
            first = (str(exc).splitlines() or [""])[0]
            logger.warning("%s: distributed ended the wait with %s: %s (future %s, "
                           "attempt %d/%d)", what, type(exc).__name__, first, status,
                           attempt, WAIT_ATTEMPTS)
            if status in ("cancelled", "lost"):
                raise CancelledError(f"{what}: the result was {status}") from None
            if status not in ("pending", "finished") or attempt == WAIT_ATTEMPTS:
                raise ClusterError(
                    f"{what} failed inside distributed {attempt} time(s) "
                    f"({type(exc).__name__}: {first}); the cluster may be overloaded or "
                    "restarting: run the same command again") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _give_up(client: Client, what: str, why: str | None = None):
    _lost.add(client)
    raise lost_scheduler_error(
        client, why or f"no answer for {SCHEDULER_DEADLINE:g} s while {what}") from None


def close_client(client: Client, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close ``client`` within ``timeout`` seconds, whatever state its scheduler is in."""
    with contextlib.suppress(Exception):
        client.close(timeout=1.0 if gave_up_on(client) else timeout)


def close_cluster(cluster: Any, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close a LocalCluster within ``timeout`` seconds."""
    with contextlib.suppress(Exception):
        cluster.close(timeout=timeout)


def start_local(make: Callable[[], T], what: str = "starting a local Dask cluster",
                timeout: float = START_TIMEOUT) -> T:
    """``make()`` (a LocalCluster start) within ``timeout`` seconds, its worker processes
    deaf to the terminal's Ctrl-C.

    A Ctrl-C reaches the whole foreground process group; workers that got it would each print
    a traceback. On the main thread SIGINT is ignored while the workers start (a process
    inherits ignored signals), then handled again: the driver alone takes a later Ctrl-C and
    closes the workers. A Ctrl-C during the start itself (seconds) is ignored.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        done, outcome = _in_thread(make, what)
        if not done.wait(timeout):
            raise ClusterError(f"{what} took more than {timeout:g} s; check the machine's "
                               "load and memory, or pass {scheduler} to use a running cluster",
                               params={"scheduler": ANY})
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _in_thread(call: Callable[[], Any], what: str) -> tuple[threading.Event, dict[str, Any]]:
    """Start ``call()`` on a daemon thread; the event set when it ends and its outcome
    (``value`` or ``error``)."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"cosim-wait: {what}", daemon=True).start()
    return done, outcome
