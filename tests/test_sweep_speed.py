"""The fast paths give the results of the straightforward per-dim computation.

The numpy evaluator is compared with ir-measures per query, and the incremental exact
sweep with truncating, renormalising and ranking every dim from scratch. Timings live
in scripts/bench.py, never here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import mrl.evaluate
import mrl.sweep
from mrl.evaluate import RunEvaluator, ranked_measure, parse_measures, run_frame
from mrl.sweep import SearchSettings, exact_search, exact_sweep, hnsw_search, sweep_dims, top_k, truncate

# The incremental sweep and a fresh product at the same dim agree to about 1e-6 in each cosine.
# So documents whose cosines differ by less than this may swap places between the two.
NEAR_TIE = 1e-5
MEASURES = ["nDCG@10", "R@100", "RR@10", "AP@100", "nDCG", "RR", "AP", "P@10", "R@5", "AP@5", "P(rel=2)@5", "AP(rel=2)@100"]


def reference_search(corpus: np.ndarray, queries: np.ndarray, dim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank by the cosine of freshly truncated vectors, equal scores by corpus position; return ranking and scores."""
    scores = truncate(queries, dim)[0] @ truncate(corpus, dim)[0].T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], scores


def assert_same_up_to_near_ties(ranked: np.ndarray, expected: np.ndarray, scores: np.ndarray) -> None:
    """Assert that at every rank both rankings hold a document of (nearly) the same reference score."""
    assert ranked.shape == expected.shape
    got = np.take_along_axis(scores, ranked, axis=1)
    want = np.take_along_axis(scores, expected, axis=1)
    assert np.abs(got - want).max(initial=0.0) <= NEAR_TIE
    # Each query ranks distinct documents.
    assert all(len(set(row)) == len(row) for row in ranked.tolist())


def ir_measures_rows(evaluator: RunEvaluator, query_ids, corpus_ids, ranked, counts) -> pd.DataFrame:
    return evaluator.per_query(run_frame(query_ids, corpus_ids, ranked, counts))


def assert_rows_equal(fast: pd.DataFrame, slow: pd.DataFrame) -> None:
    assert list(fast.columns) == list(slow.columns)
    assert fast[["query_id", "measure"]].values.tolist() == slow[["query_id", "measure"]].values.tolist()
    np.testing.assert_allclose(fast["value"].to_numpy(), slow["value"].to_numpy(), rtol=0, atol=1e-9)


def qrels_of(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["query_id", "doc_id", "relevance"])


# --- the numpy evaluator against ir-measures ---------------------------------------------


@pytest.fixture(scope="module")
def scifact_vectors(scifact, scifact_embeddings):
    from mrl.data import load_dataset
    from mrl.embed import load_embeddings

    dataset = load_dataset(str(scifact))
    embeddings = load_embeddings(scifact_embeddings, dataset)
    return dataset, embeddings, np.asarray(dataset.corpus_ids, dtype=object)


@pytest.mark.parametrize("dim", [2, 16, 64, 384])
def test_evaluator_matches_ir_measures_on_scifact(scifact_vectors, dim):
    dataset, embeddings, corpus_ids = scifact_vectors
    evaluator = RunEvaluator(MEASURES, dataset.qrels, dataset.query_ids)
    result = exact_search(truncate(embeddings.queries, dim)[0], truncate(embeddings.corpus, dim)[0], 100)

    fast = evaluator.per_query_ranked(result.ranked, result.counts, corpus_ids)
    slow = ir_measures_rows(evaluator, dataset.query_ids, corpus_ids, result.ranked, result.counts)

    assert_rows_equal(fast, slow)


def test_evaluator_matches_ir_measures_on_scifact_hnsw(scifact_vectors):
    dataset, embeddings, corpus_ids = scifact_vectors
    evaluator = RunEvaluator(MEASURES, dataset.qrels, dataset.query_ids)
    result, _ = hnsw_search(truncate(embeddings.queries, 32)[0], truncate(embeddings.corpus, 32)[0], 100, mrl.sweep.HnswParams())

    fast = evaluator.per_query_ranked(result.ranked, result.counts, corpus_ids)
    slow = ir_measures_rows(evaluator, dataset.query_ids, corpus_ids, result.ranked, result.counts)

    assert_rows_equal(fast, slow)


EDGE_QRELS = [
    # q1: graded, one judged document missing from the corpus, one judged non-relevant.
    ("q1", "a", 1),
    ("q1", "b", 2),
    ("q1", "gone", 3),
    ("q1", "c", 0),
    # q2: only non-relevant and negative judgements.
    ("q2", "a", 0),
    ("q2", "d", -1),
    # q3: a negative grade among relevant ones; its first judgement of "e" is overridden below.
    ("q3", "e", 1),
    ("q3", "f", -2),
    ("q3", "g", 1),
    ("q3", "e", 2),
    # q4: relevant documents, but the query gets no hits.
    ("q4", "a", 1),
    # q5: judged for a query that is not evaluated.
    ("q5", "a", 1),
]
EDGE_CORPUS = np.array(["a", "b", "c", "d", "e", "f", "g", "h"], dtype=object)
EDGE_QUERIES = ["q1", "q2", "q3", "q4"]


def edge_run() -> tuple[np.ndarray, np.ndarray]:
    """Return ranked positions of EDGE_CORPUS per query: fewer hits than k, padding, no hits."""
    ranked = np.array(
        [
            [2, 1, 7, 0, 0, 0],  # q1: c, b, h, a, then padding
            [0, 3, 1, 2, 4, 5],  # q2: a full run
            [5, 6, 4, 0, 0, 0],  # q3: f, g, e
            [0, 0, 0, 0, 0, 0],  # q4: no hits
        ]
    )
    counts = np.array([4, 6, 3, 0])
    return ranked, counts


@pytest.mark.parametrize("dense_cells", [mrl.evaluate.DENSE_RELEVANCE_CELLS, 0], ids=["dense", "sorted-keys"])
def test_evaluator_matches_ir_measures_on_edge_cases(monkeypatch, dense_cells):
    monkeypatch.setattr(mrl.evaluate, "DENSE_RELEVANCE_CELLS", dense_cells)
    measures = MEASURES + ["nDCG@3", "P@3", "R@3", "RR@2", "AP@2", "P@100"]
    evaluator = RunEvaluator(measures, qrels_of(EDGE_QRELS), EDGE_QUERIES)
    ranked, counts = edge_run()

    fast = evaluator.per_query_ranked(ranked, counts, EDGE_CORPUS)
    slow = ir_measures_rows(evaluator, EDGE_QUERIES, EDGE_CORPUS, ranked, counts)

    assert_rows_equal(fast, slow)
    uses_dense_table = evaluator.ranked_scorer(EDGE_CORPUS).table.dense is not None
    assert uses_dense_table == bool(dense_cells)


def test_evaluator_edge_values_by_hand():
    evaluator = RunEvaluator(["nDCG@10", "R@100", "P@10", "RR"], qrels_of(EDGE_QRELS), EDGE_QUERIES)
    ranked, counts = edge_run()

    values = evaluator.per_query_ranked(ranked, counts, EDGE_CORPUS).set_index(["query_id", "measure"])["value"]

    # q1 retrieves c (0), b (2), h (unjudged), a (1); the ideal ranking is gone (3), b (2), a (1).
    ideal = 3 + 2 / np.log2(3) + 1 / np.log2(4)
    assert values["q1", "nDCG@10"] == pytest.approx((2 / np.log2(3) + 1 / np.log2(5)) / ideal, abs=1e-12)
    assert values["q1", "R@100"] == pytest.approx(2 / 3, abs=1e-12)
    assert values["q1", "P@10"] == pytest.approx(0.2, abs=1e-12)
    assert values["q1", "RR"] == pytest.approx(0.5, abs=1e-12)
    assert (values["q2"] == 0).all()
    # q3: "e" counts with its last grade, 2; "f" (-2) adds no gain.
    assert values["q3", "nDCG@10"] == pytest.approx((1 / np.log2(3) + 2 / np.log2(4)) / (2 + 1 / np.log2(3)), abs=1e-12)
    assert (values["q4"] == 0).all()


def test_evaluator_falls_back_for_other_measures():
    measures = ["nDCG@10", "Judged@5", "nDCG(gains={0:0,1:1,2:5,3:10})@10", "nDCG(judged_only=True)@10", "Rprec"]
    evaluator = RunEvaluator(measures, qrels_of(EDGE_QRELS), EDGE_QUERIES)
    ranked, counts = edge_run()

    fast = evaluator.per_query_ranked(ranked, counts, EDGE_CORPUS)

    assert [ranked_measure(measure) is None for measure in parse_measures(measures)] == [False, True, True, True, True]
    for measure in parse_measures(measures):
        # One evaluator per measure: ir-measures 0.4.3 mixes up two nDCG@10 variants in one evaluator,
        # which RunEvaluator avoids in the same way.
        alone = RunEvaluator([measure], qrels_of(EDGE_QRELS), EDGE_QUERIES)
        slow = ir_measures_rows(alone, EDGE_QUERIES, EDGE_CORPUS, ranked, counts)
        assert_rows_equal(fast[fast["measure"] == str(measure)].reset_index(drop=True), slow)


def test_evaluator_handles_repeated_hits_like_ir_measures():
    evaluator = RunEvaluator(["nDCG@10", "P@5"], qrels_of(EDGE_QRELS), EDGE_QUERIES)
    ranked, counts = edge_run()
    ranked[2] = [6, 6, 4, 6, 0, 0]
    counts[2] = 4

    fast = evaluator.per_query_ranked(ranked, counts, EDGE_CORPUS)
    slow = ir_measures_rows(evaluator, EDGE_QUERIES, EDGE_CORPUS, ranked, counts)

    assert_rows_equal(fast, slow)


def test_evaluator_keeps_search_order_of_ties():
    # Both documents would tie on similarity; the evaluator must score the order given, as ir-measures does with rank scores.
    evaluator = RunEvaluator(["P@1", "RR"], qrels_of([("q", "b", 1)]), ["q"])
    corpus_ids = np.array(["a", "b"], dtype=object)

    first = evaluator.per_query_ranked(np.array([[0, 1]]), np.array([2]), corpus_ids)
    second = evaluator.per_query_ranked(np.array([[1, 0]]), np.array([2]), corpus_ids)

    assert first["value"].tolist() == [0.0, 0.5]
    assert second["value"].tolist() == [1.0, 1.0]


# --- top-k selection and the incremental exact sweep -------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_top_k_matches_stable_sort(seed):
    rng = np.random.default_rng(seed)
    rows, columns = int(rng.integers(1, 30)), int(rng.integers(1, 80))
    # Integer scores force many ties, also across the k-th place.
    scores = rng.integers(-3, 4, size=(rows, columns)).astype(np.float32) if seed % 2 else rng.standard_normal((rows, columns)).astype(np.float32)

    for k in (0, 1, columns // 2, columns - 1, columns, columns + 5):
        expected = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, columns)]
        assert top_k(scores, k).tolist() == expected.tolist()


def random_vectors(seed: int, n_docs: int, n_queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n_docs, dim)).astype(np.float32)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    # Zero rows and rows that are zero in their first dims, as truncation can produce.
    corpus[3] = 0
    corpus[5, :4] = 0
    queries[1, :2] = 0
    # Duplicate documents tie exactly at every dim.
    corpus[10] = corpus[20]
    return corpus, queries


@pytest.mark.parametrize(
    ("dims", "block_floats", "min_tile_queries", "result_bytes", "update_floats"),
    [
        (list(range(1, 25)), 1 << 24, 32, 1 << 28, 1 << 22),
        ([1, 2, 3, 7, 8, 15, 24], 1 << 24, 32, 1 << 28, 1 << 22),
        ([1, 2, 3, 7, 8, 15, 24], 1 << 24, 32, 1 << 28, 1000),  # several query rows per update
        ([2, 5, 24], 1 << 24, 32, 1 << 28, 1 << 22),
        ([12, 13, 24], 1 << 24, 32, 1 << 28, 1 << 22),  # first dim above FRESH_MAX_DIM
        (list(range(1, 25)), 2000, 1, 1 << 28, 1 << 22),  # blocks of 6 queries over the whole corpus
        (list(range(1, 25)), 2000, 32, 1 << 28, 1 << 22),  # tiles of 19 queries x 100 documents
        ([1, 2, 3, 7, 8, 15, 24], 600, 32, 1 << 28, 1 << 22),  # tiles of 19 queries x 30 documents
        (list(range(1, 25)), 1 << 24, 32, 30_000, 1 << 22),  # several chunks of dims
    ],
    ids=["all-dims", "gaps", "gaps-split-updates", "first-dim-above-1", "first-dim-above-fresh", "query-blocks", "tiles", "small-tiles", "dim-chunks"],
)
def test_exact_sweep_matches_per_dim_search(monkeypatch, dims, block_floats, min_tile_queries, result_bytes, update_floats):
    monkeypatch.setattr(mrl.sweep, "SCORE_BLOCK_FLOATS", block_floats)
    monkeypatch.setattr(mrl.sweep, "MIN_TILE_QUERIES", min_tile_queries, raising=False)
    monkeypatch.setattr(mrl.sweep, "EXACT_RESULT_BYTES", result_bytes)
    monkeypatch.setattr(mrl.sweep, "UPDATE_FLOATS", update_floats)
    corpus, queries = random_vectors(0, n_docs=300, n_queries=37, dim=24)

    swept = list(exact_sweep(corpus, queries, dims, k=20))

    assert [row.dim for row in swept] == sorted(dims)
    for row in swept:
        expected, scores = reference_search(corpus, queries, row.dim, 20)
        assert_same_up_to_near_ties(row.result.ranked, expected, scores)
        assert row.result.counts.tolist() == [20] * len(queries)
        assert row.zero_docs == truncate(corpus, row.dim)[1]
        assert row.zero_queries == truncate(queries, row.dim)[1]


def test_exact_sweep_first_dim_is_exact_search():
    # At dim 1 every cosine is -1, 0 or 1, so nearly all documents tie; the order must follow corpus position.
    corpus, queries = random_vectors(1, n_docs=200, n_queries=9, dim=8)

    [first, *_] = exact_sweep(corpus, queries, [1, 2, 8], k=50)

    expected, _ = reference_search(corpus, queries, 1, 50)
    assert first.result.ranked.tolist() == expected.tolist()
    assert exact_search(truncate(queries, 1)[0], truncate(corpus, 1)[0], 50).ranked.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("n_queries", "n_docs", "expected"),
    [
        (300, 5_183, (300, 5_183)),  # SciFact fits one tile
        (100, 200_000, (50, 200_000)),  # two blocks of queries over the whole corpus
        (1_000, 10_000_000, (32, 500_000)),  # corpus tiles once fewer than 32 queries would fit
        (10, 10_000_000, (10, 1_666_667)),
    ],
)
def test_tile_shape(n_queries, n_docs, expected):
    query_rows, doc_rows = mrl.sweep.tile_shape(n_queries, n_docs)

    assert (query_rows, doc_rows) == expected
    assert query_rows * doc_rows <= mrl.sweep.SCORE_BLOCK_FLOATS


def test_exact_sweep_k_above_corpus_size():
    corpus, queries = random_vectors(2, n_docs=30, n_queries=4, dim=6)

    swept = list(exact_sweep(corpus, queries, [3, 6], k=100))

    for row in swept:
        expected, scores = reference_search(corpus, queries, row.dim, 100)
        assert row.result.ranked.shape == (4, 30)
        assert_same_up_to_near_ties(row.result.ranked, expected, scores)


# --- whole dim groups, as the Ray task runs them ------------------------------------------


def straightforward_rows(corpus, queries, dim, settings, corpus_ids, query_ids, evaluator) -> tuple[dict, pd.DataFrame]:
    """Search and score one dim the slow way: truncate, search each index from scratch, score with ir-measures."""
    corpus_dim, queries_dim = truncate(corpus, dim)[0], truncate(queries, dim)[0]
    results = {}
    if "exact" in settings.indexes:
        results["exact"] = exact_search(queries_dim, corpus_dim, settings.top_k)
    if "hnsw" in settings.indexes:
        results["hnsw"] = hnsw_search(queries_dim, corpus_dim, settings.top_k, settings.hnsw, settings.threads)[0]
    frames = []
    for index, result in results.items():
        scored = ir_measures_rows(evaluator, query_ids, corpus_ids, result.ranked, result.counts)
        scored.insert(0, "dim", dim)
        scored.insert(0, "index", index)
        frames.append(scored)
    return results, pd.concat(frames, ignore_index=True)


def test_sweep_dims_matches_straightforward_on_scifact(scifact_vectors):
    dataset, embeddings, corpus_ids = scifact_vectors
    evaluator = RunEvaluator(["nDCG@10", "R@100", "RR@10", "AP@100"], dataset.qrels, dataset.query_ids)
    settings = SearchSettings()
    dims = [1, 2, 3, 48, 128, 129, 384]

    swept = sweep_dims(embeddings.corpus, embeddings.queries, dims, settings, corpus_ids, dataset.query_ids, evaluator)

    assert [dim for dim, _, _ in swept] == dims
    for dim, rows, [stats] in swept:
        _, expected = straightforward_rows(embeddings.corpus, embeddings.queries, dim, settings, corpus_ids, dataset.query_ids, evaluator)
        assert list(rows.columns) == ["index", "dtype", "dim", "query_id", "measure", "value"]
        assert set(rows["dtype"]) == {"f32"}
        rows = rows.drop(columns="dtype")
        assert rows[["index", "dim", "query_id", "measure"]].values.tolist() == expected[["index", "dim", "query_id", "measure"]].values.tolist()
        # HNSW is rebuilt from the same vectors with one thread, so it matches exactly. Exact search
        # may swap near-tied documents (see NEAR_TIE), which moves a mean by at most a few 1e-4.
        hnsw = (rows["index"] == "hnsw").to_numpy()
        np.testing.assert_allclose(rows["value"][hnsw], expected["value"][hnsw], rtol=0, atol=1e-9)
        means = rows.groupby(["index", "measure"])["value"].mean() - expected.groupby(["index", "measure"])["value"].mean()
        assert means.abs().max() <= 1e-3
        assert stats["zero_docs"] == truncate(embeddings.corpus, dim)[1]
        assert 0.0 <= stats["hnsw_recall_vs_exact"] <= 1.0


def test_sweep_dims_exact_rankings_on_scifact(scifact_vectors):
    _, embeddings, _ = scifact_vectors
    dims = [1, 2, 8, 64, 200, 384]

    for row in exact_sweep(embeddings.corpus, embeddings.queries, dims, 100):
        expected, scores = reference_search(embeddings.corpus, embeddings.queries, row.dim, 100)
        assert_same_up_to_near_ties(row.result.ranked, expected, scores)
        # At dim 2 a cosine is the cosine of one angle, so near-ties are common. From dim 8 on,
        # at most 2% of queries differ anywhere in their top 100.
        if row.dim >= 8:
            assert (row.result.ranked != expected).any(axis=1).mean() <= 0.02


def test_sweep_dims_ignore_identical_ids():
    corpus, queries = random_vectors(3, n_docs=60, n_queries=5, dim=8)
    corpus[:5] = queries  # each query's own id is in the corpus and is its nearest neighbour
    corpus_ids = np.array([f"q{i}" for i in range(5)] + [f"d{i}" for i in range(5, 60)], dtype=object)
    query_ids = [f"q{i}" for i in range(5)]
    qrels = qrels_of([(f"q{i}", f"d{10 + i}", 1) for i in range(5)])
    evaluator = RunEvaluator(["P@1", "R@10", "nDCG@10"], qrels, query_ids)
    settings = SearchSettings(top_k=10, ignore_identical_ids=True)

    swept = sweep_dims(corpus, queries, [4, 8], settings, corpus_ids, query_ids, evaluator)

    for dim, rows, _ in swept:
        corpus_dim, queries_dim = truncate(corpus, dim)[0], truncate(queries, dim)[0]
        for index, result in (
            ("exact", exact_search(queries_dim, corpus_dim, 11)),
            ("hnsw", hnsw_search(queries_dim, corpus_dim, 11, settings.hnsw)[0]),
        ):
            kept = mrl.sweep.drop_identical_ids(result, query_ids, corpus_ids, 10)
            expected = ir_measures_rows(evaluator, query_ids, corpus_ids, kept.ranked, kept.counts)
            got = rows[rows["index"] == index].reset_index(drop=True)
            np.testing.assert_allclose(got["value"], expected["value"], rtol=0, atol=1e-9)


def test_sweep_dims_hnsw_only_counts_zero_vectors():
    corpus, queries = random_vectors(4, n_docs=50, n_queries=3, dim=6)
    evaluator = RunEvaluator(["nDCG@10"], qrels_of([("q0", "d1", 1)]), ["q0", "q1", "q2"])
    corpus_ids = np.array([f"d{i}" for i in range(50)], dtype=object)

    [(_, rows, [stats])] = sweep_dims(corpus, queries, [2], SearchSettings(indexes=("hnsw",)), corpus_ids, ["q0", "q1", "q2"], evaluator)

    assert stats["zero_docs"] == truncate(corpus, 2)[1]
    assert stats["zero_queries"] == 1
    assert set(rows["index"]) == {"hnsw"}
