"""Truncation, search and scoring on small hand-made inputs, with real usearch and ir-measures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mrl.evaluate import RunEvaluator, parse_measures
from mrl.sweep import HnswParams, SearchSettings, evaluate_dim, exact_search, hnsw_search, parse_dims, truncate


def score(corpus, queries, corpus_ids, query_ids, qrels, dim, measures=("nDCG@10",), **settings) -> pd.DataFrame:
    """Search and score one dim with both indexes; return per-query rows."""
    qrels = pd.DataFrame(qrels, columns=["query_id", "doc_id", "relevance"])
    evaluator = RunEvaluator(list(measures), qrels, query_ids)
    rows, _ = evaluate_dim(
        np.asarray(corpus, dtype=np.float32),
        np.asarray(queries, dtype=np.float32),
        dim,
        SearchSettings(**settings),
        np.asarray(corpus_ids, dtype=object),
        query_ids,
        evaluator,
    )
    return rows


def value(rows: pd.DataFrame, index: str, measure: str = "nDCG@10", query_id: str | None = None) -> float:
    selected = rows[(rows["index"] == index) & (rows["measure"] == measure)]
    if query_id is not None:
        selected = selected[selected["query_id"] == query_id]
    return float(selected["value"].mean())


def test_truncation_renormalises():
    # Without renormalising, B's first two dims (0.7, 0.7) outscore A's (0.6, 0) for query [1, 0];
    # after it, A is [1, 0] and matches the query exactly.
    corpus = [[0.6, 0, 0.8, 0], [0.7, 0.7, 0.1, 0.1]]
    rows = score(corpus, [[1, 0, 0, 0]], ["A", "B"], ["q"], [("q", "A", 1)], dim=2)

    assert value(rows, "exact") == pytest.approx(1.0)
    assert value(rows, "hnsw") == pytest.approx(1.0)


def test_truncate_keeps_zero_rows_finite():
    vectors = np.array([[0.0, 1.0, 0.0], [3.0, 4.0, 0.0]], dtype=np.float32)

    unit, zero_rows = truncate(vectors, 1)

    assert zero_rows == 1
    assert np.isfinite(unit).all()
    assert unit.tolist() == [[0.0], [1.0]]
    assert np.allclose(np.linalg.norm(truncate(vectors, 2)[0], axis=1), 1.0)


def test_zero_vectors_put_no_nan_into_results():
    corpus = [[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]
    rows = score(corpus, [[1.0, 0.0], [0.0, 1.0]], ["a", "b", "c"], ["q1", "q2"], [("q1", "b", 1), ("q2", "a", 1)], dim=1)

    assert rows["value"].notna().all()
    assert value(rows, "exact", query_id="q1") == pytest.approx(1.0)
    assert value(rows, "hnsw", query_id="q1") == pytest.approx(1.0)


def test_missing_relevant_document_counts_in_ideal_dcg():
    # q1 judges dA and dGone relevant; dGone is not in the corpus, so the ideal ranking has two
    # relevant documents and dA alone at rank 1 scores 1 / (1 + 1/log2(3)) = 0.6131, as BEIR reports.
    corpus = [[1.0, 0.0], [0.0, 1.0]]
    qrels = [("q1", "dA", 1), ("q1", "dGone", 1)]
    rows = score(corpus, [[1.0, 0.1]], ["dA", "dB"], ["q1"], qrels, dim=2)

    assert value(rows, "exact") == pytest.approx(0.6131471927654584)
    assert value(rows, "hnsw") == pytest.approx(0.6131471927654584)


def test_ignore_identical_ids_removes_own_id():
    # ArguAna-style: the query's own argument is in the corpus and is its nearest neighbour.
    corpus = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]
    ids = ["q1", "counter", "other"]
    qrels = [("q1", "counter", 1)]

    kept = score(corpus, [[1.0, 0.0]], ids, ["q1"], qrels, dim=2, measures=("P@1", "R@2"), top_k=2)
    dropped = score(corpus, [[1.0, 0.0]], ids, ["q1"], qrels, dim=2, measures=("P@1", "R@2"), top_k=2, ignore_identical_ids=True)

    assert value(kept, "exact", "P@1") == 0.0
    assert value(dropped, "exact", "P@1") == 1.0
    assert value(dropped, "hnsw", "P@1") == 1.0
    assert value(dropped, "exact", "R@2") == 1.0


def test_top_k_larger_than_corpus():
    corpus = np.eye(3, dtype=np.float32)
    rows = score(corpus, [[1, 0, 0]], ["a", "b", "c"], ["q"], [("q", "c", 1)], dim=3, measures=("R@100", "nDCG@100"), top_k=100)

    assert value(rows, "exact", "R@100") == 1.0
    assert value(rows, "hnsw", "R@100") == 1.0
    assert rows["value"].notna().all()


def test_hnsw_padding_never_becomes_a_document():
    corpus = np.eye(3, dtype=np.float32)

    result, _ = hnsw_search(corpus[:1], corpus, 10, HnswParams())

    assert result.counts.tolist() == [3]
    assert sorted(result.ranked[0, :3].tolist()) == [0, 1, 2]


def test_exact_search_orders_ties_by_corpus_position():
    corpus = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)

    result = exact_search(np.array([[1.0, 0.0]], dtype=np.float32), corpus, 2)

    assert result.ranked.tolist() == [[0, 1]]


def test_evaluation_keeps_search_order_of_ties():
    # Two identical documents: search returns "a" (position 0) first. pytrec_eval would break the
    # score tie by document id in descending order and put "b" first; rank-derived scores prevent that.
    corpus = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    rows = score(corpus, [[1.0, 0.0]], ["a", "b", "c"], ["q"], [("q", "a", 1)], dim=2, measures=("P@1",), indexes=("exact",))

    assert value(rows, "exact", "P@1") == 1.0


def test_graded_relevance_counts():
    corpus = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    qrels = [("q", "a", 1), ("q", "b", 2)]
    rows = score(corpus, [[1.0, 0.0]], ["a", "b", "c"], ["q"], qrels, dim=2, indexes=("exact",))

    # Ranking a (gain 1), b (gain 2) against the ideal b, a: DCG = 1 + 2/log2(3), IDCG = 2 + 1/log2(3).
    expected = (1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3))
    assert value(rows, "exact") == pytest.approx(expected)


def test_judged_query_without_hits_scores_zero():
    qrels = pd.DataFrame([("q1", "a", 1), ("q2", "a", 1)], columns=["query_id", "doc_id", "relevance"])
    evaluator = RunEvaluator(["nDCG@10"], qrels, ["q1", "q2"])
    run = pd.DataFrame({"query_id": ["q1"], "doc_id": ["a"], "score": [1.0]})

    rows = evaluator.per_query(run)

    assert rows.set_index("query_id")["value"].to_dict() == {"q1": 1.0, "q2": 0.0}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(1, 9))),
        ("2:5", [2, 3, 4, 5]),
        ("2:8:3", [2, 5, 8]),
        ("8,2,4,4", [2, 4, 8]),
        ([3, 1], [1, 3]),
    ],
)
def test_parse_dims(spec, expected):
    assert parse_dims(spec, 8) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("16", r"dim 16 is larger than the embeddings' 8 dims"),
        ("1:9", r"dim 9 is larger"),
        ("0,4", r"at least 1"),
        ("a:b", r"invalid --dims 'a:b'"),
        ("1:8:0", r"invalid --dims"),
        ("5:2", r"selects no dims"),
    ],
)
def test_parse_dims_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_dims(spec, 8)


def test_invalid_measure_is_named():
    with pytest.raises(ValueError, match=r"invalid measure 'nDCG@x'"):
        parse_measures("nDCG@10 nDCG@x")
