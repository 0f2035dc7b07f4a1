"""The pipelines run end to end at a small size."""

import importlib.util
import sys
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def load(name):
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~5 s idle, 14 s on the shared 2-core machine
def test_digits_quick_learned_beats_plain_cosine():
    digits = load("digits")
    rows = digits.run(quick=True, baselines=False)
    plain, learned = rows[0], rows[1]
    assert plain.method.startswith("plain") and learned.method.startswith("CosineMetric")
    assert learned.auc > plain.auc + 0.02
    assert learned.accuracy > plain.accuracy
    assert "| CosineMetricLearner (defaults) |" in digits.render(rows)


def test_digits_splits_samples_not_pairs():
    import numpy as np

    digits = load("digits")
    data = digits.digits_pairs(digits.QUICK, seed=1)
    train = {v.tobytes() for v in data["train"][0].reshape(-1, 64)}
    test = {v.tobytes() for v in data["test"][0].reshape(-1, 64)}
    # Digits has a few duplicate images; allow those, but the splits must be (nearly) disjoint.
    assert len(train & test) <= 5
    for _, y in (data["train"], data["test"]):
        assert np.mean(y == 1) == 0.5  # balanced


@pytest.mark.slow
def test_synthetic_pipeline_runs_end_to_end(tmp_path, capsys):
    """`make demo`'s pipeline at a small size: every stage runs, the learned metric wins."""
    import json

    from cosim_dask.fit.model import load_model

    synthetic = load("synthetic")
    synthetic.main(["--out", str(tmp_path), "--pairs", "20000", "--dim", "16", "--rank", "3",
                    "--steps", "8"])
    out = capsys.readouterr().out
    for stage in ("$ cosim generate", "$ cosim info", "$ cosim train", "$ cosim evaluate",
                  "$ cosim report"):
        assert stage in out
    assert (tmp_path / "report.html").stat().st_size > 1000
    figures = load_model(tmp_path / "model.zarr").attrs["validation_figures"]
    assert figures["learned"]["auc"] > figures["plain"]["auc"]
    assert json.dumps(figures)  # JSON-safe attributes


@pytest.mark.slow
def test_out_of_core_pipeline_streams_under_the_memory_limit(tmp_path):
    """A store twice the cluster's memory trains by streaming, workers under their limit."""
    out_of_core = load("out_of_core")
    summary = out_of_core.main(["--out", str(tmp_path), "--memory-mib", "200", "--factor", "2",
                                "--dim", "32", "--steps", "2"])
    assert summary["store_bytes"] > 2 * summary["cluster_bytes"] * 0.99
    assert summary["cache"] == "stream"
    assert 0 < summary["peak_worker_rss"] < summary["limit"]


@pytest.mark.slow  # three cosim subprocesses
def test_digits_quick_via_store_matches_the_estimator(cluster_address, monkeypatch):
    """The learned row through cosim ingest/train/evaluate beats plain cosine and agrees
    with the in-memory estimator on the same pairs."""
    # train and evaluate join the shared cluster (Dask's own variable) instead of starting
    # a LocalCluster each; the same 2 workers x 1 thread, so the same sums.
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster_address)
    digits = load("digits")
    data = digits.digits_pairs(digits.QUICK)
    plain, in_memory = digits.plain_cosine(data), digits.learned(data)[0]
    via_store = digits.via_store(data)
    assert via_store.method == "cosim train (via store)"
    assert via_store.fit_pairs == in_memory.fit_pairs == 4000
    assert via_store.auc > plain.auc + 0.02
    assert via_store.accuracy > plain.accuracy
    # Same settings (--validation 0), chunk and tree: the A is the estimator's fit on float32
    # copies (the store keeps float32) to 1e-16; that and the 8,192-bin histogram AUC are the
    # difference. Measured |ΔAUC| ≤ 4.3e-5, |Δaccuracy| ≤ 1.5e-3 over seeds 0-4 (quick),
    # ≤ 9.5e-5 and 1e-4 over seeds 0-1 of the full run with plain L-BFGS. The default's first
    # pass (hundreds of local Adam steps) lets roundoff grow more: 5.4e-4 seen once.
    assert abs(via_store.auc - in_memory.auc) < 1e-3
    assert abs(via_store.accuracy - in_memory.accuracy) < 5e-3
    assert "| cosim train (via store) | 4,000 |" in digits.render([plain, via_store])


@pytest.mark.slow  # two fits and two retrieval passes on the shared cluster
def test_retrieval_pipeline_learned_metrics_rank_better_than_plain_cosine(tmp_path, client,
                                                                           capsys):
    retrieval = load("retrieval")
    rows = retrieval.main(["--quick", "--steps", "6", "--negatives", "2", "--candidates", "60",
                           "--store", str(tmp_path / "stores"), "--out", str(tmp_path / "m")],
                          client=client)
    plain, positive, labelled = rows
    assert plain.method.startswith("plain") and "--negatives 2" in positive.method
    assert positive.fit_pairs == labelled.fit_pairs == 420 * 3
    for learned in (positive, labelled):
        assert learned.mrr > plain.mrr + 0.05
    assert "| positive pairs, --negatives 2 |" in capsys.readouterr().out
    assert (tmp_path / "stores" / "test.zarr").is_dir()
