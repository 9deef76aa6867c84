"""Draw quality against truncation dim with Altair, as interactive HTML and PNG."""

from __future__ import annotations

import re
from pathlib import Path

import altair as alt
import pandas as pd

from mrl.output import atomic_path


def measure_file_stem(measure: str) -> str:
    """Return a file-name-safe stem for a measure: ``nDCG@10`` becomes ``nDCG_at_10``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", measure.replace("@", "_at_"))


def measure_chart(metrics: pd.DataFrame, measure: str, title: str) -> alt.Chart:
    """Plot one measure against truncation dim, one line per index, with tooltips.

    ``metrics`` holds at most one row per (index, dim) for the measure, so even
    1..1024 dims with two indexes stay well under Altair's 5,000-row limit.
    """
    data = metrics.loc[metrics["measure"] == measure, ["index", "dim", "value", "n_queries"]]
    return (
        alt.Chart(data, title=title)
        .mark_line(point=alt.OverlayMarkDef(size=12), strokeWidth=1.5)
        .encode(
            x=alt.X("dim:Q", title="truncation dim"),
            y=alt.Y("value:Q", title=measure, scale=alt.Scale(zero=False)),
            color=alt.Color("index:N", title="index"),
            tooltip=[
                alt.Tooltip("index:N"),
                alt.Tooltip("dim:Q", title="dim"),
                alt.Tooltip("value:Q", title=measure, format=".4f"),
                alt.Tooltip("n_queries:Q", title="queries"),
            ],
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
