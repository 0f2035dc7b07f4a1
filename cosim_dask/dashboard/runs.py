"""The per-run metric history behind the live dashboard, and the Tornado handlers serving it.

No Dask here: the same :class:`RunStore` and handlers serve the page from the scheduler (inside
the cosim scheduler plugin) and, as a fallback, from a small HTTP server in the driver process.

Histories are columnar (one ``array('d')`` per metric, NaN for "not given") because a run of
100,000 steps kept as one dict per step would cost ~100 MB on the scheduler; columnar it is
~1 MB per metric.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import re
import socket
import threading
import time
from array import array
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from tornado import web

#: Run ids become URL path segments and page titles, so they are kept to a safe alphabet.
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)

#: Steps kept per run; older steps are dropped (and counted) beyond this.
MAX_STEPS_PER_RUN = 100_000
#: Runs kept per store; the oldest finished runs go first beyond this.
MAX_RUNS = 100
#: Key of the wall-clock time (seconds since the epoch) the driver attached to each step.
TIME_KEY = "wall_time"
#: Extra names the pages answer to, read from the serving process's environment: a comma-
#: separated list of ``host`` or ``host:port`` (``*`` for any), for a proxy that passes on
#: its own ``Host`` header.
ALLOWED_HOSTS_ENV = "COSIM_DASHBOARD_ALLOWED_HOSTS"
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_valid_run_id(run_id: str) -> bool:
    """Whether ``run_id`` fits :data:`RUN_ID_PATTERN` (letters, digits, ``._-``; ≤ 128)."""
    return isinstance(run_id, str) and _RUN_ID_RE.fullmatch(run_id) is not None


def _json_number(value: float, as_int: bool) -> float | int | None:
    # JSON has no NaN/Infinity (JSON.parse rejects them), so a missing or non-finite value is null.
    if not math.isfinite(value):
        return None
    return int(value) if as_int else value


class RunHistory:
    """Every step one run logged (up to ``max_steps``), column by column, in arrival order.

    Parameters
    ----------
    run_id : str
        The run's id.
    settings : dict
        JSON-compatible training settings shown beside the curves.
    started : float
        Wall-clock start time (seconds since the epoch).
    max_steps : int
        Steps kept; beyond it the oldest are dropped in batches and counted in ``dropped``.
    """

    def __init__(
        self, run_id: str, settings: Mapping[str, Any], started: float, max_steps: int
    ) -> None:
        self.run_id = run_id
        self.settings = dict(settings)
        self.started = started
        self.updated = started
        self.finished: float | None = None
        #: How the run ended (:data:`END_STATUSES`) and why, once its end event came.
        self.outcome = "finished"
        self.reason: str | None = None
        #: What the driver said about the run: ``total_steps``, ``pairs`` (per pass over the
        #: data), ``model`` (where it is written), ``report`` (a report's path or command).
        self.info: dict[str, Any] = {}
        self.max_steps = max_steps
        self.columns: dict[str, array] = {TIME_KEY: array("d")}
        self._float_columns: set[str] = {TIME_KEY}  # columns that ever held a non-int value
        self.dropped = 0

    @property
    def status(self) -> str:
        """``"running"`` until the publisher closes the run, then how it ended:
        ``"finished"``, ``"failed"`` or ``"interrupted"``."""
        return "running" if self.finished is None else self.outcome

    def __len__(self) -> int:
        return len(self.columns[TIME_KEY])

    def append(self, metrics: Mapping[str, float | int | None], when: float) -> None:
        """Add one step; a metric seen for the first time is back-filled with "missing"."""
        n = len(self)
        for key, value in metrics.items():
            if key == TIME_KEY:  # reserved: the store's own clock column
                continue
            column = self.columns.get(key)
            if column is None:
                column = self.columns[key] = array("d", [math.nan]) * n
            if value is None:
                column.append(math.nan)
            else:
                column.append(float(value))
                if not isinstance(value, int):
                    self._float_columns.add(key)
        self.columns[TIME_KEY].append(when)
        for column in self.columns.values():
            if len(column) == n:  # a metric this step did not report
                column.append(math.nan)
        self.updated = when
        # Trim in batches of a tenth so deleting from the front of the arrays stays amortised O(1).
        if len(self) > self.max_steps + max(1, self.max_steps // 10):
            excess = len(self) - self.max_steps
            for column in self.columns.values():
                del column[:excess]
            self.dropped += excess

    def records(self, since: int = 0) -> list[dict[str, float | int | None]]:
        """Steps from absolute index ``since`` on (index 0 is the run's first logged step)."""
        start = max(since - self.dropped, 0)
        names = list(self.columns)
        as_int = [name not in self._float_columns for name in names]
        cols = [self.columns[name] for name in names]
        fields = list(zip(names, cols, as_int, strict=True))
        return [
            {name: _json_number(col[i], is_int) for name, col, is_int in fields}
            for i in range(start, len(self))
        ]

    def last(self) -> dict[str, float | int | None] | None:
        """The latest step, or None before the first."""
        return self.records(self.dropped + len(self) - 1)[0] if len(self) else None

    def summary(self) -> dict[str, Any]:
        """The run's entry in the runs listing."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "started": self.started,
            "updated": self.updated,
            "finished": self.finished,
            "n_steps": self.dropped + len(self),
            "dropped": self.dropped,
            "reason": self.reason,
            "info": self.info,
            "last": self.last(),
            "page": f"cosim/runs/{self.run_id}",
            "json": f"cosim/api/runs/{self.run_id}",
        }


#: How a run can end: it ran to a stopping rule, an error stopped it, or a signal did.
END_STATUSES = ("finished", "failed", "interrupted")


def _info(value: Any) -> dict[str, Any]:
    """The JSON-safe scalars of an event's ``info`` (anything else is dropped)."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items()
            if v is None or isinstance(v, str | bool | int)
            or (isinstance(v, float) and math.isfinite(v))}


class RunStore:
    """All runs' histories, fed by the events a :class:`MetricsPublisher` sends.

    Thread-safe: in the driver fallback, ``handle`` runs on the training thread while the HTTP
    server reads on its own thread. On the scheduler both run on its event loop.

    Parameters
    ----------
    max_runs : int
        Runs kept; beyond it the run updated longest ago (finished runs first) is forgotten.
    max_steps : int
        Steps kept per run.
    """

    def __init__(self, max_runs: int = MAX_RUNS, max_steps: int = MAX_STEPS_PER_RUN) -> None:
        self.max_runs = max_runs
        self.max_steps = max_steps
        self._runs: dict[str, RunHistory] = {}
        self._lock = threading.Lock()

    def handle(self, msg: Mapping[str, Any]) -> None:
        """Apply one event: ``{"kind": "start" | "step" | "end", "run": id, "time": t, ...}``.

        ``start`` may carry ``settings`` and ``info``; ``end`` may carry ``status`` (one of
        :data:`END_STATUSES`, default finished), ``reason`` and more ``info``."""
        run_id = msg.get("run")
        if not isinstance(run_id, str) or not is_valid_run_id(run_id):
            return
        when = float(msg.get("time") or time.time())
        kind = msg.get("kind")
        with self._lock:
            if kind == "start":
                # A new publisher with an existing id starts that run afresh (one run, one curve).
                self._runs.pop(run_id, None)
                run = self._add(run_id, msg.get("settings") or {}, when)
                run.info.update(_info(msg.get("info")))
                return
            run = self._runs.get(run_id)
            if run is None:  # its start was missed (plugin installed later, or run evicted)
                run = self._add(run_id, {}, when)
            if kind == "step":
                run.append(msg.get("metrics") or {}, when)
            elif kind == "end":
                run.finished = when
                run.updated = when
                status = msg.get("status", "finished")
                run.outcome = status if status in END_STATUSES else "finished"
                reason = msg.get("reason")
                run.reason = str(reason)[:2000] if reason is not None else None
                run.info.update(_info(msg.get("info")))

    def _add(self, run_id: str, settings: Mapping[str, Any], when: float) -> RunHistory:
        if len(self._runs) >= self.max_runs:
            oldest = min(self._runs.values(), key=lambda r: (r.finished is None, r.updated))
            del self._runs[oldest.run_id]
        run = self._runs[run_id] = RunHistory(run_id, settings, when, self.max_steps)
        return run

    def runs(self) -> list[dict[str, Any]]:
        """Summaries of all runs, oldest first."""
        with self._lock:
            return [run.summary() for run in sorted(self._runs.values(), key=lambda r: r.started)]

    def run(self, run_id: str, since: int = 0) -> dict[str, Any] | None:
        """One run's summary, settings and steps from ``since`` on; None if unknown."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            out = run.summary()
            first = max(since, run.dropped)
            out.update(
                now=time.time(),
                settings=run.settings,
                offset=first,
                next=run.dropped + len(run),
                steps=run.records(first),
            )
            return out


# --------------------------------------------------------------------------------------------
# HTTP: two HTML pages and two JSON routes, identical on the scheduler and in the driver.

_PAGES = {
    name: resources.files("cosim_dask.dashboard").joinpath("assets", f"{name}.html")
    .read_text("utf-8")
    for name in ("live", "index")
}


def split_host(value: str) -> tuple[str, int | None]:
    """A ``Host`` header as (lower-case name without brackets or final dot, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:  # a bare name, or a bare IPv6 address
        name, port = value, None
    if port is None or port == "":
        return name.rstrip("."), None
    if not port.isascii() or not port.isdigit() or len(port) > 5:
        return "", None  # matches nothing
    return name.rstrip("."), int(port)


@functools.lru_cache(maxsize=1)
def _machine_names() -> frozenset[str]:
    # Once per process: getfqdn may ask the resolver.
    # Loopback names answer on loopback only (some machines call themselves "localhost").
    names = {n.lower().rstrip(".") for n in (socket.gethostname(), socket.getfqdn()) if n}
    return frozenset(names - _LOOPBACK_NAMES)


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or ip).is_loopback


def host_allowed(header: str | None, local: tuple[str, int], names: Iterable[str] = (),
                 extra: str | None = None) -> bool:
    """Whether a request whose ``Host`` is ``header``, arriving at the local socket address
    ``local`` (address, port), is for this server: a DNS-rebinding page names its own host.

    The name must be a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``) when the
    request came in on loopback, and otherwise the address it came in on, this machine's
    name or one of ``names`` (the names the server is announced as); the port, the one it
    came in on. ``extra`` (see :data:`ALLOWED_HOSTS_ENV`) adds ``host`` or ``host:port``
    entries, or ``*`` for any.
    """
    if not header:
        return False
    name, port = split_host(header)
    if not name:
        return False
    address, local_port = local
    address = address.split("%")[0].lower()
    for entry in (e.strip() for e in (extra or "").split(",")):
        if entry == "*":
            return True
        if entry:
            allowed_name, allowed_port = split_host(entry)
            if allowed_name == name and allowed_port in (None, port):
                return True
    if (port if port is not None else 80) != local_port:
        return False
    if _is_loopback(address):
        return name in _LOOPBACK_NAMES or name == address
    allowed = {address, *(n.lower().rstrip(".") for n in names), *_machine_names()}
    return name in allowed


class _Base(web.RequestHandler):
    def initialize(self, store: RunStore, context: dict[str, Any]) -> None:
        self.store = store
        self.context = context

    def set_default_headers(self) -> None:
        # Live data: never serve a cached copy.
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        """Refuse (403) a request whose ``Host`` is not a name of this server: a page from
        another site rebound to this address must not read the runs' settings and paths."""
        try:
            local = self.request.connection.stream.socket.getsockname()[:2]
        except (AttributeError, OSError):
            local = ("", -1)  # unknown: only an explicitly allowed name passes
        header = self.request.headers.get("Host")
        if not host_allowed(header, local, self.context.get("hosts", ()),
                            os.environ.get(ALLOWED_HOSTS_ENV)):
            self.set_status(403)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            # The refused name is not echoed back: nothing of the request is reflected.
            self.finish("403: this server does not answer for that Host; open it by the "
                        f"address it listens on, or list the name in {ALLOWED_HOSTS_ENV}\n")

    def _root(self, depth: int) -> str:
        # Relative link from this page to the server's root. Relative, not absolute, links keep
        # working behind a proxy (jupyter-server-proxy) or an http prefix that rewrites paths.
        trailing = self.request.path.endswith("/")
        return "../" * (depth + trailing) or "./"

    def _page(self, name: str, depth: int, run_id: str | None) -> None:
        config = {
            "root": self._root(depth),
            "run_id": run_id,
            "dask_nav": self.context.get("dask_nav", False),
            "dashboard_link": self.context.get("dashboard_link"),
            "served_by": self.context.get("served_by", "scheduler"),
        }
        # "</" cannot appear inside the inline <script>: escape it in the embedded JSON.
        payload = json.dumps(config).replace("</", "<\\/")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(_PAGES[name].replace("/*COSIM_CONFIG*/null", payload))

    def _json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(body, allow_nan=False))


class IndexPage(_Base):
    """``GET …/cosim``: the runs on this cluster, with links to their pages."""

    def get(self) -> None:
        self._page("index", 0, None)


class RunPage(_Base):
    """``GET …/cosim/runs/<run_id>``: the live curves of one run."""

    def get(self, run_id: str) -> None:
        self._page("live", 2, run_id)


class RunsJSON(_Base):
    """``GET …/cosim/api/runs``: ``{"runs": [summary, ...]}``."""

    def get(self) -> None:
        self._json({"runs": self.store.runs()})


class RunJSON(_Base):
    """``GET …/cosim/api/runs/<run_id>?since=K``: the run's steps from index K on."""

    def get(self, run_id: str) -> None:
        try:
            since = max(int(self.get_query_argument("since", "0")), 0)
        except ValueError:
            self._json({"error": "since must be a non-negative integer"}, 400)
            return
        body = self.store.run(run_id, since)
        if body is None:
            self._json({"error": f"no run {run_id!r} on this dashboard"}, 404)
        else:
            self._json(body)


def routes(store: RunStore, context: dict[str, Any]) -> list[tuple[str, type, dict]]:
    """Tornado rules for the pages and JSON routes.

    The leading ``.*`` lets the rules match under any http prefix the scheduler was given
    (``--dashboard-prefix``), which the scheduler does not record for plugins to read.
    """
    kwargs = {"store": store, "context": context}
    rid = f"({RUN_ID_PATTERN})"
    return [
        (r".*/cosim/?", IndexPage, kwargs),
        (rf".*/cosim/runs/{rid}", RunPage, kwargs),
        (r".*/cosim/api/runs/?", RunsJSON, kwargs),
        (rf".*/cosim/api/runs/{rid}", RunJSON, kwargs),
    ]
