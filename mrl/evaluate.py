"""Score runs against qrels with ir-measures, one value per query and measure.

A run is given as ranked document positions per query, exactly as the search returned
them. ir-measures (through pytrec_eval) sorts a run by score and breaks ties by
document id, so the scores handed to it are derived from rank (k for the first hit,
k-1 for the second, ...): equal similarity scores, common at small truncation dims,
then keep the order the search produced instead of being re-sorted by id.
"""

from __future__ import annotations

import ir_measures
import numpy as np
import pandas as pd

DEFAULT_MEASURES = ("nDCG@10", "R@100", "RR@10", "AP@100")


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


class RunEvaluator:
    """Scores runs against one set of qrels; build once, call per run."""

    def __init__(self, measures: list | list[str], qrels: pd.DataFrame, query_ids: list[str]):
        self.measures = parse_measures(measures)
        self.query_ids = list(query_ids)
        self.evaluator = ir_measures.evaluator(self.measures, qrels_frame(qrels))

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
