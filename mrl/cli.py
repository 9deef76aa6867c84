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
from mrl.sweep import INDEXES, HnswParams

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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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

    output = sweep.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None, help="output folder (default results/DATASET-MODEL)")
    output.add_argument("--cache", type=Path, default=None, help="cache folder for datasets and embeddings (default $MRL_CACHE, else the user cache folder)")
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
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

    from mrl.pipeline import run_sweep

    try:
        if args.command == "sweep":
            run_sweep(config_from_args(args))
    except (DataError, EmbeddingsError, ModelError, ValueError) as error:
        print(f"mrl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
