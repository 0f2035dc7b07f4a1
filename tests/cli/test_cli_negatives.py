"""Positive pairs end to end through the CLI, in-process on the shared cluster: `cosim ingest`
without targets, `cosim train --negatives`, `cosim evaluate --retrieval`."""

import json

import numpy as np
import pytest
from helpers import cosim_main, one_line_error

from cosim_dask.data.ingest import generate_store
from cosim_dask.data.store import open_store
from cosim_dask.fit.model import load_model


@pytest.mark.slow  # ~7 s idle (four commands), 37 s at load 20 on the shared 2 cores
def test_positive_pairs_train_with_negatives_and_rank_better_than_plain_cosine(
        tmp_path, cluster_address, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    # y shares x's first three coordinates, scaled up; the rest is louder noise.
    y = np.concatenate([3 * x[:, :3], 4 * rng.standard_normal((3000, 5))], axis=1)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y.astype(np.float32))
    store, model = tmp_path / "pos.zarr", tmp_path / "model.zarr"
    result = cosim_main("ingest", store, "--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy",
                        "--chunk-pairs", "1000")
    assert result.exit_code == 0, result.output
    opened = open_store(store)
    assert opened.targets == "binary" and opened.attrs["target_stats"]["count_neg"] == 0
    result = cosim_main("train", store, "--out", model, "--negatives", "2", "--steps", "6",
                        "--validation", "0.2", "--scheduler", cluster_address)
    assert result.exit_code == 0, result.output
    assert ("holds positive pairs only (the figures count their in-chunk negatives): rank "
            "them with `cosim evaluate") in result.stdout
    # The table is of each validation pair against its in-chunk negatives: an AUC, and a
    # threshold that tells a pair from a random one.
    trained = load_model(model)
    assert trained.attrs["settings"]["negatives"] == 2
    figures = trained.attrs["validation_figures"]
    assert "auc" in result.stdout and figures["learned"]["auc"] > figures["plain"]["auc"] + 0.05
    assert -1.0 < trained.attrs["threshold"] < 1.0
    # `cosim evaluate` scores them the same way (the model's K and seed): the same figures.
    result = cosim_main("evaluate", model, store, "--json", "--scheduler", cluster_address)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["negatives"] == 2 and report["split"] == "validation"
    for name in ("learned", "plain"):
        assert report[name]["pairs"] == figures[name]["pairs"]
        assert report[name]["auc"] == pytest.approx(figures[name]["auc"], abs=1e-12)
    # Without negatives, positive pairs alone would fit every similarity to 1: refused.
    result = cosim_main("train", store, "--out", tmp_path / "none.zarr", "--scheduler",
                        cluster_address)
    assert result.exit_code == 2 and "pass --negatives K" in result.output
    assert not (tmp_path / "none.zarr").exists()
    result = cosim_main("evaluate", model, store, "--retrieval", "--candidates", "50",
                        "--json", "--scheduler", cluster_address)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "validation" and report["candidates"] == 50
    assert report["learned"]["queries"] == report["plain"]["queries"] > 500
    assert report["learned"]["min_candidates"] == 50
    assert report["learned"]["mrr"] > report["plain"]["mrr"] + 0.1
    from cosim_dask.cli.train import _print_retrieval

    _print_retrieval(report, str(store))
    captured = capsys.readouterr()
    out = captured.out + captured.err  # after a --json run, text lines go to stderr
    assert "candidates each" in out and "hit@1" in out and "learned A" in out


def test_negatives_on_graded_targets_is_one_line(tmp_path):
    store = tmp_path / "graded.zarr"
    generate_store(store, pairs=500, dim=4, rank=2, targets="graded")
    result = cosim_main("train", store, "--out", tmp_path / "m.zarr", "--negatives", "1")
    assert result.exit_code == 2
    one_line_error(result.stderr, "--negatives needs positive pairs", "graded targets")
    assert not (tmp_path / "m.zarr").exists()
