"""Live training metrics on the Dask dashboard: a scheduler plugin, the page, the JSON routes.

The driver publishes one small event per training step with ``Client.log_event`` (~1 ms).
The :class:`CosimDashboardPlugin`, installed once per scheduler, receives every event through
``SchedulerPlugin.log_event``, keeps each run's full history (the scheduler itself keeps only
the last 1,000 events per topic) and adds, to the scheduler's own HTTP server:

``…/cosim``                   the runs on this cluster (also a "Cosim" tab in the dashboard)
``…/cosim/runs/<run_id>``     the live curves of one run
``…/cosim/api/runs``          JSON: ``{"runs": [summary, ...]}``
``…/cosim/api/runs/<run_id>`` JSON: the run's summary, settings and every logged step, in order

When the scheduler cannot load the plugin (an external scheduler without cosim-dask
installed), :class:`MetricsPublisher` serves the same pages from the driver process instead
(loopback by default) and says how to get the scheduler page.

Nothing here imports the CLI; the trainer calls :class:`MetricsPublisher`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import numbers
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import distributed
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import netutil, web
from tornado.httpserver import HTTPServer

from cosim_dask.dashboard.runs import (
    END_STATUSES,
    RUN_ID_PATTERN,
    TIME_KEY,
    RunStore,
    is_valid_run_id,
    routes,
)
from cosim_dask.dist.waits import guarded
from cosim_dask.errors import ClusterError, CosimError, SchedulerLostError

logger = logging.getLogger(__name__)

#: Event topic of the publisher's messages (one topic for all runs keeps the scheduler's own
#: per-topic event buffers to one).
TOPIC = "cosim-dashboard"
#: Name of the scheduler plugin; registering it again under this name is a no-op.
PLUGIN_NAME = "cosim-dashboard"
#: Version of the event messages, so a newer driver can tell an older plugin apart later.
PROTOCOL = 1
#: Where the driver serves the fallback page: loopback, any free port.
DEFAULT_FALLBACK_ADDRESS = "127.0.0.1:0"
#: The metrics the page draws; others are accepted and get a chart of their own.
METRIC_KEYS = (
    "step",
    "loss",
    "grad_norm",
    "step_seconds",
    "pairs_per_s",
    "val_loss",
    "val_auc",
    "step_size",
)

_INSTALL_HINT = (
    "install cosim-dask in the scheduler's environment (pip install cosim-dask) and restart "
    "the scheduler to get this page on the Dask dashboard"
)


def dashboard_url(client: distributed.Client) -> str:
    """The Dask dashboard's link (``client.dashboard_link``, e.g. ``http://127.0.0.1:8787/status``).

    Dask builds the link from the scheduler's address, not from where the dashboard listens:
    a ``LocalCluster(processes=False, dashboard_address="127.0.0.1:0")`` reports the machine's
    IP while listening on loopback only. When every address the dashboard listens on is a
    loopback one, the link's host is replaced by it so the printed link opens.

    Raises
    ------
    ClusterError
        If the scheduler runs no dashboard.
    """
    link = client.dashboard_link
    if not link:
        raise ClusterError("the Dask scheduler reports no dashboard address")
    link = str(link)
    try:
        hosts = guarded(client, lambda: client.run_on_scheduler(_http_hosts()),
                        "asking the scheduler where its dashboard listens")
    except SchedulerLostError:
        raise
    except Exception:  # an old or unusual scheduler: trust its link
        logger.debug("cannot ask the scheduler where its dashboard listens", exc_info=True)
        return link
    parts = urlsplit(link)
    loopback = [h for h in hosts if ipaddress.ip_address(h).is_loopback]
    if loopback and len(loopback) == len(hosts) and parts.hostname not in loopback:
        host = loopback[0] if ":" not in loopback[0] else f"[{loopback[0]}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        link = urlunsplit(parts._replace(netloc=netloc))
    return link


def _http_hosts() -> Callable[..., list[str]]:
    # A closure, so cloudpickle sends it by value: it also runs on a scheduler that cannot
    # import cosim_dask (the fallback still wants a working link to the Dask dashboard).
    def hosts(dask_scheduler: distributed.Scheduler) -> list[str]:
        sockets = dask_scheduler.http_server._sockets.values()
        return sorted({sock.getsockname()[0] for sock in sockets})

    return hosts


def _dashboard_root(link: str) -> str:
    # The configurable link template (distributed.dashboard.link) normally ends in "status";
    # everything before it is the root, which keeps any proxy path in front of it.
    root, sep, last = link.rstrip("/").rpartition("/")
    return root + "/" if sep and last == "status" else link.rstrip("/") + "/"


def new_run_id() -> str:
    """A fresh, URL-safe run id: ``YYYYmmdd-HHMMSS-xxxxxx`` (local time, 6 random hex digits)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class CosimDashboardPlugin(SchedulerPlugin):
    """Scheduler plugin keeping every run's metrics and serving the live pages.

    Parameters
    ----------
    max_runs : int
        Runs kept on the scheduler (the least recently updated finished runs go first).
    max_steps : int
        Steps kept per run; beyond it the oldest are dropped and counted.
    """

    name = PLUGIN_NAME
    idempotent = True  # several runs sharing one cluster install it once

    def __init__(self, max_runs: int = 100, max_steps: int = 100_000) -> None:
        self.max_runs = max_runs
        self.max_steps = max_steps
        self.store: RunStore | None = None

    def start(self, scheduler: distributed.Scheduler) -> None:
        """Add the routes to the scheduler's HTTP server and a "Cosim" tab to its dashboard."""
        app = getattr(scheduler, "http_application", None)
        if app is None:
            raise ClusterError("the scheduler has no HTTP server to add the cosim pages to")
        self.store = RunStore(self.max_runs, self.max_steps)
        context = {"dask_nav": True, "served_by": "scheduler",
                   "hosts": _scheduler_hosts(scheduler)}
        app.add_handlers(".*$", routes(self.store, context))
        try:
            # The dashboard's nav bar is rendered from one memoized dict per scheduler; adding
            # to its "pages" puts a "Cosim" tab beside Status, Workers, Tasks, ...
            from distributed.dashboard.scheduler import template_variables

            pages = template_variables(scheduler)["pages"]
            if "cosim" not in pages:
                pages.append("cosim")
        except Exception:  # no bokeh, or a distributed whose internals moved: the routes still work
            logger.debug("could not add a Cosim tab to the dashboard", exc_info=True)

    def log_event(self, topic: str, msg: Any) -> None:
        """Record a publisher's event (every other topic is ignored)."""
        if topic == TOPIC and self.store is not None and isinstance(msg, Mapping):
            self.store.handle(msg)


def _scheduler_hosts(scheduler: distributed.Scheduler) -> list[str]:
    """The host of the scheduler's address: the dashboard link is built from it, so the
    pages answer to that name (see ``_dashboard_store.host_allowed``)."""
    try:
        from distributed.comm.addressing import get_address_host

        return [get_address_host(scheduler.address)]
    except Exception:  # inproc or an unusual address: the machine's names still apply
        return []


class _DriverServer:
    """The fallback: the same pages served by a Tornado server on a thread of the driver."""

    def __init__(self, store: RunStore, address: str, dashboard_link: str | None) -> None:
        host, _, port = address.rpartition(":")
        try:
            # Bound here, on the caller's thread, so a busy port raises at once.
            sockets = netutil.bind_sockets(int(port), address=host or None)
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot serve the dashboard on {address!r}: {exc}") from exc
        self.port = sockets[0].getsockname()[1]
        shown = host if host and host not in ("0.0.0.0", "::") else socket.gethostname()
        self.root = f"http://{shown}:{self.port}/"
        context = {"dask_nav": False, "dashboard_link": dashboard_link, "served_by": "driver",
                   "hosts": [shown]}
        self._app = web.Application(routes(store, context))
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(sockets),), name="cosim-dashboard", daemon=True
        )
        self._thread.start()
        self._ready.wait()

    async def _serve(self, sockets: list[socket.socket]) -> None:
        server = HTTPServer(self._app)
        server.add_sockets(sockets)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        server.stop()
        await server.close_all_connections()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=10)


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
    """Metrics as plain Python numbers (msgpack and JSON need them; numpy scalars are not)."""
    out: dict[str, float | int | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or key == TIME_KEY:
            raise CosimError(f"metric name {key!r} must be a string other than {TIME_KEY!r}")
        if value is None:
            out[key] = None
        elif isinstance(value, numbers.Integral):  # int, bool and numpy integers
            out[key] = int(value)
        elif isinstance(value, numbers.Real):  # float and numpy floats
            number = float(value)
            out[key] = number if math.isfinite(number) else None
        else:
            raise CosimError(f"metric {key!r} must be a real number or None, got {value!r}")
    return out


def _clean_info(info: Mapping[str, Any] | None) -> dict[str, str | int | float | None]:
    """``info`` with strings and finite numbers kept as they are, paths as strings."""
    out: dict[str, str | int | float | None] = {}
    for key, value in (info or {}).items():
        if value is None or isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, numbers.Integral):
            out[str(key)] = int(value)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            out[str(key)] = float(value)
        else:
            out[str(key)] = str(value)
    return out


class MetricsPublisher:
    """Publish one training run's metrics to the live dashboard.

    Parameters
    ----------
    client : distributed.Client
        A synchronous client of the cluster that trains.
    run_id : str
        The run's name on the dashboard (letters, digits, ``._-``; :func:`new_run_id` makes one).
        Publishing under an id already on the dashboard starts that run's curves afresh.
    settings : dict, optional
        Training settings shown beside the curves (JSON-compatible; other values become strings).
    info : dict, optional
        What the page shows in its header: ``total_steps`` (the step limit, for "step k of N"
        and the ETA), ``pairs`` (pairs in one pass over the data, for the passes done),
        ``model`` (where the model is written); strings and numbers only.
    serve : {"auto", "scheduler", "driver"}
        Where the page lives: ``"auto"`` tries the scheduler plugin and falls back to the driver;
        ``"scheduler"`` raises :class:`ClusterError` if the plugin cannot be installed;
        ``"driver"`` skips the scheduler.
    fallback_address : str
        ``host:port`` of the driver's server in the fallback (loopback, free port by default).

    Attributes
    ----------
    url : str
        The one URL to print: this run's live page.
    json_url : str
        This run's JSON route.
    runs_url : str
        The JSON listing of all runs.
    served_by : {"scheduler", "driver"}
        Where the page is served.
    hint : str or None
        In the fallback, one line on how to get the page on the Dask dashboard instead.
    """

    def __init__(
        self,
        client: distributed.Client,
        run_id: str,
        *,
        settings: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        serve: Literal["auto", "scheduler", "driver"] = "auto",
        fallback_address: str = DEFAULT_FALLBACK_ADDRESS,
    ) -> None:
        if not is_valid_run_id(run_id):
            raise CosimError(f"run id {run_id!r} must match {RUN_ID_PATTERN} (letters, digits ._-)")
        if serve not in ("auto", "scheduler", "driver"):
            raise CosimError(f"serve={serve!r} must be one of 'auto', 'scheduler', 'driver'")
        self.client = client
        self.run_id = run_id
        self.hint: str | None = None
        self._closed = False
        self._warned = False
        self._store: RunStore | None = None
        self._server: _DriverServer | None = None
        try:
            link: str | None = dashboard_url(client)
        except ClusterError:
            link = None

        reason = "serve='driver' was asked for"
        if serve != "driver":
            reason = self._install_plugin(link)
            if reason and serve == "scheduler":
                raise ClusterError(f"cannot show the dashboard on the scheduler: {reason}")
        if reason is None:
            assert link is not None
            self.served_by: Literal["scheduler", "driver"] = "scheduler"
            root = _dashboard_root(link)
        else:
            self.served_by = "driver"
            self._store = RunStore()
            self._server = _DriverServer(self._store, fallback_address, link)
            root = self._server.root
            if serve == "auto":
                self.hint = f"live dashboard served by this process ({reason}); {_INSTALL_HINT}"
                logger.warning("%s", self.hint)
        self.url = f"{root}cosim/runs/{run_id}"
        self.json_url = f"{root}cosim/api/runs/{run_id}"
        self.runs_url = f"{root}cosim/api/runs"
        clean = json.loads(json.dumps(dict(settings or {}), default=str))
        self._send({"kind": "start", "settings": clean, "info": _clean_info(info)})

    def _install_plugin(self, link: str | None) -> str | None:
        """Install the plugin (once per scheduler); the reason it failed, or None."""
        if link is None:
            return "the scheduler runs no dashboard"
        try:
            guarded(self.client, lambda: self.client.register_plugin(CosimDashboardPlugin(),
                                                                     name=PLUGIN_NAME),
                    "installing the cosim plugin on the scheduler")
        except SchedulerLostError:
            raise
        except (ImportError, AttributeError) as exc:
            # Unpickling the plugin on the scheduler imports cosim_dask.
            return f"the scheduler cannot import cosim_dask: {exc}"
        except Exception as exc:  # any other refusal still must not stop training
            return f"the scheduler refused the cosim plugin: {type(exc).__name__}: {exc}"
        return None

    def _send(self, msg: dict[str, Any]) -> None:
        msg.update(v=PROTOCOL, run=self.run_id, time=time.time())
        if self._store is not None:
            self._store.handle(msg)
            return
        try:
            guarded(self.client, lambda: self.client.log_event(TOPIC, msg),
                    "publishing metrics to the scheduler")
        except SchedulerLostError:
            raise  # the run cannot go on either: let it stop with its own message
        except Exception as exc:
            # Losing the dashboard must not stop training: say so once and go on.
            if not self._warned:
                logger.warning("cannot publish metrics to the dashboard: %s", exc)
                self._warned = True

    def publish(self, metrics: Mapping[str, float | int | None]) -> None:
        """Publish one training step's metrics (one ``log_event``, about a millisecond).

        Parameters
        ----------
        metrics : dict
            ``step``, ``loss``, ``grad_norm``, ``step_seconds``, ``pairs_per_s``, ``val_loss``,
            ``val_auc``, ``step_size`` (None when not computed); other numeric keys get a chart
            of their own. NaN and infinities are shown as missing.
        """
        if self._closed:
            raise CosimError(f"run {self.run_id!r} was closed; start a new MetricsPublisher")
        self._send({"kind": "step", "metrics": _clean_metrics(metrics)})

    def close(self, status: Literal["finished", "failed", "interrupted"] = "finished",
              reason: str | None = None, info: Mapping[str, Any] | None = None) -> None:
        """Mark the run ended; in the driver fallback, also stop the driver's page server.

        ``status``: ``"finished"`` (a stopping rule ended it), ``"failed"`` (an error did) or
        ``"interrupted"`` (a signal did); ``reason`` says which rule, error or signal, in one
        line; ``info`` adds to what the page shows (``model``, ``report``: their paths).
        """
        if self._closed:
            return
        if status not in END_STATUSES:
            raise CosimError(f"status={status!r} must be one of {', '.join(END_STATUSES)}")
        first = None if reason is None else (str(reason).splitlines() or [""])[0]
        self._send({"kind": "end", "status": status, "reason": first,
                    "info": _clean_info(info)})
        self._closed = True
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> MetricsPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
