"""Truncate, renormalise, search and score at each truncation dim.

Exact search (brute-force cosine) shows what truncation alone costs; a usearch HNSW
index over the same vectors adds the approximate index's own loss on top. Running
both separates index noise from truncation loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import ray
from usearch.index import Index

from mrl.evaluate import RunEvaluator, run_frame

INDEXES = ("exact", "hnsw")
# Queries are scored in blocks so that the block's score matrix stays near this many floats.
SCORE_BLOCK_FLOATS = 1 << 25


@dataclass(frozen=True)
class HnswParams:
    """usearch HNSW graph parameters; the defaults are usearch's own (2.x)."""

    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 64


@dataclass(frozen=True)
class SearchSettings:
    """What every truncation dim is searched with."""

    indexes: tuple[str, ...] = INDEXES
    top_k: int = 100
    hnsw: HnswParams = field(default_factory=HnswParams)
    ignore_identical_ids: bool = False
    threads: int = 1


@dataclass
class SearchResult:
    """Ranked corpus positions per query; ``ranked[i, :counts[i]]`` are real hits, the rest padding."""

    ranked: np.ndarray
    counts: np.ndarray
    seconds: float


def parse_dims(spec: str | list[int] | tuple[int, ...], full_dim: int) -> list[int]:
    """Parse a truncation-dim spec: ``all``, ``start:stop`` (inclusive), ``start:stop:step`` or ``32,64,128``."""
    if isinstance(spec, (list, tuple)):
        dims = [int(value) for value in spec]
    else:
        text = str(spec).strip()
        try:
            if text == "all":
                dims = list(range(1, full_dim + 1))
            elif ":" in text:
                parts = [int(part) for part in text.split(":")]
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                    raise ValueError
                start, stop = parts[0], parts[1]
                step = parts[2] if len(parts) == 3 else 1
                dims = list(range(start, stop + 1, step))
            else:
                dims = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"invalid --dims {spec!r}; expected all, START:STOP, START:STOP:STEP or a list like 32,64,128") from None

    if not dims:
        raise ValueError(f"--dims {spec!r} selects no dims")
    too_small = [dim for dim in dims if dim < 1]
    if too_small:
        raise ValueError(f"--dims {spec!r}: dims must be at least 1, got {too_small[0]}")
    too_large = [dim for dim in dims if dim > full_dim]
    if too_large:
        raise ValueError(f"--dims {spec!r}: dim {too_large[0]} is larger than the embeddings' {full_dim} dims")
    return sorted(set(dims))


def truncate(vectors: np.ndarray, dim: int) -> tuple[np.ndarray, int]:
    """Keep the first ``dim`` dims and scale each row to unit length.

    Returns the truncated vectors and how many rows became all zeros. Such rows stay
    zero instead of turning into NaN: cosine similarity with them is taken as 0.
    """
    kept = vectors[:, :dim].astype(np.float32, copy=False)
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    unit = np.zeros(kept.shape, dtype=np.float32)
    np.divide(kept, norms, out=unit, where=~zero[:, None])
    return unit, int(zero.sum())


def exact_search(queries: np.ndarray, corpus: np.ndarray, k: int) -> SearchResult:
    """Brute-force search by inner product of unit vectors (cosine), best first.

    Ties are ordered by corpus position, so the ranking is deterministic.
    """
    started = time.perf_counter()
    n_queries, n_docs = len(queries), len(corpus)
    k = min(k, n_docs)
    ranked = np.empty((n_queries, k), dtype=np.int64)
    block = max(1, SCORE_BLOCK_FLOATS // max(n_docs, 1))

    for start in range(0, n_queries, block):
        scores = queries[start : start + block] @ corpus.T
        if k < n_docs:
            candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            candidates.sort(axis=1)
        else:
            candidates = np.broadcast_to(np.arange(n_docs), scores.shape).copy()
        candidate_scores = np.take_along_axis(scores, candidates, axis=1)
        order = np.argsort(-candidate_scores, axis=1, kind="stable")
        ranked[start : start + block] = np.take_along_axis(candidates, order, axis=1)

    counts = np.full(n_queries, k, dtype=np.int64)
    return SearchResult(ranked=ranked, counts=counts, seconds=time.perf_counter() - started)


def hnsw_search(queries: np.ndarray, corpus: np.ndarray, k: int, params: HnswParams, threads: int = 1) -> tuple[SearchResult, float]:
    """Build a usearch HNSW index (cosine, f32) over the corpus and search it.

    Returns the search result and the build time in seconds. The dtype is passed
    explicitly because usearch may otherwise store vectors in half precision.
    """
    started = time.perf_counter()
    index = Index(
        ndim=corpus.shape[1],
        metric="cos",
        dtype="f32",
        connectivity=params.connectivity,
        expansion_add=params.expansion_add,
        expansion_search=params.expansion_search,
    )
    index.add(np.arange(len(corpus), dtype=np.uint64), corpus, threads=threads)
    build_seconds = time.perf_counter() - started

    started = time.perf_counter()
    k = min(k, len(corpus))
    matches = index.search(queries, k, threads=threads)
    if hasattr(matches, "counts"):
        counts = np.asarray(matches.counts, dtype=np.int64).reshape(len(queries))
        ranked = np.asarray(matches.keys, dtype=np.int64).reshape(len(queries), k)
    else:
        # usearch returns a single Matches object, holding only real hits, for a batch of one query.
        counts = np.array([len(matches.keys)], dtype=np.int64)
        ranked = np.zeros((1, k), dtype=np.int64)
        ranked[0, : counts[0]] = matches.keys
    # Slots past a query's count hold usearch's sentinel key; point them at 0 so no index is out of range.
    ranked[np.arange(k)[None, :] >= counts[:, None]] = 0
    return SearchResult(ranked=ranked, counts=counts, seconds=time.perf_counter() - started), build_seconds


def drop_identical_ids(result: SearchResult, query_ids: list[str], corpus_ids: np.ndarray, k: int) -> SearchResult:
    """Remove each query's own id from its hits and keep at most ``k`` (BEIR's rule for ArguAna and Quora)."""
    query_ids_array = np.asarray(query_ids, dtype=object)
    ranked = np.zeros((len(query_ids), min(k, result.ranked.shape[1])), dtype=np.int64)
    counts = np.zeros(len(query_ids), dtype=np.int64)

    for row in range(len(query_ids)):
        hits = result.ranked[row, : result.counts[row]]
        hits = hits[corpus_ids[hits] != query_ids_array[row]][: ranked.shape[1]]
        ranked[row, : len(hits)] = hits
        counts[row] = len(hits)
    return SearchResult(ranked=ranked, counts=counts, seconds=result.seconds)


def overlap_at_k(approximate: SearchResult, exact: SearchResult) -> float:
    """Return the mean share of exact top-k hits that the approximate search also found (ANN recall@k)."""
    shares = []
    for row in range(len(exact.counts)):
        truth = set(exact.ranked[row, : exact.counts[row]].tolist())
        if truth:
            found = set(approximate.ranked[row, : approximate.counts[row]].tolist())
            shares.append(len(truth & found) / len(truth))
    return float(np.mean(shares)) if shares else float("nan")


def search_dim(corpus: np.ndarray, queries: np.ndarray, dim: int, settings: SearchSettings, query_ids: list[str], corpus_ids: np.ndarray) -> tuple[dict[str, SearchResult], dict]:
    """Search one truncation dim with every requested index; return results by index and per-dim stats."""
    corpus_dim, zero_docs = truncate(corpus, dim)
    queries_dim, zero_queries = truncate(queries, dim)
    # One extra hit lets a query keep k results after its own id is removed.
    k = settings.top_k + (1 if settings.ignore_identical_ids else 0)
    stats: dict = {"dim": dim, "zero_docs": zero_docs, "zero_queries": zero_queries}

    results: dict[str, SearchResult] = {}
    for index in settings.indexes:
        if index == "exact":
            result = exact_search(queries_dim, corpus_dim, k)
        elif index == "hnsw":
            result, stats["hnsw_build_seconds"] = hnsw_search(queries_dim, corpus_dim, k, settings.hnsw, settings.threads)
        else:
            raise ValueError(f"unknown index {index!r}; expected one of {', '.join(INDEXES)}")
        if settings.ignore_identical_ids:
            result = drop_identical_ids(result, query_ids, corpus_ids, settings.top_k)
        stats[f"{index}_search_seconds"] = result.seconds
        results[index] = result

    if "exact" in results and "hnsw" in results:
        stats["hnsw_recall_vs_exact"] = overlap_at_k(results["hnsw"], results["exact"])
    return results, stats


def evaluate_dim(
    corpus: np.ndarray,
    queries: np.ndarray,
    dim: int,
    settings: SearchSettings,
    corpus_ids: np.ndarray,
    query_ids: list[str],
    evaluator: RunEvaluator,
) -> tuple[pd.DataFrame, dict]:
    """Search one truncation dim and score it; return per-query rows (index, dim, query_id, measure, value) and stats."""
    results, stats = search_dim(corpus, queries, dim, settings, query_ids, corpus_ids)
    frames = []
    for index, result in results.items():
        scored = evaluator.per_query(run_frame(query_ids, corpus_ids, result.ranked, result.counts))
        scored.insert(0, "dim", dim)
        scored.insert(0, "index", index)
        frames.append(scored)
    return pd.concat(frames, ignore_index=True), stats


@ray.remote(num_cpus=1, max_retries=3)
def sweep_dims_task(corpus, queries, dims, settings, corpus_ids, query_ids, qrels, measures) -> list[tuple[int, pd.DataFrame, dict]]:
    """Ray task: search and score a group of truncation dims over vectors shared through the object store."""
    evaluator = RunEvaluator(measures, qrels, query_ids)
    return [(dim, *evaluate_dim(corpus, queries, dim, settings, corpus_ids, query_ids, evaluator)) for dim in dims]
