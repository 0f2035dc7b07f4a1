#!/usr/bin/env python3
"""Where a training run's time goes around its passes, from the workers' task stream.

For one `train_store` run on a 2-worker LocalCluster (data in cluster memory), prints:

- pass         median span of a pass's chunk tasks on the workers (first start to last end);
- between      median time from the end of one pass's tasks to the start of the next's (the
               driver's results fetch, solver math, parameter send, graph, scheduling);
- final        the end of the last training pass to `train_store` returning: the final
               figures (one evaluation pass) and the model write;
- to eval      of which: from there to the start of the evaluation pass's tasks;
- eval pass    the span of the final figures' evaluation pass alone;
- after eval   the end of that pass to `train_store` returning (figures, model write).

Usage: python scripts/bench_overhead.py STORE [--repeats N] [--steps S]
Make STORE with e.g. `cosim generate pairs.zarr --pairs 200000 --dim 64 --rank 8 --noise 0.3
--targets binary`. Absolute seconds depend on the machine's load; compare ratios in one run.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster, get_task_stream

from cosim_dask.fit.config import RunOptions, TrainConfig
from cosim_dask.fit.train import train_store


def spans(stream: list[dict]) -> list[tuple[float, float, str]]:
    """(first start, last end, kind) of each pass's chunk tasks, in time order."""
    by_token: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    kinds = {}
    for record in stream:
        parts = str(record["key"]).split("-")
        if len(parts) < 3 or parts[0] != "cosim" or parts[1] not in ("chunk", "run"):
            continue
        for s in record["startstops"]:
            if s["action"] == "compute":
                by_token[parts[2]].append((s["start"], s["stop"]))
    for token, times in by_token.items():
        kinds[token] = (min(a for a, _ in times), max(b for _, b in times))
    return sorted((a, b, token) for token, (a, b) in kinds.items())


def one_run(client: Client, store: str, out: Path, steps: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(steps=steps, validation=0.1)
    with get_task_stream(client) as stream:
        result = train_store(store, str(out), config, client=client,
                             options=RunOptions(cache="memory"), dashboard=False)
        returned = time.time()
    passes = spans(stream.data)
    training, evaluation = passes[:-1], passes[-1]
    return {
        "steps": result.state.step,
        "passes": len(training),
        "pass": statistics.median(b - a for a, b, _ in training),
        "between": statistics.median(training[i + 1][0] - training[i][1]
                                     for i in range(len(training) - 1)),
        "final": returned - training[-1][1],
        "to eval": evaluation[0] - training[-1][1],
        "eval pass": evaluation[1] - evaluation[0],
        "after eval": returned - evaluation[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                         dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        rows = [one_run(client, args.store, Path(tmp) / "m.zarr", args.steps)
                for _ in range(args.repeats)]
    for key in rows[0]:
        values = [r[key] for r in rows]
        shown = (f"{statistics.median(values):.3f} s" if isinstance(values[0], float)
                 else str(values[0]))
        runs = ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values)
        print(f"{key:10s} {shown}   ({runs})")
    ratio = statistics.median(r["between"] / r["pass"] for r in rows)
    print(f"between / pass {ratio:.2f};  final / pass "
          f"{statistics.median(r['final'] / r['pass'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
