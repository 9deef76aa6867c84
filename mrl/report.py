"""Turn a run folder's per-query scores into statistics, a recommendation and report.html.

A run folder contains the sweep's ``per_query.parquet`` (or a hive-partitioned
``per_query/`` dataset) and ``manifest.json``. This module adds, each written atomically:

- ``summary.parquet``: the output of ``mrl.analyse.summarise``, with the settings it was
  computed with in the Parquet schema metadata (key ``mrl.summary``).
- ``recommendation.parquet``: one row per rule for each (model, dataset) pair, with the
  settings in the schema metadata (key ``mrl.recommendation``).
- ``report.html``: the charts, the recommendation table, the methods and the manifest in
  one page that works offline, with PNG copies of the charts in ``charts/``.

``render_report`` only reads those Parquet files, so re-rendering never recomputes the
statistics.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mrl import analyse, charts
from mrl.output import atomic_path, write_parquet, write_text

log = logging.getLogger(__name__)

PER_QUERY_FILE = "per_query.parquet"
PER_QUERY_FOLDER = "per_query"
SUMMARY_FILE = "summary.parquet"
RECOMMENDATION_FILE = "recommendation.parquet"
REPORT_FILE = "report.html"
CHARTS_FOLDER = "charts"
MANIFEST_FILE = "manifest.json"

SUMMARY_METADATA_KEY = b"mrl.summary"
RECOMMENDATION_METADATA_KEY = b"mrl.recommendation"
DEFAULT_MEASURE = "nDCG@10"
DEFAULT_KEEP = (0.95, 0.98, 0.99)
PAIR_COLUMNS = ["model", "dataset"]
# Columns of a per-query frame that hold names, read back as strings whatever the
# partitioning inferred. A hive partition value such as "007" would otherwise become 7.
TEXT_COLUMNS = ("model", "dataset", "index", "dtype", "query_id", "measure")


class RunFolderError(ValueError):
    """A run folder is missing, lacks the files a command needs, or contains invalid data."""


@dataclass(frozen=True)
class StatisticsSettings:
    """Settings of ``mrl.analyse.summarise``: resamples, interval level, correction, seed."""

    n_bootstrap: int = 1000
    # None means max(10,000, 40 x number of tested dims), as summarise chooses.
    n_permutations: int | None = None
    level: float = 0.95
    correction: str = analyse.DEFAULT_CORRECTION
    seed: int = 0


@dataclass(frozen=True)
class RecommendSettings:
    """Settings of the recommendation rules. A None field takes the run's default."""

    measure: str | None = None
    index: str | None = None
    keep: tuple[float, ...] = DEFAULT_KEEP
    alpha: float = 0.05
    budget: str | None = None
    n_docs: int | None = None
    connectivity: int | None = None
    model: str | None = None
    dataset: str | None = None
    dtype: str | None = None
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)


# Reading a run folder


def check_run_folder(run_dir: Path) -> Path:
    """Return ``run_dir`` as a Path, or raise RunFolderError when it contains no sweep results."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise RunFolderError(f"run folder {str(folder)!r} not found")
    if not (folder / PER_QUERY_FILE).is_file() and not (folder / PER_QUERY_FOLDER).is_dir():
        if not (folder / SUMMARY_FILE).is_file():
            raise RunFolderError(
                f"{str(folder)!r} is not a run folder: it contains neither {PER_QUERY_FILE} nor "
                f"a {PER_QUERY_FOLDER}/ dataset. Pass the --out folder of an mrl sweep."
            )
    return folder


def _per_query_dataset(run_dir: Path) -> ds.Dataset:
    folder = Path(run_dir)
    single = folder / PER_QUERY_FILE
    if single.is_file():
        return ds.dataset(single, format="parquet")

    partitioned = folder / PER_QUERY_FOLDER
    if not partitioned.is_dir():
        raise RunFolderError(
            f"per-query scores not found in {str(folder)!r}: expected {PER_QUERY_FILE} or a "
            f"hive-partitioned {PER_QUERY_FOLDER}/ folder"
        )
    # Discover the partition keys first, then read them again with fixed types: names as
    # strings and dim as int64, whatever their values look like.
    discovered = ds.dataset(partitioned, format="parquet", partitioning="hive")
    keys = discovered.partitioning.schema if discovered.partitioning is not None else pa.schema([])
    fields = [(name, pa.int64() if name == "dim" else pa.string()) for name in keys.names]
    partitioning = ds.partitioning(pa.schema(fields), flavor="hive")
    return ds.dataset(partitioned, format="parquet", partitioning=partitioning)


def load_per_query(run_dir: Path, **equal: object) -> pd.DataFrame:
    """Read a run's per-query scores, keeping rows whose columns equal the given values.

    ``load_per_query(run, measure="nDCG@10", dim=[8, 16])`` reads only those rows. A list
    matches any of its values, and None leaves a column unfiltered. Reads
    ``per_query.parquet`` or a hive-partitioned ``per_query/`` dataset.
    """
    dataset = _per_query_dataset(run_dir)
    missing = [column for column in analyse.PER_QUERY_COLUMNS if column not in dataset.schema.names]
    if missing:
        raise RunFolderError(
            f"per-query scores in {str(run_dir)!r} lack columns {missing} "
            f"(found {dataset.schema.names})"
        )

    condition = None
    for column, value in equal.items():
        if value is None:
            continue
        if column not in dataset.schema.names:
            raise RunFolderError(f"per-query scores have no {column} column to filter on")
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        term = pc.field(column).isin(values)
        condition = term if condition is None else condition & term

    frame = dataset.to_table(filter=condition).to_pandas()
    for column in TEXT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].astype(str)
    frame["dim"] = frame["dim"].astype(np.int64)
    frame["value"] = frame["value"].astype(np.float64)
    return frame


def read_manifests(run_dir: Path) -> list[tuple[str, dict]]:
    """Return (path relative to the run folder, content) of every manifest.json in it.

    A single-pair run has one at the top. A multi-pair run may have one per pair folder.
    """
    folder = Path(run_dir)
    found = []
    for path in sorted(folder.rglob(MANIFEST_FILE)):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise RunFolderError(f"invalid JSON in {path}: {error}") from None
        found.append((path.relative_to(folder).as_posix(), content))
    return found


def _documents_by_pair(manifests: list[tuple[str, dict]]) -> dict[tuple[str, str], int]:
    """Map (model, dataset) to the corpus size that each manifest records."""
    sizes = {}
    for _, manifest in manifests:
        model = (manifest.get("model") or {}).get("name")
        dataset = manifest.get("dataset") or {}
        if model and dataset.get("name") and dataset.get("documents") is not None:
            sizes[(model, dataset["name"])] = int(dataset["documents"])
    return sizes


def _manifest_connectivity(manifests: list[tuple[str, dict]]) -> int:
    for _, manifest in manifests:
        hnsw = manifest.get("hnsw") or {}
        if hnsw.get("connectivity"):
            return int(hnsw["connectivity"])
    return 16


# Summary


def _settings_metadata(settings: StatisticsSettings) -> dict:
    return {**asdict(settings), "interval": analyse.INTERVAL_METHOD, "test": analyse.PAIRED_TEST}


def scores_fingerprint(run_dir: Path) -> str:
    """Return a hash of the per-query score files' names, sizes and modification times.

    A summary stored with another fingerprint was computed from other scores (a re-sweep
    with other dims or prompts), so it is recomputed.
    """
    run_dir = Path(run_dir)
    files = [run_dir / PER_QUERY_FILE] if (run_dir / PER_QUERY_FILE).is_file() else sorted((run_dir / PER_QUERY_FOLDER).rglob("*.parquet"))
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(run_dir)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def read_summary(run_dir: Path) -> tuple[pd.DataFrame, dict] | None:
    """Return the stored summary and its settings, or None when the run has none yet."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    settings = json.loads(metadata.get(SUMMARY_METADATA_KEY, b"{}"))
    return table.to_pandas(), settings


def summarise_run(run_dir: Path, settings: StatisticsSettings) -> pd.DataFrame:
    """Compute the summary of a run's per-query scores and write summary.parquet."""
    per_query = load_per_query(run_dir)
    if per_query.empty:
        raise RunFolderError(f"the per-query scores in {str(run_dir)!r} contain no rows")
    summary = analyse.summarise(
        per_query,
        n_bootstrap=settings.n_bootstrap,
        n_permutations=settings.n_permutations,
        level=settings.level,
        correction=settings.correction,
        seed=settings.seed,
    )
    table = pa.Table.from_pandas(summary, preserve_index=False)
    stored_settings = {**_settings_metadata(settings), "scores": scores_fingerprint(run_dir)}
    metadata = {SUMMARY_METADATA_KEY: json.dumps(stored_settings).encode()}
    write_parquet(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), Path(run_dir) / SUMMARY_FILE)
    return summary


def summary_is_current(run_dir: Path) -> bool:
    """Return whether summary.parquet exists and was computed from the run's current per-query scores."""
    stored = read_summary(run_dir)
    return stored is not None and stored[1].get("scores") == scores_fingerprint(run_dir)


def load_summary(run_dir: Path, settings: StatisticsSettings) -> pd.DataFrame:
    """Return the run's summary, recomputing it when it is missing or used other settings."""
    stored = read_summary(run_dir)
    if stored is not None:
        summary, stored_settings = stored
        if stored_settings == {**_settings_metadata(settings), "scores": scores_fingerprint(run_dir)}:
            return summary
        log.info("recomputing %s: it was computed from other scores or with other settings", SUMMARY_FILE)
    if not (Path(run_dir) / PER_QUERY_FILE).is_file() and not (Path(run_dir) / PER_QUERY_FOLDER).is_dir():
        raise RunFolderError(
            f"{str(run_dir)!r} has no per-query scores, so the statistics cannot be "
            f"recomputed with other settings"
        )
    return summarise_run(run_dir, settings)


# Recommendation


def default_measure(summary: pd.DataFrame) -> str:
    """Return nDCG@10 when the summary has it, else its first measure."""
    measures = list(dict.fromkeys(summary["measure"]))
    return DEFAULT_MEASURE if DEFAULT_MEASURE in measures else measures[0]


def default_index(indexes: Sequence[str]) -> str:
    """Return hnsw when the run searched an HNSW index, else exact."""
    return "hnsw" if "hnsw" in set(indexes) else "exact"


def _select_pairs(summary: pd.DataFrame, model: str | None, dataset: str | None) -> pd.DataFrame:
    pairs = summary[PAIR_COLUMNS].drop_duplicates().sort_values(PAIR_COLUMNS)
    for column, value in (("model", model), ("dataset", dataset)):
        if value is None:
            continue
        available = sorted(pairs[column].unique())
        if value not in available:
            raise RunFolderError(f"{column} {value!r} not found in the run, available: {available}")
        pairs = pairs[pairs[column] == value]
    return pairs


def recommend_run(
    run_dir: Path, settings: RecommendSettings
) -> tuple[pd.DataFrame, dict]:
    """Apply the recommendation rules to every (model, dataset) pair of a run.

    Returns the table (``model``, ``dataset``, ``measure`` and then
    ``mrl.analyse.RECOMMENDATION_COLUMNS``) and the settings used, with the run's
    defaults filled in. Without ``n_docs`` each pair uses its corpus size from the
    manifest, and ``connectivity`` defaults to the sweep's HNSW connectivity.
    """
    summary = load_summary(run_dir, settings.statistics)
    manifests = read_manifests(run_dir)
    measure = settings.measure or default_measure(summary)
    if measure not in set(summary["measure"]):
        raise RunFolderError(
            f"measure {measure!r} not found in the run, available: {sorted(set(summary['measure']))}"
        )
    connectivity = settings.connectivity or _manifest_connectivity(manifests)
    documents = _documents_by_pair(manifests)
    statistics = settings.statistics

    tables = []
    resolved_index = settings.index
    for model, dataset in _select_pairs(summary, settings.model, settings.dataset).itertuples(index=False):
        pair = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
        index = settings.index or default_index(pair["index"].unique())
        resolved_index = index
        n_docs = settings.n_docs if settings.n_docs is not None else documents.get((model, dataset))
        if settings.budget is not None and n_docs is None:
            raise RunFolderError(
                f"the manifest does not record the corpus size of {model} on {dataset}, so "
                f"--budget needs --n-docs"
            )
        per_query = None
        if settings.budget is not None:
            per_query = load_per_query(run_dir, model=model, dataset=dataset, measure=measure, index=index)
        table = analyse.recommend(
            pair,
            measure=measure,
            index=index,
            keep=settings.keep,
            alpha=settings.alpha,
            budget_bytes=settings.budget,
            n_docs=n_docs,
            connectivity=connectivity,
            dtype=settings.dtype,
            per_query=per_query,
            correction=statistics.correction,
            n_permutations=statistics.n_permutations,
            seed=statistics.seed,
        )
        table.insert(0, "measure", measure)
        table.insert(0, "dataset", dataset)
        table.insert(0, "model", model)
        table["n_docs"] = pd.array([n_docs] * len(table), dtype="Int64")
        tables.append(table)

    used = {
        **asdict(settings),
        "measure": measure,
        "index": resolved_index,
        "connectivity": connectivity,
        "statistics": _settings_metadata(statistics),
    }
    return pd.concat(tables, ignore_index=True), used


def write_recommendation(run_dir: Path, table: pd.DataFrame, used: dict) -> Path:
    path = Path(run_dir) / RECOMMENDATION_FILE
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    metadata = {RECOMMENDATION_METADATA_KEY: json.dumps(used, default=str).encode()}
    write_parquet(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **metadata}), path)
    return path


def read_recommendation(run_dir: Path) -> tuple[pd.DataFrame, dict] | None:
    """Return the stored recommendation and its settings, or None when there is none."""
    path = Path(run_dir) / RECOMMENDATION_FILE
    if not path.is_file():
        return None
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    return table.to_pandas(), json.loads(metadata.get(RECOMMENDATION_METADATA_KEY, b"{}"))


# Text output


def format_bytes(count: float | None) -> str:
    """Format a byte count with a decimal unit: 9061266 becomes "9.06 MB"."""
    if count is None or pd.isna(count):
        return "-"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _interval_text(mean: float, low: float, high: float) -> str:
    return f"{mean:.4f} [{low:.4f}, {high:.4f}]"


def recommendation_rows(table: pd.DataFrame) -> list[dict[str, str]]:
    """Format each recommendation row as display strings, keyed by column heading."""
    rows = []
    for row in table.itertuples(index=False):
        rows.append(
            {
                "rule": row.rule,
                "dim": str(row.dim),
                "dtype": row.dtype,
                "mean [95% CI]": _interval_text(row.mean, row.ci_low, row.ci_high),
                "share of full": f"{row.share_of_full:.1%}",
                "adj. p vs full": f"{row.p_adjusted:.3g}",
                "bytes/vector": str(row.bytes_per_vector),
                "index memory": format_bytes(row.index_bytes),
            }
        )
    return rows


def _align(rows: list[dict[str, str]]) -> list[str]:
    headings = list(rows[0])
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in headings}
    numeric = {key for key in headings if key not in ("rule", "dtype", "mean [95% CI]")}

    def line(cells: dict[str, str]) -> str:
        parts = [
            cells[key].rjust(widths[key]) if key in numeric else cells[key].ljust(widths[key])
            for key in headings
        ]
        return "  ".join(parts).rstrip()

    return [line({key: key for key in headings}), *(line(row) for row in rows)]


def _pair_heading(first: pd.Series, used: dict) -> str:
    n_docs = first["n_docs"]
    documents = "" if pd.isna(n_docs) else f", index memory for {int(n_docs):,} documents"
    return (
        f"{first['model']} on {first['dataset']}: {first['measure']}, {first['index']} index"
        f"{documents}"
    )


def format_recommendation(table: pd.DataFrame, used: dict) -> str:
    """Format the recommendation as aligned text, one block per (model, dataset) pair."""
    statistics = used.get("statistics", {})
    level = statistics.get("level", 0.95)
    correction = analyse.CORRECTIONS.get(statistics.get("correction"), "Holm")
    blocks = []
    for _, pair in table.groupby(PAIR_COLUMNS, sort=True, observed=True):
        lines = [_pair_heading(pair.iloc[0], used), *_align(recommendation_rows(pair))]
        for row in pair.itertuples(index=False):
            if row.note:
                lines.append(f"{row.rule}: {row.note}")
        blocks.append("\n".join(lines))
    footer = (
        f"Intervals: {level:.0%} {analyse.INTERVAL_METHOD} over queries. adj. p: "
        f"{analyse.PAIRED_TEST} against the full size, {correction}-adjusted over the dims. "
        f"Index memory: data-only estimate (see report.html for the formula)."
    )
    return "\n\n".join([*blocks, footer])


def format_comparison(result: analyse.Comparison, n_bootstrap: int, n_permutations: int) -> str:
    """Format a paired comparison of two dims as text for the terminal."""
    dtype = f", {result.dtype}" if result.dtype else ""
    return "\n".join(
        [
            f"{result.model} on {result.dataset}: {result.measure}, {result.index} index{dtype}, "
            f"{result.n_queries} queries",
            f"  dim {result.dim_a}: mean {result.mean_a:.4f}",
            f"  dim {result.dim_b}: mean {result.mean_b:.4f}",
            f"  difference (dim {result.dim_a} - dim {result.dim_b}): {result.difference:+.4f}, "
            f"{result.level:.0%} CI [{result.ci_low:+.4f}, {result.ci_high:+.4f}] "
            f"(paired {analyse.INTERVAL_METHOD}, {n_bootstrap} resamples of queries)",
            f"  p-value: {result.p_value:.4g} (two-sided {analyse.PAIRED_TEST}, up to "
            f"{n_permutations} sign vectors, not corrected for multiple comparisons)",
        ]
    )


# Charts


def parse_zoom(text: str) -> tuple[int, int]:
    """Parse a dim range such as "650:1024" (inclusive) for the zoomed chart."""
    parts = text.split(":")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"invalid zoom range {text!r}, expected START:STOP such as 650:1024")
    low, high = (int(part) for part in parts)
    if low >= high:
        raise ValueError(f"invalid zoom range {text!r}: START must be smaller than STOP")
    return low, high


def default_zoom(summary: pd.DataFrame, recommendation: pd.DataFrame) -> tuple[int, int] | None:
    """Return a dim range from just below the keep-X% and not-worse dims to the full size.

    The range starts about 5% of its width below the smallest dim those rules chose, so
    that its mark and label stay clear of the axis. The knee usually lies far below the
    plateau, so it is left out. When the rules all chose the full size, the range covers
    the top quarter of the dims. A run of one dim has no range, so it returns None.
    """
    dims = np.sort(summary["dim"].unique())
    if len(dims) < 2:
        return None
    high = int(dims[-1])
    plateau_rules = recommendation["rule"].str.startswith("keep ") | (
        recommendation["rule"] == "not significantly worse"
    )
    chosen = recommendation.loc[plateau_rules, "dim"]
    smallest = int(chosen.min()) if not chosen.empty else high
    below = dims[dims <= smallest - 0.05 * (high - smallest)]
    low = int(below[-1]) if below.size else int(dims[0])
    if smallest >= high:
        low = int(dims[max(0, len(dims) - max(2, len(dims) // 4))])
    if low >= high:
        raise ValueError(f"the run has only dim {high}, so there is no range to zoom into")
    return low, high


@dataclass(frozen=True)
class ReportChart:
    """A chart of the report, with the stem of its PNG file and a caption."""

    stem: str
    title: str
    caption: str
    chart: alt.TopLevelMixin


def _pair_title(summary: pd.DataFrame) -> str:
    pairs = summary[PAIR_COLUMNS].drop_duplicates()
    if len(pairs) == 1:
        return f"{pairs.iloc[0]['model']} on {pairs.iloc[0]['dataset']}"
    return f"{len(pairs)} (model, dataset) pairs"


def build_charts(
    summary: pd.DataFrame,
    recommendation: pd.DataFrame,
    used: dict,
    zoom: tuple[int, int] | None = None,
) -> list[ReportChart]:
    """Build the report's charts: quality with marks, the zoom, bytes, then other measures."""
    measure = used.get("measure") or default_measure(summary)
    index = recommendation["index"].iloc[0] if not recommendation.empty else default_index(summary["index"].unique())
    subject = _pair_title(summary)
    stem = charts.measure_file_stem(measure)
    marks_note = f"Vertical rules mark the dims each rule chose on the {index} index."
    zoom_range = zoom or default_zoom(summary, recommendation)

    built = [
        ReportChart(
            f"quality-{stem}",
            f"{measure} against truncation dim",
            f"Mean over queries with its bootstrap 95% confidence band. The dashed line is the "
            f"full-size mean. {marks_note}",
            charts.quality_chart(
                summary, measure, recommendation=recommendation, title=f"{measure}: {subject}"
            ),
        ),
    ]
    if zoom_range is not None:
        built.append(ReportChart(
            f"zoom-{stem}",
            f"{measure}, dims {zoom_range[0]} to {zoom_range[1]}",
            f"The same curve zoomed into dims {zoom_range[0]} to {zoom_range[1]}. {marks_note}",
            charts.quality_chart(
                summary,
                measure,
                recommendation=recommendation,
                dim_range=zoom_range,
                title=f"{measure}, dims {zoom_range[0]}-{zoom_range[1]}: {subject}",
            ),
        ))
    built.append(
        ReportChart(
            f"bytes-{stem}-{index}",
            f"{measure} against bytes per vector",
            f"Mean on the {index} index against the bytes one vector needs, coloured by dtype, "
            f"on a log scale. The step line joins the Pareto frontier: the points that no "
            f"other point beats with fewer or equal bytes.",
            charts.bytes_chart(summary, measure, index, title=f"{measure} by bytes per vector: {subject}"),
        )
    )
    for other in dict.fromkeys(summary["measure"]):
        if other == measure:
            continue
        built.append(
            ReportChart(
                f"quality-{charts.measure_file_stem(other)}",
                f"{other} against truncation dim",
                "Mean over queries with its bootstrap 95% confidence band. The dashed line is "
                "the full-size mean.",
                charts.quality_chart(summary, other, title=f"{other}: {subject}"),
            )
        )
    return built


def write_png(chart: alt.TopLevelMixin, path: Path) -> None:
    with atomic_path(path) as temporary:
        # Altair picks the format from the suffix, so the temporary file keeps it.
        named = temporary.with_suffix(".png")
        chart.save(named, format="png", scale_factor=2)
        named.replace(temporary)


# HTML


def format_json(value: object, indent: int = 0) -> str:
    """Format JSON with two-space indents, keeping lists of numbers and strings on one line.

    A manifest's list of hundreds of dims then takes one line instead of hundreds.
    """
    pad = " " * indent
    inner = " " * (indent + 2)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(key))}: {format_json(item, indent + 2)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        items = [f"{inner}{format_json(item, indent + 2)}" for item in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, default=str)


def _script_json(value: object) -> str:
    """Serialise ``value`` as JSON that is safe inside a <script> element."""
    return json.dumps(value).replace("</", "<\\/")


def _table_html(table: pd.DataFrame, several_pairs: bool) -> str:
    pair_headings = ["model", "dataset"] if several_pairs else []
    with_notes = bool(table["note"].fillna("").str.len().gt(0).any())
    formatted = recommendation_rows(table)
    headings = pair_headings + list(formatted[0]) + (["note"] if with_notes else [])

    lines = ["<table>", "<thead><tr>"]
    lines.append("".join(f"<th>{html.escape(heading)}</th>" for heading in headings))
    lines.append("</tr></thead>\n<tbody>")
    for (_, row), cells in zip(table.iterrows(), formatted):
        values = [row[column] for column in pair_headings] + list(cells.values())
        cells_html = "".join(f"<td>{html.escape(str(value))}</td>" for value in values)
        if with_notes:
            cells_html += f'<td class="note">{html.escape(str(row["note"]))}</td>'
        lines.append(f"<tr>{cells_html}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def funnel_html(run_dir: Path, used: dict, manifests: list[tuple[str, dict]]) -> str:
    """Render the two-stage (funnel) retrieval section of a single-pair run, or "" when it has no funnel.parquet.

    NOTE: a study keeps its funnel tables in hive folders, which this section does not read yet.
    """
    from mrl.funnel import MATCH_SHARE, summarise_funnel

    path = Path(run_dir) / "funnel.parquet"
    if not path.is_file() or not manifests:
        return ""
    manifest = manifests[0][1]
    measure = str(used.get("measure") or "nDCG@10")
    n_docs = int((manifest.get("dataset") or {}).get("documents") or 0)
    full_dim = int(manifest["full_dim"])
    connectivity = _manifest_connectivity(manifests)
    summary = summarise_funnel(pd.read_parquet(path), pd.read_parquet(Path(run_dir) / "metrics.parquet"), measure, n_docs, full_dim, connectivity)
    if summary.empty:
        return ""

    headings = ["shortlist dim", "K", "rerank dim", "mean", "share of full", f"matches (>= {MATCH_SHARE:.0%})", "shortlist index", "of full-size index", "rerank vectors"]
    lines = ["<table>", "<thead><tr>", "".join(f"<th>{html.escape(heading)}</th>" for heading in headings), "</tr></thead>\n<tbody>"]
    for row in summary.itertuples():
        cells = [
            row.shortlist_dim,
            row.shortlist_k,
            row.rerank_dim,
            f"{row.mean:.4f}",
            "-" if pd.isna(row.share_of_full) else f"{row.share_of_full:.1%}",
            "yes" if row.matches_full else "no",
            format_bytes(row.shortlist_index_bytes),
            f"{row.shortlist_index_bytes / row.full_index_bytes:.0%}",
            format_bytes(row.rerank_bytes),
        ]
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    lines.append("</tbody></table>")
    intro = (
        f"Each row shortlists K documents per query from an f32 HNSW index at the shortlist dim, reranks them by "
        f"exact cosine at the rerank dim and scores the top {manifest.get('top_k')}. Share of full is the mean "
        f"{html.escape(measure)} against exact f32 search at the full size ({full_dim} dims). Index memory is "
        f"estimated for {n_docs:,} documents with connectivity {connectivity}, by the formula in Methods. The rerank "
        f"reads float32 vectors at the rerank dim (documents x 4 x rerank dim bytes), which can stay on disk."
    )
    return f"<h2>Two-stage (funnel) retrieval</h2>\n<p>{intro}</p>\n" + "\n".join(lines)


def methods_html(summary_settings: dict, used: dict) -> str:
    """Describe the interval, test, correction, knee and memory estimate of a report."""
    level = summary_settings.get("level", 0.95)
    n_bootstrap = summary_settings.get("n_bootstrap", 1000)
    n_permutations = summary_settings.get("n_permutations")
    permutations = (
        f"{n_permutations:,} random sign vectors"
        if n_permutations
        else "max(10,000, 40 &times; number of tested dims) random sign vectors"
    )
    correction = analyse.CORRECTIONS.get(summary_settings.get("correction"), "Holm")
    seed = summary_settings.get("seed", 0)
    connectivity = used.get("connectivity", 16)
    alpha = used.get("alpha", 0.05)
    keep = ", ".join(f"{share * 100:g}%" for share in used.get("keep", DEFAULT_KEEP))
    budget = used.get("budget")
    budget_text = (
        f"Under the memory budget ({html.escape(str(budget))}), the rule takes every (dim, "
        f"dtype) of the index whose estimated memory fits, finds the best-scoring one, tests "
        f"every fitting configuration that needs fewer bytes against it with the same paired "
        f"test ({correction}-adjusted over those tests), and picks the one needing the fewest "
        f"bytes that is not significantly worse at &alpha; = {alpha}."
        if budget
        else "No memory budget was given (<code>mrl recommend --budget 8GB --n-docs N</code> adds that rule)."
    )
    return f"""
<ul>
<li><b>Mean and interval.</b> Each point is the mean of the measure over queries, with a
{level:.0%} {analyse.INTERVAL_METHOD} interval: queries are resampled with replacement
{n_bootstrap:,} times (seed {seed}), and all dims of a curve share the same resamples.</li>
<li><b>Test against the full size.</b> Each dim is compared with the largest dim by a
two-sided {analyse.PAIRED_TEST} on per-query differences, with {permutations} (seed {seed}),
or every sign vector when there are at most that many. The p-values are corrected over the
dims of each curve by the {correction} method.</li>
<li><b>Rules.</b> "keep X%" ({keep}): the smallest dim whose mean is at least X% of the
full-size mean. "not significantly worse": the smallest dim whose adjusted p-value is at
least &alpha; = {alpha}, or whose mean is at least the full-size mean. "knee": the knee of
the curve of means by {analyse.KNEE_METHOD}, in its offline form without smoothing.
{budget_text}</li>
<li><b>Memory.</b> Bytes per vector: 4 per dim for f32, 2 for f16 and bf16, 1 for i8, and
ceil(dim / 8) for b1. Index memory for N documents is a data-only estimate. Exact search
needs N &times; V bytes, V being the bytes per vector. A usearch HNSW index with
connectivity M = {connectivity} needs
N &times; (pad(V, 8) + E[node] + 16) bytes, where pad rounds up to a multiple,
E[node] = &sum;<sub>l&ge;0</sub> M<sup>-l</sup>(1 - 1/M) &times; pad(14 + 8M + l(4 + 4M), 64)
is the expected size of a graph node (a 10-byte key and level, a 4-byte count and 2M 4-byte
neighbour slots on level 0, and M slots on each upper level), and 16 bytes are two pointers
per slot. It leaves out usearch's reserved but untouched arena pages, its key lookup table and
per-thread search buffers.</li>
</ul>"""


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
td.note { text-align: left; max-width: 28em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0 2em 0; } figcaption { font-size: 0.9em; color: #555; max-width: 60em; }
.chart-error { color: #b00; }
"""

# Renders every chart with vega-embed, then records the outcome on <body> so that a
# headless browser (and the tests) can check that each chart rendered.
_EMBED_SCRIPT = """
const specs = %s;
const embedOptions = {renderer: "svg", actions: false};
Promise.allSettled(specs.map((spec, i) => vegaEmbed("#chart-" + i, spec, embedOptions)))
  .then((results) => {
    const failed = results.filter((result) => result.status === "rejected");
    failed.forEach((result) => console.error("chart failed:", result.reason));
    document.body.dataset.chartsRendered = String(results.length - failed.length);
    document.body.dataset.chartsFailed = String(failed.length);
  });
"""


def report_html(
    title: str,
    built: list[ReportChart],
    table: pd.DataFrame,
    used: dict,
    summary_settings: dict,
    manifests: list[tuple[str, dict]],
    funnel_section: str = "",
) -> str:
    """Assemble the report page: charts inline with the vega-embed bundle, so it works offline."""
    import vl_convert

    several_pairs = table[PAIR_COLUMNS].drop_duplicates().shape[0] > 1
    index = table["index"].iloc[0]
    n_docs = table["n_docs"].dropna().unique()
    documents = f" Index memory is estimated for {int(n_docs[0]):,} documents." if len(n_docs) == 1 else ""
    intro = (
        f"Measure {html.escape(str(used.get('measure')))} on the {html.escape(index)} index. "
        f"Each row is the dim one rule chooses, with its mean and 95% confidence interval over "
        f"queries, its share of the full-size mean, the adjusted p-value against the full size, "
        f"and the memory it needs.{documents}"
    )

    figures = []
    for number, item in enumerate(built):
        figures.append(
            f'<figure><h3>{html.escape(item.title)}</h3><div id="chart-{number}" class="chart"></div>'
            f"<figcaption>{html.escape(item.caption)} PNG copy: "
            f'<a href="{CHARTS_FOLDER}/{html.escape(item.stem)}.png">{CHARTS_FOLDER}/{html.escape(item.stem)}.png</a>'
            f"</figcaption></figure>"
        )
    specs = [item.chart.to_dict() for item in built]
    manifest_blocks = "\n".join(
        f"<details open><summary>{html.escape(path)}</summary><pre>{html.escape(format_json(content))}</pre></details>"
        for path, content in manifests
    ) or "<p>The run folder contains no manifest.json.</p>"

    vl_version = "_".join(alt.SCHEMA_VERSION.split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_PAGE_STYLE}</style>
<script>
// vega-embed, Vega-Lite {alt.SCHEMA_VERSION} and Vega, bundled by vl-convert {vl_convert.__version__}
{bundle}
</script>
</head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Recommendation</h2>
<p>{intro}</p>
{_table_html(table, several_pairs)}
<h2>Charts</h2>
{"".join(figures)}
{funnel_section}
<h2>Methods</h2>
{methods_html(summary_settings, used)}
<h2>Manifest</h2>
{manifest_blocks}
<script>
{_EMBED_SCRIPT % _script_json(specs)}
</script>
</body>
</html>
"""


def render_report(run_dir: Path, zoom: tuple[int, int] | None = None) -> Path:
    """Write report.html and the PNG charts from the run's Parquet files; return the page's path.

    Reads summary.parquet and recommendation.parquet and computes neither. Raises
    RunFolderError when one is missing.
    """
    folder = check_run_folder(run_dir)
    stored_summary = read_summary(folder)
    stored_recommendation = read_recommendation(folder)
    if stored_summary is None or stored_recommendation is None:
        missing = SUMMARY_FILE if stored_summary is None else RECOMMENDATION_FILE
        raise RunFolderError(f"{missing} not found in {str(folder)!r}; run mrl recommend first")
    summary, summary_settings = stored_summary
    table, used = stored_recommendation

    built = build_charts(summary, table, used, zoom)
    for item in built:
        write_png(item.chart, folder / CHARTS_FOLDER / f"{item.stem}.png")

    manifests = read_manifests(folder)
    study = folder / "study.json"
    if study.is_file():
        manifests.insert(0, ("study.json", json.loads(study.read_text(encoding="utf-8"))))
    page = report_html(
        f"mrl report: {_pair_title(summary)}", built, table, used, summary_settings, manifests, funnel_html(folder, used, manifests)
    )
    path = folder / REPORT_FILE
    write_text(page, path)
    log.info("wrote %s and %d PNG charts in %s", path, len(built), folder / CHARTS_FOLDER)
    return path


def write_report(
    run_dir: Path,
    settings: RecommendSettings | None = None,
    zoom: tuple[int, int] | None = None,
) -> Path:
    """Compute the summary and recommendation of a run where needed, then render the report.

    Reuses summary.parquet when it was computed with the same statistics settings. Used at
    the end of ``mrl sweep`` and by ``mrl report`` on a run that has no recommendation yet.
    """
    folder = check_run_folder(run_dir)
    table, used = recommend_run(folder, settings or RecommendSettings())
    write_recommendation(folder, table, used)
    return render_report(folder, zoom)
