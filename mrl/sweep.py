"""Truncate, renormalise, search and score at each truncation dim.

Exact search (brute-force cosine) shows what truncation alone costs; a usearch HNSW
index over the same vectors adds the approximate index's own loss on top. Running
both separates index noise from truncation loss.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import ray
from scipy.linalg import blas
from usearch.index import Index

from mrl.evaluate import RunEvaluator

INDEXES = ("exact", "hnsw")
# Vector precisions that usearch stores. Reduced dtypes are quantised from the truncated float32 vectors as usearch 2.26 does.
DTYPES = ("f32", "bf16", "f16", "i8", "b1")
# Dtypes whose shortlist --rescore reorders with the float32 truncated vectors.
RESCORE_DTYPES = ("i8", "b1")
# A rescored dtype is recorded under its own dtype label, such as "b1+rescore".
RESCORE_SUFFIX = "+rescore"
# Queries are scored in blocks so that the block's score matrix stays within this many floats
# (64 MiB). An exact sweep keeps two such matrices per task.
SCORE_BLOCK_FLOATS = 1 << 24
# Corpus rows truncated and added to an HNSW index at a time.
HNSW_ADD_ROWS = 1 << 16
# An exact sweep keeps the rankings of at most this many bytes of dims in memory at once.
EXACT_RESULT_BYTES = 1 << 28
# Temporary floats an exact sweep allocates to add several dims to its dot products at once.
UPDATE_FLOATS = 1 << 22
# An exact sweep scores its first dim from a fresh product when it is at most this large; see exact_tile.
FRESH_MAX_DIM = 8
# Minimum queries per tile of scores: below it an exact sweep splits the corpus into tiles too; see tile_shape.
MIN_TILE_QUERIES = 32


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
    dtypes: tuple[str, ...] = ("f32",)
    # Shortlist size that i8 and b1 results are rescored from with float32 vectors; 0 turns rescoring off.
    rescore: int = 0


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


def parse_dtypes(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse a dtype list such as ``f32,i8,b1`` into a tuple in the order of DTYPES."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(name).strip() for name in names if str(name).strip()]
    unknown = [name for name in names if name not in DTYPES]
    if unknown or not names:
        raise ValueError(f"invalid dtype {unknown[0] if unknown else ''!r} in {spec!r}; expected one or more of {','.join(DTYPES)}")
    return tuple(dtype for dtype in DTYPES if dtype in names)


def quantise(unit: np.ndarray, dtype: str) -> np.ndarray:
    """Convert unit vectors to what a usearch index of ``dtype`` stores.

    The conversions reproduce usearch 2.26, checked against ``Index.get``. bf16 rounds
    to nearest even, f16 is IEEE half precision, and i8 truncates each component times
    127 toward zero. b1 packs one sign bit per dim (set for components above 0) with
    ``np.packbits``, so a b1 vector of d dims takes ceil(d / 8) bytes. For bf16 the
    result is float32 values rounded to bf16, because numpy has no bf16 type.
    """
    if dtype == "f32":
        return unit
    if dtype == "bf16":
        bits = unit.astype(np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32)
    if dtype == "f16":
        return unit.astype(np.float16)
    if dtype == "i8":
        return np.trunc(unit * 127).astype(np.int8)
    if dtype == "b1":
        return np.packbits(unit > 0, axis=1)
    raise ValueError(f"invalid dtype {dtype!r}; expected one of {','.join(DTYPES)}")


def scoring_vectors(unit: np.ndarray, dtype: str) -> np.ndarray:
    """Return float32 vectors whose inner products rank as ``dtype``'s usearch metric does.

    For the float dtypes and i8 that is cosine of the quantised vectors, so they are
    renormalised. For b1 it is Hamming distance: with components of +1 for a set bit
    and -1 otherwise, the inner product is d - 2 * hamming, exact in float32.
    """
    if dtype == "b1":
        return np.where(unit > 0, np.float32(1), np.float32(-1))
    return truncate(quantise(unit, dtype).astype(np.float32), unit.shape[1])[0]


def rerank(shortlist: SearchResult, unit_queries: np.ndarray, unit_corpus: np.ndarray, k: int) -> SearchResult:
    """Reorder each query's shortlist by cosine of the given unit vectors and keep its best ``k``.

    Equal scores keep their shortlist order. ``seconds`` adds the reranking time to the
    shortlist's search time.
    """
    started = time.perf_counter()
    n_queries, width = shortlist.ranked.shape
    k = min(k, width)
    ranked = np.zeros((n_queries, k), dtype=np.int64)
    # Bound the gathered shortlist vectors, block x width x dim floats, as the exact search bounds its scores.
    block = max(1, SCORE_BLOCK_FLOATS // max(width * unit_corpus.shape[1], 1))
    padding = np.arange(width)[None, :] >= shortlist.counts[:, None]

    for start in range(0, n_queries, block):
        stop = min(start + block, n_queries)
        positions = shortlist.ranked[start:stop]
        scores = np.einsum("qd,qkd->qk", unit_queries[start:stop], unit_corpus[positions])
        scores[padding[start:stop]] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ranked[start:stop] = np.take_along_axis(positions, order, axis=1)

    counts = np.minimum(shortlist.counts, k)
    ranked[np.arange(k)[None, :] >= counts[:, None]] = 0
    return SearchResult(ranked=ranked, counts=counts, seconds=shortlist.seconds + time.perf_counter() - started)


def top_k(scores: np.ndarray, k: int, kth: np.ndarray | None = None) -> np.ndarray:
    """Return the positions of each row's ``k`` highest scores, best first, equal scores by lower position.

    np.partition on the values finds each row's k-th highest score, and a mask picks the
    positions at or above it. That is as fast as np.argpartition and ordering its k (2.7
    ms for a 300 x 5,183 float32 matrix, numpy 2.4 on one AMD EPYC core). But it makes
    ties at the k-th place deterministic, because of the positions tied there the lowest
    are kept. It also needs 1 byte of mask per score where np.argpartition moves an int64
    index array, and at dim 1, where most scores tie, it takes 3.7 ms against 10 ms.

    ``kth``, each row's k-th highest score, skips the partition when the caller has it.
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    if k == n_cols:
        return np.argsort(-scores, axis=1, kind="stable")
    if k == 0:
        return np.empty((n_rows, 0), dtype=np.int64)

    if kth is None:
        kth = np.partition(scores, n_cols - k, axis=1)[:, n_cols - k]
    at_or_above = scores >= kth[:, None]
    if np.count_nonzero(at_or_above) == n_rows * k:
        # No row ties across the k-th place. flatnonzero lists each row's positions in ascending order.
        flat = np.flatnonzero(at_or_above)
    else:
        # Fewer than k scores per row lie above the k-th, so the rest of the row's k are tied with it.
        # Taking the lowest tied positions row by row bounds memory: at dim 1 most of the matrix ties.
        above = np.flatnonzero(scores > kth[:, None])
        missing = k - np.bincount(above // n_cols, minlength=n_rows)
        tied = [row * n_cols + np.flatnonzero(scores[row] == kth[row])[: missing[row]] for row in range(n_rows)]
        flat = np.sort(np.concatenate([above, *tied]))
    candidate_scores = scores.reshape(-1)[flat]

    positions = (flat % n_cols).reshape(n_rows, k)
    order = np.argsort(-candidate_scores.reshape(n_rows, k), axis=1, kind="stable")
    return np.take_along_axis(positions, order, axis=1)


def query_block_size(n_queries: int, n_docs: int) -> int:
    """Return how many queries to score at once: blocks of equal size, each within SCORE_BLOCK_FLOATS scores."""
    largest = max(1, SCORE_BLOCK_FLOATS // max(n_docs, 1))
    n_blocks = -(-n_queries // largest)
    return max(1, -(-n_queries // max(n_blocks, 1)))


def exact_search(queries: np.ndarray, corpus: np.ndarray, k: int) -> SearchResult:
    """Brute-force search by inner product of unit vectors (cosine), best first.

    Ties are ordered by corpus position, so the ranking is deterministic.
    """
    started = time.perf_counter()
    n_queries, n_docs = len(queries), len(corpus)
    k = min(k, n_docs)
    ranked = np.empty((n_queries, k), dtype=np.int64)
    block = query_block_size(n_queries, n_docs)

    for start in range(0, n_queries, block):
        ranked[start : start + block] = top_k(queries[start : start + block] @ corpus.T, k)

    counts = np.full(n_queries, k, dtype=np.int64)
    return SearchResult(ranked=ranked, counts=counts, seconds=time.perf_counter() - started)


@dataclass
class ExactDim:
    """Exact search result at one dim, with how many corpus and query vectors are all zeros there."""

    dim: int
    result: SearchResult
    zero_docs: int
    zero_queries: int


def exact_sweep(corpus: np.ndarray, queries: np.ndarray, dims: list[int], k: int) -> Iterator[ExactDim]:
    """Search every dim in ``dims`` exactly, extending dot products and squared norms dim by dim.

    At dim d the cosine is S_d / (|q_d| |c_d|), and S_d = S_p + Q[:, p:d] C[:, p:d]^T for
    the previous dim p, so all dims together cost about one full-size matrix product plus
    a top-k selection per dim, instead of a product per dim. Each row's ranking needs
    only S_d / |c_d|, because the query norm is a positive factor of the whole row. A
    vector whose first d dims are all zero scores 0 against everything, as ``truncate``
    makes it.

    Yields one ``ExactDim`` per dim in ascending order. Dims are processed in chunks whose
    rankings fit in ``EXACT_RESULT_BYTES``, each chunk starting afresh from its first dim.

    NOTE: S_d accumulates in float32 over many steps, so scores differ from a fresh
    product at dim d by rounding (about 1e-6 relative). Documents whose scores are that
    close may swap places; the tests check that nothing else changes.
    """
    dims = sorted(dims)
    bytes_per_dim = len(queries) * min(k, len(corpus)) * np.dtype(np.int64).itemsize
    chunk = max(1, EXACT_RESULT_BYTES // max(bytes_per_dim, 1))
    for start in range(0, len(dims), chunk):
        yield from exact_sweep_chunk(corpus, queries, dims[start : start + chunk], k)


def tile_shape(n_queries: int, n_docs: int) -> tuple[int, int]:
    """Return the queries and documents of one tile of scores, at most SCORE_BLOCK_FLOATS of them.

    A tile spans the whole corpus while that leaves room for MIN_TILE_QUERIES queries.
    Beyond that the corpus is split too, because each tile reads its corpus columns once
    per dim, and with only a few queries per tile that reading would outweigh the
    scoring. Tiles are of equal size along each axis.
    """
    query_rows = query_block_size(n_queries, n_docs)
    if query_rows >= min(n_queries, MIN_TILE_QUERIES):
        return query_rows, n_docs
    query_rows = -(-n_queries // -(-n_queries // MIN_TILE_QUERIES))
    largest_doc_rows = max(1, SCORE_BLOCK_FLOATS // query_rows)
    return query_rows, -(-n_docs // -(-n_docs // largest_doc_rows))


def exact_sweep_chunk(corpus: np.ndarray, queries: np.ndarray, dims: list[int], k: int) -> list[ExactDim]:
    """Search ascending ``dims`` exactly, one tile of queries x documents at a time; see ``exact_sweep``.

    When the corpus spans several tiles, each tile's top k per dim is merged into the
    running top k of the tiles before it, so a task's memory stays bounded however large
    the corpus is.
    """
    n_queries, n_docs = len(queries), len(corpus)
    k = min(k, n_docs)
    query_rows, doc_rows = tile_shape(n_queries, n_docs)
    ranked = {dim: np.empty((n_queries, k), dtype=np.int64) for dim in dims}
    seconds = dict.fromkeys(dims, 0.0)
    zero_queries = dict.fromkeys(dims, 0)
    zero_docs = dict.fromkeys(dims, 0)

    for query_start in range(0, n_queries, query_rows):
        query_block = queries[query_start : query_start + query_rows]
        best: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for doc_start in range(0, n_docs, doc_rows):
            for tile in exact_tile(corpus[doc_start : doc_start + doc_rows], query_block, dims, k):
                seconds[tile.dim] += tile.seconds
                zero_docs[tile.dim] += tile.zero_docs if query_start == 0 else 0
                zero_queries[tile.dim] += tile.zero_queries if doc_start == 0 else 0
                found = (tile.positions + doc_start, tile.scores)
                best[tile.dim] = merge_top_k(best[tile.dim], found, k) if tile.dim in best else found
        for dim, (positions, _) in best.items():
            ranked[dim][query_start : query_start + len(query_block)] = positions

    counts = np.full(n_queries, k, dtype=np.int64)
    return [
        ExactDim(dim=dim, result=SearchResult(ranked=ranked[dim], counts=counts, seconds=seconds[dim]), zero_docs=zero_docs[dim], zero_queries=zero_queries[dim])
        for dim in dims
    ]


@dataclass
class TileTopK:
    """One tile's top k at one dim: positions within the tile, best first, their scores, and the tile's zero-vector counts."""

    dim: int
    positions: np.ndarray
    scores: np.ndarray
    zero_docs: int
    zero_queries: int
    seconds: float


def exact_tile(corpus: np.ndarray, queries: np.ndarray, dims: list[int], k: int) -> Iterator[TileTopK]:
    """Yield the top k of every dim in ``dims`` for one tile of queries x documents, extending dot products dim by dim.

    A first dim up to FRESH_MAX_DIM is scored from freshly truncated and renormalised
    vectors, exactly as ``exact_search`` scores it. The smallest dims are where many
    documents tie exactly (at dim 1 every cosine is -1, 0 or 1), and a fresh product keeps
    those ties exact, so they are broken by corpus position rather than by rounding noise.
    """
    n_docs = len(corpus)
    k = min(k, n_docs)
    # Two score matrices are all the working memory: BLAS updates dots in place, and the
    # partition runs in place in scaled, which is then recomputed.
    dots = np.empty((len(queries), n_docs), dtype=np.float32)
    scaled = np.empty_like(dots)
    doc_norms = np.zeros(n_docs)
    query_norms = np.zeros(len(queries))
    previous = 0

    for dim in dims:
        started = time.perf_counter()
        doc_slice = corpus[:, previous:dim]
        query_slice = queries[:, previous:dim]
        if previous == 0:
            np.matmul(query_slice, doc_slice.T, out=dots)
        else:
            add_product(dots, query_slice, doc_slice)
        # Each step's squares sum in float32, as truncate's norms do, and accumulate across dims in
        # float64. einsum reads the strided slice in place, where a dtype=float64 argument would copy it.
        doc_norms += np.einsum("ij,ij->i", doc_slice, doc_slice)
        query_norms += np.einsum("ij,ij->i", query_slice, query_slice)

        if previous == 0 and dim <= FRESH_MAX_DIM:
            unit_queries, unit_docs = truncate(queries, dim)[0], truncate(corpus, dim)[0]
            score = partial(np.matmul, unit_queries, unit_docs.T, out=scaled)
        else:
            score = partial(scale_columns, dots, doc_norms, scaled)
        if k == n_docs:
            positions = top_k(score(), k)
        else:
            # Partition in place, then score again: cheaper in memory than np.partition's copy.
            score().partition(n_docs - k, axis=1)
            kth = scaled[:, n_docs - k].copy()
            positions = top_k(score(), k, kth)
        previous = dim

        yield TileTopK(
            dim=dim,
            positions=positions,
            scores=np.take_along_axis(scaled, positions, axis=1),
            zero_docs=int((doc_norms == 0).sum()),
            zero_queries=int((query_norms == 0).sum()),
            seconds=time.perf_counter() - started,
        )


def merge_top_k(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (positions, scores) top-k lists of the same queries into one, best first.

    ``first`` comes from a tile of lower corpus positions, so a stable sort by score keeps
    equal scores in corpus position order, as within a tile.
    """
    positions = np.concatenate([first[0], second[0]], axis=1)
    scores = np.concatenate([first[1], second[1]], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(positions, order, axis=1), np.take_along_axis(scores, order, axis=1)


def add_product(dots: np.ndarray, query_columns: np.ndarray, doc_columns: np.ndarray) -> None:
    """Add ``query_columns @ doc_columns.T`` to the float32 matrix ``dots`` in place.

    One column goes through BLAS sger on the transposed, Fortran-ordered view of
    ``dots``, without a temporary matrix: 0.05 ms against 0.2 ms for numpy's outer
    product and add (300 x 5,183, one AMD EPYC core). Several columns go through numpy's
    matmul, a few query rows at a time, so the temporary product stays within
    UPDATE_FLOATS and the strided corpus columns are read in place rather than copied.
    """
    if query_columns.shape[1] == 1:
        doc_column, query_column = np.ascontiguousarray(doc_columns[:, 0]), np.ascontiguousarray(query_columns[:, 0])
        result = blas.sger(1.0, doc_column, query_column, a=dots.T, overwrite_a=1)
        if not np.shares_memory(result, dots):
            # scipy returns a copy when it cannot write into the given array.
            dots[...] = result.T
        return
    rows = max(1, UPDATE_FLOATS // dots.shape[1])
    for start in range(0, len(dots), rows):
        dots[start : start + rows] += query_columns[start : start + rows] @ doc_columns.T


def scale_columns(dots: np.ndarray, squared_norms: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Divide each column of ``dots`` by its document norm into ``out``; a zero-norm document scores 0."""
    inverse_norms = np.zeros(len(squared_norms), dtype=np.float32)
    np.divide(1.0, np.sqrt(squared_norms), out=inverse_norms, where=squared_norms > 0)
    return np.multiply(dots, inverse_norms, out=out)


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
    return search_index(index, queries, k, len(corpus), threads), build_seconds


def search_index(index: Index, queries: np.ndarray, k: int, n_docs: int, threads: int) -> SearchResult:
    """Search a usearch index and return its hits as corpus positions, padding set to position 0."""
    started = time.perf_counter()
    k = min(k, n_docs)
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
    return SearchResult(ranked=ranked, counts=counts, seconds=time.perf_counter() - started)


def hnsw_search_dim(
    corpus: np.ndarray, queries: np.ndarray, dim: int, settings: SearchSettings, k: int, dtype: str = "f32"
) -> tuple[SearchResult, float, int, int]:
    """Build an HNSW index over the corpus truncated to ``dim`` and stored as ``dtype``, and search it.

    Returns the result, the build seconds, and the zero-vector counts of corpus and queries.
    """
    index, build_seconds, zero_docs = build_hnsw_index(corpus, dim, settings, dtype)
    queries_dim, zero_queries = truncate(queries, dim)
    result = search_index(index, quantise(queries_dim, dtype), k, len(corpus), settings.threads)
    return result, build_seconds, zero_docs, zero_queries


def build_hnsw_index(corpus: np.ndarray, dim: int, settings: SearchSettings, dtype: str = "f32") -> tuple[Index, float, int]:
    """Build a usearch HNSW index over the corpus truncated to ``dim``, quantised to ``dtype``.

    The metric is cosine, except Hamming distance for b1. Rows are truncated, renormalised
    and quantised in chunks as they are added, so the task keeps only the index's own
    copy of the vectors, never a second full truncated matrix. With one thread, adding
    in chunks builds the same graph as one add of all rows (usearch 2.26, checked on
    SciFact). Returns the index, the build seconds and the number of all-zero rows.
    """
    started = time.perf_counter()
    params = settings.hnsw
    index = Index(
        ndim=dim,
        metric="hamming" if dtype == "b1" else "cos",
        dtype=dtype,
        connectivity=params.connectivity,
        expansion_add=params.expansion_add,
        expansion_search=params.expansion_search,
    )
    zero_docs = 0
    for start in range(0, len(corpus), HNSW_ADD_ROWS):
        unit, zero_rows = truncate(corpus[start : start + HNSW_ADD_ROWS], dim)
        index.add(np.arange(start, start + len(unit), dtype=np.uint64), quantise(unit, dtype), threads=settings.threads)
        zero_docs += zero_rows
    return index, time.perf_counter() - started, zero_docs


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


def sweep_dims(
    corpus: np.ndarray,
    queries: np.ndarray,
    dims: list[int],
    settings: SearchSettings,
    corpus_ids: np.ndarray,
    query_ids: list[str],
    evaluator: RunEvaluator,
) -> list[tuple[int, pd.DataFrame, list[dict]]]:
    """Search and score a group of truncation dims with every requested index and dtype.

    Returns (dim, per-query rows, stats rows) per dim in ascending dim order. The per-query
    rows have columns index, dtype, dim, query_id, measure, value, and there is one stats
    row per dtype label (each dtype, plus "i8+rescore" and "b1+rescore" when rescoring).
    """
    unknown = [index for index in settings.indexes if index not in INDEXES]
    if unknown:
        raise ValueError(f"unknown index {unknown[0]!r}; expected one of {', '.join(INDEXES)}")
    parse_dtypes(settings.dtypes)
    if settings.rescore < 0:
        raise ValueError(f"rescore shortlist size must be 0 (off) or positive, got {settings.rescore}")
    dims = sorted(dims)
    # One extra hit lets a query keep k results after its own id is removed.
    k = settings.top_k + (1 if settings.ignore_identical_ids else 0)
    exact = exact_sweep(corpus, queries, dims, k) if "exact" in settings.indexes and "f32" in settings.dtypes else None

    swept = []
    for dim in dims:
        results: dict[tuple[str, str], SearchResult] = {}
        stats: dict[str, dict] = {}
        quantised = [dtype for dtype in settings.dtypes if dtype != "f32"]
        # Reduced dtypes are quantised from the truncated float32 vectors, made once per dim.
        unit = (truncate(queries, dim), truncate(corpus, dim)) if quantised else None

        for dtype in settings.dtypes:
            labels = [dtype]
            if settings.rescore and dtype in RESCORE_DTYPES:
                labels.append(dtype + RESCORE_SUFFIX)
            for label in labels:
                stats[label] = {"dim": dim, "dtype": label, "zero_docs": 0, "zero_queries": 0}

            for index in settings.indexes:
                found = search_dtype(corpus, queries, dim, dtype, index, settings, k, exact, unit)
                for label, (result, facts) in zip(labels, found):
                    if settings.ignore_identical_ids:
                        result = drop_identical_ids(result, query_ids, corpus_ids, settings.top_k)
                    stats[label].update(facts)
                    stats[label][f"{index}_search_seconds"] = result.seconds
                    results[(index, label)] = result

        for label in stats:
            if ("exact", label) in results and ("hnsw", label) in results:
                stats[label]["hnsw_recall_vs_exact"] = overlap_at_k(results[("hnsw", label)], results[("exact", label)])
        swept.append((dim, score_dim(dim, results, corpus_ids, evaluator), list(stats.values())))
    return swept


def search_dtype(
    corpus: np.ndarray,
    queries: np.ndarray,
    dim: int,
    dtype: str,
    index: str,
    settings: SearchSettings,
    k: int,
    exact: Iterator[ExactDim] | None,
    unit: tuple[tuple[np.ndarray, int], tuple[np.ndarray, int]] | None,
) -> list[tuple[SearchResult, dict]]:
    """Search one dim with one index and dtype; return (result, stats facts) for the plain dtype, then its rescored label.

    ``exact`` is the f32 exact sweep, and ``unit`` the truncated (queries, zero count) and
    (corpus, zero count) that reduced dtypes are quantised from.
    """
    if dtype == "f32":
        if index == "exact":
            exact_dim = next(exact)
            return [(exact_dim.result, {"zero_docs": exact_dim.zero_docs, "zero_queries": exact_dim.zero_queries})]
        result, build_seconds, zero_docs, zero_queries = hnsw_search_dim(corpus, queries, dim, settings, k)
        return [(result, {"hnsw_build_seconds": build_seconds, "zero_docs": zero_docs, "zero_queries": zero_queries})]

    (unit_queries, zero_queries), (unit_corpus, zero_docs) = unit
    facts = {"zero_docs": zero_docs, "zero_queries": zero_queries}
    rescoring = bool(settings.rescore) and dtype in RESCORE_DTYPES
    shortlist_k = max(settings.rescore, k) if rescoring else k
    if index == "exact":
        shortlist = exact_search(scoring_vectors(unit_queries, dtype), scoring_vectors(unit_corpus, dtype), shortlist_k)
        # The exact order is total (score, then corpus position), so its first k are the top k.
        plain = SearchResult(shortlist.ranked[:, :k], np.minimum(shortlist.counts, k), shortlist.seconds)
    else:
        built, build_seconds, _ = build_hnsw_index(corpus, dim, settings, dtype)
        facts["hnsw_build_seconds"] = build_seconds
        quantised_queries = quantise(unit_queries, dtype)
        plain = search_index(built, quantised_queries, k, len(corpus), settings.threads)
        # HNSW searches a larger k more widely, so the shortlist is a search of its own; the plain result stays as without rescoring.
        shortlist = search_index(built, quantised_queries, shortlist_k, len(corpus), settings.threads) if rescoring else None
    found = [(plain, facts)]
    if rescoring:
        found.append((rerank(shortlist, unit_queries, unit_corpus, k), dict(facts)))
    return found


def score_dim(dim: int, results: dict[tuple[str, str], SearchResult], corpus_ids: np.ndarray, evaluator: RunEvaluator) -> pd.DataFrame:
    """Score each (index, dtype label) result at one dim; return rows of index, dtype, dim, query_id, measure, value."""
    frames = []
    for (index, dtype), result in results.items():
        scored = evaluator.per_query_ranked(result.ranked, result.counts, corpus_ids)
        scored.insert(0, "dim", dim)
        scored.insert(0, "dtype", dtype)
        scored.insert(0, "index", index)
        frames.append(scored)
    return pd.concat(frames, ignore_index=True)


def evaluate_dim(
    corpus: np.ndarray,
    queries: np.ndarray,
    dim: int,
    settings: SearchSettings,
    corpus_ids: np.ndarray,
    query_ids: list[str],
    evaluator: RunEvaluator,
) -> tuple[pd.DataFrame, list[dict]]:
    """Search one truncation dim and score it; return per-query rows (index, dtype, dim, query_id, measure, value) and stats rows."""
    [(_, rows, stats)] = sweep_dims(corpus, queries, [dim], settings, corpus_ids, query_ids, evaluator)
    return rows, stats


@ray.remote(num_cpus=1, max_retries=3)
def sweep_dims_task(corpus, queries, dims, settings, corpus_ids, query_ids, qrels, measures) -> list[tuple[int, pd.DataFrame, list[dict]]]:
    """Ray task: search and score a group of truncation dims over vectors shared through the object store."""
    evaluator = RunEvaluator(measures, qrels, query_ids)
    return sweep_dims(corpus, queries, dims, settings, corpus_ids, query_ids, evaluator)
