"""Two-stage (funnel) retrieval: shortlist with a small-dim HNSW index, then rerank exactly at a larger dim.

For each shortlist dim s, an f32 HNSW index over the corpus truncated to s returns the
top K of each query. That shortlist is reordered by exact cosine of the truncated and
renormalised float32 vectors at the rerank dim r, and the best top-k are scored. Only
the small index must sit in memory, while the rerank reads r dims of K documents per
query.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray

from mrl.evaluate import RunEvaluator
from mrl.sweep import SearchSettings, build_hnsw_index, drop_identical_ids, parse_dims, rerank, search_index, truncate

# Columns that identify one funnel configuration, in the order the tables list them.
FUNNEL_KEYS = ("shortlist_dim", "shortlist_k", "rerank_dim")


@dataclass(frozen=True)
class FunnelGrid:
    """Funnel configurations to evaluate: every (shortlist dim, shortlist size K, rerank dim)."""

    shortlist_dims: tuple[int, ...]
    shortlist_ks: tuple[int, ...]
    rerank_dims: tuple[int, ...]

    def size(self) -> int:
        """Return the number of (shortlist dim, K, rerank dim) configurations."""
        return len(self.shortlist_dims) * len(self.shortlist_ks) * len(self.rerank_dims)


def parse_ks(spec: str | int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Parse shortlist sizes such as ``100,200`` into sorted positive integers."""
    if isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        items = [item for item in str(spec).split(",") if item.strip()]
    try:
        ks = sorted({int(item) for item in items})
    except ValueError:
        raise ValueError(f"invalid shortlist size list {spec!r}; expected positive integers such as 100,200") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"invalid shortlist size list {spec!r}; expected positive integers such as 100,200")
    return tuple(ks)


def parse_funnel(shortlist_dims: str | list[int], shortlist_ks: str | list[int], rerank_dims: str | list[int], full_dim: int) -> FunnelGrid:
    """Parse the three funnel lists; dims take the forms that ``--dims`` takes and must fit ``full_dim``.

    ``full`` in a dim list stands for ``full_dim``.
    """
    return FunnelGrid(
        shortlist_dims=tuple(parse_dims(expand_full(shortlist_dims, full_dim), full_dim)),
        shortlist_ks=parse_ks(shortlist_ks),
        rerank_dims=tuple(parse_dims(expand_full(rerank_dims, full_dim), full_dim)),
    )


def expand_full(spec: str | list[int], full_dim: int) -> str | list[int]:
    """Replace the word ``full`` in a comma-separated dim list by ``full_dim``."""
    if not isinstance(spec, str):
        return spec
    return ",".join(str(full_dim) if item.strip() == "full" else item for item in spec.split(","))


def funnel_shortlist_dim(
    corpus: np.ndarray,
    queries: np.ndarray,
    shortlist_dim: int,
    grid: FunnelGrid,
    settings: SearchSettings,
    corpus_ids: np.ndarray,
    query_ids: list[str],
    evaluator: RunEvaluator,
) -> tuple[pd.DataFrame, list[dict]]:
    """Evaluate every (K, rerank dim) of the grid for one shortlist dim.

    Builds one f32 HNSW index at ``shortlist_dim`` and searches it once per K. Returns
    per-query rows (shortlist_dim, shortlist_k, rerank_dim, query_id, measure, value)
    and one stats row per configuration with its build, search and rerank seconds.
    """
    index, build_seconds, _ = build_hnsw_index(corpus, shortlist_dim, settings)
    unit_queries = truncate(queries, shortlist_dim)[0]
    shortlists = {shortlist_k: search_index(index, unit_queries, shortlist_k, len(corpus), settings.threads) for shortlist_k in grid.shortlist_ks}
    del index
    # One extra hit lets a query keep k results after its own id is removed.
    k = settings.top_k + (1 if settings.ignore_identical_ids else 0)

    frames = []
    stats = []
    for rerank_dim in grid.rerank_dims:
        # One truncated copy of the corpus at a time bounds memory to the largest rerank dim.
        rerank_queries, rerank_corpus = truncate(queries, rerank_dim)[0], truncate(corpus, rerank_dim)[0]
        for shortlist_k, shortlist in shortlists.items():
            started = time.perf_counter()
            result = rerank(shortlist, rerank_queries, rerank_corpus, k)
            rerank_seconds = time.perf_counter() - started
            if settings.ignore_identical_ids:
                result = drop_identical_ids(result, query_ids, corpus_ids, settings.top_k)

            scored = evaluator.per_query_ranked(result.ranked, result.counts, corpus_ids)
            for position, (column, value) in enumerate(zip(FUNNEL_KEYS, (shortlist_dim, shortlist_k, rerank_dim))):
                scored.insert(position, column, value)
            frames.append(scored)
            stats.append(
                {
                    "shortlist_dim": shortlist_dim,
                    "shortlist_k": shortlist_k,
                    "rerank_dim": rerank_dim,
                    "hnsw_build_seconds": build_seconds,
                    "shortlist_search_seconds": shortlist.seconds,
                    "rerank_seconds": rerank_seconds,
                }
            )
    return pd.concat(frames, ignore_index=True), stats


@ray.remote(num_cpus=1, max_retries=3)
def funnel_task(corpus, queries, shortlist_dim, grid, settings, corpus_ids, query_ids, qrels, measures) -> tuple[pd.DataFrame, list[dict]]:
    """Ray task: evaluate the funnel grid of one shortlist dim over vectors shared through the object store."""
    evaluator = RunEvaluator(measures, qrels, query_ids)
    return funnel_shortlist_dim(corpus, queries, shortlist_dim, grid, settings, corpus_ids, query_ids, evaluator)


def aggregate_funnel(per_query: pd.DataFrame) -> pd.DataFrame:
    """Average per-query funnel values into one row per model, dataset, configuration and measure."""
    keys = ["model", "dataset", *FUNNEL_KEYS, "measure"]
    metrics = per_query.groupby(keys, sort=True, observed=True)["value"].agg(value="mean", n_queries="count").reset_index()
    return metrics[[*keys, "value", "n_queries"]]


# Share of the full-size mean at which the report counts a funnel configuration as matching the full size.
MATCH_SHARE = 0.99


def summarise_funnel(funnel: pd.DataFrame, metrics: pd.DataFrame, measure: str, n_docs: int, full_dim: int, connectivity: int = 16) -> pd.DataFrame:
    """Compare each funnel configuration with full-size exact f32 search, in quality and in memory.

    ``funnel`` and ``metrics`` are one pair's funnel.parquet and metrics.parquet. Returns
    one row per configuration with its mean and ``share_of_full``, which is NaN when the
    sweep has no exact f32 result at ``full_dim``. ``matches_full`` is a share of at least
    MATCH_SHARE. The memory columns estimate, for ``n_docs`` documents, the shortlist HNSW
    index and a full-size f32 HNSW index (``analyse.index_memory_bytes``). ``rerank_bytes``
    is the float32 vectors the rerank reads, n_docs x 4 x rerank dim bytes, which can stay on disk.
    """
    from mrl.analyse import bytes_per_vector, index_memory_bytes

    rows = funnel[funnel["measure"] == measure].sort_values(list(FUNNEL_KEYS)).reset_index(drop=True)
    full = metrics[(metrics["measure"] == measure) & (metrics["index"] == "exact") & (metrics["dim"] == full_dim)]
    if "dtype" in full.columns:
        full = full[full["dtype"] == "f32"]
    full_size = float(full["value"].iloc[0]) if len(full) else float("nan")

    summary = rows[[*FUNNEL_KEYS, "value", "n_queries"]].rename(columns={"value": "mean"})
    summary["share_of_full"] = summary["mean"] / full_size
    summary["matches_full"] = summary["share_of_full"] >= MATCH_SHARE
    summary["shortlist_index_bytes"] = [index_memory_bytes(n_docs, int(dim), "f32", connectivity) for dim in summary["shortlist_dim"]]
    summary["full_index_bytes"] = index_memory_bytes(n_docs, full_dim, "f32", connectivity)
    summary["rerank_bytes"] = [n_docs * bytes_per_vector(int(dim), "f32") for dim in summary["rerank_dim"]]
    return summary
