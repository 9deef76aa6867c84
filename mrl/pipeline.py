"""The sweep driver: load data, embed once, fan truncation dims out to Ray tasks, write results.

``run_sweep`` runs one (model, dataset) pair into a local folder. ``run_study`` runs
every pair of a study config into one hive-partitioned Parquet dataset, in a local
folder or at a URI. Finished dims are kept as part files under
``<out>/.parts/<sweep key>/`` (one folder per pair in a study), one per task, each
written atomically. A rerun with the same inputs and settings skips them, so a
stopped sweep resumes where it was.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from mrl import charts
from mrl.config import DEFAULT_MODEL, StudyConfig, SweepConfig, dataset_name, safe_name
from mrl.data import Dataset, cache_dir, hash_files, load_dataset
from mrl.embed import Embeddings, embed_dataset, load_embeddings, plan_actors
from mrl.evaluate import max_cutoff, parse_measures
from mrl.funnel import FUNNEL_KEYS, FunnelGrid, aggregate_funnel, funnel_task, parse_funnel
from mrl.output import write_json, write_parquet
from mrl.report import write_report
from mrl.storage import StoragePath, hive_folder
from mrl.sweep import SearchSettings, parse_dims, sweep_dims_task

log = logging.getLogger(__name__)

PACKAGES = ("mrl", "ray", "sentence-transformers", "torch", "transformers", "usearch", "ir-measures", "numpy", "pandas", "pyarrow", "altair")
# Bump when part files change meaning, so a resumed sweep never mixes old and new parts.
PARTS_FORMAT = 2
WARNINGS_IN_MANIFEST = 200
# Seconds between progress lines while a sweep runs; a line is also logged when it ends.
PROGRESS_INTERVAL_S = 15.0
# Times Ray reruns a sweep task whose worker process died (killed, out of memory, node lost).
TASK_RETRIES = 3
# Seconds between checks of the cluster's nodes while waiting for the autoscaler.
RESOURCE_POLL_S = 5.0
# Tables of a study's output, each a hive-partitioned Parquet dataset below the output folder.
STUDY_TABLES = ("metrics", "per_query", "sweep_stats")
# Tables a pair adds when it evaluates a funnel grid, in the same layout.
FUNNEL_TABLES = ("funnel", "funnel_per_query", "funnel_stats")


class ResourceError(RuntimeError):
    """The Ray cluster has no node that can run a task or actor that a sweep needs."""


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


def read_part(path: StoragePath) -> tuple[pd.DataFrame, list[dict]]:
    table = path.read_parquet()
    stats = json.loads(table.schema.metadata[b"mrl.stats"])
    return table.to_pandas(), stats


def write_part(path: StoragePath, frame: pd.DataFrame, stats: list[dict]) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"mrl.stats": json.dumps(stats).encode()})
    path.write_parquet(table)


def aggregate(per_query: pd.DataFrame) -> pd.DataFrame:
    """Average per-query values into one row per model, dataset, index, dtype, dim and measure."""
    keys = ["model", "dataset", "index", "dtype", "dim", "measure"]
    metrics = per_query.groupby(keys, sort=True, observed=True)["value"].agg(value="mean", n_queries="count").reset_index()
    return metrics[[*keys, "value", "n_queries"]]


@dataclass
class PairInputs:
    """A pair's dataset and full-size vectors, with the facts its manifest records."""

    dataset: Dataset
    embeddings: Embeddings
    vectors_key: str
    model_record: dict
    prompts_record: dict | None
    embedding_facts: dict
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PairResult:
    """A finished pair: its tables and manifest."""

    per_query: pd.DataFrame
    metrics: pd.DataFrame
    stats: pd.DataFrame
    manifest: dict
    # Funnel tables by name (FUNNEL_TABLES), empty when the pair evaluates no funnel grid.
    funnel: dict[str, pd.DataFrame] = field(default_factory=dict)


def load_inputs(config: SweepConfig, cache: Path) -> PairInputs:
    """Load a pair's dataset, then its vectors: precomputed, from the embedding cache, or embedded now."""
    timings: dict[str, float] = {}
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
    return PairInputs(dataset, embeddings, vectors_key, model_record, prompts_record, embedding_facts, timings)


def search_settings(config: SweepConfig) -> SearchSettings:
    return SearchSettings(
        indexes=tuple(config.indexes),
        top_k=config.top_k,
        hnsw=config.hnsw,
        ignore_identical_ids=config.ignore_identical_ids,
        dtypes=tuple(config.dtypes),
        rescore=config.rescore,
    )


def sweep_pair(config: SweepConfig, inputs: PairInputs, parts_root: StoragePath, label: str, resource_timeout_s: float = 0.0) -> PairResult:
    """Sweep one pair's dims on Ray and return its tables; the manifest lacks only the write time."""
    dataset, embeddings = inputs.dataset, inputs.embeddings
    dims = parse_dims(config.dims, embeddings.dim)
    measures = parse_measures(list(config.measures))
    measure_names = [str(measure) for measure in measures]
    settings = search_settings(config)
    cutoff = max_cutoff(measures)
    if cutoff is None or cutoff > settings.top_k:
        log.warning(
            "measures %s read past --top-k %d: documents below rank %d are never retrieved, so those measures are computed on the top %d only",
            " ".join(measure_names), settings.top_k, settings.top_k, settings.top_k,
        )
    log.info(
        "sweeping %d dims (%d..%d) of %s on %s with indexes %s, top-k %d, HNSW %s; measures %s",
        len(dims), dims[0], dims[-1], config.model_name, dataset.name, ",".join(settings.indexes), settings.top_k,
        asdict(settings.hnsw), " ".join(measure_names),
    )

    started = time.perf_counter()
    key = sweep_key(inputs.vectors_key, dataset, settings, measure_names)
    per_query, stats = sweep(embeddings, dataset, dims, settings, measure_names, parts_root, key, label, resource_timeout_s)
    inputs.timings["sweep"] = time.perf_counter() - started

    per_query.insert(0, "dataset", dataset.name)
    per_query.insert(0, "model", config.model_name)
    per_query = per_query[["model", "dataset", "index", "dtype", "dim", "query_id", "measure", "value"]]
    metrics = aggregate(per_query)
    # A stable sort keeps each dim's dtypes in the order the task searched them.
    stats_frame = pd.DataFrame(stats).sort_values("dim", kind="stable").reset_index(drop=True)
    zero_dims = sorted({row["dim"] for row in stats if row["zero_docs"] or row["zero_queries"]})
    if zero_dims:
        log.warning("%d dims truncated some vectors to all zeros; counts per dim are in sweep_stats.parquet", len(zero_dims))
    manifest = build_manifest(inputs, dims, settings, measure_names, stats, len(zero_dims))

    funnel_tables: dict[str, pd.DataFrame] = {}
    if config.funnel is not None:
        grid = parse_funnel(*config.funnel, embeddings.dim)
        started = time.perf_counter()
        funnel_per_query, funnel_stats = run_funnel(embeddings, dataset, grid, settings, measure_names, label)
        inputs.timings["funnel"] = time.perf_counter() - started
        funnel_per_query.insert(0, "dataset", dataset.name)
        funnel_per_query.insert(0, "model", config.model_name)
        funnel_tables = {"funnel": aggregate_funnel(funnel_per_query), "funnel_per_query": funnel_per_query, "funnel_stats": funnel_stats}
        manifest["funnel"] = asdict(grid)
    return PairResult(per_query, metrics, stats_frame, manifest, funnel_tables)


def run_funnel(embeddings: Embeddings, dataset: Dataset, grid: FunnelGrid, settings: SearchSettings, measures: list[str], label: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate a funnel grid on Ray, one task per shortlist dim; return per-query rows and stats.

    NOTE: funnel results have no part files, so a stopped sweep reruns its whole funnel grid.
    """
    prefix = f"{label}: " if label else ""
    log.info(
        "%sfunnel: %d configurations (shortlist dims %s, shortlist sizes %s, rerank dims %s)",
        prefix, grid.size(), list(grid.shortlist_dims), list(grid.shortlist_ks), list(grid.rerank_dims),
    )
    corpus_ref = ray.put(embeddings.corpus)
    queries_ref = ray.put(embeddings.queries)
    corpus_ids_ref = ray.put(np.asarray(dataset.corpus_ids, dtype=object))
    query_ids_ref = ray.put(list(dataset.query_ids))
    qrels_ref = ray.put(dataset.qrels[["query_id", "doc_id", "relevance"]])
    task = funnel_task.options(scheduling_strategy="SPREAD", max_retries=TASK_RETRIES)
    refs = [
        task.remote(corpus_ref, queries_ref, shortlist_dim, grid, settings, corpus_ids_ref, query_ids_ref, qrels_ref, measures)
        for shortlist_dim in grid.shortlist_dims
    ]
    results = ray.get(refs)
    per_query = pd.concat([frame for frame, _ in results], ignore_index=True)
    stats = pd.DataFrame([row for _, rows in results for row in rows])
    return per_query.sort_values(list(FUNNEL_KEYS), kind="stable").reset_index(drop=True), stats


def build_manifest(inputs: PairInputs, dims: list[int], settings: SearchSettings, measure_names: list[str], stats: list[dict], zero_dims: int) -> dict:
    dataset = inputs.dataset
    return {
        "model": inputs.model_record,
        "dataset": {
            "name": dataset.name,
            "path": str(dataset.path),
            "split": dataset.split,
            "content_sha256": dataset.content_hash,
            "documents": len(dataset.corpus_ids),
            "queries": len(dataset.query_ids),
            "qrels": len(dataset.qrels),
        },
        "prompts": inputs.prompts_record,
        "embedding": inputs.embedding_facts,
        "full_dim": inputs.embeddings.dim,
        "dims": dims,
        "indexes": list(settings.indexes),
        "hnsw": asdict(settings.hnsw),
        "dtypes": list(settings.dtypes),
        # usearch's metric per dtype, for the exact and the HNSW search alike.
        "metrics": {dtype: "hamming" if dtype == "b1" else "cos" for dtype in settings.dtypes},
        "rescore": settings.rescore,
        "top_k": settings.top_k,
        "ignore_identical_ids": settings.ignore_identical_ids,
        "measures": measure_names,
        "zero_vectors": {"dims_affected": zero_dims, "max_zero_docs": max((row["zero_docs"] for row in stats), default=0)},
        "warnings": {"count": len(dataset.warnings), "items": dataset.warnings[:WARNINGS_IN_MANIFEST]},
        "seconds": {phase: round(value, 3) for phase, value in inputs.timings.items()},
        "packages": package_versions(),
    }


def log_summary(metrics: pd.DataFrame, measure: str, dim: int) -> None:
    summary = metrics[(metrics["measure"] == measure) & (metrics["dim"] == dim)]
    for row in summary.itertuples():
        log.info("%s at dim %d, %s, %s: %.4f over %d queries", row.measure, row.dim, row.index, row.dtype, row.value, row.n_queries)


def run_sweep(config: SweepConfig) -> Path:
    """Run one sweep end to end and return its output folder."""
    cache = Path(config.cache) if config.cache else cache_dir()
    inputs = load_inputs(config, cache)
    out = Path(config.out) if config.out else default_out(config, inputs.dataset)
    log.info("output %s", out)
    result = sweep_pair(config, inputs, StoragePath.parse(out / ".parts"), "")

    started = time.perf_counter()
    write_parquet(result.per_query, out / "per_query.parquet")
    write_parquet(result.metrics, out / "metrics.parquet")
    write_parquet(result.stats, out / "sweep_stats.parquet")
    for table in FUNNEL_TABLES:
        if table in result.funnel:
            write_parquet(result.funnel[table], out / f"{table}.parquet")
        else:
            # A funnel table of an earlier run into this folder would be reported as this run's.
            (out / f"{table}.parquet").unlink(missing_ok=True)
    charts.write_measure_charts(result.metrics, out / "charts", f"{config.model_name} on {inputs.dataset.name}")
    inputs.timings["write"] = time.perf_counter() - started
    result.manifest["seconds"] = {phase: round(value, 3) for phase, value in inputs.timings.items()}
    write_json(result.manifest, out / "manifest.json")
    # The report embeds the manifest, so it is written last.
    write_report(out)

    log_summary(result.metrics, result.manifest["measures"][0], result.manifest["dims"][-1])
    log.info("wrote %s (phases in seconds: %s)", out, result.manifest["seconds"])
    return out


class Progress:
    """Logs a sweep's progress at most every PROGRESS_INTERVAL_S: dims done, elapsed and estimated time left.

    The estimate assumes that the remaining dims finish at the rate of the dims done so
    far in this run.
    """

    def __init__(self, label: str, total: int, resumed: int):
        self.label = f"{label}: " if label else ""
        self.total = total
        self.resumed = resumed
        self.done = resumed
        self.started = time.perf_counter()
        self.logged = self.started

    def update(self, finished: int, *, force: bool = False) -> None:
        self.done += finished
        now = time.perf_counter()
        if not force and now - self.logged < PROGRESS_INTERVAL_S:
            return
        self.logged = now
        elapsed = now - self.started
        computed = self.done - self.resumed
        if computed and self.done < self.total:
            left = f"about {elapsed / computed * (self.total - self.done):.0f} s left"
        elif self.done < self.total:
            left = "time left unknown until the first task finishes"
        else:
            left = "finished"
        log.info("%s%d of %d dims done (%d resumed), %.0f s elapsed, %s", self.label, self.done, self.total, self.resumed, elapsed, left)


def sweep(
    embeddings: Embeddings,
    dataset: Dataset,
    dims: list[int],
    settings: SearchSettings,
    measures: list[str],
    parts_root: StoragePath,
    key: str,
    label: str = "",
    resource_timeout_s: float = 0.0,
) -> tuple[pd.DataFrame, list[dict]]:
    """Run the per-dim tasks on Ray, persisting each task's result as it completes; skip dims already done.

    Tasks are spread over all nodes and read the vectors from the object store. Ray
    reruns a task whose worker died, up to TASK_RETRIES times. A part file is
    written only when a task returns, so every dim is stored exactly once.
    """
    parts = parts_root.join(key)
    for stale in parts_root.folders():
        if stale.name != key:
            log.info("removing part files of an earlier sweep with other settings: %s", stale)
            stale.remove_folder()
    if parts.is_local and parts.remove_temporary_files():
        log.info("removed temporary files of writes that an earlier run did not finish in %s", parts)

    frames: list[pd.DataFrame] = []
    stats: list[dict] = []
    done: set[int] = set()
    for path in parts.files(".parquet"):
        frame, part_stats = read_part(path)
        frames.append(frame)
        stats.extend(part_stats)
        done.update(int(row["dim"]) for row in part_stats)
    todo = [dim for dim in dims if dim not in done]
    if done:
        log.info("resuming: %d of %d dims already done in %s", len(set(dims) & done), len(dims), parts)

    if todo:
        require_resources({"CPU": 1}, "sweep tasks", resource_timeout_s)
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        corpus_ref = ray.put(embeddings.corpus)
        queries_ref = ray.put(embeddings.queries)
        corpus_ids_ref = ray.put(np.asarray(dataset.corpus_ids, dtype=object))
        query_ids_ref = ray.put(list(dataset.query_ids))
        qrels_ref = ray.put(dataset.qrels[["query_id", "doc_id", "relevance"]])
        # SPREAD puts tasks on every node instead of filling the driver's node first.
        task = sweep_dims_task.options(scheduling_strategy="SPREAD", max_retries=TASK_RETRIES)
        pending = {
            task.remote(corpus_ref, queries_ref, group, settings, corpus_ids_ref, query_ids_ref, qrels_ref, measures): group
            for group in group_dims(todo, workers)
        }

        progress = Progress(label, len(dims), len(set(dims) & done))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_INTERVAL_S)
            if not ready:
                progress.update(0)
                continue
            group = pending.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayError:
                log.error("%sthe task for dims %s failed after %d retries; finished dims are kept, so a rerun resumes", progress.label, group, TASK_RETRIES)
                raise
            frame = pd.concat([result[1] for result in results], ignore_index=True)
            part_stats = [row for result in results for row in result[2]]
            write_part(parts.join(f"part-{min(group):05d}-{len(group):05d}.parquet"), frame, part_stats)
            frames.append(frame)
            stats.extend(part_stats)
            progress.update(len(group), force=not pending)

    per_query = pd.concat(frames, ignore_index=True)
    wanted = set(dims)
    per_query = per_query[per_query["dim"].isin(wanted)].sort_values(["index", "dim"], kind="stable").reset_index(drop=True)
    stats = sorted((row for row in stats if row["dim"] in wanted), key=lambda row: row["dim"])
    return per_query, stats


def nodes_with(request: dict[str, float]) -> list[dict]:
    """Return the alive nodes that offer every resource in ``request``, such as ``{"GPU": 1}``."""
    return [
        node
        for node in ray.nodes()
        if node.get("Alive") and all(node.get("Resources", {}).get(name, 0) >= amount for name, amount in request.items())
    ]


def require_resources(request: dict[str, float], purpose: str, timeout_s: float) -> None:
    """Return once some node offers ``request``; otherwise ask the autoscaler and wait up to ``timeout_s``.

    Ray queues a task or actor that no node can run until a node that can appears, and
    without an autoscaler that never happens. Checking first turns that silent wait
    into an error.
    """
    if nodes_with(request):
        return
    resources = {name: value for name, value in ray.cluster_resources().items() if not name.startswith("node:")}
    advice = "Add a node with these resources, change the config, or set resource_timeout_s so that an autoscaling cluster can start one"
    if timeout_s <= 0:
        raise ResourceError(f"{purpose} need {request} on one node, but no node of the Ray cluster has it (cluster resources: {resources}). {advice}.")

    from ray.autoscaler.sdk import request_resources

    log.info("no node offers %s for %s yet; asking the autoscaler and waiting up to %g s", request, purpose, timeout_s)
    request_resources(bundles=[request])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(min(RESOURCE_POLL_S, max(0.0, deadline - time.monotonic())))
        if nodes_with(request):
            log.info("a node with %s joined the cluster", request)
            return
    raise ResourceError(f"{purpose} need {request} on one node, but none joined within {timeout_s:g} s (cluster resources: {resources}). {advice}.")


def check_embedding_resources(configs: list[SweepConfig], timeout_s: float) -> None:
    """Fail before any data is loaded when the cluster cannot host the embedding actors the pairs need."""
    devices = sorted({config.device or "" for config in configs if config.embeddings is None})
    for device in devices:
        if device.startswith("cuda"):
            require_resources({"GPU": 1}, f"embedding actors on device {device!r}", timeout_s)
        _, _, actor_options = plan_actors(device or None)
        request = {"CPU": actor_options.get("num_cpus", 1), "GPU": actor_options.get("num_gpus", 0)}
        require_resources({name: amount for name, amount in request.items() if amount}, "embedding actors", timeout_s)


def check_output_location(location: str, what: str) -> None:
    """Reject a relative local path in a Ray job that runs in an uploaded working directory.

    Such a job runs in a temporary copy of the working directory that Ray deletes, so
    results written there would be lost.
    """
    if "://" in location or Path(os.path.expanduser(location)).is_absolute():
        return
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if (job_config.get("runtime_env") or {}).get("working_dir"):
        raise ValueError(
            f"{what} {location!r} is a relative path, but this Ray job runs in a temporary copy of its working directory "
            f"({os.getcwd()}) that Ray deletes. Use an absolute path on the head node, a path starting with ~, "
            "or a URI such as s3://bucket/prefix"
        )


def run_study(study: StudyConfig) -> StoragePath:
    """Run every (model, dataset) pair of a study into one hive-partitioned dataset; return the output location.

    Each pair is embedded once and swept as in ``run_sweep``. Its tables are written to
    ``<output>/<table>/model=<model>/dataset=<dataset>/<table>.parquet`` as soon as the
    pair finishes, then faceted charts of all pairs go to ``<output>/charts/``.
    """
    started = time.perf_counter()
    check_output_location(study.output, "output")
    configs = study.sweep_configs()
    if configs[0].cache is not None:
        check_output_location(str(configs[0].cache), "cache")
    output = StoragePath.parse(study.output)
    ensure_ray()
    log.info("study %s: %d (model, dataset) pair(s), output %s", study.source, len(configs), output)
    check_embedding_resources(configs, study.resource_timeout_s)
    require_resources({"CPU": 1}, "sweep tasks", study.resource_timeout_s)

    metrics_frames = []
    pairs_record = []
    for number, config in enumerate(configs, start=1):
        label = f"pair {number} of {len(configs)} ({config.model_name} on {dataset_name(config.dataset)})"
        log.info("%s: starting", label)
        cache = Path(config.cache) if config.cache else cache_dir()
        inputs = load_inputs(config, cache)
        folder = hive_folder(config.model_name, inputs.dataset.name)
        result = sweep_pair(config, inputs, output.join(".parts", folder), label, study.resource_timeout_s)
        write_pair(output, folder, result, inputs.timings)

        log_summary(result.metrics, result.manifest["measures"][0], result.manifest["dims"][-1])
        log.info("%s: done, wrote %s (phases in seconds: %s)", label, output.join("*", folder), result.manifest["seconds"])
        metrics_frames.append(result.metrics)
        pairs_record.append({"model": config.model_name, "dataset": inputs.dataset.name, "folder": folder, "dims": len(result.manifest["dims"])})

    metrics = pd.concat(metrics_frames, ignore_index=True)
    write_study_charts(metrics, output.join("charts"), Path(study.source).stem)
    output.join("study.json").write_json(
        {
            "config": study.source,
            "pairs": pairs_record,
            "tables": {table: f"{table}/" for table in STUDY_TABLES},
            "seconds": round(time.perf_counter() - started, 3),
            "packages": package_versions(),
        }
    )
    log.info("study done: %d pair(s) in %.0f s; read the results with pyarrow.dataset.dataset(%r, partitioning='hive')", len(configs), time.perf_counter() - started, str(output.join("metrics")))
    return output


def write_pair(output: StoragePath, folder: str, result: PairResult, timings: dict[str, float]) -> None:
    """Write a finished pair's tables into its hive partition of each study table, then its manifest."""
    started = time.perf_counter()
    for table, frame in [*zip(STUDY_TABLES, (result.metrics, result.per_query, result.stats)), *result.funnel.items()]:
        # The model and dataset columns are the partition keys, so they live in the folder names.
        data = pa.Table.from_pandas(frame.drop(columns=["model", "dataset"], errors="ignore"), preserve_index=False)
        output.join(table, folder, f"{table}.parquet").write_parquet(data)
    timings["write"] = time.perf_counter() - started
    result.manifest["seconds"] = {phase: round(value, 3) for phase, value in timings.items()}
    output.join("manifest", folder, "manifest.json").write_json(result.manifest)


def write_study_charts(metrics: pd.DataFrame, folder: StoragePath, title: str) -> None:
    """Draw the faceted charts into a local temporary folder, then copy them to ``folder``, which may be a URI."""
    with tempfile.TemporaryDirectory(prefix="mrl-charts-") as scratch:
        for path in charts.write_facet_charts(metrics, Path(scratch), title):
            folder.join(path.name).write_bytes(path.read_bytes())
