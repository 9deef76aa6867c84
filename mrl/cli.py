"""Command line: ``mrl sweep`` and friends."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mrl.config import DEFAULT_DATASET, DEFAULT_MODEL, SweepConfig
from mrl.data import DataError
from mrl.embed import EmbeddingsError, ModelError
from mrl.evaluate import DEFAULT_MEASURES
from mrl.sweep import DTYPES, INDEXES, RESCORE_DTYPES, RESCORE_SUFFIX, HnswParams

DESCRIPTION = """\
mrl measures how far the vectors of a Matryoshka embedding model can be truncated
before retrieval quality drops: it embeds a BEIR benchmark once at full size, then
for every truncation dim keeps the first dims, renormalises, searches exactly and
with a usearch HNSW index, and scores every query with ir-measures."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    sweep = commands.add_parser(
        "sweep",
        help="embed once, then search and score every truncation dim",
        description="Embed a benchmark once at full size, then search and score every truncation dim.",
        formatter_class=DefaultsHelpFormatter,
    )
    inputs = sweep.add_argument_group("model and data")
    inputs.add_argument("--model", default=None, help=f"sentence-transformers model: a Hugging Face Hub name or a local folder (default {DEFAULT_MODEL}; with --embeddings, only a label)")
    inputs.add_argument("--dataset", default=DEFAULT_DATASET, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or a BEIR dataset name, downloaded once into the cache")
    inputs.add_argument("--split", default="test", help="qrels split to evaluate: reads qrels/SPLIT.tsv")
    inputs.add_argument("--embeddings", type=Path, default=None, help="sweep vectors made elsewhere: a folder with corpus.parquet and queries.parquet, each with _id and embedding columns; no model is loaded")
    inputs.add_argument("--strict", action="store_true", help="treat data warnings (qrels without query text, judged documents missing from the corpus) as errors")
    inputs.add_argument("--ignore-identical-ids", action="store_true", help="remove each query's own id from its results, BEIR's rule for ArguAna and Quora")

    embedding = sweep.add_argument_group("embedding")
    embedding.add_argument("--device", default=None, help="torch device for embedding, such as cpu or cuda (default: cuda when the Ray cluster has GPUs, else cpu)")
    embedding.add_argument("--batch-size", type=int, default=32, help="texts per encoding batch")
    embedding.add_argument("--max-seq-length", type=int, default=None, help="truncate inputs to this many tokens (default: the model's own limit)")
    embedding.add_argument("--query-prompt", default=None, help="text put before every query (default: the model's 'query' prompt, if it defines one)")
    embedding.add_argument("--document-prompt", default=None, help="text put before every document (default: the model's 'document' prompt, if it defines one)")

    search = sweep.add_argument_group("sweep and search")
    search.add_argument("--dims", default="all", help="truncation dims: all, START:STOP (inclusive), START:STOP:STEP or a list like 32,64,128")
    search.add_argument("--index", default=",".join(INDEXES), help="indexes to search, comma separated: exact (brute-force cosine), hnsw (usearch)")
    search.add_argument("--top-k", type=int, default=100, help="results retrieved per query, capped at the corpus size")
    defaults = HnswParams()
    search.add_argument("--connectivity", type=int, default=defaults.connectivity, help="HNSW graph degree (M)")
    search.add_argument("--expansion-add", type=int, default=defaults.expansion_add, help="HNSW candidate list size while building (efConstruction)")
    search.add_argument("--expansion-search", type=int, default=defaults.expansion_search, help="HNSW candidate list size while searching (ef)")
    search.add_argument("--measures", default=" ".join(DEFAULT_MEASURES), help="measures in ir-measures notation, space or comma separated")

    precision = sweep.add_argument_group("precision")
    precision.add_argument(
        "--dtypes",
        default="f32",
        help=f"vector precisions to search at every dim, comma separated: {','.join(DTYPES)}. Both indexes store the "
        "vectors in each dtype as usearch does: cosine for floats and i8, Hamming distance of sign bits for b1",
    )
    precision.add_argument(
        "--rescore",
        type=int,
        default=0,
        help=f"shortlist size, in documents per query, that {' and '.join(RESCORE_DTYPES)} results are rescored from with "
        f"the float32 truncated vectors. The results are recorded as dtypes "
        f"{' and '.join(repr(dtype + RESCORE_SUFFIX) for dtype in RESCORE_DTYPES)}. 0 turns rescoring off. A common choice "
        "is 10 x --top-k",
    )

    funnel = sweep.add_argument_group("two-stage (funnel) retrieval")
    funnel.add_argument(
        "--funnel-shortlist-dims",
        default=None,
        help="turn the funnel on: truncation dims of the f32 HNSW index that shortlists documents, in --dims notation "
        "such as 64,128; without it no funnel runs",
    )
    funnel.add_argument("--funnel-k", default="100,200", help="shortlist sizes K, documents per query, comma separated")
    funnel.add_argument(
        "--funnel-rerank-dims",
        default="full",
        help="truncation dims at which the shortlist is reranked by exact cosine, in --dims notation; 'full' is the embeddings' size",
    )

    output = sweep.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None, help="output folder (default results/DATASET-MODEL)")
    output.add_argument("--cache", type=Path, default=None, help="cache folder for datasets and embeddings (default $MRL_CACHE, else the user cache folder)")
    sweep.add_argument("--config", type=Path, default=None, help="run every (model, dataset) pair of a YAML study config (see jobs/configs/) instead; only --out may be combined with it and overrides the config's output")
    add_analysis_commands(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        model=args.model,
        dataset=args.dataset,
        split=args.split,
        embeddings=args.embeddings,
        dims=args.dims,
        indexes=tuple(name.strip() for name in args.index.split(",") if name.strip()),
        measures=tuple(args.measures.replace(",", " ").split()),
        top_k=args.top_k,
        hnsw=HnswParams(args.connectivity, args.expansion_add, args.expansion_search),
        out=args.out,
        device=args.device,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        query_prompt=args.query_prompt,
        document_prompt=args.document_prompt,
        ignore_identical_ids=args.ignore_identical_ids,
        strict=args.strict,
        cache=args.cache,
        dtypes=tuple(args.dtypes.split(",")),
        rescore=args.rescore,
        funnel=(args.funnel_shortlist_dims, args.funnel_k, args.funnel_rerank_dims) if args.funnel_shortlist_dims else None,
    )


def study_from_args(args: argparse.Namespace):
    """Load the study config of ``--config``; reject other sweep options, which the file sets instead."""
    from mrl.config import load_study

    defaults = vars(build_parser().parse_args(["sweep"]))
    combined = [f"--{name.replace('_', '-')}" for name, value in vars(args).items() if name not in ("verbose", "config", "out") and value != defaults.get(name)]
    if combined:
        raise ValueError(f"{', '.join(combined)} cannot be combined with --config; set them in {args.config}")
    return load_study(args.config, output=args.out)


ANALYSIS_COMMANDS = ("recommend", "compare", "report")
BUDGET_HELP = (
    "memory budget for the index of --n-docs vectors, such as 8GB or 512MiB: KB, MB, GB and TB "
    "are decimal (8GB = 8 x 10^9 bytes), KiB, MiB, GiB and TiB are binary (8GiB = 8 x 2^30 "
    "bytes), and a bare number counts bytes. Adds the 'memory budget' rule: the configuration "
    "needing the fewest bytes that is not significantly worse than the best one that fits"
)


def add_statistics_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("statistics (a change recomputes summary.parquet)")
    group.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples of the queries for the confidence intervals")
    group.add_argument("--n-permutations", type=int, default=None, help="random sign vectors for the paired test against the full size (default: max(10000, 40 x number of tested dims))")
    group.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals, between 0 and 1")
    group.add_argument("--correction", choices=("holm", "bh"), default="holm", help="multiple-testing correction over the dims: holm (Holm-Bonferroni, family-wise error) or bh (Benjamini-Hochberg, false discovery rate)")
    group.add_argument("--seed", type=int, default=0, help="seed of the resampling, so reruns give the same numbers")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Add "(default: ...)" to help texts, except for options whose default is None or False.

    Those options explain their default in the help text itself.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_analysis_commands(commands: argparse._SubParsersAction) -> None:
    """Add the subcommands that read a finished run folder: recommend, compare and report."""
    formatter = DefaultsHelpFormatter

    recommend = commands.add_parser(
        "recommend",
        help="choose a truncation dim by each rule and print the table",
        description=(
            "Apply each rule to a run's quality curve and print one row per rule: the chosen dim, its "
            "mean and 95% confidence interval, its share of the full-size mean, the adjusted p-value "
            "against the full size, bytes per vector and the estimated index memory. Writes "
            "recommendation.parquet and re-renders report.html."
        ),
        formatter_class=formatter,
    )
    recommend.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output folder of mrl sweep")
    recommend.add_argument("--measure", default=None, help="measure the rules run on (default nDCG@10 when the run has it, else its first measure)")
    recommend.add_argument("--index", choices=("exact", "hnsw"), default=None, help="index whose curve the rules and the budget use (default hnsw when the run has it, else exact)")
    recommend.add_argument("--keep", default="95,98,99", help="shares of the full-size mean to keep, in percent, comma separated: one 'keep X%%' rule each")
    recommend.add_argument("--alpha", type=float, default=0.05, help="significance level of the 'not significantly worse' and budget rules")
    recommend.add_argument("--budget", default=None, help=BUDGET_HELP + " (default: no budget rule)")
    recommend.add_argument("--n-docs", type=int, default=None, help="number of documents the index memory is estimated for (default: the run's corpus size from manifest.json)")
    recommend.add_argument("--connectivity", type=int, default=None, help="HNSW connectivity M for the memory estimate (default: the sweep's)")
    recommend.add_argument("--model", default=None, help="only this model of a run with several")
    recommend.add_argument("--dataset", default=None, help="only this dataset of a run with several")
    recommend.add_argument("--dtype", default=None, help="dtype whose curve the dim rules use (default f32). The budget rule considers every dtype.")
    recommend.add_argument("--no-report", action="store_true", help="write recommendation.parquet but leave report.html as it is")
    recommend.add_argument("--zoom", default=None, help="dim range START:STOP (inclusive) of the report's zoomed chart, such as 650:1024 (default: from the smallest dim a keep or not-worse rule chose to the full size)")
    add_statistics_options(recommend)

    compare = commands.add_parser(
        "compare",
        help="compare two truncation dims with a paired test",
        description=(
            "Compare two dims of a run on the same queries: both means, the difference (A minus B) "
            "with its paired bootstrap confidence interval, and the p-value of a two-sided paired "
            "sign-flip randomisation test. The p-value is not corrected for other comparisons."
        ),
        formatter_class=formatter,
    )
    compare.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output folder of mrl sweep")
    compare.add_argument("dim_a", type=int, metavar="A", help="first truncation dim")
    compare.add_argument("dim_b", type=int, metavar="B", help="second truncation dim")
    compare.add_argument("--measure", default="nDCG@10", help="measure to compare")
    compare.add_argument("--index", choices=("exact", "hnsw"), default=None, help="index to compare on (default hnsw when the run has it, else exact)")
    compare.add_argument("--model", default=None, help="model, needed when the run has several")
    compare.add_argument("--dataset", default=None, help="dataset, needed when the run has several")
    compare.add_argument("--dtype", default=None, help="dtype, needed when the run has several")
    compare.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples of the queries for the interval")
    compare.add_argument("--n-permutations", type=int, default=10_000, help="random sign vectors for the test (every sign vector when there are fewer)")
    compare.add_argument("--level", type=float, default=0.95, help="confidence level of the interval, between 0 and 1")
    compare.add_argument("--seed", type=int, default=0, help="seed of the resampling")

    report = commands.add_parser(
        "report",
        help="render report.html and PNG charts from a run's Parquet files",
        description=(
            "Render report.html (charts, recommendation table, methods and manifest in one page that "
            "works offline) and PNG copies of the charts in charts/, from summary.parquet and "
            "recommendation.parquet. Nothing is recomputed unless one of them is missing, in which "
            "case it is computed with the default settings first."
        ),
        formatter_class=formatter,
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output folder of mrl sweep")
    report.add_argument("--zoom", default=None, help="dim range START:STOP (inclusive) of the zoomed chart, such as 650:1024 (default: from the smallest dim a keep or not-worse rule chose to the full size)")


def parse_keep(text: str) -> tuple[float, ...]:
    """Parse --keep percentages such as "95,98,99" into shares (0.95, 0.98, 0.99)."""
    shares = []
    for item in text.split(","):
        try:
            percent = float(item)
        except ValueError:
            raise ValueError(f"invalid --keep value {item.strip()!r}, expected percentages such as 95,98,99") from None
        if not 1.0 <= percent <= 100.0:
            raise ValueError(f"--keep takes percentages between 1 and 100, such as 95,98,99, got {item.strip()}")
        shares.append(percent / 100.0)
    return tuple(shares)


def statistics_from_args(args: argparse.Namespace):
    from mrl.report import StatisticsSettings

    return StatisticsSettings(
        n_bootstrap=args.n_bootstrap,
        n_permutations=args.n_permutations,
        level=args.level,
        correction=args.correction,
        seed=args.seed,
    )


def run_recommend(args: argparse.Namespace) -> None:
    from mrl import report

    settings = report.RecommendSettings(
        measure=args.measure,
        index=args.index,
        keep=parse_keep(args.keep),
        alpha=args.alpha,
        budget=args.budget,
        n_docs=args.n_docs,
        connectivity=args.connectivity,
        model=args.model,
        dataset=args.dataset,
        dtype=args.dtype,
        statistics=statistics_from_args(args),
    )
    zoom = report.parse_zoom(args.zoom) if args.zoom else None
    folder = report.check_run_folder(args.run_dir)
    table, used = report.recommend_run(folder, settings)
    print(report.format_recommendation(table, used))
    report.write_recommendation(folder, table, used)
    if not args.no_report:
        report.render_report(folder, zoom)


def run_compare(args: argparse.Namespace) -> None:
    from mrl import analyse, report

    folder = report.check_run_folder(args.run_dir)
    index = args.index
    if index is None:
        indexes = report.load_per_query(folder, measure=args.measure, dim=args.dim_a)["index"].unique()
        index = report.default_index(indexes)
    per_query = report.load_per_query(
        folder, measure=args.measure, index=index, model=args.model, dataset=args.dataset, dim=[args.dim_a, args.dim_b]
    )
    if per_query.empty:
        # Say which filter matched nothing, with the values the run has.
        available = report.load_per_query(folder)
        for column, value in (("measure", args.measure), ("index", index), ("model", args.model), ("dataset", args.dataset)):
            if value is not None and value not in set(available[column]):
                raise ValueError(f"{column} {value!r} not found in the run, available: {sorted(set(available[column]))}")
        dims = sorted(set(available["dim"]))
        raise ValueError(f"dims {args.dim_a} and {args.dim_b} not found in the run, available dims: {dims[0]}..{dims[-1]} ({len(dims)} dims)")
    result = analyse.compare(
        per_query,
        args.dim_a,
        args.dim_b,
        measure=args.measure,
        index=index,
        model=args.model,
        dataset=args.dataset,
        dtype=args.dtype,
        n_bootstrap=args.n_bootstrap,
        n_permutations=args.n_permutations,
        level=args.level,
        seed=args.seed,
    )
    print(report.format_comparison(result, args.n_bootstrap, args.n_permutations))


def run_report(args: argparse.Namespace) -> None:
    from mrl import report

    folder = report.check_run_folder(args.run_dir)
    zoom = report.parse_zoom(args.zoom) if args.zoom else None
    if not report.summary_is_current(folder) or report.read_recommendation(folder) is None:
        path = report.write_report(folder, zoom=zoom)
    else:
        path = report.render_report(folder, zoom)
    print(path)


def run_analysis_command(args: argparse.Namespace) -> int:
    """Run recommend, compare or report, and return the exit status: 2 on invalid input."""
    handlers = {"recommend": run_recommend, "compare": run_compare, "report": run_report}
    try:
        handlers[args.command](args)
    except ValueError as error:
        print(f"mrl: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

    if args.command in ANALYSIS_COMMANDS:
        return run_analysis_command(args)

    import ray.exceptions

    from mrl.pipeline import ResourceError, run_study, run_sweep

    try:
        if args.command == "sweep" and args.config is not None:
            run_study(study_from_args(args))
        elif args.command == "sweep":
            run_sweep(config_from_args(args))
    except (DataError, EmbeddingsError, ModelError, ResourceError, ValueError) as error:
        print(f"mrl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mrl: interrupted; finished dims are kept, so the same command resumes the sweep", file=sys.stderr)
        return 130
    except ray.exceptions.RayError as error:
        # A failure inside an actor or task (an invalid --device, a folder that is not a model)
        # arrives wrapped in Ray's traceback; its last line is the cause.
        lines = [line for line in str(error).splitlines() if line.strip()]
        print(f"mrl: error: a Ray worker failed: {lines[-1] if lines else type(error).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
