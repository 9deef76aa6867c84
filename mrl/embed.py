"""Embed corpus and queries once at full size, with Ray actors, and cache the vectors.

Vectors are float32 and unnormalised; the sweep truncates and renormalises them. The
cache key is a fingerprint of everything that changes a vector: model name and
weights revision, the exact texts, the prompts and the maximum sequence length.
A cache folder has the same layout that ``--embeddings`` reads: ``corpus.parquet``
and ``queries.parquet``, each with ``_id`` and ``embedding``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from mrl.data import Dataset
from mrl.output import write_json, write_parquet

log = logging.getLogger(__name__)

# Bump when the cached files change meaning, so old caches are not read as new ones.
CACHE_FORMAT = 1
SHARD_SIZE = 256
CPU_THREADS_PER_ACTOR = 8
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


class ModelError(RuntimeError):
    """A model could not be found, downloaded or loaded."""


class EmbeddingsError(ValueError):
    """Precomputed embeddings are invalid or do not cover the dataset."""


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder, with the revision that identifies its weights."""

    name: str
    path: str
    revision: str


@dataclass(frozen=True)
class Prompts:
    """The exact strings put before each query and document; empty means none."""

    query: str
    document: str


@dataclass
class Embeddings:
    """Full-size vectors aligned with the dataset's corpus and query order."""

    corpus: np.ndarray
    queries: np.ndarray
    source: str
    fingerprint: str | None = None
    from_cache: bool = False
    docs_per_second: float | None = None

    @property
    def dim(self) -> int:
        return int(self.corpus.shape[1])


def hash_weights(folder: Path) -> str:
    """Return a SHA-256 over the model folder's weight and config files, for a folder with no hub revision."""
    digest = hashlib.sha256()
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    for path in files:
        if path.suffix not in WEIGHT_SUFFIXES and path.suffix != ".json":
            continue
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def resolve_model(model: str) -> ModelSource:
    """Resolve a local folder or a Hugging Face Hub name to a folder on disk.

    A hub model is downloaded once into the Hugging Face cache; its commit hash is the
    revision. Offline, a model that is not cached raises ModelError at once.
    """
    folder = Path(model).expanduser()
    if folder.is_dir():
        return ModelSource(name=model, path=str(folder.resolve()), revision=hash_weights(folder))
    if model.startswith((".", "/", "~")):
        raise ModelError(f"model folder not found: {model}")

    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=model, etag_timeout=10)
    except Exception as error:  # huggingface_hub raises many types for offline, missing and gated models
        raise ModelError(
            f"could not download model {model!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Without network access, pass a local model folder with --model PATH, "
            "or vectors made elsewhere with --embeddings DIR."
        ) from None
    return ModelSource(name=model, path=path, revision=Path(path).name)


def resolve_prompts(model_prompts: dict[str, str] | None, query_prompt: str | None, document_prompt: str | None) -> Prompts:
    """Choose the prompts: an explicit override wins, else the model's own ``query`` and ``document`` prompts, else none."""
    model_prompts = model_prompts or {}
    return Prompts(
        query=query_prompt if query_prompt is not None else model_prompts.get("query", "") or "",
        document=document_prompt if document_prompt is not None else model_prompts.get("document", "") or "",
    )


def fingerprint(source: ModelSource, dataset: Dataset, prompts: Prompts, max_seq_length: int | None) -> str:
    """Return the cache key of a dataset's vectors under a model."""
    digest = hashlib.sha256()
    header = {
        "format": CACHE_FORMAT,
        "model": source.name,
        "revision": source.revision,
        "prompts": asdict(prompts),
        "max_seq_length": max_seq_length,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for ids, texts in ((dataset.corpus_ids, dataset.corpus_texts), (dataset.query_ids, dataset.query_texts)):
        digest.update(b"\x00section")
        for text_id, text in zip(ids, texts):
            digest.update(text_id.encode() + b"\x00" + text.encode() + b"\x00")
    return digest.hexdigest()[:32]


def read_model_config(folder: Path) -> tuple[dict[str, str], int | None]:
    """Read a sentence-transformers folder's prompts and maximum sequence length without loading the weights."""
    prompts: dict[str, str] = {}
    max_seq_length = None
    config = folder / "config_sentence_transformers.json"
    if config.is_file():
        prompts = json.loads(config.read_text(encoding="utf-8")).get("prompts") or {}
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        max_seq_length = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length")
    return prompts, max_seq_length


def encode_texts(model, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
    """Encode texts with a sentence-transformers model; the prompt goes before every text."""
    vectors = model.encode(
        texts,
        prompt=prompt or None,
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=False,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def locate_model(source: ModelSource) -> str:
    """Return the model folder on this node, downloading the resolved hub revision when this node lacks it.

    The driver resolves the model on its own node; an actor on another node of a
    cluster finds no folder at that path, so it fetches the same commit there.
    """
    if Path(source.path).is_dir():
        return source.path
    if source.revision.startswith("sha256:"):
        raise ModelError(f"model folder {source.path} not found on this node; a local model folder must exist at the same path on every node")

    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=source.name, revision=source.revision, etag_timeout=10)


@ray.remote(max_restarts=2, max_task_retries=2)
class EmbeddingActor:
    """Holds one model replica on a GPU or on CPU cores and encodes shards of texts."""

    def __init__(self, source: ModelSource, device: str, max_seq_length: int | None, threads: int):
        import torch
        from sentence_transformers import SentenceTransformer

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model = SentenceTransformer(locate_model(source), device=device)
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.half = False
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            # bf16 keeps float32's range, so long inputs do not overflow as they can in fp16.
            self.model = self.model.to(torch.bfloat16)
            self.half = True

    def info(self) -> dict:
        return {
            "dim": self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else self.model.get_sentence_embedding_dimension(),
            "prompts": dict(self.model.prompts or {}),
            "max_seq_length": self.model.max_seq_length,
            "precision": "bf16" if self.half else "fp32",
        }

    def encode(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        return encode_texts(self.model, texts, prompt, batch_size)


def plan_actors(device: str | None) -> tuple[str, int, dict]:
    """Return (device, number of actors, per-actor Ray resources) for the cluster Ray is connected to.

    One actor per GPU when the cluster has GPUs; otherwise CPU actors. A GPU request on
    a cluster without GPUs fails here instead of waiting for resources that never come.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))

    if device is None:
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise ModelError(f"device {device!r} requested, but the Ray cluster has no GPU (resources: {resources}); use --device cpu")
        return device, gpus, {"num_gpus": 1, "num_cpus": 1}

    # A torch model already spreads one batch over many cores, so a few wide actors beat many narrow ones.
    # An actor must fit on one node, so its width is capped by the largest node's CPUs.
    largest_node = max((int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")), default=cpus)
    threads = max(1, min(CPU_THREADS_PER_ACTOR, largest_node))
    actors = max(1, cpus // threads)
    log.info("no GPU requested or present; embedding with %d CPU actor(s) of %d threads", actors, threads)
    return device, actors, {"num_cpus": threads}


def embed_sharded(actors: list, texts: list[str], prompt: str, batch_size: int, label: str) -> np.ndarray:
    """Encode texts across actors in shards sorted by length, and return vectors in input order.

    Sorting by length puts texts of similar length in one batch, so little compute is
    spent on padding.
    """
    order = np.argsort([-len(text) for text in texts], kind="stable")
    shards = [order[start : start + SHARD_SIZE] for start in range(0, len(order), SHARD_SIZE)]
    pool = ray.util.ActorPool(actors)
    for shard in shards:
        pool.submit(lambda actor, ids: actor.encode.remote([texts[i] for i in ids], prompt, batch_size), shard)

    vectors: np.ndarray | None = None
    with tqdm(total=len(texts), desc=f"embedding {label}", unit="text") as progress:
        for shard in shards:
            # ActorPool returns results in submission order, so each result matches its shard.
            result = pool.get_next()
            if vectors is None:
                vectors = np.empty((len(texts), result.shape[1]), dtype=np.float32)
            vectors[shard] = result
            progress.update(len(shard))
    assert vectors is not None
    return vectors


def write_vectors(path: Path, ids: list[str], vectors: np.ndarray) -> None:
    """Write vectors in the ``--embeddings`` layout: ``_id`` string and a fixed-size list of float32."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.table({"_id": pa.array(ids, pa.string()), "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
    write_parquet(table, path)


def read_vectors(path: Path, ids: list[str]) -> np.ndarray:
    """Read vectors for ``ids`` from a Parquet file with ``_id`` and ``embedding`` columns, in the order of ``ids``."""
    if not path.is_file():
        raise EmbeddingsError(f"{path}: file not found (expected columns _id and embedding)")
    table = pq.read_table(path)
    if "_id" not in table.column_names or "embedding" not in table.column_names:
        raise EmbeddingsError(f"{path}: expected columns _id and embedding, found {table.column_names}")

    column = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) and pa.types.is_list(column.type):
        lengths = set(column.value_lengths().to_pylist())
        if len(lengths) != 1:
            raise EmbeddingsError(f"{path}: embeddings have different lengths {sorted(lengths)[:5]}; expected one size")
        column = column.cast(pa.list_(column.type.value_type, lengths.pop()))
    if not pa.types.is_fixed_size_list(column.type):
        raise EmbeddingsError(f"{path}: column embedding has type {column.type}, expected a fixed-size list of float32")
    width = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise EmbeddingsError(f"{path}: row {bad} contains NaN or infinity")

    file_ids = [str(value) for value in table.column("_id").to_pylist()]
    position = {text_id: row for row, text_id in enumerate(file_ids)}
    missing = [text_id for text_id in ids if text_id not in position]
    if missing:
        raise EmbeddingsError(f"{path}: {len(missing)} of {len(ids)} ids have no embedding, for example {missing[:3]}")
    return matrix[[position[text_id] for text_id in ids]]


def load_embeddings(folder: Path, dataset: Dataset) -> Embeddings:
    """Load precomputed vectors from ``corpus.parquet`` and ``queries.parquet`` in ``folder``."""
    folder = Path(folder)
    corpus = read_vectors(folder / "corpus.parquet", dataset.corpus_ids)
    queries = read_vectors(folder / "queries.parquet", dataset.query_ids)
    if corpus.shape[1] != queries.shape[1]:
        raise EmbeddingsError(f"{folder}: corpus vectors have {corpus.shape[1]} dims but query vectors {queries.shape[1]}")
    return Embeddings(corpus=corpus, queries=queries, source=str(folder))


def embed_dataset(
    dataset: Dataset,
    model: str,
    *,
    cache: Path,
    device: str | None = None,
    batch_size: int = 32,
    max_seq_length: int | None = None,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
) -> tuple[Embeddings, ModelSource, Prompts, dict]:
    """Embed a dataset with Ray actors, or load its vectors from the cache.

    Returns the vectors, the resolved model, the prompts used and a dict of facts for
    the manifest (device, actors, precision, throughput).
    """
    source = resolve_model(model)
    model_prompts, configured_length = read_model_config(Path(source.path))
    prompts = resolve_prompts(model_prompts, query_prompt, document_prompt)
    key = fingerprint(source, dataset, prompts, max_seq_length or configured_length)
    folder = cache / "embeddings" / key

    if (folder / "queries.parquet").is_file() and (folder / "corpus.parquet").is_file():
        log.info("loading cached embeddings from %s (fingerprint %s)", folder, key)
        cached = load_embeddings(folder, dataset)
        cached.fingerprint, cached.from_cache = key, True
        facts = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        return cached, source, prompts, {**facts, "from_cache": True}

    device, n_actors, resources = plan_actors(device)
    threads = int(resources.get("num_cpus", 1))
    actor_class = EmbeddingActor.options(**resources)
    actors = [actor_class.remote(source, device, max_seq_length, threads) for _ in range(n_actors)]
    info = ray.get(actors[0].info.remote())
    facts = {"device": device, "actors": n_actors, "precision": info["precision"], "max_seq_length": info["max_seq_length"]}

    log.info(
        "embedding %d documents and %d queries with %s on %d %s actor(s), %s",
        len(dataset.corpus_texts), len(dataset.query_texts), source.name, n_actors, device, info["precision"],
    )
    started = time.perf_counter()
    corpus = embed_sharded(actors, dataset.corpus_texts, prompts.document, batch_size, "corpus")
    corpus_seconds = time.perf_counter() - started
    queries = embed_sharded(actors, dataset.query_texts, prompts.query, batch_size, "queries")
    for actor in actors:
        ray.kill(actor)

    write_vectors(folder / "corpus.parquet", dataset.corpus_ids, corpus)
    write_vectors(folder / "queries.parquet", dataset.query_ids, queries)
    facts["docs_per_second"] = round(len(dataset.corpus_texts) / max(corpus_seconds, 1e-9), 1)
    write_json(
        {"model": source.name, "revision": source.revision, "dataset": dataset.name, "prompts": asdict(prompts), **facts},
        folder / "meta.json",
    )
    embeddings = Embeddings(corpus=corpus, queries=queries, source=source.name, fingerprint=key, docs_per_second=facts["docs_per_second"])
    return embeddings, source, prompts, facts

