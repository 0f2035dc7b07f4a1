"""The live dashboard: the run store, the JSON routes on a real cluster, the fallback served by
the driver for a real external scheduler that cannot import cosim_dask, and the pages in a real
headless Chromium."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from distributed import Client, LocalCluster

from cosim_dask.dashboard.publisher import (
    PLUGIN_NAME,
    CosimDashboardPlugin,
    MetricsPublisher,
    dashboard_url,
    new_run_id,
)
from cosim_dask.dashboard.runs import ALLOWED_HOSTS_ENV, RunStore, host_allowed
from cosim_dask.data.ingest import generate_store
from cosim_dask.errors import ClusterError, CosimError
from cosim_dask.fit.loop import TrainConfig
from cosim_dask.fit.train import train_store


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def synthetic_step(i: int) -> dict[str, float | int | None]:
    """One step of a made-up training run: validation every 5th step, like the trainer."""
    val = i % 5 == 4
    return {
        "step": i,
        "loss": 1.0 / (1.0 + i) + 0.01 * math.sin(i),
        "grad_norm": 2.0 * 0.9**i,
        "step_seconds": 0.05 + 0.001 * (i % 3),
        "pairs_per_s": 600_000.0 + 1_000.0 * i,
        "val_loss": 1.2 / (1.0 + i) if val else None,
        "val_auc": 0.5 + 0.4 * (1 - 0.9**i) if val else None,
        "step_size": 0.5 if i else None,
    }


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


# ------------------------------------------------------------------------------ the store


def test_store_columns_backfill_ints_and_missing():
    store = RunStore()
    store.handle({"kind": "start", "run": "r1", "time": 1.0, "settings": {"lr": 0.1}})
    store.handle({"kind": "step", "run": "r1", "time": 2.0, "metrics": {"step": 0, "loss": 1.5}})
    store.handle(
        {"kind": "step", "run": "r1", "time": 3.0, "metrics": {"step": 1, "val_auc": 0.75}}
    )
    body = store.run("r1")
    assert body["settings"] == {"lr": 0.1}
    assert body["steps"] == [
        {"wall_time": 2.0, "step": 0, "loss": 1.5, "val_auc": None},
        {"wall_time": 3.0, "step": 1, "loss": None, "val_auc": 0.75},
    ]
    assert isinstance(body["steps"][1]["step"], int)
    assert store.run("r1", since=1)["steps"] == body["steps"][1:]
    assert store.run("nope") is None
    store.handle({"kind": "end", "run": "r1", "time": 4.0})
    assert store.runs()[0]["status"] == "finished"


def test_store_bounds_steps_and_runs():
    store = RunStore(max_runs=2, max_steps=10)
    for i in range(25):
        store.handle({"kind": "step", "run": "a", "time": float(i), "metrics": {"step": i}})
    body = store.run("a")
    assert body["next"] == 25 and body["dropped"] == len(range(25)) - len(body["steps"])
    assert [s["step"] for s in body["steps"]] == list(range(body["dropped"], 25))
    assert len(body["steps"]) <= 11
    store.handle({"kind": "end", "run": "a", "time": 30.0})
    store.handle({"kind": "start", "run": "b", "time": 31.0})
    store.handle({"kind": "start", "run": "c", "time": 32.0})  # evicts the finished run "a"
    assert [r["run_id"] for r in store.runs()] == ["b", "c"]
    store.handle({"kind": "step", "run": "bad/id", "time": 1.0, "metrics": {}})  # ignored
    assert len(store.runs()) == 2


def test_publisher_rejects_bad_input(client):
    with pytest.raises(CosimError, match="run id"):
        MetricsPublisher(client, "no spaces allowed")
    with pytest.raises(CosimError, match="serve="):
        MetricsPublisher(client, "ok", serve="elsewhere")  # type: ignore[arg-type]
    pub = MetricsPublisher(client, new_run_id())
    with pytest.raises(CosimError, match="'loss' must be a real number"):
        pub.publish({"loss": "low"})
    pub.close()
    with pytest.raises(CosimError, match="was closed"):
        pub.publish({"loss": 1.0})


# ------------------------------------------------------------------- on a real LocalCluster


def test_json_route_every_step_in_order_for_two_runs(client):
    base = dashboard_url(client)
    assert base.startswith("http://127.0.0.1:")  # loopback, even though the scheduler is inproc
    a = MetricsPublisher(client, "json-a", settings={"solver": "lbfgs", "rank": 8})
    b = MetricsPublisher(client, "json-b")  # the plugin is installed once, not twice
    assert a.served_by == b.served_by == "scheduler" and a.hint is None
    assert a.url == base.removesuffix("status") + "cosim/runs/json-a"
    plugins = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
    assert plugins.count(PLUGIN_NAME) == 1

    logged: dict[str, list[dict]] = {"json-a": [], "json-b": []}
    for i in range(1_200):  # more than the 1,000 events the scheduler itself keeps per topic
        step = synthetic_step(i)
        a.publish(step)
        logged["json-a"].append(step)
        if i % 2 == 0:
            other = {"step": i // 2, "loss": np.float32(0.5), "grad_norm": np.float64(i)}
            b.publish(other)
            logged["json-b"].append({"step": i // 2, "loss": 0.5, "grad_norm": float(i)})
    a.close()

    for pub in (a, b):
        body = get_json(pub.json_url)
        assert body["run_id"] == pub.run_id and body["n_steps"] == len(logged[pub.run_id])
        got = [{k: v for k, v in s.items() if k != "wall_time"} for s in body["steps"]]
        assert got == logged[pub.run_id]
        times = [s["wall_time"] for s in body["steps"]]
        assert times == sorted(times)
    assert get_json(a.json_url)["status"] == "finished"
    assert get_json(a.json_url)["settings"] == {"solver": "lbfgs", "rank": 8}
    assert get_json(b.json_url)["status"] == "running"
    tail = get_json(a.json_url + "?since=1195")
    assert [s["step"] for s in tail["steps"]] == list(range(1195, 1200)) and tail["next"] == 1200

    runs = {r["run_id"]: r for r in get_json(a.runs_url)["runs"]}
    assert {"json-a", "json-b"} <= set(runs)
    assert runs["json-a"]["last"]["step"] == 1199
    assert runs["json-a"]["json"] == "cosim/api/runs/json-a"

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(a.json_url.replace("json-a", "json-zzz"), timeout=10)
    assert err.value.code == 404
    err.value.close()
    # The Dask dashboard itself links to the cosim pages: a "Cosim" tab in its nav bar.
    with urllib.request.urlopen(base, timeout=10) as response:
        assert b'href="cosim"' in response.read()
    b.close()


@pytest.mark.slow
def test_worker_processes_cluster_and_real_tasks():
    """Processes for workers, real tasks between steps, the route as a script would poll it."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as c,
        MetricsPublisher(c, "procs", settings={"workers": 2}) as pub,
    ):
        for i in range(20):
            keys = [f"square-{i}-{k}" for k in range(4)]
            total = sum(c.gather(c.map(lambda k: k * k, range(4), key=keys)))
            pub.publish({"step": i, "loss": float(total) / (i + 1)})
        body = get_json(pub.json_url)
        assert [s["step"] for s in body["steps"]] == list(range(20))
        assert body["steps"][-1]["loss"] == pytest.approx(14 / 20)


# ------------------------------------------- Host header: no answer to a DNS-rebinding page


def http_get(url: str, host: str | None = None) -> tuple[int, bytes]:
    """GET ``url`` with the given ``Host`` header (the URL's own when None)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def routes_of(page_url: str) -> list[str]:
    """The run's page, its JSON route, the runs listing and the index, from its page URL."""
    root = page_url.split("cosim/runs/")[0]
    run_id = page_url.rsplit("/", 1)[1]
    return [page_url, f"{root}cosim/api/runs/{run_id}", f"{root}cosim/api/runs",
            f"{root}cosim"]


def assert_only_own_host(page_url: str, secret: str) -> None:
    port = urlsplit(page_url).port
    for url in routes_of(page_url):
        status, body = http_get(url)
        assert status == 200, (url, body)
        assert http_get(url, f"localhost:{port}")[0] == 200
        for foreign in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}",
                        f"127.0.0.1.evil.example:{port}", f"localhost.:{port + 1}"):
            status, body = http_get(url, foreign)
            assert status == 403, (url, foreign, status)
            assert secret.encode() not in body and b"evil" not in body


def test_live_page_of_a_training_run_answers_only_for_its_host(client, tmp_path):
    store = tmp_path / "secret-pairs.zarr"
    generate_store(store, pairs=600, dim=4, rank=2, targets="binary", seed=3, chunk_rows=300)
    started: dict[str, Any] = {}
    train_store(str(store), str(tmp_path / "m.zarr"), TrainConfig(steps=2), client=client,
                on_start=started.update, run_id="host-check")
    assert started["live_url"].startswith("http://127.0.0.1:")
    body = json.loads(http_get(routes_of(started["live_url"])[1])[1])
    assert body["settings"]["store"] == str(store)  # what a rebinding page was after
    assert_only_own_host(started["live_url"], "secret-pairs")


def test_driver_page_answers_only_for_its_host(client, monkeypatch):
    with MetricsPublisher(client, "driver-host", serve="driver",
                          settings={"store": "/data/secret-pairs.zarr"}) as pub:
        pub.publish(synthetic_step(0))
        assert_only_own_host(pub.url, "secret-pairs")
        # A proxy that passes on its own Host is let in by name, on purpose.
        monkeypatch.setenv(ALLOWED_HOSTS_ENV, "proxy.example")
        assert http_get(pub.json_url, "proxy.example:443")[0] == 200
        assert http_get(pub.json_url, "evil.example")[0] == 403


def test_host_allowed_rules():
    loop, lan = ("127.0.0.1", 8787), ("10.1.2.3", 8787)
    assert host_allowed("127.0.0.1:8787", loop) and host_allowed("LOCALHOST:8787", loop)
    assert host_allowed("[::1]:8787", ("::1", 8787))
    assert host_allowed("localhost:8787", ("::ffff:127.0.0.1", 8787))  # dual-stack socket
    assert not host_allowed("10.1.2.3:8787", loop)  # loopback answers to loopback names
    assert not host_allowed("localhost", loop)  # port 80 implied, served on 8787
    assert not host_allowed(None, loop) and not host_allowed("", loop)
    assert not host_allowed("localhost:8787:1", loop) and not host_allowed("localhost:x", loop)
    assert host_allowed("10.1.2.3:8787", lan)
    assert host_allowed("sched.internal:8787", lan, names=["sched.internal"])
    assert not host_allowed("localhost:8787", lan) and not host_allowed("evil.example:8787", lan)
    assert host_allowed("evil.example:1", lan, extra="*")
    assert host_allowed("proxy.example:9", lan, extra="a, proxy.example:9")
    assert not host_allowed("proxy.example:8", lan, extra="proxy.example:9")


# ------------------------------------------------- an external scheduler without cosim_dask


@pytest.fixture
def scheduler_without_cosim(tmp_path):
    """A real ``dask scheduler`` process on loopback in which ``import cosim_dask`` fails."""
    blocker = tmp_path / "block_cosim.py"
    # None in sys.modules makes every later ``import cosim_dask`` raise ModuleNotFoundError,
    # as on a scheduler whose environment lacks the package.
    blocker.write_text("import sys\nsys.modules['cosim_dask'] = None\n")
    scheduler_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "distributed.cli.dask_scheduler",
            "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
            "--preload", str(blocker), "--scheduler-file", str(scheduler_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists():
            assert proc.poll() is None, "dask scheduler exited"
            assert time.monotonic() < deadline, "dask scheduler did not start in 30 s"
            time.sleep(0.05)
        with Client(scheduler_file=str(scheduler_file), timeout=30) as c:
            yield c
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_external_scheduler_without_cosim_falls_back_to_driver(scheduler_without_cosim):
    c = scheduler_without_cosim
    with pytest.raises(ClusterError, match="cannot import cosim_dask"):
        MetricsPublisher(c, "strict", serve="scheduler")
    with MetricsPublisher(c, "fallback", settings={"k": 1}) as pub:
        assert pub.served_by == "driver"
        assert "install cosim-dask in the scheduler's environment" in pub.hint
        assert pub.url.startswith("http://127.0.0.1:") and pub.url.endswith("/cosim/runs/fallback")
        for i in range(30):
            pub.publish(synthetic_step(i))
        body = get_json(pub.json_url)
        assert [s["step"] for s in body["steps"]] == list(range(30))
        assert get_json(pub.runs_url)["runs"][0]["run_id"] == "fallback"
        # The Dask dashboard link still works (asked with a function sent by value).
        assert dashboard_url(c).startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.URLError):  # close() stopped the driver's server
        urllib.request.urlopen(pub.json_url, timeout=5)


# -------------------------------------------------------------------- in a real browser




def publish_in_background(
    pub: MetricsPublisher, steps: range, pause: float, logged: list[dict]
) -> threading.Thread:
    def run() -> None:
        for i in steps:
            step = synthetic_step(i)
            pub.publish(step)
            logged.append(step)
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def watch_live_page(browser, pub: MetricsPublisher, n: int, screenshot: Path) -> list[int]:
    """Open the page while ``n`` steps are published; check the curves hold the logged values."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    logged = [synthetic_step(0)]
    pub.publish(logged[0])
    page.goto(pub.url + "?interval=100")
    loss = page.locator('#chart-loss path.series[data-key="loss"]')
    # A one-point path has no extent, so Playwright would call it hidden: wait for it in the DOM.
    loss.wait_for(state="attached")  # the page drew the first step: now the run goes on
    thread = publish_in_background(pub, range(1, n), pause=0.05, logged=logged)
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:  # sample the curve while it grows
        seen.append(int(loss.get_attribute("data-n")))
        time.sleep(0.15)
    thread.join()
    page.wait_for_function(
        f"() => document.querySelector('#status').dataset.nSteps === '{n}'", timeout=10_000
    )

    def plotted(chart: str, key: str) -> tuple[list, list]:
        path = page.locator(f'#chart-{chart} path.series[data-key="{key}"]')
        return json.loads(path.get_attribute("data-x")), json.loads(path.get_attribute("data-y"))

    for chart, key in [
        ("loss", "loss"),
        ("loss", "val_loss"),
        ("val_auc", "val_auc"),
        ("grad_norm", "grad_norm"),
        ("step_size", "step_size"),
        ("pairs_per_s", "pairs_per_s"),
        ("step_seconds", "step_seconds"),
    ]:
        xs, ys = plotted(chart, key)
        expected = [(s["step"], s[key]) for s in logged if s[key] is not None]
        assert list(zip(xs, ys, strict=True)) == expected, key
    assert page.locator("#latest td[data-key='step']").inner_text() == str(n - 1)
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    assert not problems, problems
    return seen


@pytest.mark.slow
def test_live_page_on_the_dask_dashboard(browser, client, tmp_path):
    first = MetricsPublisher(client, "live-1", settings={"solver": "lbfgs"})
    second = MetricsPublisher(client, "live-2")
    for i in range(5):  # a second run on the same cluster: its own page, its own curves
        second.publish({"step": i, "loss": 10.0 + i})
    n = 40
    seen = watch_live_page(browser, first, n, tmp_path / "live.png")
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # the curves grew while we watched
    assert (tmp_path / "live.png").stat().st_size > 10_000

    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(second.url + "?interval=100")
    path = page.locator('#chart-loss path.series[data-key="loss"]')
    path.wait_for()
    assert json.loads(path.get_attribute("data-y")) == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert page.locator('#nav a[href="../../status"]').count() == 1  # back to Dask's pages
    page.goto(first.url.replace("runs/live-1", ""))  # the index lists both runs
    page.locator('tr[data-run-id="live-2"]').wait_for()
    assert page.locator('tr[data-run-id="live-1"]').count() == 1
    page.close()
    assert not problems, problems
    first.close()
    second.close()


@pytest.mark.slow
def test_live_page_served_by_the_driver(browser, client, tmp_path):
    with MetricsPublisher(client, "driver-run", serve="driver") as pub:
        assert pub.served_by == "driver"
        watch_live_page(browser, pub, 25, tmp_path / "driver.png")
    assert (tmp_path / "driver.png").stat().st_size > 10_000


def test_plugin_is_idempotent_by_name():
    assert CosimDashboardPlugin.idempotent is True
    assert CosimDashboardPlugin().name == PLUGIN_NAME


# ----------------------------------------------- the page tells the whole story, in Chromium

E_NOTATION = re.compile(r"\d[eE][+-]?\d")


def page_facts(page) -> dict[str, Any]:
    """What the live page shows: header texts, table headers, chart ids and tick labels."""
    return page.evaluate("""() => {
      const text = id => (document.getElementById(id) || {}).textContent || "";
      const charts = {};
      for (const box of document.querySelectorAll("#charts .chart")) {
        charts[box.dataset.chart] = {
          title: box.querySelector("h2").textContent,
          legend: box.querySelector(".legend").textContent,
          x: [...box.querySelectorAll("text.x-tick")].map(t => t.textContent),
          y: [...box.querySelectorAll("text.y-tick")].map(t => t.textContent)};
      }
      return {status: document.getElementById("status").dataset.status,
              status_text: text("status"), progress: text("progress"), elapsed: text("elapsed"),
              eta: text("eta"), throughput: text("throughput"), passes: text("passes"),
              reason: text("reason"), where: text("where"), notice: text("notice"),
              headers: [...document.querySelectorAll("#latest th")].map(t => t.textContent),
              body: document.body.innerText, charts};
    }""")


def check_readable(facts: dict[str, Any]) -> None:
    """No raw names, no NaN, no e-notation, no repeated step ticks, only meaningful charts."""
    assert "NaN" not in facts["body"] and "undefined" not in facts["body"], facts["body"]
    assert facts["headers"] and not any("_" in h for h in facts["headers"]), facts["headers"]
    assert "evaluations" not in facts["charts"]
    assert {"loss", "grad_norm", "pairs_per_s", "step_seconds"} <= set(facts["charts"])
    for chart in facts["charts"].values():
        assert "_" not in chart["title"] + chart["legend"], chart
        ticks = chart["x"] + chart["y"]
        assert ticks and not any(E_NOTATION.search(t) or "NaN" in t for t in ticks), chart
        assert len(set(chart["x"])) == len(chart["x"]), chart  # no step tick twice
        assert len(set(chart["y"])) == len(chart["y"]), chart


@pytest.mark.slow
def test_live_page_at_the_start_middle_and_end_of_a_run(browser, cluster_address, tmp_path):
    """A real run on the shared cluster, held at steps 1 and 3 (of 6) by its step callback
    while the page is read and photographed; then its end."""
    store = tmp_path / "s.zarr"
    generate_store(store, pairs=2_000, dim=8, rank=2, targets="binary", seed=5,
                   chunk_rows=500)
    hold = {1: (threading.Event(), threading.Event()), 3: (threading.Event(), threading.Event())}
    started: dict[str, Any] = {}

    def on_step(record: dict) -> None:
        if record["step"] in hold:
            reached, go_on = hold[record["step"]]
            reached.set()
            go_on.wait(30)

    config = TrainConfig(steps=6, solver="gd", lr=0.2, tol=0.0, gtol=0.0, validation=0.2)
    out = tmp_path / "m.zarr"
    errors: list[BaseException] = []

    def train() -> None:
        try:
            with Client(cluster_address, set_as_default=False) as c:
                train_store(str(store), str(out), config, client=c, on_step=on_step,
                            on_start=started.update, run_id="shots")
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    shots = {}
    try:
        for moment, step in (("start", 1), ("middle", 3)):
            reached, go_on = hold[step]
            assert reached.wait(60), errors
            if moment == "start":
                page.goto(started["live_url"] + "?interval=100")
            page.wait_for_function(f"() => document.getElementById('progress').textContent"
                                   f" === 'step {step} of 6'", timeout=10_000)
            page.wait_for_function("() => document.getElementById('eta').textContent !== ''",
                                   timeout=10_000)
            facts = page_facts(page)
            shots[moment] = tmp_path / f"live-{moment}.png"
            page.screenshot(path=str(shots[moment]), full_page=True)
            go_on.set()
            assert facts["status"] == "running" and facts["status_text"] == "running"
            assert re.fullmatch(r"elapsed \d+(\.\d)? s", facts["elapsed"]), facts["elapsed"]
            assert re.fullmatch(r"ETA ≤ \d+(\.\d)? s", facts["eta"]), facts["eta"]
            assert re.fullmatch(r"[\d,]+ pairs/s", facts["throughput"]), facts["throughput"]
            assert re.fullmatch(r"\d+\.\d passes over the 2,000 pairs", facts["passes"]), facts
            assert facts["reason"] == ""
            assert f"model will be written to {out}" in facts["where"]
            check_readable(facts)
        thread.join(60)
        assert not errors, errors
        page.wait_for_function("() => document.getElementById('status').dataset.status"
                               " === 'finished'", timeout=10_000)
        facts = page_facts(page)
        shots["end"] = tmp_path / "live-end.png"
        page.screenshot(path=str(shots["end"]), full_page=True)
    finally:
        for _, go_on in hold.values():
            go_on.set()
        page.close()
    assert facts["progress"] == "step 6 of 6" and facts["eta"] == ""
    assert facts["reason"] == "stopped: max steps"
    assert f"model written to {out}; report: cosim report {out}" in facts["where"]
    check_readable(facts)
    assert not problems, problems
    for shot in shots.values():
        assert shot.stat().st_size > 10_000
    if os.environ.get("COSIM_SHOTS_DIR"):  # to look at them
        for shot in shots.values():
            shutil.copy(shot, os.environ["COSIM_SHOTS_DIR"])


def test_failed_and_interrupted_runs_on_an_external_cluster_say_so(cluster_address, tmp_path):
    store = tmp_path / "s.zarr"
    generate_store(store, pairs=600, dim=4, rank=2, targets="binary", seed=6, chunk_rows=300)
    seen: dict[str, Any] = {}

    def interrupt(record: dict) -> None:
        if record["step"] == 2:
            raise KeyboardInterrupt

    with Client(cluster_address, set_as_default=False) as c:
        with pytest.raises(CosimError, match="diverged"):
            train_store(str(store), str(tmp_path / "a.zarr"),
                        TrainConfig(steps=5, solver="gd", lr=1e9), client=c,
                        on_start=seen.update, run_id="diverges")
        failed = get_json(seen["live_url"].replace("/cosim/runs/", "/cosim/api/runs/"))
        with pytest.raises(KeyboardInterrupt):
            train_store(str(store), str(tmp_path / "b.zarr"), TrainConfig(steps=5, tol=0.0),
                        client=c, on_step=interrupt, on_start=seen.update, run_id="stopped")
        stopped = get_json(seen["live_url"].replace("/cosim/runs/", "/cosim/api/runs/"))
    assert failed["status"] == "failed", failed
    assert "diverged" in failed["reason"] and "\n" not in failed["reason"]
    assert stopped["status"] == "interrupted" and stopped["reason"] == "SIGINT (Ctrl-C)"
    assert stopped["n_steps"] == 3  # steps 0, 1 and 2 were logged


@pytest.mark.slow
def test_after_the_cluster_closes_the_page_keeps_the_end_and_points_to_the_results(
        browser, tmp_path):
    model = str(tmp_path / "m.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        pub = MetricsPublisher(c, "gone", info={"total_steps": 3, "pairs": 100, "model": model})
        for i in range(3):
            pub.publish(synthetic_step(i))
        pub.close("finished", "max steps", info={"report": str(tmp_path / "r.html")})
        page = browser.new_page()
        page.goto(pub.url + "?interval=100")
        page.wait_for_function("() => document.getElementById('status').dataset.status"
                               " === 'finished'", timeout=10_000)
    page.wait_for_function("() => document.getElementById('notice').textContent !== ''",
                           timeout=10_000)
    facts = page_facts(page)
    page.close()
    assert facts["status_text"] == "finished" and facts["reason"] == "stopped: max steps"
    assert "dashboard has closed" in facts["notice"] and "retrying" not in facts["body"]
    assert facts["where"] == f"model written to {model}; report: {tmp_path / 'r.html'}"


@pytest.mark.slow
def test_linger_keeps_a_local_clusters_page_up_with_the_final_state(tmp_path):
    """`cosim train --linger`: after the run the local cluster's page says finished and
    where the model is, until Ctrl-C ends the wait (exit 0, the page is gone)."""
    from helpers import cosim_cmd, wait_for

    store, out, log = tmp_path / "s.zarr", tmp_path / "m.zarr", tmp_path / "stderr.txt"
    generate_store(store, pairs=600, dim=4, rank=2, targets="binary", seed=7, chunk_rows=300)
    with open(log, "w") as err:
        proc = subprocess.Popen(cosim_cmd("train", store, "--out", out, "--steps", "3",
                                          "--workers", "1", "--run-id", "lg", "--linger", "120"),
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        wait_for(lambda: "stays up" in log.read_text(), 120, "the run to end and linger")
        url = re.search(r"(http://\S+/cosim/runs/lg)", log.read_text())[1]
        data = get_json(url.replace("/cosim/runs/", "/cosim/api/runs/"))
        assert data["status"] == "finished" and data["reason"], data
        assert data["info"]["model"] == str(out) and out.exists()
        proc.send_signal(2)  # Ctrl-C ends the wait
        assert proc.wait(60) == 0, log.read_text()
    finally:
        proc.kill()
    with pytest.raises(OSError):
        get_json(url.replace("/cosim/runs/", "/cosim/api/runs/"))
