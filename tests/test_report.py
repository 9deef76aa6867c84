"""Tests for mrl recommend, compare and report on a real SciFact sweep, and for the charts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from mrl import analyse, charts, report
from mrl.cli import main

RULES = [
    "full size",
    "keep 95%",
    "keep 98%",
    "keep 99%",
    "not significantly worse",
    "knee (Kneedle)",
]
# all-MiniLM-L6-v2 on SciFact has 5,183 documents.
SCIFACT_DOCUMENTS = 5183


@pytest.fixture(scope="session")
def scifact_run(ray_local, tmp_path_factory, scifact, scifact_embeddings) -> Path:
    """Sweep the shared SciFact vectors on a coarse grid of dims once per session."""
    out = tmp_path_factory.mktemp("scifact-run") / "run"
    code = main(
        [
            "sweep",
            "--embeddings",
            str(scifact_embeddings),
            "--dataset",
            str(scifact),
            "--dims",
            "8:384:8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


@pytest.fixture
def run_copy(scifact_run, tmp_path) -> Path:
    """Copy the session's run, so a test may rewrite its files."""
    copy = tmp_path / "run"
    shutil.copytree(scifact_run, copy, ignore=shutil.ignore_patterns(".parts"))
    return copy


def chart_row_counts(chart) -> list[int]:
    """Return the number of rows of each dataset embedded in a chart's specification."""
    spec = chart.to_dict()
    counts = [len(values) for values in spec.get("datasets", {}).values()]
    inline = spec.get("data", {}).get("values")
    if inline is not None:
        counts.append(len(inline))
    return counts


def chart_rows(chart) -> list[dict]:
    spec = chart.to_dict()
    return [row for values in spec.get("datasets", {}).values() for row in values]


# The sweep writes the report


def test_sweep_writes_report_files(scifact_run):
    for name in ("summary.parquet", "recommendation.parquet", "report.html"):
        assert (scifact_run / name).stat().st_size > 0, name
    for stem in ("quality-nDCG_at_10", "zoom-nDCG_at_10", "bytes-nDCG_at_10-hnsw", "quality-R_at_100"):
        assert (scifact_run / "charts" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
    assert not list(scifact_run.glob(".*.tmp")), "no temporary files remain"


def test_summary_intervals_contain_mean(scifact_run):
    summary = pd.read_parquet(scifact_run / "summary.parquet")

    assert len(summary) == 2 * 48 * 4
    assert (summary["ci_low"] <= summary["mean"]).all()
    assert (summary["mean"] <= summary["ci_high"]).all()
    assert (summary["ci_high"] - summary["ci_low"] > 0).all()
    assert set(summary["n_queries"]) == {300}


# mrl recommend


def test_recommend_prints_table(run_copy, capsys):
    code = main(["recommend", str(run_copy), "--no-report"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(
        "scifact-all-MiniLM-L6-v2 on scifact: nDCG@10, hnsw index, index memory for 5,183 documents"
    )
    assert "mean [95% CI]" in out
    for rule in RULES:
        assert re.search(rf"^{re.escape(rule)} +\d+ +f32 +0\.\d{{4}} \[0\.\d{{4}}, 0\.\d{{4}}\]", out, re.M), rule
    assert "Holm-adjusted" in out


def test_recommendation_table_columns_and_rules(run_copy):
    main(["recommend", str(run_copy), "--no-report"])
    table = pd.read_parquet(run_copy / "recommendation.parquet")

    expected = ["model", "dataset", "measure", *analyse.RECOMMENDATION_COLUMNS, "n_docs"]
    assert list(table.columns) == expected
    assert table["rule"].tolist() == RULES
    assert set(table["index"]) == {"hnsw"}
    assert set(table["measure"]) == {"nDCG@10"}
    assert (table["ci_low"] <= table["mean"]).all()
    assert (table["mean"] <= table["ci_high"]).all()
    assert (table["bytes_per_vector"] == 4 * table["dim"]).all()
    assert (table["n_docs"] == SCIFACT_DOCUMENTS).all()

    by_rule = table.set_index("rule")
    assert by_rule.loc["full size", "dim"] == 384
    assert by_rule.loc["full size", "share_of_full"] == 1.0
    for share in (95, 98, 99):
        assert by_rule.loc[f"keep {share}%", "share_of_full"] >= share / 100
    assert by_rule.loc["not significantly worse", "p_adjusted"] >= 0.05
    assert by_rule.loc["keep 95%", "dim"] <= by_rule.loc["keep 99%", "dim"]
    expected_bytes = analyse.index_memory_bytes(SCIFACT_DOCUMENTS, 384, "f32", 16)
    assert by_rule.loc["full size", "index_bytes"] == expected_bytes


def test_recommend_keep_and_index_options(run_copy):
    code = main(["recommend", str(run_copy), "--keep", "90,97.5", "--index", "exact", "--no-report"])
    table = pd.read_parquet(run_copy / "recommendation.parquet")

    assert code == 0
    assert table["rule"].tolist()[1:3] == ["keep 90%", "keep 97.5%"]
    assert set(table["index"]) == {"exact"}
    assert (table["index_bytes"] == SCIFACT_DOCUMENTS * table["bytes_per_vector"]).all()


def test_recommend_memory_budget_fits(run_copy, capsys):
    code = main(["recommend", str(run_copy), "--budget", "5MB", "--n-docs", "5183"])

    out = capsys.readouterr().out
    table = pd.read_parquet(run_copy / "recommendation.parquet")
    budget = table[table["rule"] == "memory budget"].iloc[0]
    assert code == 0
    assert "memory budget: " in out
    assert budget["index"] == "hnsw"
    assert budget["index_bytes"] <= 5_000_000
    # 5 MB for 5,183 documents fits f32 HNSW up to dim 188, far below the full size.
    assert budget["dim"] < 384
    assert "memory budget" in (run_copy / "report.html").read_text()


def test_recommend_budget_too_small_exits(scifact_run, capsys):
    code = main(["recommend", str(scifact_run), "--budget", "1kB", "--no-report"])

    assert code == 2
    assert "nothing fits in the memory budget of 1,000 bytes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--keep", "0.95"], "--keep takes percentages between 1 and 100"),
        (["--keep", "ninety"], "invalid --keep value 'ninety'"),
        (["--budget", "8 parsecs"], "unknown unit 'parsecs'"),
        (["--measure", "P@5"], "measure 'P@5' not found in the run"),
        (["--model", "other-model"], "model 'other-model' not found in the run"),
        (["--zoom", "300:200"], "invalid zoom range '300:200'"),
    ],
)
def test_recommend_rejects_bad_arguments(scifact_run, capsys, arguments, message):
    code = main(["recommend", str(scifact_run), *arguments, "--no-report"])

    assert code == 2
    assert message in capsys.readouterr().err


def test_commands_reject_missing_folder(tmp_path, capsys):
    for command in (["recommend"], ["report"], ["compare"]):
        arguments = [*command, str(tmp_path / "missing")]
        if command == ["compare"]:
            arguments += ["8", "16"]
        code = main(arguments)

        error = capsys.readouterr().err
        assert code == 2, command
        assert f"run folder '{tmp_path / 'missing'}' not found" in error, command


def test_commands_reject_folder_without_results(tmp_path, capsys):
    code = main(["recommend", str(tmp_path)])

    assert code == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_recommend_statistics_options_recompute(run_copy):
    before = pd.read_parquet(run_copy / "summary.parquet")

    code = main(["recommend", str(run_copy), "--n-bootstrap", "200", "--seed", "3", "--correction", "bh", "--no-report"])

    after, settings = report.read_summary(run_copy)
    assert code == 0
    assert settings["n_bootstrap"] == 200
    assert settings["correction"] == "bh"
    assert not np.allclose(before["ci_low"], after["ci_low"])
    assert np.allclose(before["mean"], after["mean"])


# mrl compare


def test_compare_small_dim_worse(scifact_run, capsys):
    code = main(["compare", str(scifact_run), "8", "384", "--index", "exact"])

    out = capsys.readouterr().out
    assert code == 0
    difference = re.search(r"difference \(dim 8 - dim 384\): ([-+]\d\.\d{4}), 95% CI \[([-+]\d\.\d{4}), ([-+]\d\.\d{4})\]", out)
    assert difference is not None, out
    value, low, high = (float(group) for group in difference.groups())
    assert value < 0
    assert low <= value <= high
    assert high < 0
    p_value = float(re.search(r"p-value: (\S+)", out).group(1))
    assert p_value < 0.001
    assert "paired sign-flip randomisation test" in out
    assert "exact index" in out


def test_compare_reversed_order_flips_sign(scifact_run, capsys):
    main(["compare", str(scifact_run), "384", "8"])

    out = capsys.readouterr().out
    difference = float(re.search(r"difference \(dim 384 - dim 8\): ([-+]\d\.\d{4})", out).group(1))
    assert difference > 0
    assert "hnsw index" in out, "compare defaults to hnsw when the run has it"


def test_compare_means_match_summary(scifact_run, capsys):
    main(["compare", str(scifact_run), "200", "384", "--measure", "R@100", "--index", "exact"])

    out = capsys.readouterr().out
    summary = pd.read_parquet(scifact_run / "summary.parquet")
    row = summary[(summary["measure"] == "R@100") & (summary["index"] == "exact") & (summary["dim"] == 200)].iloc[0]
    assert f"dim 200: mean {row['mean']:.4f}" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["8", "12"], "dim 12 not found"),
        (["3", "5"], "dims 3 and 5 not found in the run, available dims: 8..384 (48 dims)"),
        (["8", "16", "--measure", "P@5"], "measure 'P@5' not found in the run"),
        (["8", "16", "--model", "other"], "model 'other' not found in the run"),
    ],
)
def test_compare_rejects_bad_arguments(scifact_run, capsys, arguments, message):
    code = main(["compare", str(scifact_run), *arguments])

    assert code == 2
    assert message in capsys.readouterr().err


# mrl report


def test_report_rerenders_without_recomputing(run_copy, capsys):
    stored = {name: (run_copy / name).stat().st_mtime_ns for name in ("summary.parquet", "recommendation.parquet")}
    page_before = (run_copy / "report.html").stat().st_mtime_ns

    code = main(["report", str(run_copy), "--zoom", "200:320"])

    assert code == 0
    assert capsys.readouterr().out.strip() == str(run_copy / "report.html")
    for name, mtime in stored.items():
        assert (run_copy / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert (run_copy / "report.html").stat().st_mtime_ns > page_before
    assert "dims 200 to 320" in (run_copy / "report.html").read_text()


def test_report_contains_every_chart(scifact_run):
    page = (scifact_run / "report.html").read_text()
    summary = pd.read_parquet(scifact_run / "summary.parquet")
    table = pd.read_parquet(scifact_run / "recommendation.parquet")
    built = report.build_charts(summary, table, {"measure": "nDCG@10"})

    # Three charts of the main measure, and one quality chart of each other measure.
    assert len(built) == 3 + 3
    specs = json.loads(re.search(r"const specs = (\[.*\]);\n", page).group(1))
    assert len(specs) == len(built)
    for number, item in enumerate(built):
        assert f'id="chart-{number}"' in page
        assert f"{report.CHARTS_FOLDER}/{item.stem}.png" in page
        assert (scifact_run / report.CHARTS_FOLDER / f"{item.stem}.png").is_file()
    for heading in ("Recommendation", "Charts", "Methods", "Manifest"):
        assert f"<h2>{heading}</h2>" in page
    for fact in ("percentile bootstrap", "paired sign-flip randomisation test", "Holm", "Kneedle", "E[node]"):
        assert fact in page
    assert "content_sha256" in page, "the manifest is in the page"
    assert "<script src=" not in page, "the page loads no external scripts"


def test_report_computes_missing_statistics(run_copy):
    (run_copy / "summary.parquet").unlink()
    (run_copy / "recommendation.parquet").unlink()

    code = main(["report", str(run_copy)])

    assert code == 0
    assert (run_copy / "summary.parquet").is_file()
    assert (run_copy / "recommendation.parquet").is_file()


def test_report_reads_hive_per_query(scifact_run, tmp_path):
    # A study run: per-query scores of two pairs in a hive-partitioned per_query/ folder.
    per_query = pd.read_parquet(scifact_run / "per_query.parquet")
    per_query = per_query[(per_query["measure"] == "nDCG@10") & (per_query["dim"] % 32 == 0)]
    second = per_query.assign(dataset="007", value=per_query["value"] * 0.9)
    both = pd.concat([per_query, second], ignore_index=True)
    run = tmp_path / "study"
    ds.write_dataset(
        pa.Table.from_pandas(both, preserve_index=False),
        run / "per_query",
        format="parquet",
        partitioning=ds.partitioning(pa.schema([("model", pa.string()), ("dataset", pa.string())]), flavor="hive"),
    )

    code = main(["report", str(run)])

    assert code == 0
    table = pd.read_parquet(run / "recommendation.parquet")
    assert sorted(set(table["dataset"])) == ["007", "scifact"], "a numeric-looking name stays a string"
    assert len(table) == 2 * len(RULES)
    assert table["n_docs"].isna().all(), "without a manifest the corpus size is unknown"
    page = (run / "report.html").read_text()
    assert "2 (model, dataset) pairs" in page
    spec = json.loads(re.search(r"const specs = (\[.*\]);\n", page).group(1))[0]
    assert "facet" in spec


def test_recommend_with_dtype_column(scifact_run, tmp_path, capsys):
    # Binary vectors modelled as 7% worse than float32 at every dim and query.
    per_query = pd.read_parquet(scifact_run / "per_query.parquet")
    per_query = per_query[per_query["measure"] == "nDCG@10"]
    binary = per_query.assign(dtype="b1", value=per_query["value"] * 0.93)
    run = tmp_path / "dtypes"
    run.mkdir()
    pd.concat([per_query.assign(dtype="f32"), binary]).to_parquet(run / "per_query.parquet", index=False)
    shutil.copy(scifact_run / "manifest.json", run / "manifest.json")

    code = main(["recommend", str(run), "--budget", "2MB"])

    assert code == 0
    table = pd.read_parquet(run / "recommendation.parquet")
    by_rule = table.set_index("rule")
    assert (table[table["rule"] != "memory budget"]["dtype"] == "f32").all(), "dim rules use f32"
    # 2 MB for 5,183 documents leaves about 174 bytes of vector per document beside the
    # graph, which fits f32 only up to dim 40 but b1 at every dim.
    assert by_rule.loc["memory budget", "dtype"] == "b1"
    assert by_rule.loc["memory budget", "bytes_per_vector"] == -(-by_rule.loc["memory budget", "dim"] // 8)
    summary = pd.read_parquet(run / "summary.parquet")
    assert set(summary["dtype"]) == {"f32", "b1"}
    spec = json.loads(re.search(r"const specs = (\[.*\]);\n", (run / "report.html").read_text()).group(1))[2]
    points = [layer for layer in spec["layer"] if layer["mark"]["type"] == "point"][0]
    assert points["encoding"]["color"]["field"] == "dtype"


def test_load_per_query_filters(scifact_run):
    rows = report.load_per_query(scifact_run, measure="nDCG@10", index="exact", dim=[8, 16])

    assert set(rows["dim"]) == {8, 16}
    assert set(rows["measure"]) == {"nDCG@10"}
    assert len(rows) == 2 * 300


# Headless browser


def test_report_renders_in_chromium(scifact_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed; install Debian's chromium package to run this check")
    page = (scifact_run / "report.html").read_text()
    expected = len(json.loads(re.search(r"const specs = (\[.*\]);\n", page).group(1)))

    with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
        result = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=10000",
                "--dump-dom",
                (scifact_run / "report.html").as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )

    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert f'data-charts-rendered="{expected}"' in dom
    assert 'data-charts-failed="0"' in dom
    # vega-embed with the SVG renderer draws each chart as one <svg class="marks">.
    assert len(re.findall(r'<svg[^>]*class="marks"', dom)) == expected
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "the page logged to the console"


# Charts


def synthetic_summary(models=3, datasets=2, dims=1024, dtypes=("f32", "i8")) -> pd.DataFrame:
    """Build a summary shaped like a large study, with a concave curve per series."""
    frames = []
    dim_values = np.arange(1, dims + 1)
    for model in range(models):
        for dataset in range(datasets):
            for index in ("exact", "hnsw"):
                for offset, dtype in enumerate(dtypes):
                    mean = 0.7 * (1 - np.exp(-dim_values / 150)) - 0.02 * offset
                    frames.append(
                        pd.DataFrame(
                            {
                                "model": f"model-{model}",
                                "dataset": f"dataset-{dataset}",
                                "index": index,
                                "dtype": dtype,
                                "dim": dim_values,
                                "measure": "nDCG@10",
                                "mean": mean,
                                "ci_low": mean - 0.03,
                                "ci_high": mean + 0.03,
                                "n_queries": 300,
                                "share_of_full": mean / mean[-1],
                                "p_value": 0.5,
                                "p_adjusted": 0.5,
                            }
                        )
                    )
    return pd.concat(frames, ignore_index=True)


def synthetic_recommendation(summary: pd.DataFrame) -> pd.DataFrame:
    tables = []
    for (model, dataset), pair in summary.groupby(["model", "dataset"]):
        table = analyse.recommend(pair, index="hnsw")
        table.insert(0, "measure", "nDCG@10")
        table.insert(0, "dataset", dataset)
        table.insert(0, "model", model)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def test_charts_stay_under_row_limit():
    summary = synthetic_summary()
    recommendation = synthetic_recommendation(summary)
    assert len(summary) > 4 * charts.MAX_CHART_ROWS

    built = report.build_charts(summary, recommendation, {"measure": "nDCG@10"})

    for item in built:
        counts = chart_row_counts(item.chart)
        assert counts, item.stem
        assert max(counts) <= charts.MAX_CHART_ROWS, item.stem
        assert "facet" in item.chart.to_dict(), f"{item.stem} has a panel per pair"


def test_thinned_chart_keeps_marked_dims():
    summary = synthetic_summary()
    recommendation = synthetic_recommendation(summary)

    chart = charts.quality_chart(summary, "nDCG@10", recommendation=recommendation)

    rows = chart_rows(chart)
    curve = {(row["model"], row["dataset"], row["index"], row["dtype"], row["dim"]) for row in rows if row["layer"] == "curve"}
    marks = recommendation[recommendation["rule"] != "full size"]
    for mark in marks.itertuples():
        assert (mark.model, mark.dataset, mark.index, mark.dtype, mark.dim) in curve
    assert ("model-0", "dataset-0", "exact", "f32", 1024) in curve, "each series keeps its full size"
    assert len({row["label"] for row in rows if row["layer"] == "mark"}) > 0


def test_thin_dims_small_and_pinned():
    frame = pd.DataFrame({"series": "a", "dim": range(1, 101), "mean": 0.5})

    assert charts.thin_dims(frame, ["series"], 100) is frame
    thinned = charts.thin_dims(frame, ["series"], 30, pd.DataFrame({"series": ["a"], "dim": [57]}))
    assert len(thinned) <= 30
    assert {57, 100} <= set(thinned["dim"])


def test_zoom_chart_filters_range(scifact_run):
    summary = pd.read_parquet(scifact_run / "summary.parquet")
    table = pd.read_parquet(scifact_run / "recommendation.parquet")

    chart = charts.quality_chart(summary, "nDCG@10", recommendation=table, dim_range=(200, 320))

    rows = chart_rows(chart)
    curve_dims = {row["dim"] for row in rows if row["layer"] == "curve"}
    assert curve_dims == set(range(200, 321, 8))
    mark_dims = {row["dim"] for row in rows if row["layer"] == "mark"}
    assert all(200 <= dim <= 320 for dim in mark_dims)
    # The full-size line still shows the mean at dim 384, outside the zoomed range.
    full = [row for row in rows if row["layer"] == "full size"]
    assert len(full) == 2


def test_zoom_outside_dims_rejected(scifact_run):
    summary = pd.read_parquet(scifact_run / "summary.parquet")

    with pytest.raises(ValueError, match="no dims of nDCG@10 lie in the range 1:7"):
        charts.quality_chart(summary, "nDCG@10", dim_range=(1, 7))


def test_bytes_chart_colours_by_dtype():
    summary = synthetic_summary(models=1, datasets=1, dims=64, dtypes=("f32", "b1"))

    chart = charts.bytes_chart(summary, "nDCG@10", "exact")

    spec = chart.to_dict()
    points = [layer for layer in spec["layer"] if layer["mark"]["type"] == "point"][0]
    assert points["encoding"]["color"]["field"] == "dtype"
    assert spec["layer"][0]["encoding"]["x"]["scale"]["type"] == "log"
    rows = chart_rows(chart)
    assert {row["dtype"] for row in rows} == {"f32", "b1"}
    b1_64 = [row for row in rows if row["dtype"] == "b1" and row["dim"] == 64][0]
    assert b1_64["bytes_per_vector"] == 8
    frontier = [row for row in rows if row["on_frontier"]]
    expected = analyse.pareto_frontier([row["bytes_per_vector"] for row in rows], [row["mean"] for row in rows])
    assert len(frontier) == int(expected.sum())


def test_quality_chart_dashes_by_dtype():
    summary = synthetic_summary(models=1, datasets=1, dims=64, dtypes=("f32", "b1"))

    spec = charts.quality_chart(summary, "nDCG@10").to_dict()

    band, line = spec["layer"][0], spec["layer"][1]
    assert line["encoding"]["strokeDash"]["field"] == "dtype"
    assert "strokeDash" not in band["encoding"], "Vega-Lite drops strokeDash on areas with a warning"
    assert band["encoding"]["detail"]["field"] == "dtype", "each dtype gets its own band"


# Text output


def test_format_bytes_decimal_units():
    assert report.format_bytes(512) == "512 B"
    assert report.format_bytes(9_061_266) == "9.06 MB"
    assert report.format_bytes(8 * 10**9) == "8 GB"
    assert report.format_bytes(None) == "-"


def test_default_zoom_starts_at_plateau_rules():
    summary = synthetic_summary(models=1, datasets=1, dims=100, dtypes=("f32",))
    recommendation = synthetic_recommendation(summary)
    plateau = recommendation[recommendation["rule"].str.startswith("keep ")]["dim"].min()

    low, high = report.default_zoom(summary, recommendation)

    assert high == 100
    assert low <= plateau
