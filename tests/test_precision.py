"""Vector dtypes, rescoring and funnel retrieval: quantisation on known vectors, quality on SciFact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mrl.analyse import bytes_per_vector, index_memory_bytes
from mrl.cli import main
from mrl.evaluate import RunEvaluator
from mrl.funnel import FunnelGrid, funnel_shortlist_dim, parse_funnel
from mrl.sweep import (
    SearchSettings,
    build_hnsw_index,
    exact_search,
    hnsw_search_dim,
    parse_dtypes,
    quantise,
    scoring_vectors,
    search_index,
    sweep_dims,
    truncate,
)


@pytest.fixture(scope="module")
def scifact_vectors(scifact, scifact_embeddings):
    from mrl.data import load_dataset
    from mrl.embed import load_embeddings

    dataset = load_dataset(str(scifact))
    embeddings = load_embeddings(scifact_embeddings, dataset)
    return dataset, embeddings, np.asarray(dataset.corpus_ids, dtype=object)


def ndcg_means(rows: pd.DataFrame) -> pd.Series:
    selected = rows[rows["measure"] == "nDCG@10"]
    return selected.groupby(["index", "dtype", "dim"])["value"].mean()


def test_b1_packs_sign_bits():
    unit = np.array([[0.5, -0.5, 0.5, -0.5], [-0.5, -0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]], dtype=np.float32)

    packed = quantise(unit, "b1")

    assert packed.dtype == np.uint8
    assert packed.shape == (3, 1)
    # Bits fill from the highest one: 1010 then zero padding.
    assert packed[:, 0].tolist() == [0b10100000, 0b00110000, 0b00010000]


def test_b1_ranks_by_hamming_distance():
    rng = np.random.default_rng(0)
    corpus = truncate(rng.normal(size=(40, 12)).astype(np.float32), 12)[0]
    queries = truncate(rng.normal(size=(5, 12)).astype(np.float32), 12)[0]
    hamming = ((queries[:, None, :] > 0) != (corpus[None, :, :] > 0)).sum(axis=2)
    # Equal distances are ordered by corpus position, as the exact search orders ties.
    expected = np.argsort(hamming, axis=1, kind="stable")[:, :10]

    exact = exact_search(scoring_vectors(queries, "b1"), scoring_vectors(corpus, "b1"), 10)
    index, _, _ = build_hnsw_index(corpus, 12, SearchSettings(), "b1")
    approximate = search_index(index, quantise(queries, "b1"), 10, len(corpus), threads=1)

    assert exact.ranked.tolist() == expected.tolist()
    found_distances = np.take_along_axis(hamming, approximate.ranked, axis=1)
    np.testing.assert_array_equal(found_distances, np.take_along_axis(hamming, expected, axis=1))


def test_i8_quantises_like_usearch():
    unit = np.array([[0.6, -0.8], [1.0, 0.0]], dtype=np.float32)

    assert quantise(unit, "i8").tolist() == [[76, -101], [127, 0]]
    index, _, _ = build_hnsw_index(unit, 2, SearchSettings(), "i8")
    stored = np.vstack(index.get(np.arange(2, dtype=np.uint64), dtype=np.int8))
    assert stored.tolist() == [[76, -101], [127, 0]]


def test_i8_keeps_well_separated_ranking():
    # Documents at 0, 8, 16, ... 152 degrees from the query: cosines far apart compared with i8 steps.
    angles = np.radians(np.arange(0, 160, 8))
    corpus = np.zeros((len(angles), 16), dtype=np.float32)
    corpus[:, 0], corpus[:, 1] = np.cos(angles), np.sin(angles)
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))[0].astype(np.float32)
    corpus = truncate(corpus @ rotation, 16)[0]
    queries = corpus[:1]
    order = np.random.default_rng(2).permutation(len(corpus))
    corpus = corpus[order]

    f32 = exact_search(queries, corpus, len(corpus))
    i8 = exact_search(scoring_vectors(queries, "i8"), scoring_vectors(corpus, "i8"), len(corpus))

    assert i8.ranked.tolist() == f32.ranked.tolist()
    assert order[f32.ranked[0]].tolist() == list(range(len(corpus)))


def test_half_precisions_stay_close_to_f32():
    unit = truncate(np.random.default_rng(3).normal(size=(50, 64)).astype(np.float32), 64)[0]

    bf16 = quantise(unit, "bf16")
    f16 = quantise(unit, "f16").astype(np.float32)

    # bf16 keeps 8 significant bits, so rounding to nearest moves a value by at most 2^-8 of it.
    assert np.all(np.abs(bf16 - unit) <= np.abs(unit) * 2.0**-8)
    assert np.all(bf16.view(np.uint32) & 0xFFFF == 0)
    assert np.abs(f16 - unit).max() < 1e-3
    # 1 + 2^-8 lies halfway between two bf16 values and rounds to the even one, 1.0.
    assert quantise(np.array([[1 + 2.0**-8, 1 + 3 * 2.0**-8]], dtype=np.float32), "bf16").tolist() == [[1.0, 1 + 2.0**-6]]


def test_parse_dtypes_orders_and_rejects():
    assert parse_dtypes("b1,f32") == ("f32", "b1")
    with pytest.raises(ValueError, match="invalid dtype 'f64'"):
        parse_dtypes("f32,f64")


def test_rescoring_recovers_f32_on_scifact(scifact_vectors):
    dataset, embeddings, corpus_ids = scifact_vectors
    evaluator = RunEvaluator(["nDCG@10"], dataset.qrels, dataset.query_ids)
    settings = SearchSettings(indexes=("exact", "hnsw"), top_k=10, dtypes=("f32", "i8", "b1"), rescore=100)

    swept = sweep_dims(embeddings.corpus, embeddings.queries, [128, 384], settings, corpus_ids, dataset.query_ids, evaluator)

    rows = pd.concat([frame for _, frame, _ in swept], ignore_index=True)
    means = ndcg_means(rows)
    for index in ("exact", "hnsw"):
        for dim in (128, 384):
            f32 = means[(index, "f32", dim)]
            # On SciFact with all-MiniLM-L6-v2, b1 alone keeps 67% of f32 at dim 128 and 91% at 384.
            assert means[(index, "b1", dim)] < 0.93 * f32
            assert means[(index, "b1+rescore", dim)] >= 0.95 * f32
            assert means[(index, "i8+rescore", dim)] == pytest.approx(f32, abs=0.005)
    stats = pd.DataFrame([row for _, _, rows in swept for row in rows])
    assert stats["dtype"].tolist() == ["f32", "i8", "i8+rescore", "b1", "b1+rescore"] * 2
    assert stats["hnsw_recall_vs_exact"].between(0, 1).all()


def test_funnel_without_rerank_matches_hnsw(scifact_vectors):
    dataset, embeddings, corpus_ids = scifact_vectors
    evaluator = RunEvaluator(["nDCG@10", "R@100"], dataset.qrels, dataset.query_ids)
    settings = SearchSettings(indexes=("hnsw",))
    grid = FunnelGrid(shortlist_dims=(64,), shortlist_ks=(settings.top_k,), rerank_dims=(64,))

    funnel, stats = funnel_shortlist_dim(embeddings.corpus, embeddings.queries, 64, grid, settings, corpus_ids, dataset.query_ids, evaluator)
    plain, _, _, _ = hnsw_search_dim(embeddings.corpus, embeddings.queries, 64, settings, settings.top_k)
    expected = evaluator.per_query_ranked(plain.ranked, plain.counts, corpus_ids)

    assert list(funnel.columns) == ["shortlist_dim", "shortlist_k", "rerank_dim", "query_id", "measure", "value"]
    assert funnel["query_id"].tolist() == expected["query_id"].tolist()
    np.testing.assert_allclose(funnel["value"], expected["value"], rtol=0, atol=1e-6)
    assert len(stats) == 1


def test_funnel_reaches_full_size_on_scifact(scifact_vectors):
    dataset, embeddings, corpus_ids = scifact_vectors
    evaluator = RunEvaluator(["nDCG@10"], dataset.qrels, dataset.query_ids)
    settings = SearchSettings(indexes=("exact",))
    grid = parse_funnel("128", "10,200", "full", embeddings.dim)

    funnel, _ = funnel_shortlist_dim(embeddings.corpus, embeddings.queries, 128, grid, settings, corpus_ids, dataset.query_ids, evaluator)
    [(_, full, _)] = sweep_dims(embeddings.corpus, embeddings.queries, [384], settings, corpus_ids, dataset.query_ids, evaluator)

    means = funnel.groupby("shortlist_k")["value"].mean()
    full_size = full.loc[full["measure"] == "nDCG@10", "value"].mean()
    # Measured: a shortlist of 200 at dim 128 reranked at 384 keeps 99.6% of full-size exact nDCG@10.
    assert means[200] >= 0.98 * full_size
    assert means[10] < means[200]
    assert index_memory_bytes(len(corpus_ids), 128, "f32") < 0.5 * index_memory_bytes(len(corpus_ids), 384, "f32")


def test_bytes_per_vector_per_dtype():
    expected = {"f32": 1536, "bf16": 768, "f16": 768, "i8": 384, "b1": 48, "b1+rescore": 48, "i8+rescore": 384}

    for dtype, size in expected.items():
        assert bytes_per_vector(384, dtype) == size, dtype
    assert index_memory_bytes(10_000, 384, "b1+rescore") == index_memory_bytes(10_000, 384, "b1")
    assert index_memory_bytes(10_000, 384, "b1") < index_memory_bytes(10_000, 384, "i8") < index_memory_bytes(10_000, 384, "f32")
    with pytest.raises(ValueError, match="unknown dtype 'b2'"):
        bytes_per_vector(384, "b2")


def test_sweep_writes_dtypes_and_funnel(ray_local, tmp_path, scifact, scifact_embeddings):
    out = tmp_path / "run"

    code = main(
        [
            "sweep", "--embeddings", str(scifact_embeddings), "--dataset", str(scifact), "--dims", "64,384", "--index", "hnsw",
            "--dtypes", "b1,f32", "--rescore", "200", "--funnel-shortlist-dims", "64", "--funnel-k", "100", "--out", str(out),
        ]
    )

    assert code == 0
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == ["model", "dataset", "index", "dtype", "dim", "measure", "value", "n_queries"]
    assert set(metrics["dtype"]) == {"f32", "b1", "b1+rescore"}
    stats = pd.read_parquet(out / "sweep_stats.parquet")
    assert stats[["dim", "dtype"]].values.tolist() == [[64, "f32"], [64, "b1"], [64, "b1+rescore"], [384, "f32"], [384, "b1"], [384, "b1+rescore"]]
    funnel = pd.read_parquet(out / "funnel.parquet")
    assert list(funnel.columns) == ["model", "dataset", "shortlist_dim", "shortlist_k", "rerank_dim", "measure", "value", "n_queries"]
    assert funnel[["shortlist_dim", "shortlist_k", "rerank_dim"]].drop_duplicates().values.tolist() == [[64, 100, 384]]
    assert set(funnel["n_queries"]) == {300}
    per_query = pd.read_parquet(out / "funnel_per_query.parquet")
    assert len(per_query) == 300 * funnel["measure"].nunique()
    assert "funnel" in (out / "report.html").read_text()
