"""Every bad input the CLI and the Python API handle, in one table.

For each: the exit code (2 for the CLI), one ``error:`` line naming the problem and no
traceback (``--debug`` shows one), and every file that existed before left as it was (all
files of the stores, models and inputs involved are hashed before and after).
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict

import numpy as np
import pytest
import zarr
from helpers import cosim_main, one_line_error, tree_hash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cosim_dask
from cosim_dask.cli.app import app
from cosim_dask.data.ingest import generate_store, ingest_arrays
from cosim_dask.data.store import create_store, open_store
from cosim_dask.errors import (
    CosimError,
    InvalidPairsError,
    ShapeError,
    StoreError,
    UnknownNameError,
)
from cosim_dask.fit.config import LIVE_VALIDATION, TrainConfig
from cosim_dask.fit.model import Model, save_model

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Stores, models and input files, some good and some bad, in one folder."""
    w = tmp_path_factory.mktemp("bad-input")
    generate_store(w / "store.zarr", pairs=2_000, dim=6, rank=2, targets="binary", seed=9,
                   chunk_rows=1_000)
    save_model(w / "model.zarr", Model(A=np.eye(6), attrs={"steps": 0}), overwrite=False)
    save_model(w / "model-d3.zarr", Model(A=np.eye(3)), overwrite=False)
    nan = zarr.open_group(w / "model-nan.zarr", mode="w")
    nan.attrs.update({"format": "cosim-model", "format_version": 1, "d": 2})
    nan.create_array("A", data=np.array([[1.0, np.nan], [np.nan, 1.0]]))
    old = zarr.open_group(w / "model-v9.zarr", mode="w")
    old.attrs.update({"format": "cosim-model", "format_version": 9, "d": 2})
    future = zarr.open_group(w / "store-v9.zarr", mode="w")
    future.attrs.update({"format": "cosim-pairs", "format_version": 9})
    _damaged_models(w)
    _damaged_stores(w)
    (w / "folder").mkdir()
    (w / "folder" / "notes.txt").write_text("not a store\n")
    (w / "not-a-model.bin").write_bytes(b"\x00garbage")
    rng = np.random.default_rng(0)
    np.save(w / "x.npy", rng.standard_normal((50, 6)).astype(np.float32))
    np.save(w / "y.npy", rng.standard_normal((50, 6)).astype(np.float32))
    np.save(w / "t.npy", np.sign(rng.standard_normal(50)).astype(np.float32))
    np.save(w / "xint.npy", np.arange(300).reshape(50, 6))
    np.save(w / "t40.npy", np.ones(40, dtype=np.float32))
    (w / "x.txt").write_text("1,2,3\n")
    (w / "tls.yaml").write_text("distributed: {comm: {tls: {client: {cert: a.pem}}}}\n")
    # A store that holds one of the inputs of a command that would replace it.
    generate_store(w / "sx.zarr", pairs=100, dim=6, rank=2, targets="binary", seed=1)
    np.save(w / "sx.zarr" / "x.npy", rng.standard_normal((50, 6)).astype(np.float32))
    (w / "link-to-store").symlink_to(w / "store.zarr")
    # Positive pairs only (no targets given): training them needs --negatives.
    ingest_arrays(w / "positive.zarr", x=w / "x.npy", y=w / "y.npy", target=None)
    ingest_arrays(w / "negative.zarr", x=w / "x.npy", y=w / "y.npy",
                  target=-np.ones(50, np.float32))
    return w


def _model_with(path, *, A=None, M=None, attrs=None, solver=None):
    """A model file as save_model writes it, holding whatever it is given."""
    save_model(path, Model(A=np.eye(6) if A is None else A, M=M, attrs=attrs or {},
                           solver_state=solver), overwrite=False)


def _damaged_models(w):
    """Model files damaged the ways a disk, a copy or a hand edit damages them."""
    rng = np.random.default_rng(3)
    _model_with(w / "model-no-chunk.zarr", A=np.eye(6) * 2)
    (w / "model-no-chunk.zarr" / "A" / "c" / "0" / "0").unlink()  # zarr would read A = 0
    _model_with(w / "model-no-M-chunk.zarr", A=np.eye(6), M=np.eye(6))
    (w / "model-no-M-chunk.zarr" / "M" / "c" / "0" / "0").unlink()
    skew = np.eye(6)
    skew[0, 1] = 0.5
    _model_with(w / "model-asym.zarr", A=skew)
    _model_with(w / "model-indefinite.zarr", A=np.diag([1.0, 1, 1, 1, 1, -1]))
    M = rng.standard_normal((3, 6))
    _model_with(w / "model-M-nan.zarr", A=M.T @ M, M=np.where(np.eye(3, 6) > 0, np.nan, M))
    # save_model writes NaN attributes as null, so the NaN goes into M's chunk by hand.
    bad = zarr.open_group(w / "model-M-nan.zarr", mode="r+")
    bad["M"][0, 0] = np.nan
    _model_with(w / "model-history-str.zarr", attrs={"history": "step 1: loss 0.3"})
    _model_with(w / "model-history-junk.zarr", attrs={"history": [{"step": 1, "loss": "low"}]})
    _model_with(w / "model-settings-list.zarr", attrs={"settings": ["mse", "factor"]})
    _model_with(w / "model-settings-type.zarr", attrs={"settings": {"loss": 3, "seed": 0}})
    _model_with(w / "model-negatives-huge.zarr", attrs={"settings": {"negatives": 10**9}})
    _model_with(w / "model-steps-str.zarr", attrs={"steps": "10"})
    _model_with(w / "model-threshold-str.zarr", attrs={"threshold": "0.5"})
    solver = {"params": np.eye(6), "grad": np.zeros((6, 6)), "loss": 1.0, "iteration": 1}
    _model_with(w / "model-state-keys.zarr", solver=solver,
                attrs={"history": [], "train_state": {"step": 1}})
    _model_with(w / "model-state-none.zarr", solver=solver, attrs={"history": []})
    # A checkpoint that passes every check of a resume but its solver's: no "grad".
    config = TrainConfig(solver="gd", validation=LIVE_VALIDATION)  # cosim train's defaults
    _model_with(w / "model-solver-lacks.zarr", solver={"params": np.eye(6)}, attrs={
        "history": [], "train_state": {"step": 1, "best_score": None, "since_best": 0,
                                       "stop_reason": None},
        "settings": asdict(config), "settings_key": config.key(),
        "store_fingerprint": open_store(w / "store.zarr").fingerprint})


def _damaged_stores(w):
    """Pair stores whose attributes or files contradict each other."""
    shutil.copytree(w / "store.zarr", w / "store-no-chunk.zarr")
    (w / "store-no-chunk.zarr" / "y" / "c" / "1" / "0").unlink()  # zarr would read zeros
    generate_store(w / "graded.zarr", pairs=2_000, dim=6, rank=2, targets="graded", seed=9,
                   chunk_rows=1_000)
    shutil.copytree(w / "graded.zarr", w / "graded-as-binary.zarr")
    zarr.open_group(w / "graded-as-binary.zarr", mode="r+").attrs["targets"] = "binary"
    shutil.copytree(w / "store.zarr", w / "store-stats-str.zarr")
    zarr.open_group(w / "store-stats-str.zarr", mode="r+").attrs["target_stats"] = "lots"
    # x and y in shards of two chunks, target in single chunks: the chunk shapes agree, the
    # files do not cut the rows at the same places.
    with create_store(w / "store-shards.zarr", d=6, chunk_rows=500, shard_chunks=2) as wr:
        rng = np.random.default_rng(5)
        wr.append(rng.standard_normal((2_000, 6)), rng.standard_normal((2_000, 6)),
                  np.sign(rng.standard_normal(2_000)))
    group = zarr.open_group(w / "store-shards.zarr", mode="r+")
    target = group["target"][...]
    group.create_array("target", shape=target.shape, chunks=(500,), dtype="float32",
                       overwrite=True, config={"write_empty_chunks": True})[...] = target
    shutil.copytree(w / "store.zarr", w / "store-x-float64.zarr")
    group = zarr.open_group(w / "store-x-float64.zarr", mode="r+")
    x = group["x"][...]
    group.create_array("x", shape=x.shape, chunks=(1_000, 6), dtype="float64",
                       overwrite=True)[...] = x


S, M, OUT = "{w}/store.zarr", "{w}/model.zarr", "{w}/new.zarr"
TRAIN = ["train", S, "--out", OUT]


def argv_of(command: str, model: str) -> list[str]:
    """The command line that reads ``model`` through ``command``."""
    return {"evaluate": ["evaluate", model, S, "--scheduler", "{sched}"],
            "transform": ["transform", model, "{w}/x.npy", "{w}/xt.npy"],
            "report": ["report", model, "--out", "{w}/r.html"],
            "resume": ["train", S, "--out", model, "--resume"]}[command]


#: (id, argv with {w} for the folder and {sched} for a running scheduler, fragments)
CLI_CASES = [
    ("store-missing", ["train", "{w}/nope.zarr", "--out", OUT], ["nope.zarr", "does not exist"]),
    ("store-is-a-folder", ["train", "{w}/folder", "--out", OUT], ["is not a cosim pair store"]),
    ("store-is-a-model", ["train", M, "--out", OUT], ["is not a cosim pair store", "cosim-model"]),
    ("store-newer-format", ["train", "{w}/store-v9.zarr", "--out", OUT], ["format version 9"]),
    ("steps-negative", [*TRAIN, "--steps", "-1"], ["'--steps'", "greater than or equal to 0"]),
    ("rank-above-d", [*TRAIN, "--rank", "7"], ["rank=7", "d=6"]),
    ("rank-zero", [*TRAIN, "--rank", "0"], ["'--rank'"]),
    ("lr-zero", [*TRAIN, "--lr", "0"], ["--lr 0.0 must be > 0"]),
    ("lr-negative", [*TRAIN, "--lr", "-0.5", "--solver", "gd"], ["--lr -0.5 must be > 0"]),
    ("split-every-1", [*TRAIN, "--split-every", "1"], ["'--split-every'"]),
    ("validation-1", [*TRAIN, "--validation", "1"], ["'--validation'"]),
    ("validation-negative", [*TRAIN, "--validation", "-0.1"], ["'--validation'"]),
    ("checkpoint-every-0", [*TRAIN, "--checkpoint-every", "0"], ["'--checkpoint-every'"]),
    ("patience-0", [*TRAIN, "--patience", "0"], ["'--patience'"]),
    ("steps-not-a-number", [*TRAIN, "--steps", "ten"], ["'--steps'", "integer"]),
    ("unknown-loss", [*TRAIN, "--loss", "hinge"], ["'--loss'", "hinge"]),
    ("unknown-option", [*TRAIN, "--learning-rate", "1"], ["--learning-rate"]),
    ("workers-0", [*TRAIN, "--workers", "0"], ["'--workers'"]),
    ("margin-for-mse", [*TRAIN, "--negative-target", "0", "--loss", "contrastive"],
     ["does not take negative_target"]),
    ("out-exists", ["train", S, "--out", M], ["already exists", "--overwrite"]),
    ("out-folder-missing", ["train", S, "--out", "{w}/no/such/m.zarr"], ["does not exist"]),
    ("resume-nothing", [*TRAIN, "--resume"], ["nothing to resume"]),
    ("resume-and-overwrite", [*TRAIN, "--resume", "--overwrite"], ["contradict"]),
    ("resume-not-a-checkpoint", ["train", S, "--out", M, "--resume"], ["no solver state"]),
    ("security-missing", [*TRAIN, "--security", "{w}/none.yaml"], ["none.yaml", "not exist"]),
    ("security-without-ca", [*TRAIN, "--security", "{w}/tls.yaml"], ["lacks the key 'ca-file'"]),
    ("model-is-a-store", ["evaluate", S, S, "--scheduler", "{sched}"], ["is not a cosim model"]),
    ("model-is-a-file", ["evaluate", "{w}/not-a-model.bin", S, "--scheduler", "{sched}"],
     ["not-a-model.bin", "is not a cosim model"]),
    ("model-missing", ["evaluate", "{w}/none.zarr", S, "--scheduler", "{sched}"],
     ["does not exist"]),
    ("model-nan", ["evaluate", "{w}/model-nan.zarr", S, "--scheduler", "{sched}"],
     ["NaN or Inf"]),
    ("model-newer-format", ["evaluate", "{w}/model-v9.zarr", S, "--scheduler", "{sched}"],
     ["format version 9"]),
    ("model-other-d", ["evaluate", "{w}/model-d3.zarr", S, "--scheduler", "{sched}"],
     ["d=3", "d=6"]),
    # damaged models: one line "is damaged", from every command that reads a model
    *[(f"model-{kind}-{cmd}", [*argv_of(cmd, f"{{w}}/model-{kind}.zarr")], ["is damaged", *frag])
      for kind, frag in (("no-chunk", ["array 'A'", "0 of its 1 chunk files"]),
                         ("asym", ["not symmetric"]),
                         ("indefinite", ["not positive semi-definite", "-1"]))
      for cmd in ("evaluate", "transform", "report", "resume")],
    *[(f"model-{kind}", ["evaluate", f"{{w}}/model-{kind}.zarr", S, "--scheduler", "{sched}"],
       ["is damaged", *frag]) for kind, frag in (
        ("no-M-chunk", ["array 'M'"]),
        ("M-nan", ["M has NaN or Inf"]),
        ("history-str", ["attribute 'history'", "expected a list"]),
        ("history-junk", ["history[0].loss"]),
        ("settings-list", ["attribute 'settings'", "expected a dict"]),
        ("settings-type", ["settings.loss is 3", "expected str"]),
        ("negatives-huge", ["settings.negatives is 1000000000", "expected 0 to 64"]),
        ("steps-str", ["attribute 'steps' is '10'", "expected a count"]),
        ("threshold-str", ["attribute 'threshold'", "number or null"]))],
    *[(f"model-{kind}-resume", ["train", S, "--out", f"{{w}}/model-{kind}.zarr", "--resume",
                                "--solver", "gd"], ["is damaged", *frag]) for kind, frag in (
        ("state-keys", ["train_state has no 'best_score'"]),
        ("state-none", ["no 'train_state' attribute"]),
        ("solver-lacks", ["gd solver state cannot be restored", "KeyError"]))],
    ("transform-store-other-d", ["transform", "{w}/model-d3.zarr", S, "{w}/t.zarr"],
     ["d=3", "d=6"]),
    # damaged stores: the problem named before any work, by every command that reads one
    *[(f"store-no-chunk-{cmd}", argv, ["chunk 1", "array 'y'", "store-no-chunk.zarr/y/c/1/0",
                                       "is missing"])
      for cmd, argv in (("info", ["info", "{w}/store-no-chunk.zarr"]),
                        ("transform", ["transform", M, "{w}/store-no-chunk.zarr", "{w}/t.zarr"]),
                        ("evaluate", ["evaluate", M, "{w}/store-no-chunk.zarr",
                                      "--scheduler", "{sched}"]),
                        ("train", ["train", "{w}/store-no-chunk.zarr", "--out", OUT]))],
    ("store-binary-contradicts-stats", ["info", "{w}/graded-as-binary.zarr"],
     ["declared binary", "other values", "is damaged"]),
    ("store-stats-not-a-dict", ["train", "{w}/store-stats-str.zarr", "--out", OUT],
     ["target_stats is str", "is damaged"]),
    ("store-shards-differ", ["info", "{w}/store-shards.zarr"], ["row blocks", "inconsistent"]),
    ("store-x-float64", ["transform", M, "{w}/store-x-float64.zarr", "{w}/t.zarr"],
     ["x has dtype float64, expected floating point (float32)"]),
    ("ingest-x-missing", ["ingest", "{w}/i.zarr", "--x", "{w}/none.npy", "--y", "{w}/y.npy",
                          "--target", "{w}/t.npy"], ["none.npy", "does not exist"]),
    ("ingest-x-integers", ["ingest", "{w}/i.zarr", "--x", "{w}/xint.npy", "--y", "{w}/y.npy",
                           "--target", "{w}/t.npy"], ["xint.npy"]),
    ("ingest-x-not-npy", ["ingest", "{w}/i.zarr", "--x", "{w}/x.txt", "--y", "{w}/y.npy",
                          "--target", "{w}/t.npy"], ["not a readable .npy"]),
    ("ingest-target-rows", ["ingest", "{w}/i.zarr", "--x", "{w}/x.npy", "--y", "{w}/y.npy",
                            "--target", "{w}/t40.npy"], ["40"]),
    ("ingest-both-inputs", ["ingest", "{w}/i.zarr", "--x", "{w}/x.npy", "--embeddings",
                            "{w}/x.npy"], ["give either"]),
    ("ingest-over-a-folder", ["ingest", "{w}/folder", "--x", "{w}/x.npy", "--y", "{w}/y.npy",
                              "--target", "{w}/t.npy", "--overwrite"], ["refusing to replace"]),
    ("generate-dim-0", ["generate", "{w}/g.zarr", "--pairs", "10", "--dim", "0"], ["dim=0"]),
    ("generate-over-store", ["generate", S, "--pairs", "10", "--dim", "2"], ["already exists"]),
    # Refused before a byte is written (it used to write until the disk was full).
    ("generate-larger-than-the-disk", ["generate", "{w}/huge.zarr", "--pairs", str(10**15),
                                       "--dim", "64"], ["would need about", "GiB free",
                                                        "generate fewer --pairs"]),
    ("generate-larger-than-the-disk-over-a-store", ["generate", S, "--pairs", str(10**15),
                                                    "--dim", "6", "--overwrite"],
     ["would need about"]),
    ("info-missing", ["info", "{w}/none.zarr"], ["does not exist"]),
    # The output policy: never an input, never another kind of artifact, even with --overwrite.
    ("out-is-the-store", ["train", S, "--out", S, "--overwrite"], ["is the input"]),
    ("out-contains-the-store", ["train", S, "--out", "{w}", "--overwrite"],
     ["contains the input"]),
    ("out-inside-the-store", ["train", S, "--out", "{w}/store.zarr/m.zarr"],
     ["lies inside the input"]),
    ("out-links-to-the-store", ["train", S, "--out", "{w}/link-to-store", "--overwrite"],
     ["is the input"]),
    ("out-is-a-folder-of-files", ["train", S, "--out", "{w}/folder", "--overwrite"],
     ["refusing to replace", "not a cosim model"]),
    ("out-is-another-store", ["train", S, "--out", "{w}/sx.zarr", "--overwrite"],
     ["refusing to replace", "not a cosim model"]),
    ("ingest-over-its-input", ["ingest", "{w}/sx.zarr", "--x", "{w}/sx.zarr/x.npy", "--y",
                               "{w}/y.npy", "--target", "{w}/t.npy", "--overwrite"],
     ["contains the input", "x.npy"]),
    ("generate-over-a-model", ["generate", M, "--pairs", "10", "--dim", "2", "--overwrite"],
     ["refusing to replace", "not a cosim pair store"]),
    ("generate-over-a-store-with-extras", ["generate", "{w}/sx.zarr", "--pairs", "10",
                                           "--dim", "2", "--overwrite"],
     ["refusing to replace", "holds other files", "x.npy"]),
    ("transform-onto-the-model", ["transform", M, "{w}/x.npy", M, "--overwrite"],
     ["is the input"]),
    ("transform-onto-its-input", ["transform", M, "{w}/x.npy", "{w}/x.npy", "--overwrite"],
     ["is the input"]),
    ("transform-over-a-model", ["transform", M, "{w}/x.npy", "{w}/model-d3.zarr",
                                "--overwrite"], ["refusing to replace", "is a folder"]),
    ("transform-store-onto-the-store", ["transform", M, S, S, "--overwrite"], ["is the input"]),
    ("report-onto-the-model", ["report", M, "--out", M, "--overwrite"], ["is the input"]),
    ("report-over-another-file", ["report", M, "--out", "{w}/x.txt", "--overwrite"],
     ["refusing to replace", "not a report"]),
    ("info-validation-1.5", ["info", S, "--validation", "1.5"], ["1.5"]),
    # Options checked before any cluster starts (ClusterConfig.check, TrainConfig.check).
    ("memory-limit-abc", [*TRAIN, "--memory-limit", "abc"], ["memory_limit='abc'", "4GiB"]),
    ("memory-limit-empty", [*TRAIN, "--memory-limit", ""], ["memory_limit=''"]),
    ("scheduler-garbage", [*TRAIN, "--scheduler", "garbage"],
     ["scheduler='garbage'", "tcp://"]),
    ("scheduler-port-too-big", [*TRAIN, "--scheduler", "tcp://127.0.0.1:70000"],
     ["port 1-65535"]),
    ("dashboard-bogus", [*TRAIN, "--dashboard-address", "bogus"],
     ["dashboard_address='bogus'", "HOST:PORT"]),
    ("dashboard-port-too-big", [*TRAIN, "--dashboard-address", "127.0.0.1:70000"],
     ["dashboard_address='127.0.0.1:70000'", "0-65535"]),
    ("security-with-tcp", [*TRAIN, "--scheduler", "{sched}", "--security", "{w}/tls.yaml"],
     ["plain tcp://", "--security"]),
    ("evaluate-memory-limit-abc", ["evaluate", M, S, "--memory-limit", "abc"],
     ["memory_limit='abc'"]),
    ("workers-huge", [*TRAIN, "--workers", "100000"], ["workers=100000"]),
    ("seed-negative", [*TRAIN, "--seed", "-1"], ["--seed -1", "4,294,967,295"]),
    ("seed-too-big", [*TRAIN, "--seed", str(2**32)], ["--seed 4294967296"]),
    ("info-seed-negative", ["info", S, "--validation", "0.1", "--seed", "-1"], ["'--seed'"]),
    ("generate-seed-negative", ["generate", "{w}/g.zarr", "--pairs", "10", "--dim", "2",
                                "--seed", "-1"], ["'--seed'"]),
    ("lr-inf", [*TRAIN, "--lr", "inf"], ["--lr inf", "finite"]),
    ("lr-nan", [*TRAIN, "--lr", "nan"], ["--lr nan", "finite"]),
    ("steps-huge", [*TRAIN, "--steps", "100000000000000000000"], ["--steps ", "10,000,000"]),
    ("negatives-too-many", [*TRAIN, "--negatives", "65"], ["--negatives 65", "between 0 and 64"]),
    ("positive-only-without-negatives", ["train", "{w}/positive.zarr", "--out", "{w}/new.zarr"],
     ["holds positive pairs only", "pass --negatives K"]),
    ("negative-only", ["train", "{w}/negative.zarr", "--out", "{w}/new.zarr", "--negatives", "2"],
     ["holds negative pairs only", "add pairs labelled +1"]),
    ("retrieval-one-candidate", ["evaluate", M, S, "--retrieval", "--candidates", "1"],
     ["'--candidates'"]),
    ("regularization-inf", [*TRAIN, "--regularization", "inf"], ["--regularization inf"]),
    ("generate-dim-huge", ["generate", "{w}/g.zarr", "--pairs", "10", "--dim", "100000000"],
     ["Unable to allocate"]),
    # A diverging solver is named as such, with the step size to lower; not blamed on data.
    ("diverged-gd", [*TRAIN, "--solver", "gd", "--lr", "1e30", "--steps", "3",
                     "--scheduler", "{sched}"], ["diverged at step 1", "--lr", "1e+30"]),
    ("diverged-adam", [*TRAIN, "--solver", "adam", "--lr", "1e30", "--steps", "3",
                       "--scheduler", "{sched}"], ["diverged at step 1", "--lr", "1e+30"]),
]


@pytest.mark.parametrize("argv,fragments", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(world, cluster_address, argv, fragments):
    args = [a.format(w=world, sched=cluster_address) for a in argv]
    before = tree_hash(world)
    result = cosim_main(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    one_line_error(result.stderr, *fragments)
    assert tree_hash(world) == before  # nothing that existed changed, nothing was added


def test_ingest_larger_than_the_disk_is_refused_before_writing(tmp_path):
    """x and y twice the file system's free space (a sparse .npy: no real disk used) are
    refused up front, instead of written until the disk is full."""
    free = shutil.disk_usage(tmp_path).free
    d = 256
    rows = free // (4 * d) + 1  # each of x and y alone is larger than the free space
    big = tmp_path / "x.npy"
    np.lib.format.open_memmap(big, mode="w+", dtype=np.float32, shape=(rows, d))
    out = tmp_path / "big.zarr"
    result = cosim_main("ingest", out, "--x", big, "--y", big)
    assert result.exit_code == 2, (result.output, result.exception)
    one_line_error(result.stderr, "would need about", "GiB free", "write the store elsewhere")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_a_damaged_store_can_be_regenerated_over(tmp_path):
    """open_store refuses a store with a missing chunk; --overwrite still replaces it, as
    the error message advises."""
    path = tmp_path / "s.zarr"
    generate_store(path, pairs=2_000, dim=4, rank=2, targets="binary", seed=1, chunk_rows=500)
    (path / "x" / "c" / "2" / "0").unlink()
    with pytest.raises(StoreError, match="is missing"):
        open_store(path)
    result = runner.invoke(app, ["generate", str(path), "--pairs", "2000", "--dim", "4",
                                 "--overwrite"])
    assert result.exit_code == 0, result.output
    assert open_store(path).n == 2_000


def test_debug_shows_the_traceback(world):
    result = runner.invoke(app, ["--debug", "train", f"{world}/nope.zarr", "--out",
                                 f"{world}/new.zarr"])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception)  # raised, not turned into one line


def _pairs(b=5, d=4):
    rng = np.random.default_rng(1)
    return (rng.standard_normal((b, d)), rng.standard_normal((b, d)), rng.uniform(-1, 1, b))


def _zero_row():
    x, y, t = _pairs()
    x[2] = 0.0
    return x, y, t


def _nan_row():
    x, y, t = _pairs()
    y[4, 1] = np.nan
    return x, y, t


x5, y5, t5 = _pairs()
#: (id, function, arguments, error class, fragments)
API_CASES = [
    ("similarity-shapes", cosim_dask.pair_similarity, (x5, y5[:, :3]), ShapeError,
     ["same shape"]),
    ("similarity-1d", cosim_dask.pair_similarity, (x5[0], y5[0]), ShapeError, ["2-D"]),
    ("similarity-A-shape", cosim_dask.pair_similarity, (x5, y5, np.eye(3)), ShapeError,
     ["4 × 4"]),
    ("similarity-strings", cosim_dask.pair_similarity, (x5.astype(str), y5), ShapeError,
     ["real numbers"]),
    ("similarity-zero-vector", cosim_dask.pair_similarity, _zero_row()[:2], InvalidPairsError,
     ["first at row 2"]),
    ("gradient-target-rows", cosim_dask.loss_and_gradient, (x5, y5, t5[:3], np.eye(4)),
     ShapeError, ["target has 3"]),
    ("gradient-unknown-loss", cosim_dask.loss_and_gradient, (x5, y5, t5, np.eye(4), "hinge"),
     UnknownNameError, ["hinge", "mse"]),
    ("partial-nan", cosim_dask.chunk_partial, (*_nan_row(), np.eye(4)), InvalidPairsError,
     ["first at row 4"]),
    ("partial-A-shape", cosim_dask.chunk_partial, (x5, y5, t5, np.eye(5)), ShapeError,
     ["4 × 4"]),
    ("partial-complex", cosim_dask.chunk_partial, (x5 * 1j, y5, t5, np.eye(4)), ShapeError,
     ["real numbers"]),
    ("unknown-solver", cosim_dask.get_solver, ("newton",), UnknownNameError, ["newton"]),
]


@pytest.mark.parametrize("fn,args,error,fragments", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_api_bad_input(fn, args, error, fragments):
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises(error) as info:
        fn(*args)
    assert isinstance(info.value, CosimError)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    for a, c in zip(args, copies, strict=True):  # inputs untouched
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, c)


def test_the_table_is_big_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 20


# --- fuzz of the store reader: hand-damaged attributes and arrays -----------------------

_junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
                  st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2))
_attr_names = ("format", "format_version", "n", "d", "chunk_rows", "targets")
_array_names = ("x", "y", "target", "hidden_metric")


@st.composite
def damaged_stores(draw):
    attrs = {name: draw(_junk) for name in draw(st.sets(st.sampled_from(_attr_names)))}
    arrays = {}
    for name in draw(st.sets(st.sampled_from(_array_names), max_size=2)):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from(["float32", "float64", "int16", "bool", "uint8"]))
        arrays[name] = (shape, dtype)
    drop = draw(st.sets(st.sampled_from(("x", "y", "target")), max_size=1))
    return attrs, arrays, drop


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "base.zarr"
    generate_store(path, pairs=12, dim=3, rank=2, targets="graded", seed=1, chunk_rows=5)
    return path


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damaged_stores())
def test_fuzz_open_store(base_store, tmp_path, damage):
    """A damaged store opens consistently or fails with one StoreError line; never another
    exception, never a PairStore whose arrays disagree with its attributes."""
    attrs, arrays, drop = damage
    path = tmp_path / f"s-{uuid.uuid4().hex[:8]}.zarr"
    shutil.copytree(base_store, path)
    group = zarr.open_group(path, mode="r+")
    group.attrs.update(attrs)
    for name in drop:
        del group[name]
    for name, (shape, dtype) in arrays.items():
        group.create_array(name, shape=shape, dtype=dtype, overwrite=True)
    try:
        store = open_store(path)
    except StoreError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert store.x.shape == store.y.shape == (store.n, store.d)
        assert store.target.shape == (store.n,)
        assert store.x.dtype.kind == store.target.dtype.kind == "f"
        assert store.hidden_metric is None or store.hidden_metric.shape == (store.d,) * 2
    finally:
        shutil.rmtree(path)


# --- terminal safety: text from files and arguments is printed with controls escaped -----

#: Sets the terminal's title to "pwned" and clears the screen when printed raw.
ESCAPES = "\x1b]0;pwned\x07\x1b[2J"


def test_info_escapes_control_characters(tmp_path):
    path = tmp_path / "crafted.zarr"
    generate_store(path, pairs=20, dim=3, rank=2, targets="binary", seed=1, chunk_rows=10)
    group = zarr.open_group(path, mode="r+")
    group.attrs.update({"provenance": {f"note{ESCAPES}": ESCAPES}, "created": ESCAPES})
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "created      \\x1b]0;pwned\\x07\\x1b[2J by" in result.output
    assert "  note\\x1b]0;pwned\\x07\\x1b[2J: " in result.output
    as_json = runner.invoke(app, ["info", str(path), "--json"])
    assert "\x1b" not in as_json.output  # json.dumps escapes, and the values survive exactly
    assert json.loads(as_json.output)["provenance"] == {f"note{ESCAPES}": ESCAPES}


def test_paths_are_printed_escaped(world, tmp_path):
    out = tmp_path / f"out{ESCAPES}.npy"
    result = runner.invoke(app, ["transform", str(world / "model.zarr"), str(world / "x.npy"),
                                 str(out)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and f"out{ESCAPES}".encode("unicode_escape").decode() \
        in result.output
    again = runner.invoke(app, ["transform", str(world / "model.zarr"), str(world / "x.npy"),
                                str(out)])
    assert again.exit_code == 2
    assert "\x1b" not in again.stderr
    one_line_error(again.stderr, "already exists")


def test_printable_escapes_c0_c1_and_bidi_controls():
    from cosim_dask.cli.output import printable

    assert printable("a\x1b[2Jb\tc\nd\x7f\x9b\u202eé") == "a\\x1b[2Jb\\x09c\\x0ad\\x7f\\x9b\\u202eé"
