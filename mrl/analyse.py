"""Compute the statistics behind choosing a truncation dim for a Matryoshka model.

Every function here is pure: it takes arrays or data frames and returns arrays, data
frames or numbers, with no file or network I/O and no global state. Randomness comes
from a ``numpy.random.Generator`` seeded by the ``seed`` argument, so the same input and
seed give the same output.

Input is the per-query frame that the sweep writes (``per_query.parquet``): one row per
(model, dataset, index, [dtype], dim, query_id, measure) with the score in ``value``.
The ``dtype`` column is optional. When it is present, every grouping also splits by it.

The module constants name the methods for reports:

- ``INTERVAL_METHOD``: percentile bootstrap of the mean over queries.
- ``PAIRED_TEST``: two-sided paired sign-flip randomisation test on per-query differences.
- ``CORRECTIONS``: Holm by default, Benjamini-Hochberg on request.
- ``KNEE_METHOD``: Kneedle.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

INTERVAL_METHOD = "percentile bootstrap"
PAIRED_TEST = "paired sign-flip randomisation test"
CORRECTIONS = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
DEFAULT_CORRECTION = "holm"
KNEE_METHOD = "Kneedle (Satopää et al. 2011)"

# Storage types of the vectors, with their bits per dimension.
DTYPE_BITS = {"f32": 32, "bf16": 16, "f16": 16, "i8": 8, "b1": 1}

# A per-query frame without a dtype column comes from a sweep that searched float32
# vectors, both exactly and with usearch HNSW.
DEFAULT_DTYPE = "f32"

INDEX_KINDS = ("exact", "hnsw")
GROUP_COLUMNS = ("model", "dataset", "index")
PER_QUERY_COLUMNS = ("model", "dataset", "index", "dim", "query_id", "measure", "value")
SUMMARY_COLUMNS = (
    "mean",
    "ci_low",
    "ci_high",
    "n_queries",
    "share_of_full",
    "p_value",
    "p_adjusted",
)

# Resampling runs in blocks of about this many matrix entries (16 MiB of float64), so
# memory stays bounded for any number of queries, dims and resamples. The block shape
# depends only on the number of queries, so a row of a matrix gets the same random draws
# as the same values passed alone.
_BLOCK_ENTRIES = 1 << 21

# With Holm over m tests, no adjusted p-value can fall below m / (B + 1) when the test
# uses B random resamples. Forty resamples per test keep that floor at 0.025, so a dim
# can still reach significance at alpha = 0.05.
_MIN_PERMUTATIONS = 10_000
_PERMUTATIONS_PER_TEST = 40


# Resampling


def _block_rows(n_items: int) -> int:
    return max(1, _BLOCK_ENTRIES // n_items)


def _bootstrap_count_blocks(
    n_items: int, n_resamples: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield bootstrap resamples of ``n_items`` items as float count matrices.

    Each block has shape [resamples in block, n_items]. Entry (b, j) is how often item j
    was drawn in resample b, so ``values @ counts.T / n_items`` gives resampled means.
    """
    block_rows = _block_rows(n_items)
    for start in range(0, n_resamples, block_rows):
        rows = min(block_rows, n_resamples - start)
        indices = rng.integers(0, n_items, size=(rows, n_items))

        # Offset each row's indices so that one bincount counts all rows at once.
        offsets = np.arange(rows)[:, None] * n_items
        counts = np.bincount((indices + offsets).ravel(), minlength=rows * n_items)
        yield counts.reshape(rows, n_items).astype(np.float64)


def _bootstrap_intervals(
    matrix: np.ndarray, n_resamples: int, level: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return percentile bootstrap bounds of the mean of each row of ``matrix``.

    All rows share the same resampled query indices, which is what a paired design needs.
    """
    n_rows, n_items = matrix.shape
    rng = np.random.default_rng(seed)
    resampled_means = np.empty((n_rows, n_resamples))

    start = 0
    for counts in _bootstrap_count_blocks(n_items, n_resamples, rng):
        stop = start + counts.shape[0]
        resampled_means[:, start:stop] = matrix @ counts.T / n_items
        start = stop

    tail = (1.0 - level) / 2.0
    low, high = np.quantile(resampled_means, [tail, 1.0 - tail], axis=1)
    return low, high


def _sign_blocks(n_items: int, n_resamples: int, seed: int) -> tuple[Iterator[np.ndarray], bool]:
    """Return blocks of sign vectors for a sign-flip test and whether they are exhaustive.

    When ``2 ** n_items <= n_resamples`` the blocks enumerate every sign vector once, as
    scipy.stats.permutation_test does. Otherwise they contain ``n_resamples`` random vectors.
    """
    exhaustive = n_items < 63 and 2**n_items <= n_resamples
    block_rows = _block_rows(n_items)

    def enumerate_all() -> Iterator[np.ndarray]:
        total = 2**n_items
        bit_positions = np.arange(n_items, dtype=np.int64)
        for start in range(0, total, block_rows):
            patterns = np.arange(start, min(start + block_rows, total), dtype=np.int64)
            bits = (patterns[:, None] >> bit_positions) & 1
            yield bits.astype(np.float64) * 2.0 - 1.0

    def draw_random() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        for start in range(0, n_resamples, block_rows):
            rows = min(block_rows, n_resamples - start)
            bits = rng.integers(0, 2, size=(rows, n_items), dtype=np.int8)
            yield bits.astype(np.float64) * 2.0 - 1.0

    return (enumerate_all() if exhaustive else draw_random()), exhaustive


def _sign_flip_p_values(differences: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Return the two-sided sign-flip p-value for each row of per-query differences.

    The statistic is |sum of differences|, which orders sign vectors the same way as
    |mean difference|. An exhaustive enumeration gives count / 2**n. Random sign vectors
    give (count + 1) / (n_resamples + 1), which counts the observed signs as one resample
    and so never returns 0.
    """
    n_rows, n_items = differences.shape
    observed = np.abs(differences.sum(axis=1))

    # A null sum equal to the observed one may differ in the last bits because BLAS adds in
    # another order. Count it as a tie, with a margin far below any real gap between sums.
    tolerance = 1e-10 * np.abs(differences).sum(axis=1)
    threshold = (observed - tolerance)[:, None]

    blocks, exhaustive = _sign_blocks(n_items, n_resamples, seed)
    row_chunk = max(1, _BLOCK_ENTRIES // _block_rows(n_items))
    counts = np.zeros(n_rows, dtype=np.int64)
    total = 0
    for signs in blocks:
        total += signs.shape[0]
        for row_start in range(0, n_rows, row_chunk):
            rows = slice(row_start, row_start + row_chunk)
            null_sums = np.abs(differences[rows] @ signs.T)
            counts[rows] += (null_sums >= threshold[rows]).sum(axis=1)

    if exhaustive:
        return counts / total
    return (counts + 1) / (total + 1)


# Validation


def _as_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values, but scores must be finite")
    return array


def _check_resampling(n_resamples: int, name: str) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {n_resamples!r}")
    if n_resamples < 1:
        raise ValueError(f"{name} must be at least 1, got {n_resamples}")


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level!r}")


def _check_columns(frame: pd.DataFrame, required: Sequence[str], name: str) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{name} is missing columns {missing} (found {list(frame.columns)})"
        )


def _group_columns(frame: pd.DataFrame) -> list[str]:
    columns = list(GROUP_COLUMNS)
    if "dtype" in frame.columns:
        columns.append("dtype")
    return columns


# Intervals and paired tests


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Compute the mean of per-query scores and its percentile bootstrap interval.

    Resamples queries with replacement ``n_resamples`` times and returns
    ``(mean, low, high)``, where low and high are the (1 - level) / 2 and
    (1 + level) / 2 quantiles of the resampled means.
    """
    array = _as_values(values, "values")
    _check_resampling(n_resamples, "n_resamples")
    _check_level(level)

    low, high = _bootstrap_intervals(array[None, :], n_resamples, level, seed)
    return float(array.mean()), float(low[0]), float(high[0])


def _as_pair(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    first = _as_values(a, "a")
    second = _as_values(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"paired scores need one value per query in both arrays, got {first.size} and "
            f"{second.size} values"
        )
    return first, second


def paired_permutation_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> float:
    """Compute the two-sided p-value of a paired sign-flip randomisation test.

    ``a[i]`` and ``b[i]`` are scores of the same query i. Under the null hypothesis the
    sign of each difference a[i] - b[i] is equally likely to be + or -, so the test
    compares |mean difference| with its distribution over random sign flips.

    When ``2 ** len(a) <= n_resamples`` every sign vector is enumerated and the p-value is
    exact (count / 2**n, matching scipy.stats.permutation_test with
    ``permutation_type="samples"``). Otherwise ``n_resamples`` random sign vectors give
    (count + 1) / (n_resamples + 1).
    """
    first, second = _as_pair(a, b)
    _check_resampling(n_resamples, "n_resamples")

    differences = (first - second)[None, :]
    return float(_sign_flip_p_values(differences, n_resamples, seed)[0])


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Compute the mean of a - b over paired queries and its percentile bootstrap interval.

    Resampling whole queries keeps each pair together. Returns ``(difference, low, high)``.
    """
    first, second = _as_pair(a, b)
    return bootstrap_ci(first - second, n_resamples=n_resamples, level=level, seed=seed)


# Multiple testing


def _as_p_values(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(p_values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"p-values must be a 1-D array, got shape {array.shape}")
    invalid = np.isnan(array) | (array < 0.0) | (array > 1.0)
    if invalid.any():
        raise ValueError(
            f"p-values must lie in [0, 1], got {int(invalid.sum())} invalid values such as "
            f"{array[invalid][:5].tolist()}"
        )
    return array


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Adjust p-values by the Holm-Bonferroni step-down method (family-wise error rate).

    With the p-values sorted ascending as p(1) <= ... <= p(m), the adjusted value of p(k)
    is max over j <= k of min(1, (m - j + 1) * p(j)). Returns the adjusted values in the
    input order.
    """
    array = _as_p_values(p_values)
    m = array.size
    if m == 0:
        return array.copy()

    order = np.argsort(array, kind="stable")
    multipliers = m - np.arange(m)
    adjusted_sorted = np.maximum.accumulate(np.minimum(1.0, multipliers * array[order]))

    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Adjust p-values by the Benjamini-Hochberg step-up method (false discovery rate).

    With the p-values sorted ascending as p(1) <= ... <= p(m), the adjusted value of p(k)
    is min over j >= k of min(1, m / j * p(j)). Returns the adjusted values in the input
    order.
    """
    array = _as_p_values(p_values)
    m = array.size
    if m == 0:
        return array.copy()

    order = np.argsort(array, kind="stable")
    ranks = np.arange(1, m + 1)
    scaled = np.minimum(1.0, m / ranks * array[order])
    adjusted_sorted = np.minimum.accumulate(scaled[::-1])[::-1]

    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted


def adjust_p_values(
    p_values: Sequence[float] | np.ndarray, method: str = DEFAULT_CORRECTION
) -> np.ndarray:
    """Adjust p-values for multiple testing by ``method``: "holm" or "bh"."""
    if method == "holm":
        return holm(p_values)
    if method == "bh":
        return benjamini_hochberg(p_values)
    raise ValueError(f"unknown correction {method!r}, expected one of {sorted(CORRECTIONS)}")


# Per-query frames


def _pivot_group(group: pd.DataFrame, key: tuple) -> pd.DataFrame:
    """Pivot one group's scores to a [dims x queries] frame, sorted by dim."""
    duplicated = group.duplicated(subset=["dim", "query_id"])
    if duplicated.any():
        example = group.loc[duplicated, ["dim", "query_id"]].iloc[0].tolist()
        raise ValueError(
            f"group {key} has {int(duplicated.sum())} duplicate (dim, query_id) rows, "
            f"for example {example}. Expected one score per query and dim."
        )

    pivot = group.pivot(index="dim", columns="query_id", values="value")
    pivot = pivot.sort_index(axis=0).sort_index(axis=1)
    missing = int(pivot.isna().sum().sum())
    if missing:
        raise ValueError(
            f"group {key} is missing {missing} (dim, query) scores. The paired test needs "
            f"every query scored at every dim, so score a query without results as 0."
        )
    return pivot


def _default_permutations(n_tests: int) -> int:
    return max(_MIN_PERMUTATIONS, _PERMUTATIONS_PER_TEST * n_tests)


def summarise(
    per_query: pd.DataFrame,
    *,
    n_bootstrap: int = 1000,
    n_permutations: int | None = None,
    level: float = 0.95,
    correction: str = DEFAULT_CORRECTION,
    seed: int = 0,
) -> pd.DataFrame:
    """Summarise per-query scores per (model, dataset, index, [dtype], dim, measure).

    Each row contains the mean over queries, its percentile bootstrap interval
    (``ci_low``, ``ci_high`` at ``level``), ``n_queries``, ``share_of_full`` (mean divided
    by the mean at the largest dim of the group, NaN when that mean is 0), and
    ``p_value`` of the paired sign-flip randomisation test of this dim against the largest
    dim. ``p_adjusted`` corrects those p-values for multiple testing across the dims of the
    group (Holm by default). The largest dim is not tested against itself, so it gets
    p_value = p_adjusted = 1 and stays out of the correction.

    Within a group all dims share the same resampled queries and sign vectors. Queries
    are ordered by query_id first, so the result does not depend on the row order.
    ``n_permutations=None`` uses max(10,000, 40 x number of tested dims) sign vectors so
    that Holm-adjusted p-values can reach 0.05.

    Raises ValueError when a column or a grouping value is missing, a (dim, query) pair is
    scored twice, or a query is scored at some dims of its group but not at others.
    """
    _check_columns(per_query, PER_QUERY_COLUMNS, "per-query frame")
    key_columns = _group_columns(per_query) + ["measure"]
    for column in key_columns:
        n_missing = int(per_query[column].isna().sum())
        if n_missing:
            # groupby would silently drop these rows.
            raise ValueError(
                f"per-query frame has {n_missing} rows without a {column} value. Every row "
                f"needs a value in {key_columns}."
            )

    _check_resampling(n_bootstrap, "n_bootstrap")
    if n_permutations is not None:
        _check_resampling(n_permutations, "n_permutations")
    _check_level(level)
    if correction not in CORRECTIONS:
        raise ValueError(
            f"unknown correction {correction!r}, expected one of {sorted(CORRECTIONS)}"
        )

    parts = []
    for key, group in per_query.groupby(key_columns, sort=True, observed=True):
        pivot = _pivot_group(group, key)
        dims = pivot.index.to_numpy()
        scores = pivot.to_numpy(dtype=np.float64)
        n_dims, n_queries = scores.shape

        means = scores.mean(axis=1)
        ci_low, ci_high = _bootstrap_intervals(scores, n_bootstrap, level, seed)

        # Test every smaller dim against the largest one. The last row is the full size.
        p_values = np.ones(n_dims)
        p_adjusted = np.ones(n_dims)
        n_tests = n_dims - 1
        if n_tests > 0:
            resamples = n_permutations or _default_permutations(n_tests)
            differences = scores[:-1] - scores[-1]
            p_values[:-1] = _sign_flip_p_values(differences, resamples, seed)
            p_adjusted[:-1] = adjust_p_values(p_values[:-1], correction)

        full_mean = means[-1]
        share = means / full_mean if full_mean != 0 else np.full(n_dims, np.nan)

        part = pd.DataFrame(
            {
                "dim": dims.astype(np.int64),
                "mean": means,
                "ci_low": ci_low,
                "ci_high": ci_high,
                "n_queries": n_queries,
                "share_of_full": share,
                "p_value": p_values,
                "p_adjusted": p_adjusted,
            }
        )
        for column, value in zip(key_columns, key):
            part[column] = value
        parts.append(part)

    columns = _group_columns(per_query) + ["dim", "measure", *SUMMARY_COLUMNS]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of two truncation dims on the same queries."""

    model: str
    dataset: str
    index: str
    dtype: str | None
    measure: str
    dim_a: int
    dim_b: int
    n_queries: int
    mean_a: float
    mean_b: float
    difference: float  # mean_a - mean_b
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    test: str = PAIRED_TEST


def _select_one(
    frame: pd.DataFrame, column: str, value: object | None
) -> tuple[pd.DataFrame, object]:
    """Keep the rows whose ``column`` equals ``value``, or the only value when None."""
    available = sorted(frame[column].dropna().unique().tolist(), key=str)
    if value is None:
        if len(available) != 1:
            raise ValueError(
                f"the frame contains {len(available)} {column} values {available}. "
                f"Pass {column}= to choose one."
            )
        value = available[0]
    elif value not in available:
        raise ValueError(f"{column} {value!r} not found, available: {available}")
    return frame[frame[column] == value], value


def compare(
    per_query: pd.DataFrame,
    dim_a: int,
    dim_b: int,
    *,
    measure: str,
    index: str,
    model: str | None = None,
    dataset: str | None = None,
    dtype: str | None = None,
    n_bootstrap: int = 1000,
    n_permutations: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Compare two truncation dims on the same queries with a paired test.

    Returns both means, their difference (``dim_a`` minus ``dim_b``), its paired
    percentile bootstrap interval at ``level`` and the p-value of the two-sided paired
    sign-flip randomisation test. ``model``, ``dataset`` and ``dtype`` may stay None when
    the frame has only one value of them.

    Raises ValueError when a dim is not in the frame or the two dims were not scored on
    the same queries.
    """
    _check_columns(per_query, PER_QUERY_COLUMNS, "per-query frame")

    rows, measure = _select_one(per_query, "measure", measure)
    rows, index = _select_one(rows, "index", index)
    rows, model = _select_one(rows, "model", model)
    rows, dataset = _select_one(rows, "dataset", dataset)
    if "dtype" in rows.columns:
        rows, dtype = _select_one(rows, "dtype", dtype)
    elif dtype is not None:
        raise ValueError(f"dtype {dtype!r} requested, but the frame has no dtype column")

    available_dims = sorted(rows["dim"].unique().tolist())
    for dim in (dim_a, dim_b):
        if dim not in available_dims:
            raise ValueError(
                f"dim {dim} not found for {measure} on the {index} index, available dims: "
                f"{available_dims[0]}..{available_dims[-1]} ({len(available_dims)} dims)"
            )

    # Sort by query_id, as summarise does, so both draw the same resamples for a pair.
    scores_a = rows[rows["dim"] == dim_a].set_index("query_id")["value"].sort_index()
    scores_b = rows[rows["dim"] == dim_b].set_index("query_id")["value"]
    for dim, scores in ((dim_a, scores_a), (dim_b, scores_b)):
        if not scores.index.is_unique:
            raise ValueError(f"dim {dim} has duplicate query_id rows, expected one per query")
    if set(scores_a.index) != set(scores_b.index):
        unpaired = len(set(scores_a.index) ^ set(scores_b.index))
        raise ValueError(
            f"dims {dim_a} and {dim_b} were scored on different queries ({unpaired} query ids "
            f"appear at only one of them). The paired test needs the same queries."
        )
    scores_b = scores_b.reindex(scores_a.index)

    values_a = scores_a.to_numpy(dtype=np.float64)
    values_b = scores_b.to_numpy(dtype=np.float64)
    difference, ci_low, ci_high = paired_bootstrap_ci(
        values_a, values_b, n_resamples=n_bootstrap, level=level, seed=seed
    )
    p_value = paired_permutation_test(values_a, values_b, n_resamples=n_permutations, seed=seed)

    return Comparison(
        model=model,
        dataset=dataset,
        index=index,
        dtype=dtype,
        measure=measure,
        dim_a=int(dim_a),
        dim_b=int(dim_b),
        n_queries=int(values_a.size),
        mean_a=float(values_a.mean()),
        mean_b=float(values_b.mean()),
        difference=difference,
        ci_low=ci_low,
        ci_high=ci_high,
        level=level,
        p_value=p_value,
    )


# Rules on a quality curve


def _as_curve(
    dims: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    dim_array = np.asarray(dims)
    score_array = _as_values(scores, "scores")
    if dim_array.shape != score_array.shape:
        raise ValueError(
            f"dims and scores must have the same length, got {dim_array.size} and "
            f"{score_array.size}"
        )
    if np.any(np.diff(dim_array) <= 0):
        raise ValueError(f"dims must be strictly increasing, got {dim_array.tolist()}")
    return dim_array, score_array


def find_smallest_dim_keeping(
    dims: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, keep: float
) -> int:
    """Find the smallest dim whose score is at least ``keep`` times the full-size score.

    The full size is the last (largest) dim. The curve need not be monotone, so a larger
    dim may fall below the threshold again.
    """
    dim_array, score_array = _as_curve(dims, scores)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a share in (0, 1], got {keep!r}")

    threshold = keep * score_array[-1]
    first = int(np.argmax(score_array >= threshold))
    return int(dim_array[first])


def find_smallest_dim_not_worse(
    dims: Sequence[int] | np.ndarray,
    means: Sequence[float] | np.ndarray,
    p_adjusted: Sequence[float] | np.ndarray,
    *,
    alpha: float = 0.05,
) -> int:
    """Find the smallest dim not significantly worse than the full size (the largest dim).

    A dim qualifies when its adjusted p-value is at least ``alpha`` or its mean is at least
    the full-size mean. The full size always qualifies.
    """
    dim_array, mean_array = _as_curve(dims, means)
    p_array = _as_p_values(p_adjusted)
    if p_array.shape != mean_array.shape:
        raise ValueError(
            f"p_adjusted must have one value per dim, got {p_array.size} for "
            f"{dim_array.size} dims"
        )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {alpha!r}")

    qualifies = (p_array >= alpha) | (mean_array >= mean_array[-1])
    qualifies[-1] = True
    return int(dim_array[int(np.argmax(qualifies))])


def find_knee(dims: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> int:
    """Find the knee of a concave increasing quality curve by the Kneedle method.

    Kneedle (Satopää, Albrecht, Irwin and Raghavan, "Finding a 'Kneedle' in a Haystack:
    Detecting Knee Points in System Behavior", ICDCS Workshops 2011, pages 166-171,
    doi:10.1109/ICDCSW.2011.20) scales dims and scores to [0, 1] by their minimum and
    maximum, takes the difference curve y_n - x_n and returns the dim where it is largest.
    This is the offline form, without the smoothing spline or the online threshold. A flat
    curve returns the smallest dim.
    """
    dim_array, score_array = _as_curve(dims, scores)
    if dim_array.size == 1:
        return int(dim_array[0])

    dims_float = dim_array.astype(np.float64)
    x_normalised = (dims_float - dims_float[0]) / (dims_float[-1] - dims_float[0])
    score_range = score_array.max() - score_array.min()
    if score_range == 0.0:
        return int(dim_array[0])
    y_normalised = (score_array - score_array.min()) / score_range

    difference = y_normalised - x_normalised
    return int(dim_array[int(np.argmax(difference))])


def pareto_frontier(
    bytes_needed: Sequence[float] | np.ndarray, quality: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Mark the points that no other point dominates.

    Point j dominates point i when it needs no more bytes, scores no lower, and is strictly
    better in one of the two. Equal points do not dominate each other, so both stay on the
    frontier. Returns a boolean mask in the input order.
    """
    size = np.asarray(bytes_needed, dtype=np.float64)
    score = np.asarray(quality, dtype=np.float64)
    if size.ndim != 1 or size.shape != score.shape:
        raise ValueError(
            f"bytes and quality must be 1-D arrays of the same length, got shapes "
            f"{size.shape} and {score.shape}"
        )
    if not (np.all(np.isfinite(size)) and np.all(np.isfinite(score))):
        raise ValueError("bytes and quality contain NaN or infinite values, but must be finite")

    # Sweep by bytes ascending. Within one byte size only the best score survives, and it
    # survives only if it beats every score seen at strictly fewer bytes.
    order = np.lexsort((-score, size))
    on_frontier = np.zeros(size.size, dtype=bool)
    best_smaller = -np.inf
    start = 0
    while start < order.size:
        stop = start
        while stop < order.size and size[order[stop]] == size[order[start]]:
            stop += 1

        group = order[start:stop]
        group_best = score[group[0]]
        if group_best > best_smaller:
            on_frontier[group[score[group] == group_best]] = True
        best_smaller = max(best_smaller, group_best)
        start = stop

    return on_frontier


# Memory

# Layout of usearch's dense HNSW index, read from usearch's include/usearch/index.hpp,
# index_dense.hpp and index_plugins.hpp and checked against usearch 2.26 by
# tests/test_analyse.py. A node is one allocation of a uint64 key and an int16 level, then
# a neighbour list per level, each a uint32 count and uint32 slots. Level 0 has
# 2 x connectivity slots and every upper level has connectivity slots.
_USEARCH_NODE_HEAD_BYTES = 8 + 2
_USEARCH_COUNT_BYTES = 4
_USEARCH_SLOT_BYTES = 4
# The graph tape (memory_mapping_allocator_gt<64>) pads every node to 64 bytes, and the
# vector tape (memory_mapping_allocator_gt<8>) pads every vector to 8 bytes.
_USEARCH_NODE_ALIGNMENT = 64
_USEARCH_VECTOR_ALIGNMENT = 8
_USEARCH_POINTER_BYTES = 8

# Both tapes take memory in arenas of 8 MiB, then 16, 32, ... MiB. Each arena starts with
# a header of a pointer and a size, rounded up to the tape's alignment.
_USEARCH_FIRST_ARENA_BYTES = 8 * 1024 * 1024


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# Suffix of a dtype label whose shortlist was rescored with float32 vectors, such as "b1+rescore".
RESCORE_SUFFIX = "+rescore"


def storage_dtype(dtype: str) -> str:
    """Return the dtype an index stores for a dtype label: "b1" for "b1+rescore".

    A rescored configuration's index holds only the quantised vectors. The float32
    vectors it rescores with are read from storage outside the index, so the memory
    estimates leave them out.
    """
    return dtype.removesuffix(RESCORE_SUFFIX)


def _check_dtype(dtype: str) -> None:
    if storage_dtype(dtype) not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}, expected one of {list(DTYPE_BITS)}, optionally with the suffix {RESCORE_SUFFIX!r}")


def _check_positive_int(value: int, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def bytes_per_vector(dim: int, dtype: str) -> int:
    """Return the bytes one vector of ``dim`` dimensions needs when stored as ``dtype``.

    f32 needs 4 bytes per dimension, bf16 and f16 need 2, i8 needs 1, and b1 packs 8
    dimensions into a byte, so it needs ceil(dim / 8).
    """
    _check_positive_int(dim, "dim")
    _check_dtype(dtype)
    return -(-dim * DTYPE_BITS[storage_dtype(dtype)] // 8)


def _expected_node_bytes(connectivity: int) -> float:
    """Return the expected size in bytes of one usearch graph node, padding included.

    usearch draws a node's top level L as floor(-ln(U) * mL) with U uniform on (0, 1) and
    mL = 1 / ln(M), so P(L >= l) = M**-l and P(L = l) = M**-l * (1 - 1 / M).
    """
    base_bytes = (
        _USEARCH_NODE_HEAD_BYTES + _USEARCH_COUNT_BYTES + 2 * connectivity * _USEARCH_SLOT_BYTES
    )
    upper_bytes = _USEARCH_COUNT_BYTES + connectivity * _USEARCH_SLOT_BYTES

    expected = 0.0
    level = 0
    while connectivity ** (-level) > 1e-15:
        probability = connectivity ** (-level) * (1.0 - 1.0 / connectivity)
        node_bytes = _round_up(base_bytes + level * upper_bytes, _USEARCH_NODE_ALIGNMENT)
        expected += probability * node_bytes
        level += 1
    return expected


def _usearch_arena_bytes(used_bytes: int, alignment: int) -> int:
    """Return the arena capacity that usearch reserves to hold ``used_bytes`` on one tape."""
    header_bytes = _round_up(16, alignment)
    total = 0
    capacity = _USEARCH_FIRST_ARENA_BYTES
    remaining = used_bytes
    while remaining > 0:
        remaining -= capacity - header_bytes
        total += capacity
        capacity *= 2
    return total


def index_memory_bytes(
    n_docs: int,
    dim: int,
    dtype: str = "f32",
    connectivity: int = 16,
    *,
    include_arena_reserve: bool = False,
) -> int:
    """Estimate the memory of a usearch HNSW index over ``n_docs`` vectors.

    With M = ``connectivity``, V = bytes_per_vector(dim, dtype) and
    pad(x, a) = x rounded up to a multiple of a, the estimate is

        n_docs * (pad(V, 8) + E[node] + 16)
        E[node] = sum over l >= 0 of M**-l * (1 - 1/M) * pad(14 + 8M + l * (4 + 4M), 64)

    The node contains a 10-byte head (key and level), the level-0 list (a 4-byte count and
    2M 4-byte slots) and one list of M slots per upper level. usearch draws levels with
    mL = 1 / ln(M), so a node has on average 1 / (M - 1) upper lists. Without padding,
    E[node] would be 14 + 8M + (4 + 4M) / (M - 1), which is 146.5 bytes for M = 16. With
    the 64-byte padding it is about 196.3 bytes. The 16 bytes are a node pointer and a
    vector pointer per slot.

    This is the memory the data occupy. With ``include_arena_reserve=True`` the estimate
    instead follows what ``usearch.index.Index.memory_usage`` reports: usearch 2.26 counts
    every arena it has reserved (8, 16, 32, ... MiB on each of the graph and vector tapes)
    plus 8 bytes per slot of capacity, which grows to the next power of two. usearch maps
    arenas with anonymous mmap, so on Linux their untouched pages take address space but
    no RAM.

    NOTE: both forms leave out the key-to-slot hash table that usearch keeps when
    ``enable_key_lookups`` is on (tens of bytes per vector, not measured) and per-thread
    search buffers. Near an arena boundary the reported memory can be one arena larger.
    """
    _check_positive_int(n_docs, "n_docs", minimum=0)
    _check_positive_int(dim, "dim")
    _check_dtype(dtype)
    _check_positive_int(connectivity, "connectivity", minimum=2)
    if n_docs == 0:
        return 0

    vector_bytes = _round_up(bytes_per_vector(dim, dtype), _USEARCH_VECTOR_ALIGNMENT)
    graph_bytes = n_docs * _expected_node_bytes(connectivity)

    if not include_arena_reserve:
        per_slot_bytes = 2 * _USEARCH_POINTER_BYTES
        return int(round(n_docs * vector_bytes + graph_bytes + n_docs * per_slot_bytes))

    capacity = 1 << (n_docs - 1).bit_length()
    return (
        _usearch_arena_bytes(n_docs * vector_bytes, _USEARCH_VECTOR_ALIGNMENT)
        + _usearch_arena_bytes(int(math.ceil(graph_bytes)), _USEARCH_NODE_ALIGNMENT)
        + capacity * _USEARCH_POINTER_BYTES
    )


def search_memory_bytes(
    n_docs: int, dim: int, dtype: str, index: str, connectivity: int = 16
) -> int:
    """Estimate the memory that searching ``n_docs`` vectors needs with the given index.

    Exact search keeps only the vectors, n_docs * bytes_per_vector(dim, dtype). HNSW adds
    the graph, estimated by ``index_memory_bytes``.
    """
    if index == "exact":
        _check_positive_int(n_docs, "n_docs", minimum=0)
        return n_docs * bytes_per_vector(dim, dtype)
    if index == "hnsw":
        return index_memory_bytes(n_docs, dim, dtype, connectivity)
    raise ValueError(f"unknown index {index!r}, expected one of {list(INDEX_KINDS)}")


_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BYTES_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_bytes(text: str | int) -> int:
    """Parse a memory size such as "8GB", "1.5 GiB" or "4096" into bytes.

    KB, MB, GB and TB are decimal (powers of 1000). KiB, MiB, GiB and TiB are binary
    (powers of 1024). A bare number counts bytes, units are case-insensitive, and a
    fractional result is rounded to the nearest byte. An int is returned unchanged.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"memory size must not be negative, got {text}")
        return int(text)
    if not isinstance(text, str):
        raise ValueError(f"memory size must be a string such as '8GB' or an int, got {text!r}")

    match = _BYTES_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid memory size {text!r}, expected a number and an optional unit "
            f"such as '8GB' or '512 MiB'"
        )

    number, unit = match.groups()
    factor = _BYTE_UNITS.get(unit.lower() or "b")
    if factor is None:
        raise ValueError(
            f"unknown unit {unit!r} in memory size {text!r}, expected one of "
            f"B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    return int(round(float(number) * factor))


# Recommendations

RECOMMENDATION_COLUMNS = (
    "rule",
    "index",
    "dim",
    "dtype",
    "mean",
    "ci_low",
    "ci_high",
    "share_of_full",
    "p_adjusted",
    "bytes_per_vector",
    "index_bytes",
    "note",
)


def _recommendation_row(
    rule: str, row: pd.Series, n_docs: int | None, connectivity: int, note: str = ""
) -> dict:
    dim = int(row["dim"])
    dtype = row["dtype"]
    index_bytes = None
    if n_docs is not None:
        index_bytes = search_memory_bytes(n_docs, dim, dtype, row["index"], connectivity)
    return {
        "rule": rule,
        "index": row["index"],
        "dim": dim,
        "dtype": dtype,
        "mean": float(row["mean"]),
        "ci_low": float(row["ci_low"]),
        "ci_high": float(row["ci_high"]),
        "share_of_full": float(row["share_of_full"]),
        "p_adjusted": float(row["p_adjusted"]),
        "bytes_per_vector": bytes_per_vector(dim, dtype),
        "index_bytes": index_bytes,
        "note": note,
    }


@dataclass(frozen=True)
class _BudgetChoice:
    row: pd.Series
    # Why this row was chosen, for the recommendation's note column.
    note: str


def _fitting_candidates(
    candidates: pd.DataFrame, budget_bytes: int, n_docs: int, connectivity: int
) -> pd.DataFrame:
    """Return the summary rows whose search memory fits in ``budget_bytes``, sorted best first.

    Rows are sorted by mean descending, then fewer bytes, then the smaller dim. Raises
    ValueError naming the budget and the smallest need when nothing fits.
    """
    needed = np.array(
        [
            search_memory_bytes(n_docs, int(dim), dtype, index, connectivity)
            for dim, dtype, index in zip(
                candidates["dim"], candidates["dtype"], candidates["index"]
            )
        ],
        dtype=np.int64,
    )
    fits = needed <= budget_bytes
    if not fits.any():
        smallest = int(np.argmin(needed))
        row = candidates.iloc[smallest]
        raise ValueError(
            f"nothing fits in the memory budget of {budget_bytes:,} bytes for {n_docs:,} "
            f"documents. The smallest option ({row['index']} index, dim {int(row['dim'])}, "
            f"{row['dtype']}) needs {int(needed[smallest]):,} bytes."
        )

    fitting = candidates[fits].assign(_bytes=needed[fits])
    return fitting.sort_values(["mean", "_bytes", "dim"], ascending=[False, True, True])


def _per_query_matrix(
    per_query: pd.DataFrame, configurations: pd.DataFrame
) -> np.ndarray:
    """Return per-query scores as a [configurations x queries] matrix, queries by query_id.

    ``per_query`` is already narrowed to one model, dataset, measure and index and has a
    dtype column. Raises ValueError when a configuration has no scores or the
    configurations were not scored on the same queries.
    """
    pivot = per_query.pivot_table(
        index=["dtype", "dim"], columns="query_id", values="value", aggfunc="first"
    ).sort_index(axis=1)
    keys = list(zip(configurations["dtype"], configurations["dim"].astype(int)))
    missing = [key for key in keys if key not in pivot.index]
    if missing:
        raise ValueError(
            f"per-query scores are missing for (dtype, dim) {missing[:5]}, so the budget "
            f"rule cannot test them against the best fitting configuration"
        )
    matrix = pivot.loc[keys].to_numpy(dtype=np.float64)
    if np.isnan(matrix).any():
        raise ValueError(
            "the configurations that fit the budget were not scored on the same queries, "
            "so the paired test against the best fitting one cannot run"
        )
    return matrix


def _choose_within_budget(
    candidates: pd.DataFrame,
    budget_bytes: int,
    n_docs: int,
    connectivity: int,
    *,
    per_query: pd.DataFrame | None,
    alpha: float,
    correction: str,
    n_permutations: int | None,
    seed: int,
) -> _BudgetChoice:
    """Choose the smallest fitting configuration not significantly worse than the best fit.

    The best fit has the highest mean among the configurations (dim, dtype) whose search
    memory fits in ``budget_bytes``. Every fitting configuration that needs fewer bytes is
    tested against it with the paired sign-flip test, and the p-values are adjusted by
    ``correction`` over those tests. A configuration qualifies when its adjusted p-value is
    at least ``alpha`` or its mean is at least the best mean, and the one needing the
    fewest bytes wins (then the smaller dim, then the higher mean). Without ``per_query``
    no test can run, so the best fit is returned.
    """
    fitting = _fitting_candidates(candidates, budget_bytes, n_docs, connectivity)
    best = fitting.iloc[0]
    best_note = f"best mean within {budget_bytes:,} bytes"
    smaller = fitting[fitting["_bytes"] < best["_bytes"]]
    if smaller.empty:
        return _BudgetChoice(best, f"{best_note}, and no fitting configuration needs fewer bytes")
    if per_query is None:
        return _BudgetChoice(best, f"{best_note}, without per-query scores to test smaller ones")

    scores = _per_query_matrix(per_query, pd.concat([best.to_frame().T, smaller]))
    differences = scores[1:] - scores[0]
    n_tests = differences.shape[0]
    resamples = n_permutations or _default_permutations(n_tests)
    p_values = _sign_flip_p_values(differences, resamples, seed)
    p_adjusted = adjust_p_values(p_values, correction)

    smaller = smaller.assign(_p_adjusted=p_adjusted)
    qualifies = (smaller["_p_adjusted"] >= alpha) | (smaller["mean"] >= best["mean"])
    if not qualifies.any():
        return _BudgetChoice(
            best,
            f"{best_note}. Each of the {n_tests} fitting configurations with fewer bytes is "
            f"significantly worse ({CORRECTIONS[correction]}-adjusted p < {alpha:g}).",
        )

    chosen = (
        smaller[qualifies]
        .sort_values(["_bytes", "dim", "mean"], ascending=[True, True, False])
        .iloc[0]
    )
    note = (
        f"smallest within {budget_bytes:,} bytes not significantly worse than the best fit, "
        f"dim {int(best['dim'])} {best['dtype']} (mean {best['mean']:.4f}): "
        f"{CORRECTIONS[correction]}-adjusted p = {chosen['_p_adjusted']:.3g}"
    )
    return _BudgetChoice(chosen, note)


def recommend(
    summary: pd.DataFrame,
    *,
    measure: str = "nDCG@10",
    index: str = "exact",
    keep: Sequence[float] = (0.95, 0.98, 0.99),
    alpha: float = 0.05,
    budget_bytes: int | str | None = None,
    n_docs: int | None = None,
    connectivity: int = 16,
    model: str | None = None,
    dataset: str | None = None,
    dtype: str | None = None,
    per_query: pd.DataFrame | None = None,
    correction: str = DEFAULT_CORRECTION,
    n_permutations: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Recommend a truncation dim by each rule, one row per rule.

    Works on the output of ``summarise`` for one model, dataset and ``measure``. The rules
    run on the quality curve of ``index`` and ``dtype``:

    - "full size": the largest dim, for reference.
    - "keep X%": the smallest dim whose mean is at least X% of the full-size mean.
    - "not significantly worse": the smallest dim whose adjusted p-value against the full
      size is at least ``alpha``, or whose mean is at least the full-size mean.
    - "knee (Kneedle)": the knee of the curve of means by the Kneedle method.

    With ``budget_bytes`` (an int or a string for ``parse_bytes``, such as "8GB") and
    ``n_docs``, the "memory budget" rule considers every (dim, dtype) of ``index`` whose
    estimated search memory (``search_memory_bytes``, the data-only estimate) fits. It
    picks the one needing the fewest bytes that is not significantly worse than the best
    fitting one, by a paired sign-flip test on ``per_query`` with p-values adjusted by
    ``correction`` at ``alpha``. Without ``per_query`` it picks the best fitting mean. Its
    ``note`` names the best fit and the p-value.

    ``dtype=None`` means f32 when the summary has no dtype column or contains f32, and
    otherwise the only dtype present. ``index_bytes`` is filled when ``n_docs`` is given.
    ``p_adjusted`` is always the adjusted p-value against the full size, from the summary.

    Raises ValueError when the selection is empty or ambiguous, or when nothing fits the
    budget (the message names the budget and the smallest need).
    """
    required = list(GROUP_COLUMNS) + ["dim", "measure", *SUMMARY_COLUMNS]
    _check_columns(summary, required, "summary")
    if n_docs is not None:
        _check_positive_int(n_docs, "n_docs", minimum=0)
    if budget_bytes is not None and n_docs is None:
        raise ValueError("budget_bytes needs n_docs, the number of documents to index")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {alpha!r}")
    if correction not in CORRECTIONS:
        raise ValueError(
            f"unknown correction {correction!r}, expected one of {sorted(CORRECTIONS)}"
        )

    rows = summary if "dtype" in summary.columns else summary.assign(dtype=DEFAULT_DTYPE)
    rows, measure = _select_one(rows, "measure", measure)
    rows, model = _select_one(rows, "model", model)
    rows, dataset = _select_one(rows, "dataset", dataset)
    rows, index = _select_one(rows, "index", index)

    if dtype is None and DEFAULT_DTYPE in set(rows["dtype"]):
        dtype = DEFAULT_DTYPE
    curve, dtype = _select_one(rows, "dtype", dtype)
    curve = curve.sort_values("dim").reset_index(drop=True)

    dims = curve["dim"].to_numpy()
    means = curve["mean"].to_numpy(dtype=np.float64)
    chosen: list[tuple[str, int]] = [("full size", int(dims[-1]))]
    for share in keep:
        chosen.append((f"keep {share * 100:g}%", find_smallest_dim_keeping(dims, means, share)))
    chosen.append(
        (
            "not significantly worse",
            find_smallest_dim_not_worse(
                dims, means, curve["p_adjusted"].to_numpy(dtype=np.float64), alpha=alpha
            ),
        )
    )
    chosen.append(("knee (Kneedle)", find_knee(dims, means)))

    by_dim = curve.set_index("dim", drop=False)
    records = [
        _recommendation_row(rule, by_dim.loc[dim], n_docs, connectivity) for rule, dim in chosen
    ]

    if budget_bytes is not None:
        budget = parse_bytes(budget_bytes)
        scores = None
        if per_query is not None:
            scores = _narrow_per_query(per_query, model, dataset, measure, index)
        choice = _choose_within_budget(
            rows,
            budget,
            n_docs,
            connectivity,
            per_query=scores,
            alpha=alpha,
            correction=correction,
            n_permutations=n_permutations,
            seed=seed,
        )
        records.append(
            _recommendation_row("memory budget", choice.row, n_docs, connectivity, choice.note)
        )

    result = pd.DataFrame.from_records(records, columns=list(RECOMMENDATION_COLUMNS))
    result["index_bytes"] = result["index_bytes"].astype("Int64")
    return result


def _narrow_per_query(
    per_query: pd.DataFrame, model: str, dataset: str, measure: str, index: str
) -> pd.DataFrame:
    """Keep the per-query rows of one model, dataset, measure and index, with a dtype column."""
    _check_columns(per_query, PER_QUERY_COLUMNS, "per-query frame")
    selected = per_query[
        (per_query["model"] == model)
        & (per_query["dataset"] == dataset)
        & (per_query["measure"] == measure)
        & (per_query["index"] == index)
    ]
    if "dtype" not in selected.columns:
        selected = selected.assign(dtype=DEFAULT_DTYPE)
    return selected
