#!/usr/bin/env python3
"""Benchmark the chunk partial (loss + symmetric gradient) against what it is made of.

For each d, float32 pairs, and each threading mode, timed side by side in one run:

* ``fwd GEMM``  [X; Y] @ A alone (float32, into a preallocated output): the product every
  formulation pays, and the denominator of the ``×GEMM`` ratio;
* ``partial``   :func:`cosim_dask.core.kernel.chunk_partial` (MSE loss), the whole partial;
* ``factor``    :func:`cosim_dask.core.kernel.factor_chunk_partial` at k = d/4;
* ``torch``     PyTorch CPU autograd of the same summed MSE loss with respect to a symmetric A
  (A enters as (A + Aᵀ)/2), if torch is importable (``pip install torch==2.13.0``);
* ``loop``      a per-pair Python loop over the seed's per-element formula, on a small b;
* ``neg K``     (``--negatives K ...``, one thread) the partial with K in-chunk negatives per
  pair (:func:`cosim_dask.core.negatives.augmented_partial`), per augmented pair (b·(K + 1)).

Threading modes: ``1 thread`` (BLAS and torch at one thread), ``2 BLAS thr`` (BLAS/torch at two
threads), ``2 py thr`` (two Python threads, each on half of the pairs, BLAS at one thread).

Every repeat runs all variants of a mode back to back (interleaved), and the figures are
medians over repeats, so the ratios compare runs under the same machine load; absolute
times on a shared machine are noisy. FLOP counts are nominal (GEMM/SYRK work only):
fwd GEMM 4bd², partial 6bd² (forward + two SYRKs), factor 8bdk, torch 8bd² (forward GEMM
and its backward GEMM), loop: partial's 6bd².

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE can force a slower OpenBLAS kernel or block size; unless
``--keep-blas-env`` is given this script re-executes itself once with both removed from its
own environment (before NumPy is imported) and says so. Tests and CI never do this.

Usage: ``python scripts/bench_kernel.py [--quick] [--dims 32 128 512] [--pairs N]``.
"""

from __future__ import annotations

import os
import sys

_BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REEXEC_MARK = "COSIM_BENCH_REEXECED"


def _reexec_without_blas_env() -> None:
    """Re-exec this script once without the OpenBLAS overrides (only this process tree)."""
    if "--keep-blas-env" in sys.argv or os.environ.get(_REEXEC_MARK):
        return
    found = {k: os.environ[k] for k in _BLAS_ENV if k in os.environ}
    if not found:
        return
    env = {k: v for k, v in os.environ.items() if k not in _BLAS_ENV}
    env[_REEXEC_MARK] = ";".join(f"{k}={v}" for k, v in found.items())
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _reexec_without_blas_env()

import argparse  # noqa: E402  (after the re-exec: nothing heavy may load before it)
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from functools import reduce  # noqa: E402
from operator import add  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from cosim_dask.core.kernel import (  # noqa: E402
    as_pair_arrays,
    chunk_partial,
    factor_chunk_partial,
)
from cosim_dask.core.losses import get_loss  # noqa: E402
from cosim_dask.core.negatives import augmented_partial, negative_partners  # noqa: E402

try:  # optional bench extra, never a core dependency
    import torch  # noqa: E402
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

MODES = ("1 thread", "2 BLAS thr", "2 py thr")


# ----------------------------------------------------------------------------- variants
def seed_loop_partial(x: np.ndarray, y: np.ndarray, t: np.ndarray, A: np.ndarray):
    """Per-pair Python loop, the seed's per-element formula (symmetrised), MSE loss."""
    A = np.asarray(A, dtype=np.float64)
    grad = np.zeros_like(A)
    total = 0.0
    for xi, yi, ti in zip(x.astype(np.float64), y.astype(np.float64), t, strict=True):
        xa, ya = A @ xi, A @ yi
        n, m, cross = xi @ xa, yi @ ya, xi @ ya
        nm = n * m
        s = cross / np.sqrt(nm)
        total += (s - ti) ** 2
        untied = (2.0 * nm * np.outer(yi, xi) - cross * m * np.outer(xi, xi)
                  - cross * n * np.outer(yi, yi)) / (2.0 * nm**1.5)
        grad += 2.0 * (s - ti) * 0.5 * (untied + untied.T)
    return total, grad


def make_torch_partial(z: np.ndarray, t: np.ndarray, A32: np.ndarray):
    """Autograd of Σ (s − t)² w.r.t. a symmetric A; x, y are views of one stacked tensor so
    that torch runs one forward GEMM and one backward GEMM (its best case)."""
    b = z.shape[0] // 2
    zt = torch.from_numpy(z)
    tt = torch.from_numpy(t.astype(np.float32))

    def run():
        a = torch.tensor(A32, requires_grad=True)
        s_mat = 0.5 * (a + a.T)
        za = zt @ s_mat
        xt, yt, xa, ya = zt[:b], zt[b:], za[:b], za[b:]
        n = (xt * xa).sum(1)
        m = (yt * ya).sum(1)
        cross = (xt * ya).sum(1)
        s = cross * torch.rsqrt(n * m)
        loss = ((s - tt) ** 2).sum()
        loss.backward()
        return float(loss.detach()), a.grad

    return run


class Case:
    """Data and callables for one d and one threading mode."""

    def __init__(self, d: int, b: int, b_loop: int, mode: str, pool: ThreadPoolExecutor,
                 negatives: tuple[int, ...] = ()):
        rng = np.random.default_rng(d)
        self.negatives = negatives
        self.d, self.b, self.b_loop, self.mode = d, b, b_loop, mode
        self.k = max(1, d // 4)
        # Both halves of one stacked array: x, y are contiguous views (the fwd GEMM baseline
        # multiplies the same memory the partial reads).
        self.z = rng.standard_normal((2 * b, d), dtype=np.float32)
        self.x, self.y = self.z[:b], self.z[b:]
        self.t = np.clip(rng.normal(0.2, 0.5, b), -1, 1)
        g = rng.standard_normal((d, d)) / np.sqrt(d)
        self.A = g.T @ g + 0.5 * np.eye(d)
        self.A32 = self.A.astype(np.float32)
        self.M = rng.standard_normal((self.k, d)) / np.sqrt(d)
        self.out = np.empty_like(self.z)
        self.pool = pool
        self.halves = [slice(0, b // 2), slice(b // 2, b)]
        self.torch_fn = make_torch_partial(self.z, self.t, self.A32) if torch else None
        if torch and mode == "2 py thr":
            self.torch_half = []
            for h in self.halves:
                zh = np.concatenate([self.x[h], self.y[h]])
                self.torch_half.append(make_torch_partial(zh, self.t[h], self.A32))

    # Each variant returns nothing useful; it is timed as a whole.
    def variants(self) -> dict[str, Callable[[], object]]:
        x, y, t, A, z, out = self.x, self.y, self.t, self.A, self.z, self.out
        if self.mode == "2 py thr":
            ps = self.pool

            def split(fn):
                return lambda: [f.result() for f in [ps.submit(fn, h) for h in self.halves]]

            zs = [np.concatenate([x[h], y[h]]) for h in self.halves]
            outs = [np.empty_like(zh) for zh in zs]
            v = {
                "fwd GEMM": lambda: [
                    f.result() for f in
                    [ps.submit(np.matmul, zs[i], self.A32, out=outs[i]) for i in range(2)]
                ],
                "partial": lambda: reduce(
                    add, split(lambda h: chunk_partial(x[h], y[h], t[h], A))()
                ),
                "factor": lambda: reduce(
                    add, split(lambda h: factor_chunk_partial(x[h], y[h], t[h], self.M))()
                ),
            }
            if torch:
                v["torch"] = lambda: [
                    f.result() for f in [ps.submit(fn) for fn in self.torch_half]
                ]
            return v
        v = {
            "fwd GEMM": lambda: np.matmul(z, self.A32, out=out),
            "partial": lambda: chunk_partial(x, y, t, A),
            "factor": lambda: factor_chunk_partial(x, y, t, self.M),
        }
        if torch:
            v["torch"] = self.torch_fn
        if self.mode == "1 thread":
            bl = self.b_loop
            v["loop"] = lambda: seed_loop_partial(x[:bl], y[:bl], t[:bl], A)
            loss = get_loss("mse", negative_target=0.0)
            for K in self.negatives:
                partners = negative_partners(np.ones(self.b, bool), K, 0, 0)
                v[f"neg {K}"] = (lambda p=partners: augmented_partial(
                    *as_pair_arrays(x, y, np.ones(self.b)), A, loss, p, via_factor=False))
        return v

    def pairs(self, name: str) -> int:
        if name.startswith("neg "):
            return self.b * (int(name.split()[1]) + 1)
        return self.b_loop if name == "loop" else self.b

    def flops(self, name: str) -> float:
        b, d, k = self.pairs(name), self.d, self.k
        if name.startswith("neg "):  # forward 4bd², then one GEMM of (K + 2)·b rows
            K = int(name.split()[1])
            return (4 + 2 * (K + 2)) * self.b * d * d
        return {"fwd GEMM": 4 * b * d * d, "partial": 6 * b * d * d, "factor": 8 * b * d * k,
                "torch": 8 * b * d * d, "loop": 6 * b * d * d}[name]

    def check(self) -> list[str]:
        """Correctness of the compared variants against chunk_partial (not timed)."""
        notes = []
        bl = min(self.b_loop, 256)
        ref = chunk_partial(self.x[:bl], self.y[:bl], self.t[:bl], self.A)
        loss, grad = seed_loop_partial(self.x[:bl], self.y[:bl], self.t[:bl], self.A)
        notes.append(f"loop vs partial rel.err {_rel(grad, ref.grad):.1e}")
        if torch:
            ref = chunk_partial(self.x, self.y, self.t, self.A)
            tl, tg = self.torch_fn()
            notes.append(f"torch vs partial rel.err {_rel(tg.numpy(), ref.grad):.1e} "
                         f"(loss {abs(tl - ref.loss) / abs(ref.loss):.1e})")
        return notes


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- timing
def set_threads(mode: str):
    n = 2 if mode == "2 BLAS thr" else 1
    if torch:
        torch.set_num_threads(n)
    return threadpool_limits(limits=n)


def time_case(case: Case, repeats: int) -> dict[str, float]:
    if case.mode == "2 BLAS thr":
        # BLAS threads on cores shared with other work collapse (tens of times slower), and
        # then this mode alone would blow the time budget: three repeats.
        repeats = min(repeats, 3)
    with set_threads(case.mode):
        fns = case.variants()
        for name, fn in fns.items():  # warm-up: first touch of buffers, BLAS thread start-up
            if name != "loop":
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(repeats):
            # Interleave the variants and rotate their order, so drift in the machine's load
            # hits all of them alike.
            names = list(fns)
            names = names[r % len(names):] + names[: r % len(names)]
            for name in names:
                if name == "loop" and r >= 3:
                    continue  # the loop is slow and steady; three repeats are plenty
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def default_pairs(d: int) -> int:
    # 65,536 pairs, fewer at large d: b·d ≤ 2²³ keeps each of x, y at 32 MB and torch's
    # autograd intermediates (several b × d arrays) well inside memory and the time budget.
    return min(65_536, 2**23 // d)


def blas_report() -> list[str]:
    lines = []
    for info in threadpool_info():
        lines.append(
            f"  {info.get('internal_api')} {info.get('version')} "
            f"kernel/arch={info.get('architecture', '-')} threads={info.get('num_threads')} "
            f"layer={info.get('threading_layer', '-')} ({os.path.basename(info['filepath'])})"
        )
    if torch:
        cfg = torch.__config__.show()
        mkl = [ln.strip(" -") for ln in cfg.splitlines() if "Math Kernel Library" in ln]
        blas = [w.strip(" ,") for w in cfg.split() if w.startswith("BLAS_INFO=")]
        lines.append(f"  torch {torch.__version__}: {' '.join(blas) or 'BLAS_INFO ?'}; "
                     f"{mkl[0] if mkl else ''} (intra-op threads set per mode)")
    return lines


def env_report() -> str:
    done = os.environ.get(_REEXEC_MARK)
    if done:
        return f"re-executed without {done} (this benchmark's process only)"
    present = {k: os.environ[k] for k in _BLAS_ENV if k in os.environ}
    if present:
        return f"kept {present} (--keep-blas-env)"
    return "OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE not set; nothing changed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--pairs", type=int, default=None,
                    help="pairs per chunk (default 65,536, capped at b·d ≤ 2²³)")
    ap.add_argument("--loop-pairs", type=int, default=None,
                    help="pairs for the Python loop (default 512, 256 at d = 512)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--negatives", type=int, nargs="*", default=[],
                    help="also time in-chunk negatives with these K (one thread)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4,096 pairs, 64 loop pairs, 2 repeats")
    ap.add_argument("--keep-blas-env", action="store_true",
                    help="do not unset OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs = args.pairs or 4096
        args.loop_pairs, args.repeats = 64, 2

    t_start = time.perf_counter()
    print("cosim-dask kernel benchmark, float32, MSE loss")
    print(f"BLAS env: {env_report()}")
    print("BLAS libraries (threadpoolctl):")
    print("\n".join(blas_report()))
    print(f"torch: {'yes ' + torch.__version__ if torch else 'not importable, skipped'}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    print()

    rows = []  # (d, b, mode, name, seconds, pairs/s, GFLOP/s)
    summary = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for d in args.dims:
            b = args.pairs or default_pairs(d)
            b -= b % 2
            for mode in args.modes:
                b_loop = args.loop_pairs or min(512, 2**17 // d)
                case = Case(d, b, min(b_loop, b), mode, pool, tuple(args.negatives))
                if mode == "1 thread":
                    print(f"d={d} b={b} checks: " + "; ".join(case.check()))
                med = time_case(case, args.repeats)
                for name, sec in med.items():
                    rows.append((d, case.pairs(name), mode, name, sec,
                                 case.pairs(name) / sec, case.flops(name) / sec / 1e9))
                per_pair = {k: v / case.pairs(k) for k, v in med.items()}
                summary.append((d, mode, per_pair))
                print(f"  d={d:<4d} {mode:<11s} done, load {os.getloadavg()[0]:.2f}", flush=True)

    print()
    print(f"{'d':>4} {'b':>7} {'mode':<11} {'variant':<9} {'ms':>9} {'pairs/s':>10} "
          f"{'GFLOP/s':>8}")
    for d, b, mode, name, sec, pps, gf in rows:
        print(f"{d:>4} {b:>7} {mode:<11} {name:<9} {sec * 1e3:>9.2f} {pps:>10,.0f} {gf:>8.1f}")

    print()
    print("Ratios (medians, same run; per-pair time for the loop):")
    print(f"{'d':>4} {'mode':<11} {'partial/GEMM':>12} {'torch/partial':>13} "
          f"{'factor/GEMM':>11} {'loop/partial':>12}")
    for d, mode, pp in summary:
        def r(a, b, pp=pp):
            return f"{pp[a] / pp[b]:.2f}" if a in pp and b in pp else "-"
        print(f"{d:>4} {mode:<11} {r('partial', 'fwd GEMM'):>12} {r('torch', 'partial'):>13} "
              f"{r('factor', 'fwd GEMM'):>11} {r('loop', 'partial'):>12}")
    if args.negatives:
        print("In-chunk negatives, time per augmented pair over partial's per pair (1 thread):")
        for d, mode, pp in summary:
            if mode == "1 thread":
                print(f"{d:>4} " + "  ".join(f"K={K}: {pp[f'neg {K}'] / pp['partial']:.2f}"
                                             for K in args.negatives))
    one = {d: pp for d, mode, pp in summary if mode == "1 thread"}
    if 128 in one:
        pp = one[128]
        ok1 = pp["partial"] / pp["fwd GEMM"] <= 2.5
        line = (f"Targets at d=128, 1 thread: partial/GEMM = {pp['partial'] / pp['fwd GEMM']:.2f}"
                f" (≤ 2.5: {'met' if ok1 else 'NOT met'})")
        if "torch" in pp:
            ok2 = pp["torch"] / pp["partial"] >= 1.5
            line += (f"; torch/partial = {pp['torch'] / pp['partial']:.2f}"
                     f" (≥ 1.5: {'met' if ok2 else 'NOT met'})")
        print(line)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"wall {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
