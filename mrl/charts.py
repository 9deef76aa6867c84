"""Draw quality against truncation dim with Altair, as interactive HTML and PNG."""

from __future__ import annotations

import math
import re
from pathlib import Path

import altair as alt
import pandas as pd

from mrl.analyse import DEFAULT_DTYPE, bytes_per_vector, pareto_frontier
from mrl.output import atomic_path


def measure_file_stem(measure: str) -> str:
    """Return a file-name-safe stem for a measure: ``nDCG@10`` becomes ``nDCG_at_10``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", measure.replace("@", "_at_"))


def measure_chart(metrics: pd.DataFrame, measure: str, title: str) -> alt.Chart:
    """Plot one measure against truncation dim, one line per index and dtype, with tooltips.

    ``metrics`` contains at most one row per (index, dtype, dim) for the measure, so
    1..1024 dims with two indexes and one dtype stay well under Altair's 5,000-row limit.
    """
    data = metrics.loc[metrics["measure"] == measure].copy()
    if "dtype" not in data.columns:
        data["dtype"] = "f32"
    data = data[["index", "dtype", "dim", "value", "n_queries"]]
    several_dtypes = data["dtype"].nunique() > 1
    # With several dtypes, colour distinguishes the dtypes and dashes the indexes. Otherwise colour is the index.
    color = alt.Color("dtype:N", title="dtype") if several_dtypes else alt.Color("index:N", title="index")
    encodings = {"strokeDash": alt.StrokeDash("index:N", title="index")} if several_dtypes else {}
    return (
        alt.Chart(data, title=title)
        .mark_line(point=alt.OverlayMarkDef(size=12), strokeWidth=1.5)
        .encode(
            x=alt.X("dim:Q", title="truncation dim"),
            y=alt.Y("value:Q", title=measure, scale=alt.Scale(zero=False)),
            color=color,
            detail=alt.Detail("index:N"),
            tooltip=[
                alt.Tooltip("index:N"),
                alt.Tooltip("dtype:N"),
                alt.Tooltip("dim:Q", title="dim"),
                alt.Tooltip("value:Q", title=measure, format=".4f"),
                alt.Tooltip("n_queries:Q", title="queries"),
            ],
            **encodings,
        )
        .properties(width=640, height=320)
        .interactive()
    )


def save_chart(chart: alt.Chart, folder: Path, stem: str) -> list[Path]:
    """Save a chart as self-contained HTML (readable offline) and PNG; return the paths."""
    paths = []
    for suffix in (".html", ".png"):
        path = Path(folder) / f"{stem}{suffix}"
        with atomic_path(path) as temporary:
            # Altair picks the format from the suffix, so the temporary file keeps it.
            named = temporary.with_suffix(suffix)
            if suffix == ".html":
                chart.save(named, format="html", inline=True)
            else:
                chart.save(named, format="png", scale_factor=2)
            named.replace(temporary)
        paths.append(path)
    return paths


def write_measure_charts(metrics: pd.DataFrame, folder: Path, title: str) -> list[Path]:
    """Draw and save one chart per measure in ``metrics``."""
    paths = []
    for measure in metrics["measure"].unique():
        chart = measure_chart(metrics, measure, f"{title}: {measure}")
        paths.extend(save_chart(chart, folder, measure_file_stem(measure)))
    return paths


def facet_chart(metrics: pd.DataFrame, measure: str, title: str) -> alt.FacetChart:
    """Plot one measure against truncation dim in a grid: a row per dataset, a column per model.

    Each panel has its own y scale, because datasets differ in how high a measure can go.
    """
    data = metrics.loc[metrics["measure"] == measure, ["model", "dataset", "index", "dim", "value", "n_queries"]]
    panel = (
        alt.Chart(data)
        .mark_line(strokeWidth=1.5)
        .encode(
            x=alt.X("dim:Q", title="truncation dim"),
            y=alt.Y("value:Q", title=measure, scale=alt.Scale(zero=False)),
            color=alt.Color("index:N", title="index"),
            tooltip=[
                alt.Tooltip("model:N"),
                alt.Tooltip("dataset:N"),
                alt.Tooltip("index:N"),
                alt.Tooltip("dim:Q", title="dim"),
                alt.Tooltip("value:Q", title=measure, format=".4f"),
                alt.Tooltip("n_queries:Q", title="queries"),
            ],
        )
        .properties(width=320, height=200)
        .interactive()
    )
    return (
        panel.facet(row=alt.Row("dataset:N", title="dataset"), column=alt.Column("model:N", title="model"))
        .resolve_scale(y="independent")
        .properties(title=title)
    )


def write_facet_charts(metrics: pd.DataFrame, folder: Path, title: str) -> list[Path]:
    """Draw and save one faceted chart per measure in ``metrics``, for a study of several pairs."""
    paths = []
    # Three pairs of 1,024 dims and two indexes already exceed Altair's default limit of 5,000
    # rows. The limit guards notebook memory, and one file per measure carries its rows once.
    with alt.data_transformers.disable_max_rows():
        for measure in metrics["measure"].unique():
            chart = facet_chart(metrics, measure, f"{title}: {measure}")
            paths.extend(save_chart(chart, folder, measure_file_stem(measure)))
    return paths


# Charts of the statistics: quality with its confidence band, and quality against bytes.

# Altair's default data transformer raises MaxRowsError for a dataset of more rows. The
# summary charts stay below it by thinning dims, so the check stays on as a guard.
MAX_CHART_ROWS = 5000
# Rows left for curves in a quality chart, after the full-size lines and rule marks.
_CURVE_ROW_BUDGET = MAX_CHART_ROWS - 500
PAIR_COLUMNS = ("model", "dataset")
# Rules left unmarked on quality charts: the full size is drawn as a dashed line instead.
_MARKED_RULES_EXCLUDED = ("full size",)


def _with_dtype(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with a dtype column, f32 when the sweep stored no dtype."""
    if "dtype" in frame.columns:
        return frame
    return frame.assign(dtype=DEFAULT_DTYPE)


def _has_several_pairs(frame: pd.DataFrame) -> bool:
    return frame[list(PAIR_COLUMNS)].drop_duplicates().shape[0] > 1


def thin_dims(
    frame: pd.DataFrame, series: list[str], max_rows: int, keep_dims: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Keep every k-th dim of each series so that ``frame`` has at most ``max_rows`` rows.

    Each series keeps its largest dim, and ``keep_dims`` (rows of the series columns and
    dim) lists dims that stay as well, such as the recommended ones. k is the smallest
    stride that fits, so a frame already small enough comes back unchanged.
    """
    if len(frame) <= max_rows:
        return frame

    ranked = frame.sort_values([*series, "dim"])
    position = ranked.groupby(series, sort=False, observed=True).cumcount()
    is_last = ~ranked.duplicated(subset=series, keep="last")
    pinned = is_last
    if keep_dims is not None and not keep_dims.empty:
        keys = keep_dims[[*series, "dim"]].drop_duplicates()
        marked = ranked[[*series, "dim"]].merge(keys, how="left", indicator=True)["_merge"]
        pinned = pinned | (marked.to_numpy() == "both")

    n_pinned = int(pinned.sum())
    longest = int(position.max()) + 1
    stride = max(2, math.ceil((len(ranked) - n_pinned) / max(1, max_rows - n_pinned)))
    while True:
        kept = pinned | (position % stride == 0).to_numpy()
        if int(kept.sum()) <= max_rows:
            break
        if stride > longest:
            raise ValueError(
                f"a chart needs at least {int(kept.sum())} rows, more than the {max_rows} "
                f"allowed, even with one dim per series. Plot fewer series."
            )
        stride += 1
    return ranked[kept].reset_index(drop=True)


def _mark_rows(recommendation: pd.DataFrame, several_dtypes: bool) -> pd.DataFrame:
    """Return one row per marked (pair, index, dtype, dim), with the rule names joined."""
    marks = recommendation[~recommendation["rule"].isin(_MARKED_RULES_EXCLUDED)].copy()
    keys = [*PAIR_COLUMNS, "index", "dtype", "dim"]
    if marks.empty:
        return pd.DataFrame(columns=[*keys, "label", "mean"])
    if several_dtypes:
        marks["rule"] = marks["rule"] + " (" + marks["dtype"] + ")"
    rows = (
        marks.groupby(keys, sort=True, observed=True)
        .agg(label=("rule", ", ".join), mean=("mean", "first"))
        .reset_index()
    )
    rows["label"] = rows["label"] + ": " + rows["dim"].astype(str)
    return rows


def _label_rows(marks: pd.DataFrame, min_gap: float) -> pd.DataFrame:
    """Merge the labels of marks closer than ``min_gap`` dims into one label per panel.

    Rotated labels of nearby dims would print over each other, so each group of marks
    that starts within ``min_gap`` of its first dim shares one label at that dim.
    """
    labels = []
    if marks.empty:
        return pd.DataFrame(columns=[*PAIR_COLUMNS, "dim", "label"])
    for pair, panel in marks.sort_values("dim").groupby(list(PAIR_COLUMNS), sort=True, observed=True):
        group_start = None
        texts: list[str] = []
        for row in panel.itertuples(index=False):
            if group_start is not None and row.dim - group_start > min_gap:
                labels.append((*pair, group_start, "; ".join(texts)))
                texts = []
                group_start = None
            if group_start is None:
                group_start = row.dim
            texts.append(row.label)
        if texts:
            labels.append((*pair, group_start, "; ".join(texts)))
    return pd.DataFrame(labels, columns=[*PAIR_COLUMNS, "dim", "label"])


def quality_chart(
    summary: pd.DataFrame,
    measure: str,
    *,
    recommendation: pd.DataFrame | None = None,
    dim_range: tuple[int, int] | None = None,
    title: str | None = None,
) -> alt.Chart | alt.LayerChart | alt.FacetChart:
    """Plot a measure's mean against truncation dim with its confidence band.

    ``summary`` is the output of ``mrl.analyse.summarise``. Each (index, dtype) is one
    line with its bootstrap interval as a band, and a dashed rule marks its full-size mean.
    ``recommendation`` rows (with model, dataset and measure columns) become labelled
    vertical rules at their dims. ``dim_range`` (inclusive) zooms in on a range of dims.
    Several (model, dataset) pairs give a grid of panels: a row per dataset, a column per
    model. Dims are thinned when the data would exceed ``MAX_CHART_ROWS`` rows.
    """
    rows = _with_dtype(summary)
    rows = rows[rows["measure"] == measure]
    if rows.empty:
        raise ValueError(f"measure {measure!r} not found in the summary")
    series = [*PAIR_COLUMNS, "index", "dtype"]
    several_dtypes = rows["dtype"].nunique() > 1

    # The full-size mean comes from the largest dim of each series, before any zoom.
    full = rows.sort_values("dim").groupby(series, observed=True).tail(1)
    full = full.assign(layer="full size")

    marks = pd.DataFrame()
    if recommendation is not None:
        chosen = _with_dtype(recommendation)
        if "measure" in chosen.columns:
            chosen = chosen[chosen["measure"] == measure]
        marks = _mark_rows(chosen, several_dtypes).assign(layer="mark")

    if dim_range is not None:
        low, high = dim_range
        rows = rows[rows["dim"].between(low, high)]
        if rows.empty:
            raise ValueError(f"no dims of {measure} lie in the range {low}:{high}")
        if not marks.empty:
            marks = marks[marks["dim"].between(low, high)]

    several_pairs = _has_several_pairs(rows)
    width, height = (320, 220) if several_pairs else (720, 360)
    # A rotated label needs about 14 pixels across, which is this many dims on the x axis.
    x_low, x_high = dim_range if dim_range is not None else (0, int(rows["dim"].max()))
    labels = _label_rows(marks, 14 / width * (x_high - x_low)).assign(layer="label")

    curve_columns = [*series, "dim", "mean", "ci_low", "ci_high", "share_of_full", "p_adjusted", "n_queries"]
    curve = thin_dims(rows[curve_columns], series, _CURVE_ROW_BUDGET, marks if not marks.empty else None)
    frames = [curve.assign(layer="curve"), full[[*series, "mean"]].assign(layer="full size")]
    frames += [frame for frame in (marks, labels) if not frame.empty]
    data = pd.concat(frames, ignore_index=True)
    # Points on every dim of a long curve would hide the line, and points would turn the
    # dtype legend's dash patterns into circles.
    show_points = curve.groupby(series, observed=True).size().max() <= 120 and not several_dtypes

    # detail splits the bands and lines of one index by dtype. Only lines can be dashed.
    base = alt.Chart().encode(color=alt.Color("index:N", title="index"), detail="dtype:N")
    line_style = {"strokeDash": alt.StrokeDash("dtype:N", title="dtype")} if several_dtypes else {}

    x = alt.X("dim:Q", title="truncation dim", scale=alt.Scale(domain=list(dim_range)) if dim_range else alt.Undefined)
    y_title = f"{measure} (mean, 95% CI)"
    band = (
        base.transform_filter(alt.datum.layer == "curve")
        .mark_area(opacity=0.2)
        .encode(x=x, y=alt.Y("ci_low:Q", title=y_title, scale=alt.Scale(zero=False)), y2="ci_high:Q")
    )
    line = (
        base.transform_filter(alt.datum.layer == "curve")
        .mark_line(strokeWidth=1.5, point=alt.OverlayMarkDef(size=10) if show_points else False)
        .encode(
            x=x,
            y=alt.Y("mean:Q", title=y_title),
            **line_style,
            tooltip=[
                alt.Tooltip("model:N"),
                alt.Tooltip("dataset:N"),
                alt.Tooltip("index:N"),
                alt.Tooltip("dtype:N"),
                alt.Tooltip("dim:Q"),
                alt.Tooltip("mean:Q", title=measure, format=".4f"),
                alt.Tooltip("ci_low:Q", title="95% CI low", format=".4f"),
                alt.Tooltip("ci_high:Q", title="95% CI high", format=".4f"),
                alt.Tooltip("share_of_full:Q", title="share of full size", format=".1%"),
                alt.Tooltip("p_adjusted:Q", title="adjusted p vs full size", format=".3g"),
                alt.Tooltip("n_queries:Q", title="queries"),
            ],
        )
    )
    full_line = (
        base.transform_filter(alt.datum.layer == "full size")
        .mark_rule(strokeDash=[6, 3], strokeWidth=1)
        .encode(
            y="mean:Q",
            tooltip=[
                alt.Tooltip("index:N"),
                alt.Tooltip("dtype:N"),
                alt.Tooltip("mean:Q", title="full-size mean", format=".4f"),
            ],
        )
    )
    layers = [band, line, full_line]
    if not marks.empty:
        mark_rule = (
            alt.Chart()
            .transform_filter(alt.datum.layer == "mark")
            .mark_rule(color="#444", strokeWidth=1)
            .encode(x=x, tooltip=[alt.Tooltip("label:N", title="rules"), alt.Tooltip("mean:Q", format=".4f")])
        )
        mark_text = (
            alt.Chart()
            .transform_filter(alt.datum.layer == "label")
            .mark_text(angle=270, align="right", baseline="bottom", dx=-4, dy=-2, fontSize=10, color="#222")
            .encode(x=x, y=alt.value(0), text="label:N")
        )
        layers += [mark_rule, mark_text]

    chart = alt.layer(*layers, data=data)
    if several_pairs:
        return (
            chart.properties(width=width, height=height)
            .facet(row=alt.Row("dataset:N", title="dataset"), column=alt.Column("model:N", title="model"))
            .resolve_scale(y="independent")
            .properties(title=title or measure)
        )
    return chart.properties(width=width, height=height, title=title or measure)


def bytes_chart(
    summary: pd.DataFrame, measure: str, index: str, *, title: str | None = None
) -> alt.Chart | alt.LayerChart | alt.FacetChart:
    """Plot a measure's mean against bytes per vector (log scale) for one index.

    Points are coloured by dtype, and a step line joins the Pareto frontier: the
    configurations that no other one beats with no more bytes and a higher mean.
    Several (model, dataset) pairs give a grid of panels, each with its own frontier.
    """
    rows = _with_dtype(summary)
    rows = rows[(rows["measure"] == measure) & (rows["index"] == index)]
    if rows.empty:
        raise ValueError(f"no {measure} results on the {index} index in the summary")
    rows = rows.assign(
        bytes_per_vector=[
            bytes_per_vector(int(dim), dtype) for dim, dtype in zip(rows["dim"], rows["dtype"])
        ]
    )

    parts = []
    for _, pair in rows.groupby(list(PAIR_COLUMNS), sort=True, observed=True):
        frontier = pareto_frontier(pair["bytes_per_vector"], pair["mean"])
        parts.append(pair.assign(on_frontier=frontier))
    rows = pd.concat(parts, ignore_index=True)
    columns = [*PAIR_COLUMNS, "dtype", "dim", "bytes_per_vector", "mean", "ci_low", "ci_high", "on_frontier"]
    # The frontier is found on every point first. Thinning may then drop some of its points,
    # so the step line joins fewer of them, but every point drawn on it is on the frontier.
    data = thin_dims(rows[columns], [*PAIR_COLUMNS, "dtype"], MAX_CHART_ROWS)

    x = alt.X("bytes_per_vector:Q", title="bytes per vector (log scale)", scale=alt.Scale(type="log", base=2))
    y = alt.Y("mean:Q", title=f"{measure} (mean)", scale=alt.Scale(zero=False))
    points = (
        alt.Chart()
        .mark_point(filled=True, size=28, opacity=0.8)
        .encode(
            x=x,
            y=y,
            color=alt.Color("dtype:N", title="dtype"),
            tooltip=[
                alt.Tooltip("model:N"),
                alt.Tooltip("dataset:N"),
                alt.Tooltip("dtype:N"),
                alt.Tooltip("dim:Q"),
                alt.Tooltip("bytes_per_vector:Q", title="bytes per vector"),
                alt.Tooltip("mean:Q", title=measure, format=".4f"),
                alt.Tooltip("ci_low:Q", title="95% CI low", format=".4f"),
                alt.Tooltip("ci_high:Q", title="95% CI high", format=".4f"),
                alt.Tooltip("on_frontier:N", title="on the frontier"),
            ],
        )
    )
    frontier_line = (
        alt.Chart()
        .transform_filter(alt.datum.on_frontier)
        .mark_line(interpolate="step-after", color="#222", strokeWidth=1)
        .encode(x=x, y=y, order="bytes_per_vector:Q")
    )
    chart = alt.layer(frontier_line, points, data=data)
    if _has_several_pairs(rows):
        return (
            chart.properties(width=320, height=220)
            .facet(row=alt.Row("dataset:N", title="dataset"), column=alt.Column("model:N", title="model"))
            .resolve_scale(y="independent")
            .properties(title=title or measure)
        )
    return chart.properties(width=720, height=360, title=title or measure)
