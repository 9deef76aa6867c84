"""The sweep driver: load data, embed once, fan truncation dims out to Ray tasks, write results.

Finished dims are kept as part files under ``<out>/.parts/<sweep key>/``, one per
task, each written atomically. A rerun with the same inputs and settings skips
them, so a stopped sweep resumes where it was.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from mrl import charts
from mrl.config import DEFAULT_MODEL, SweepConfig, safe_name
from mrl.data import Dataset, cache_dir, hash_files, load_dataset
from mrl.embed import Embeddings, embed_dataset, load_embeddings
from mrl.evaluate import parse_measures
from mrl.output import write_json, write_parquet
from mrl.report import write_report
from mrl.sweep import SearchSettings, parse_dims, sweep_dims_task

log = logging.getLogger(__name__)

PACKAGES = ("mrl", "ray", "sentence-transformers", "torch", "transformers", "usearch", "ir-measures", "numpy", "pandas", "pyarrow", "altair")
# Bump when part files change meaning, so a resumed sweep never mixes old and new parts.
PARTS_FORMAT = 1
WARNINGS_IN_MANIFEST = 200


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster in ``RAY_ADDRESS`` or the job's cluster, or start a local one."""
    if ray.is_initialized():
        return
    ray.init(num_cpus=num_cpus if not os.environ.get("RAY_ADDRESS") else None, logging_level=logging.WARNING, configure_logging=False)
    log.info("Ray cluster resources: %s", ray.cluster_resources())


def default_out(config: SweepConfig, dataset: Dataset) -> Path:
    return Path("results") / f"{safe_name(dataset.name)}-{safe_name(config.model_name)}"


def sweep_key(vectors_key: str, dataset: Dataset, settings: SearchSettings, measures: list[str]) -> str:
    """Return the key of a sweep's part files: a hash of everything that changes a per-dim result."""
    fields = {
        "format": PARTS_FORMAT,
        "vectors": vectors_key,
        "dataset": dataset.content_hash,
        "split": dataset.split,
        "settings": asdict(settings),
        "measures": measures,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def group_dims(dims: list[int], workers: int) -> list[list[int]]:
    """Split dims into groups for tasks: a few groups per worker keep all workers busy to the end.

    Dims are dealt round-robin so each group mixes cheap small dims with costly large ones.
    """
    n_groups = min(len(dims), max(1, workers * 4), max(1, len(dims)))
    return [dims[start::n_groups] for start in range(n_groups)]


def read_part(path: Path) -> tuple[pd.DataFrame, list[dict]]:
    table = pq.read_table(path)
    stats = json.loads(table.schema.metadata[b"mrl.stats"])
    return table.to_pandas(), stats


def write_part(path: Path, frame: pd.DataFrame, stats: list[dict]) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"mrl.stats": json.dumps(stats).encode()})
    write_parquet(table, path)


def aggregate(per_query: pd.DataFrame) -> pd.DataFrame:
    """Average per-query values into one row per model, dataset, index, dim and measure."""
    keys = ["model", "dataset", "index", "dim", "measure"]
    metrics = per_query.groupby(keys, sort=True, observed=True)["value"].agg(value="mean", n_queries="count").reset_index()
    return metrics[[*keys, "value", "n_queries"]]


def run_sweep(config: SweepConfig) -> Path:
    """Run one sweep end to end and return its output folder."""
    timings: dict[str, float] = {}
    cache = Path(config.cache) if config.cache else cache_dir()

    started = time.perf_counter()
    dataset = load_dataset(config.dataset, split=config.split, strict=config.strict, cache=cache)
    timings["load_data"] = time.perf_counter() - started
    log.info(
        "dataset %s (%s split): %d documents, %d judged queries, %d qrels, %d warnings",
        dataset.name, dataset.split, len(dataset.corpus_ids), len(dataset.query_ids), len(dataset.qrels), len(dataset.warnings),
    )
    for warning in dataset.warnings[:5]:
        log.warning("%s", warning)
    if len(dataset.warnings) > 5:
        log.warning("... and %d more warnings, all listed in manifest.json", len(dataset.warnings) - 5)

    ensure_ray()
    started = time.perf_counter()
    embedding_facts: dict = {}
    model_record: dict = {"name": config.model_name}
    if config.embeddings is not None:
        embeddings = load_embeddings(Path(config.embeddings), dataset)
        vectors_key = hash_files([Path(config.embeddings) / "corpus.parquet", Path(config.embeddings) / "queries.parquet"])
        model_record["embeddings"] = str(config.embeddings)
        prompts_record = None
        log.info("loaded precomputed embeddings from %s (%d dims)", config.embeddings, embeddings.dim)
    else:
        embeddings, source, prompts, embedding_facts = embed_dataset(
            dataset,
            config.model or DEFAULT_MODEL,
            cache=cache,
            device=config.device,
            batch_size=config.batch_size,
            max_seq_length=config.max_seq_length,
            query_prompt=config.query_prompt,
            document_prompt=config.document_prompt,
        )
        vectors_key = embeddings.fingerprint or ""
        model_record.update(path=source.path, revision=source.revision)
        prompts_record = asdict(prompts)
        log.info("query prompt %r, document prompt %r", prompts.query, prompts.document)
    timings["embed"] = time.perf_counter() - started

    dims = parse_dims(config.dims, embeddings.dim)
    measures = parse_measures(list(config.measures))
    measure_names = [str(measure) for measure in measures]
    settings = SearchSettings(
        indexes=tuple(config.indexes),
        top_k=config.top_k,
        hnsw=config.hnsw,
        ignore_identical_ids=config.ignore_identical_ids,
    )
    out = Path(config.out) if config.out else default_out(config, dataset)
    log.info(
        "sweeping %d dims (%d..%d) of %s on %s with indexes %s, top-k %d, HNSW %s; measures %s; output %s",
        len(dims), dims[0], dims[-1], config.model_name, dataset.name, ",".join(settings.indexes), settings.top_k,
        asdict(settings.hnsw), " ".join(measure_names), out,
    )

    started = time.perf_counter()
    per_query, stats = sweep(embeddings, dataset, dims, settings, measure_names, out, sweep_key(vectors_key, dataset, settings, measure_names))
    timings["sweep"] = time.perf_counter() - started

    started = time.perf_counter()
    per_query.insert(0, "dataset", dataset.name)
    per_query.insert(0, "model", config.model_name)
    metrics = aggregate(per_query)
    write_parquet(per_query[["model", "dataset", "index", "dim", "query_id", "measure", "value"]], out / "per_query.parquet")
    write_parquet(metrics, out / "metrics.parquet")
    write_parquet(pd.DataFrame(stats).sort_values("dim"), out / "sweep_stats.parquet")
    charts.write_measure_charts(metrics, out / "charts", f"{config.model_name} on {dataset.name}")
    timings["write"] = time.perf_counter() - started

    zero_dims = [row for row in stats if row["zero_docs"] or row["zero_queries"]]
    if zero_dims:
        log.warning("%d dims truncated some vectors to all zeros; counts per dim are in sweep_stats.parquet", len(zero_dims))
    manifest = {
        "model": model_record,
        "dataset": {
            "name": dataset.name,
            "path": str(dataset.path),
            "split": dataset.split,
            "content_sha256": dataset.content_hash,
            "documents": len(dataset.corpus_ids),
            "queries": len(dataset.query_ids),
            "qrels": len(dataset.qrels),
        },
        "prompts": prompts_record,
        "embedding": embedding_facts,
        "full_dim": embeddings.dim,
        "dims": dims,
        "indexes": list(settings.indexes),
        "hnsw": {**asdict(settings.hnsw), "metric": "cos", "dtype": "f32"},
        "top_k": settings.top_k,
        "ignore_identical_ids": settings.ignore_identical_ids,
        "measures": measure_names,
        "zero_vectors": {"dims_affected": len(zero_dims), "max_zero_docs": max((row["zero_docs"] for row in stats), default=0)},
        "warnings": {"count": len(dataset.warnings), "items": dataset.warnings[:WARNINGS_IN_MANIFEST]},
        "seconds": {phase: round(value, 3) for phase, value in timings.items()},
        "packages": package_versions(),
    }
    write_json(manifest, out / "manifest.json")
    # The report embeds the manifest, so it is written last.
    write_report(out)

    summary = metrics[(metrics["measure"] == measure_names[0]) & (metrics["dim"] == dims[-1])]
    for row in summary.itertuples():
        log.info("%s at dim %d, %s: %.4f over %d queries", row.measure, row.dim, row.index, row.value, row.n_queries)
    log.info("wrote %s (phases in seconds: %s)", out, manifest["seconds"])
    return out


def sweep(
    embeddings: Embeddings,
    dataset: Dataset,
    dims: list[int],
    settings: SearchSettings,
    measures: list[str],
    out: Path,
    key: str,
) -> tuple[pd.DataFrame, list[dict]]:
    """Run the per-dim tasks on Ray, persisting each task's result as it completes; skip dims already done."""
    parts_root = out / ".parts"
    parts = parts_root / key
    if parts_root.is_dir():
        for stale in parts_root.iterdir():
            if stale.name != key and stale.is_dir():
                log.info("removing part files of an earlier sweep with other settings: %s", stale)
                shutil.rmtree(stale)

    frames: list[pd.DataFrame] = []
    stats: list[dict] = []
    done: set[int] = set()
    for path in sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []:
        frame, part_stats = read_part(path)
        frames.append(frame)
        stats.extend(part_stats)
        done.update(int(row["dim"]) for row in part_stats)
    todo = [dim for dim in dims if dim not in done]
    if done:
        log.info("resuming: %d of %d dims already done in %s", len(set(dims) & done), len(dims), parts)

    if todo:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        corpus_ref = ray.put(embeddings.corpus)
        queries_ref = ray.put(embeddings.queries)
        corpus_ids_ref = ray.put(np.asarray(dataset.corpus_ids, dtype=object))
        query_ids_ref = ray.put(list(dataset.query_ids))
        qrels_ref = ray.put(dataset.qrels[["query_id", "doc_id", "relevance"]])
        pending = {
            sweep_dims_task.remote(corpus_ref, queries_ref, group, settings, corpus_ids_ref, query_ids_ref, qrels_ref, measures): group
            for group in group_dims(todo, workers)
        }

        started = time.perf_counter()
        with tqdm(total=len(todo), desc="sweeping dims", unit="dim") as progress:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                group = pending.pop(ready[0])
                results = ray.get(ready[0])
                frame = pd.concat([result[1] for result in results], ignore_index=True)
                part_stats = [result[2] for result in results]
                write_part(parts / f"part-{min(group):05d}-{len(group):05d}.parquet", frame, part_stats)
                frames.append(frame)
                stats.extend(part_stats)
                progress.update(len(group))
                finished = progress.n
                elapsed = time.perf_counter() - started
                log.debug("%d of %d dims done, %.0f s elapsed, about %.0f s left", finished, len(todo), elapsed, elapsed / finished * (len(todo) - finished))

    per_query = pd.concat(frames, ignore_index=True)
    wanted = set(dims)
    per_query = per_query[per_query["dim"].isin(wanted)].sort_values(["index", "dim"], kind="stable").reset_index(drop=True)
    stats = sorted((row for row in stats if row["dim"] in wanted), key=lambda row: row["dim"])
    return per_query, stats
