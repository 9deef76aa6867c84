"""Embedding: prompts, model resolution, the vector cache and precomputed vectors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from mrl.data import load_beir
from mrl.embed import (
    EmbeddingsError,
    ModelError,
    ModelSource,
    embed_dataset,
    embed_sharded,
    load_embeddings,
    locate_model,
    plan_actors,
    read_model_config,
    resolve_model,
    resolve_prompts,
    write_vectors,
)
from tests.conftest import write_beir

QWEN_PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:", "document": ""}


@ray.remote
class RecordingModel:
    """Stand-in for an embedding actor: records every (prompt, text) it receives and returns 2-dim vectors."""

    def __init__(self):
        self.inputs: list[tuple[str, str]] = []

    def encode(self, texts, prompt, batch_size):
        self.inputs.extend((prompt, text) for text in texts)
        return np.array([[len(text), 1.0] for text in texts], dtype=np.float32)

    def recorded(self):
        return self.inputs


def test_prompts_default_to_model_configuration():
    prompts = resolve_prompts(QWEN_PROMPTS, None, None)

    assert prompts.query == QWEN_PROMPTS["query"]
    assert prompts.document == ""


def test_prompts_override_and_absence():
    assert resolve_prompts(QWEN_PROMPTS, "query: ", "passage: ").query == "query: "
    assert resolve_prompts(QWEN_PROMPTS, "query: ", "passage: ").document == "passage: "
    assert resolve_prompts(None, None, None).query == ""
    assert resolve_prompts({"document": "doc: "}, None, None).document == "doc: "


def test_prompt_reaches_queries_only(ray_local):
    prompts = resolve_prompts(QWEN_PROMPTS, None, None)
    model = RecordingModel.remote()
    documents = ["a much longer document text", "short doc", "mid-length doc"]
    queries = ["what is x", "why y"]

    corpus_vectors = embed_sharded([model], documents, prompts.document, 8, "corpus")
    query_vectors = embed_sharded([model], queries, prompts.query, 8, "queries")
    recorded = ray.get(model.recorded.remote())

    assert sorted(recorded) == sorted([("", text) for text in documents] + [(QWEN_PROMPTS["query"], text) for text in queries])
    assert corpus_vectors[:, 0].tolist() == [len(text) for text in documents], "vectors come back in input order"
    assert query_vectors[:, 0].tolist() == [len(text) for text in queries]


def test_read_model_config_without_loading(minilm_path):
    prompts, max_seq_length = read_model_config(Path(minilm_path))

    assert max_seq_length == 256
    assert all(value == "" for value in prompts.values())


def test_local_model_revision_is_a_content_hash(minilm_path):
    source = resolve_model(minilm_path)

    assert source.revision.startswith("sha256:")
    assert source.path.endswith("model")


def test_offline_hub_model_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ModelError, match=r"could not download model 'Qwen/Qwen3-Embedding-0.6B'.*--model PATH"):
        resolve_model("Qwen/Qwen3-Embedding-0.6B")


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        resolve_model(str(tmp_path / "nothing"))


@pytest.fixture
def tiny_dataset(tmp_path):
    corpus = [{"_id": f"d{i}", "title": "", "text": text} for i, text in enumerate(["cats purr", "dogs bark loudly", "the stock market fell", "rain in spring"])]
    queries = [{"_id": "q1", "text": "which animal purrs"}, {"_id": "q2", "text": "finance news"}]
    return load_beir(write_beir(tmp_path / "tiny", corpus, queries, [("q1", "d0", 1), ("q2", "d2", 1)]))


def test_embedding_cache_is_reused_and_invalidated(ray_local, tmp_path, minilm_path, tiny_dataset, caplog):
    cache = tmp_path / "cache"

    first, source, prompts, facts = embed_dataset(tiny_dataset, minilm_path, cache=cache)
    with caplog.at_level(logging.INFO, logger="mrl.embed"):
        second, *_ = embed_dataset(tiny_dataset, minilm_path, cache=cache)
    third, _, third_prompts, _ = embed_dataset(tiny_dataset, minilm_path, cache=cache, query_prompt="query: ")

    assert first.corpus.shape == (4, 384)
    assert first.corpus.dtype == np.float32
    assert not first.from_cache
    assert facts["device"] == "cpu"
    assert second.from_cache
    assert "loading cached embeddings" in caplog.text
    np.testing.assert_array_equal(first.corpus, second.corpus)
    np.testing.assert_array_equal(first.queries, second.queries)
    assert third.fingerprint != first.fingerprint, "a changed prompt re-embeds"
    assert third_prompts.query == "query: "
    assert not np.allclose(third.queries, first.queries)
    np.testing.assert_allclose(third.corpus, first.corpus, atol=1e-5)
    assert json.loads((cache / "embeddings" / first.fingerprint / "meta.json").read_text())["revision"] == source.revision


def test_embedding_matches_shared_vectors(ray_local, tmp_path, minilm_path, scifact, scifact_embeddings):
    # The shared vectors were made with the same model; embedding a few SciFact documents here must reproduce them.
    corpus = [json.loads(line) for line in (scifact / "corpus.jsonl").read_text().splitlines()[:24]]
    queries = [json.loads(line) for line in (scifact / "queries.jsonl").read_text().splitlines()[:50]]
    qrels = [line.split("\t") for line in (scifact / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    query_ids = {query["_id"] for query in queries}
    qrels = [(q, d, s) for q, d, s in qrels if q in query_ids] + [(queries[0]["_id"], corpus[0]["_id"], 1)]
    dataset = load_beir(write_beir(tmp_path / "scifact-head", corpus, queries, qrels))

    embedded, *_ = embed_dataset(dataset, minilm_path, cache=tmp_path / "cache")
    shared = load_embeddings(scifact_embeddings, dataset)

    np.testing.assert_allclose(embedded.corpus, shared.corpus, atol=2e-4)
    np.testing.assert_allclose(embedded.queries, shared.queries, atol=2e-4)


def test_precomputed_vectors_follow_dataset_order(tmp_path, tiny_dataset):
    vectors = np.arange(8, dtype=np.float32).reshape(4, 2)
    write_vectors(tmp_path / "corpus.parquet", list(reversed(tiny_dataset.corpus_ids)), vectors[::-1])
    write_vectors(tmp_path / "queries.parquet", ["q2", "q1", "extra"], np.ones((3, 2), dtype=np.float32))

    loaded = load_embeddings(tmp_path, tiny_dataset)

    np.testing.assert_array_equal(loaded.corpus, vectors)
    assert loaded.dim == 2


def test_precomputed_vectors_missing_ids(tmp_path, tiny_dataset):
    write_vectors(tmp_path / "corpus.parquet", tiny_dataset.corpus_ids[:3], np.ones((3, 2), dtype=np.float32))
    write_vectors(tmp_path / "queries.parquet", ["q1", "q2"], np.ones((2, 2), dtype=np.float32))

    with pytest.raises(EmbeddingsError, match=r"corpus.parquet: 1 of 4 ids have no embedding, for example \['d3'\]"):
        load_embeddings(tmp_path, tiny_dataset)


def test_precomputed_vectors_wrong_schema(tmp_path, tiny_dataset):
    pq.write_table(pa.table({"id": ["d0"], "vector": [[1.0, 2.0]]}), tmp_path / "corpus.parquet")

    with pytest.raises(EmbeddingsError, match=r"corpus.parquet: expected columns _id and embedding, found \['id', 'vector'\]"):
        load_embeddings(tmp_path, tiny_dataset)


def test_precomputed_vectors_as_variable_lists(tmp_path, tiny_dataset):
    table = pa.table({"_id": tiny_dataset.corpus_ids, "embedding": pa.array([[1.0, 0.0]] * 4, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "corpus.parquet")
    shutil.copy(tmp_path / "corpus.parquet", tmp_path / "queries.parquet")
    write_vectors(tmp_path / "queries.parquet", ["q1", "q2"], np.ones((2, 2), dtype=np.float32))

    assert load_embeddings(tmp_path, tiny_dataset).corpus.shape == (4, 2)


def test_precomputed_vectors_with_nan(tmp_path, tiny_dataset):
    vectors = np.ones((4, 2), dtype=np.float32)
    vectors[2, 1] = np.nan
    write_vectors(tmp_path / "corpus.parquet", tiny_dataset.corpus_ids, vectors)
    write_vectors(tmp_path / "queries.parquet", ["q1", "q2"], np.ones((2, 2), dtype=np.float32))

    with pytest.raises(EmbeddingsError, match=r"row 2 contains NaN"):
        load_embeddings(tmp_path, tiny_dataset)


def test_actor_plan_fits_one_node(ray_local):
    device, actors, resources = plan_actors(None)

    assert device == "cpu"
    assert actors == 1
    assert resources == {"num_cpus": 2}


def test_gpu_request_without_gpu_fails(ray_local):
    with pytest.raises(ModelError, match=r"device 'cuda' requested, but the Ray cluster has no GPU"):
        plan_actors("cuda")


def test_model_folder_missing_on_node(tmp_path):
    source = ModelSource(name="local-model", path=str(tmp_path / "elsewhere"), revision="sha256:abc")

    with pytest.raises(ModelError, match=r"must exist at the same path on every node"):
        locate_model(source)


def test_model_folder_found_on_node(minilm_path):
    source = resolve_model(minilm_path)

    assert locate_model(source) == source.path
