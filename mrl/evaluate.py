"""Score runs against qrels with ir-measures, one value per query and measure.

A run is given as ranked document positions per query, exactly as the search returned
them. ir-measures (through pytrec_eval) sorts a run by score and breaks ties by
document id, so the scores handed to it are derived from rank (k for the first hit,
k-1 for the second, ...): equal similarity scores, common at small truncation dims,
then keep the order the search produced instead of being re-sorted by id.

Scoring a sweep's runs through ir-measures costs about 0.1 s per run on SciFact, more
than searching them. ``RankedScorer`` computes nDCG@k, P@k, R@k, RR, RR@k, AP and AP@k
with numpy straight from the ranked positions, to the same values as trec_eval 9 (through
pytrec_eval) and ir-measures' msmarco provider:

- nDCG uses linear gain (the relevance grade, negative grades counted as 0) and the
  log2(rank + 1) discount. The ideal DCG comes from all judged documents of the query,
  including those missing from the corpus.
- A document is relevant when its grade is at least ``rel`` (default 1). The recall and
  AP denominators count all relevant judged documents, retrieved or not.
- P@k divides by k even when fewer than k documents were retrieved.
- A query with no relevant judged document, or no hit, scores 0.

Other measures, or parameters beyond ``cutoff`` and ``rel``, go through ir-measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import ir_measures
import numpy as np
import pandas as pd

DEFAULT_MEASURES = ("nDCG@10", "R@100", "RR@10", "AP@100")
# Above this many query x document cells, relevance is looked up in sorted keys instead of a dense table.
DENSE_RELEVANCE_CELLS = 1 << 26


def parse_measures(spec: str | list[str] | tuple[str, ...]) -> list:
    """Parse measures in ir-measures notation (``nDCG@10 R@100``, comma or space separated)."""
    names = spec.replace(",", " ").split() if isinstance(spec, str) else [str(name) for name in spec]
    if not names:
        raise ValueError("no measures given; expected names in ir-measures notation such as nDCG@10 R@100")

    measures = []
    for name in names:
        try:
            measures.append(ir_measures.parse_measure(name))
        except (NameError, ValueError, TypeError) as error:
            raise ValueError(f"invalid measure {name!r} ({error}); expected ir-measures notation such as nDCG@10, R@100, RR@10, AP@100") from None
    return measures


def max_cutoff(measures: list) -> int | None:
    """Return the largest rank cut-off among the measures, or None when one of them reads the whole run."""
    cutoffs = []
    for measure in measures:
        cutoff = measure.params.get("cutoff")
        if cutoff is None:
            return None
        cutoffs.append(int(cutoff))
    return max(cutoffs)


def qrels_frame(qrels: pd.DataFrame) -> pd.DataFrame:
    """Return qrels in the column layout ir-measures reads."""
    return pd.DataFrame(
        {
            "query_id": qrels["query_id"].astype(str),
            "doc_id": qrels["doc_id"].astype(str),
            "relevance": qrels["relevance"].astype(int),
        }
    )


def run_frame(query_ids: list[str], corpus_ids: np.ndarray, ranked: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """Build an ir-measures run from ranked corpus positions.

    ``ranked[i, :counts[i]]`` are the corpus positions retrieved for query ``i``, best
    first; slots past ``counts[i]`` are padding and are ignored.
    """
    k = ranked.shape[1]
    valid = np.arange(k)[None, :] < counts[:, None]
    rows, ranks = np.nonzero(valid)
    return pd.DataFrame(
        {
            "query_id": np.asarray(query_ids, dtype=object)[rows],
            "doc_id": corpus_ids[ranked[rows, ranks]],
            "score": (k - ranks).astype(np.float64),
        }
    )


@dataclass(frozen=True)
class RankedMeasure:
    """A measure that ``RankedScorer`` computes itself: its ir-measures name, kind, cut-off and relevance threshold."""

    name: str
    kind: str
    cutoff: int | None
    rel: int


def ranked_measure(measure) -> RankedMeasure | None:
    """Return the ``RankedMeasure`` for an ir-measures measure, or None when only ir-measures computes it."""
    params = dict(measure.params)
    cutoff = params.pop("cutoff", None)
    rel = params.pop("rel", 1)
    if params.pop("judged_only", False):
        return None
    if measure.NAME == "nDCG":
        # The defaults: log2 discount and the grades themselves as gains.
        if params.pop("dcg", "log2") != "log2" or params.pop("gains", None) is not None:
            return None
    elif measure.NAME not in ("P", "R", "RR", "AP"):
        return None
    if params or not isinstance(rel, int):
        return None
    if measure.NAME in ("P", "R") and cutoff is None:
        return None
    return RankedMeasure(name=str(measure), kind=measure.NAME, cutoff=None if cutoff is None else int(cutoff), rel=rel)


class RelevanceTable:
    """Relevance grades of one set of qrels, indexed by query row and corpus position.

    Judged documents missing from the corpus cannot be retrieved, so they are left out of
    the lookup, but they stay in ``grades`` and so count towards ideal DCG and recall.
    """

    def __init__(self, qrels: pd.DataFrame, query_ids: list[str], corpus_ids: np.ndarray):
        judged = qrels_frame(qrels).drop_duplicates(["query_id", "doc_id"], keep="last")
        rows = pd.Index(list(query_ids)).get_indexer(judged["query_id"])
        judged = judged[rows >= 0]
        rows = rows[rows >= 0]
        positions = pd.Index(np.asarray(corpus_ids, dtype=object)).get_indexer(judged["doc_id"])
        relevance = judged["relevance"].to_numpy(np.int64)
        self.n_queries = len(query_ids)
        self.n_docs = len(corpus_ids)

        # Every judged grade per query, corpus or not, for the ideal ranking and recall denominators.
        order = np.argsort(rows, kind="stable")
        self.grade_rows = rows[order]
        self.grades = relevance[order]

        in_corpus = positions >= 0
        rows, positions, relevance = rows[in_corpus], positions[in_corpus], relevance[in_corpus]
        self.dense: np.ndarray | None = None
        if self.n_queries * self.n_docs <= DENSE_RELEVANCE_CELLS:
            small = relevance.size == 0 or (relevance.min() >= -128 and relevance.max() <= 127)
            self.dense = np.zeros((self.n_queries, self.n_docs), dtype=np.int8 if small else np.int64)
            self.dense[rows, positions] = relevance
        else:
            keys = rows.astype(np.int64) * self.n_docs + positions
            order = np.argsort(keys)
            self.keys = keys[order]
            self.values = relevance[order]

    def gather(self, ranked: np.ndarray) -> np.ndarray:
        """Return the grade of every ranked position, [n_queries x k], 0 for unjudged documents."""
        if self.dense is not None:
            return np.take_along_axis(self.dense, ranked, axis=1).astype(np.int64)
        if len(self.keys) == 0:
            return np.zeros(ranked.shape, dtype=np.int64)
        keys = np.arange(self.n_queries, dtype=np.int64)[:, None] * self.n_docs + ranked
        found = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[found] == keys, self.values[found], 0)

    def relevant_counts(self, rel: int) -> np.ndarray:
        """Return how many judged documents per query have a grade of at least ``rel``."""
        return np.bincount(self.grade_rows[self.grades >= rel], minlength=self.n_queries)

    def ideal_dcg(self, cutoff: int | None) -> np.ndarray:
        """Return each query's DCG of the ideal ranking, all positive grades best first, cut at ``cutoff``."""
        positive = self.grades > 0
        rows, gains = self.grade_rows[positive], self.grades[positive].astype(np.float64)
        # Best first within each query: sort by row, then by descending gain.
        order = np.lexsort((-gains, rows))
        rows, gains = rows[order], gains[order]
        starts = np.searchsorted(rows, rows, side="left")
        ranks = np.arange(len(rows)) - starts
        kept = ranks < cutoff if cutoff is not None else np.ones(len(rows), dtype=bool)
        discounted = gains[kept] / np.log2(ranks[kept] + 2.0)
        return np.bincount(rows[kept], weights=discounted, minlength=self.n_queries)


class RankedScorer:
    """Computes ``RankedMeasure`` values per query from ranked corpus positions, without building a run."""

    def __init__(self, measures: list[RankedMeasure], table: RelevanceTable):
        self.measures = measures
        self.table = table
        self.relevant = {measure.rel: table.relevant_counts(measure.rel) for measure in measures}
        self.ideal = {measure.cutoff: table.ideal_dcg(measure.cutoff) for measure in measures if measure.kind == "nDCG"}

    def score(self, ranked: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Return a [n_queries x n_measures] array of values; ``ranked[i, counts[i]:]`` is ignored."""
        k = ranked.shape[1]
        valid = np.arange(k)[None, :] < counts[:, None]
        grades = np.where(valid, self.table.gather(ranked), 0)
        values = np.zeros((len(counts), len(self.measures)))

        for column, measure in enumerate(self.measures):
            depth = k if measure.cutoff is None else min(measure.cutoff, k)
            head = grades[:, :depth]
            if measure.kind == "nDCG":
                dcg = np.maximum(head, 0) @ (1.0 / np.log2(np.arange(depth) + 2.0))
                ideal = self.ideal[measure.cutoff]
                values[:, column] = np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)
                continue

            relevant = head >= measure.rel
            n_relevant = self.relevant[measure.rel]
            if measure.kind == "P":
                values[:, column] = relevant.sum(axis=1) / measure.cutoff
            elif measure.kind == "R":
                values[:, column] = np.divide(relevant.sum(axis=1), n_relevant, out=np.zeros(len(counts)), where=n_relevant > 0)
            elif measure.kind == "RR":
                first = np.argmax(relevant, axis=1)
                found = relevant.any(axis=1)
                values[:, column] = np.where(found, 1.0 / (first + 1.0), 0.0)
            elif measure.kind == "AP":
                precision = np.cumsum(relevant, axis=1) / np.arange(1.0, depth + 1.0)
                total = (precision * relevant).sum(axis=1)
                values[:, column] = np.divide(total, n_relevant, out=np.zeros(len(counts)), where=n_relevant > 0)
        return values


def has_duplicate_hits(ranked: np.ndarray, counts: np.ndarray) -> bool:
    """Return whether any query's hits name one document twice (ir-measures would keep only one of them)."""
    k = ranked.shape[1]
    # Padding gets distinct negative values so that it never looks like a repeat.
    padded = np.where(np.arange(k)[None, :] < counts[:, None], ranked, -1 - np.arange(k)[None, :])
    ordered = np.sort(padded, axis=1)
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())


class RunEvaluator:
    """Scores runs against one set of qrels; build once, call per run."""

    def __init__(self, measures: list | list[str], qrels: pd.DataFrame, query_ids: list[str]):
        self.measures = parse_measures(measures)
        self.query_ids = list(query_ids)
        self.qrels = qrels
        self.evaluator = ir_measures.evaluator(self.measures, qrels_frame(qrels))
        self.ranked_measures = [ranked_measure(measure) for measure in self.measures]
        # One evaluator per measure: ir-measures 0.4.3 reports two variants of one trec_eval
        # measure, such as nDCG@10 and nDCG(judged_only=True)@10, under one name in a shared evaluator.
        self.other_evaluators = [
            ir_measures.evaluator([measure], qrels_frame(qrels)) for measure, fast in zip(self.measures, self.ranked_measures) if fast is None
        ]
        self.scorer: RankedScorer | None = None
        self.scorer_corpus_ids: np.ndarray | None = None

    def per_query(self, run: pd.DataFrame) -> pd.DataFrame:
        """Return ``query_id``, ``measure``, ``value`` for every evaluated query and measure.

        A judged query with no retrieved document scores 0 on every measure, so that
        all runs average over the same queries.
        """
        values = {(metric.query_id, str(metric.measure)): float(metric.value) for metric in self.evaluator.iter_calc(run)}
        names = [str(measure) for measure in self.measures]
        return pd.DataFrame(
            [(query_id, name, values.get((query_id, name), 0.0)) for query_id in self.query_ids for name in names],
            columns=["query_id", "measure", "value"],
        )

    def per_query_ranked(self, ranked: np.ndarray, counts: np.ndarray, corpus_ids: np.ndarray) -> pd.DataFrame:
        """Return the rows of ``per_query`` for ranked corpus positions, ``ranked[i, :counts[i]]`` best first.

        The measures that ``RankedScorer`` implements are computed with numpy; the others,
        and every measure of a run that names a document twice, go through ir-measures.
        """
        if has_duplicate_hits(ranked, counts):
            return self.per_query(run_frame(self.query_ids, corpus_ids, ranked, counts))

        values = np.zeros((len(self.query_ids), len(self.measures)))
        fast_columns = [column for column, fast in enumerate(self.ranked_measures) if fast is not None]
        if fast_columns:
            values[:, fast_columns] = self.ranked_scorer(corpus_ids).score(ranked, counts)
        if self.other_evaluators:
            run = run_frame(self.query_ids, corpus_ids, ranked, counts)
            row_of = {query_id: row for row, query_id in enumerate(self.query_ids)}
            column_of = {str(measure): column for column, measure in enumerate(self.measures)}
            for evaluator in self.other_evaluators:
                for metric in evaluator.iter_calc(run):
                    # Some measures also report judged queries outside ``query_ids``; per_query skips those too.
                    if metric.query_id in row_of:
                        values[row_of[metric.query_id], column_of[str(metric.measure)]] = float(metric.value)

        names = np.array([str(measure) for measure in self.measures], dtype=object)
        return pd.DataFrame(
            {
                "query_id": np.repeat(np.asarray(self.query_ids, dtype=object), len(names)),
                "measure": np.tile(names, len(self.query_ids)),
                "value": values.reshape(-1),
            }
        )

    def ranked_scorer(self, corpus_ids: np.ndarray) -> RankedScorer:
        """Return the numpy scorer for this corpus, building its relevance table on first use."""
        if self.scorer is None or self.scorer_corpus_ids is not corpus_ids:
            measures = [fast for fast in self.ranked_measures if fast is not None]
            self.scorer = RankedScorer(measures, RelevanceTable(self.qrels, self.query_ids, corpus_ids))
            self.scorer_corpus_ids = corpus_ids
        return self.scorer
