"""The main job: generate pairs from a hidden metric, train on a LocalCluster with the live
dashboard, evaluate the learned metric against plain cosine similarity, write the report.

Run with `make demo` (or `python pipelines/synthetic.py --help`). Each stage is the `cosim`
command a user would type, so the demo shows exactly what the CLI prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cosim_dask.cli.app import app


def cosim(*args: object) -> None:
    argv = [str(a) for a in args]
    print(f"\n$ cosim {shlex.join(argv)}", flush=True)
    try:
        app(argv, prog_name="cosim", standalone_mode=False)
    except SystemExit as exc:  # typer.Exit from a failing command
        if exc.code:
            raise
    except Exception as exc:  # click's own usage errors
        sys.exit(f"stage failed: {exc}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="folder for the store and the model (default: demo-output)")
    parser.add_argument("--pairs", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8, help="rank of the hidden metric")
    parser.add_argument("--noise", type=float, default=0.3,
                        help="noise on the hidden similarity before its sign is taken")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=None,
                        help="LocalCluster workers (default: cosim's, 2); not with a scheduler "
                             "in DASK_SCHEDULER_ADDRESS, whose own workers are used")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    store, model = args.out / "pairs.zarr", args.out / "model.zarr"
    cosim("generate", store, "--pairs", args.pairs, "--dim", args.dim, "--rank", args.rank,
          "--noise", args.noise, "--targets", "binary", "--seed", 0, "--overwrite")
    cosim("info", store)
    # cosim refuses LocalCluster options beside a scheduler: pass --workers only if given.
    workers = () if args.workers is None else ("--workers", args.workers)
    cosim("train", store, "--out", model, "--steps", args.steps, "--validation", 0.1,
          *workers, "--overwrite")
    cosim("evaluate", model, store, *workers)
    cosim("report", model, "--out", args.out / "report.html", "--overwrite")
    print(f"\nThe store and the model are in {args.out}/. Next: `cosim transform {model} "
          "EMBEDDINGS.npy OUT.npy` maps vectors so plain cosine equals the learned similarity.")


if __name__ == "__main__":
    main()
