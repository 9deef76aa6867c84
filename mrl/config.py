"""Settings of one sweep: a model (or precomputed vectors) on one dataset."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mrl.evaluate import DEFAULT_MEASURES, parse_measures
from mrl.sweep import INDEXES, HnswParams, parse_dims, parse_dtypes

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-0.6B"
DEFAULT_DATASET = "nfcorpus"
# An upper bound for checking --dims before the embeddings' size is known.
MAX_CHECKED_DIM = 1 << 20
GENERIC_FOLDER_NAMES = {"model", "models", "checkpoint", "final"}


@dataclass
class SweepConfig:
    """Everything a sweep reads; the CLI and job config files both build one of these."""

    model: str | None = None
    dataset: str = DEFAULT_DATASET
    split: str = "test"
    embeddings: Path | None = None
    dims: str | list[int] = "all"
    indexes: tuple[str, ...] = INDEXES
    measures: tuple[str, ...] = DEFAULT_MEASURES
    top_k: int = 100
    hnsw: HnswParams = field(default_factory=HnswParams)
    out: Path | None = None
    device: str | None = None
    batch_size: int = 32
    max_seq_length: int | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    ignore_identical_ids: bool = False
    strict: bool = False
    cache: Path | None = None
    dtypes: tuple[str, ...] = ("f32",)
    rescore: int = 0
    # (shortlist dims, shortlist sizes, rerank dims) as given; checked against the vectors' size once they are loaded.
    funnel: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        unknown = [index for index in self.indexes if index not in INDEXES]
        if unknown or not self.indexes:
            raise ValueError(f"invalid index {unknown[0] if unknown else ''!r}; expected one or more of {', '.join(INDEXES)}")
        if self.top_k < 1:
            raise ValueError(f"top-k must be at least 1, got {self.top_k}")
        self.dtypes = parse_dtypes(self.dtypes)
        if self.rescore < 0:
            raise ValueError(f"rescore must be 0 (off) or a positive shortlist size, got {self.rescore}")
        for name in ("connectivity", "expansion_add", "expansion_search"):
            if getattr(self.hnsw, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self.hnsw, name)}")

        # Check the dims and measures before any data is loaded or embedded; only the upper
        # bound of the dims waits for the vectors, whose size is not known yet.
        if self.dims != "all":
            parse_dims(self.dims, MAX_CHECKED_DIM)
        parse_measures(list(self.measures))

    @property
    def model_name(self) -> str:
        """Return the name results carry in their ``model`` column.

        A hub name stays as given; a local folder is named by its folder name. With
        ``embeddings`` and no model, the label is the embeddings folder's name; with
        neither, it is the default model.
        """
        if self.model:
            folder = Path(self.model).expanduser()
            if not folder.is_dir():
                return self.model
            # Packaged models often sit in a folder named just "model"; its parent names it.
            return f"{folder.resolve().parent.name}/{folder.name}" if folder.name in GENERIC_FOLDER_NAMES else folder.resolve().name
        if self.embeddings is not None:
            return Path(self.embeddings).resolve().name
        return DEFAULT_MODEL


def safe_name(name: str) -> str:
    """Return ``name`` made safe for one path component: ``Qwen/Qwen3-Embedding-0.6B`` becomes ``Qwen__Qwen3-Embedding-0.6B``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name.replace("/", "__")).strip("._") or "unnamed"


# Keys of a study config file that set the SweepConfig field of the same name in every pair.
STUDY_SETTINGS = (
    "dims", "indexes", "measures", "top_k", "hnsw", "split", "device", "batch_size", "max_seq_length",
    "query_prompt", "document_prompt", "ignore_identical_ids", "strict", "cache", "dtypes", "rescore", "funnel",
)
STUDY_KEYS = ("models", "datasets", "output", "resource_timeout_s", *STUDY_SETTINGS)
MODEL_KEYS = ("model", "embeddings", "name", "datasets", "query_prompt", "document_prompt", "max_seq_length")
HNSW_KEYS = ("connectivity", "expansion_add", "expansion_search")
# Upper bound for checking a dims spec before any vectors exist; larger dims fail later, against the real size.
MAX_CHECKED_DIM = 1 << 16


class ConfigError(ValueError):
    """A study config file is missing, malformed or sets an invalid value; the message names the file and key."""


@dataclass(frozen=True)
class ModelEntry:
    """One entry of a study's ``models`` list: a model to embed with, or precomputed vectors.

    ``embeddings`` may contain ``{dataset}``, replaced by each dataset's name. With
    ``datasets`` set, the entry runs only on those datasets of the study.
    """

    model: str | None = None
    embeddings: str | None = None
    name: str | None = None
    datasets: tuple[str, ...] | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    max_seq_length: int | None = None


@dataclass
class StudyConfig:
    """A sweep of every (model, dataset) pair, read from a YAML config file."""

    models: list[ModelEntry]
    datasets: list[str]
    output: str
    settings: dict = field(default_factory=dict)
    resource_timeout_s: float = 0.0
    source: str = "<config>"

    def sweep_configs(self) -> list[SweepConfig]:
        """Return one SweepConfig per (model, dataset) pair, models in the outer loop."""
        configs = []
        for entry in self.models:
            for dataset in self.datasets:
                if entry.datasets is not None and dataset not in entry.datasets and dataset_name(dataset) not in entry.datasets:
                    continue
                embeddings = entry.embeddings.replace("{dataset}", dataset_name(dataset)) if entry.embeddings else None
                overrides = {key: getattr(entry, key) for key in ("query_prompt", "document_prompt", "max_seq_length") if getattr(entry, key) is not None}
                configs.append(
                    SweepConfig(
                        model=entry.name or entry.model,
                        dataset=dataset,
                        embeddings=Path(embeddings) if embeddings else None,
                        **{**self.settings, **overrides},
                    )
                )
        return configs


def dataset_name(spec: str) -> str:
    """Return the name results carry for a dataset spec: a folder's name, or the BEIR name as given."""
    folder = Path(spec).expanduser()
    return folder.resolve().name if folder.is_dir() else spec


def expand_path(text: str) -> str:
    """Expand ``~`` and ``$VARIABLES`` in a local path; leave URIs and Hub names as they are."""
    return text if "://" in text else os.path.expanduser(os.path.expandvars(text))


def is_embeddings_folder(text: str) -> bool:
    folder = Path(text)
    return (folder / "corpus.parquet").is_file() and (folder / "queries.parquet").is_file()


def parse_model_entry(value: object, where: str) -> ModelEntry:
    """Parse one ``models`` entry: a Hub name or folder, or a mapping with the keys in MODEL_KEYS.

    A plain folder that contains corpus.parquet and queries.parquet is read as precomputed vectors.
    """
    if isinstance(value, str) and value.strip():
        text = expand_path(value.strip())
        if "{dataset}" in text:
            raise ConfigError(f"{where}: an embeddings path with {{dataset}} needs a name; write it as a mapping with keys name and embeddings")
        if is_embeddings_folder(text):
            return ModelEntry(embeddings=text)
        return ModelEntry(model=text)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a model name, a folder or a mapping with keys {', '.join(MODEL_KEYS)}, got {value!r}")

    unknown = sorted(set(value) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected {', '.join(MODEL_KEYS)}")
    for key in ("model", "embeddings", "name", "query_prompt", "document_prompt"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {value[key]!r}")
    if not value.get("model") and not value.get("embeddings"):
        raise ConfigError(f"{where}: set model (a Hub name or folder) or embeddings (a folder of precomputed vectors)")
    if value.get("model") and value.get("embeddings"):
        raise ConfigError(f"{where}: set either model or embeddings, not both; use name to label precomputed vectors")
    if "{dataset}" in (value.get("embeddings") or "") and not value.get("name"):
        raise ConfigError(f"{where}: name: missing; an embeddings path with {{dataset}} needs a name, so that all its datasets share one model label")
    datasets = value.get("datasets")
    if datasets is not None and (not isinstance(datasets, list) or not all(isinstance(item, str) for item in datasets)):
        raise ConfigError(f"{where}.datasets: expected a list of dataset names or folders, got {datasets!r}")
    max_seq_length = value.get("max_seq_length")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ConfigError(f"{where}.max_seq_length: expected a positive integer, got {max_seq_length!r}")

    return ModelEntry(
        model=expand_path(value["model"]) if value.get("model") else None,
        embeddings=expand_path(value["embeddings"]) if value.get("embeddings") else None,
        name=value.get("name"),
        datasets=tuple(expand_path(item) for item in datasets) if datasets is not None else None,
        query_prompt=value.get("query_prompt"),
        document_prompt=value.get("document_prompt"),
        max_seq_length=max_seq_length,
    )


def parse_names(value: object, where: str) -> tuple[str, ...]:
    """Parse a list of names given as a YAML list or as one string separated by spaces or commas."""
    if isinstance(value, str):
        names = value.replace(",", " ").split()
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        names = [item.strip() for item in value if item.strip()]
    else:
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    if not names:
        raise ConfigError(f"{where}: the list is empty")
    return tuple(names)


def parse_settings(raw: dict, where: str) -> dict:
    """Turn the shared settings of a study file into SweepConfig keyword arguments."""
    settings: dict = {}
    for key in ("split", "device", "query_prompt", "document_prompt"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], str):
                raise ConfigError(f"{where}: {key}: expected a string, got {raw[key]!r}")
            settings[key] = raw[key]
    for key in ("top_k", "batch_size", "max_seq_length"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                raise ConfigError(f"{where}: {key}: expected a positive integer, got {raw[key]!r}")
            settings[key] = raw[key]
    for key in ("ignore_identical_ids", "strict"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], bool):
                raise ConfigError(f"{where}: {key}: expected true or false, got {raw[key]!r}")
            settings[key] = raw[key]

    if "dims" in raw:
        dims = raw["dims"]
        if isinstance(dims, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in dims):
            settings["dims"] = dims
        elif isinstance(dims, (str, int)) and not isinstance(dims, bool):
            settings["dims"] = str(dims)
        else:
            raise ConfigError(f"{where}: dims: expected a string such as \"1:1024\" or \"32,64\", or a list of integers, got {dims!r}")
    if raw.get("indexes") is not None:
        settings["indexes"] = parse_names(raw["indexes"], f"{where}: indexes")
    if raw.get("measures") is not None:
        settings["measures"] = parse_names(raw["measures"], f"{where}: measures")
    if raw.get("dtypes") is not None:
        settings["dtypes"] = parse_names(raw["dtypes"], f"{where}: dtypes")
    if raw.get("rescore") is not None:
        if not isinstance(raw["rescore"], int) or isinstance(raw["rescore"], bool) or raw["rescore"] < 0:
            raise ConfigError(f"{where}: rescore: expected 0 (off) or a positive shortlist size, got {raw['rescore']!r}")
        settings["rescore"] = raw["rescore"]
    if raw.get("funnel") is not None:
        settings["funnel"] = parse_funnel_setting(raw["funnel"], f"{where}: funnel")
    if raw.get("cache") is not None:
        settings["cache"] = Path(expand_path(str(raw["cache"])))

    hnsw = raw.get("hnsw")
    if hnsw is not None:
        if not isinstance(hnsw, dict):
            raise ConfigError(f"{where}: hnsw: expected a mapping with keys {', '.join(HNSW_KEYS)}, got {hnsw!r}")
        unknown = sorted(set(hnsw) - set(HNSW_KEYS))
        if unknown:
            raise ConfigError(f"{where}: hnsw: unknown key {unknown[0]!r}; expected {', '.join(HNSW_KEYS)}")
        for key, number in hnsw.items():
            if not isinstance(number, int) or isinstance(number, bool):
                raise ConfigError(f"{where}: hnsw.{key}: expected an integer, got {number!r}")
        settings["hnsw"] = HnswParams(**hnsw)
    return settings


FUNNEL_SETTING_KEYS = ("shortlist_dims", "shortlist_k", "rerank_dims")


def parse_funnel_setting(value: object, where: str) -> tuple[str, str, str]:
    """Parse a study file's funnel mapping, such as ``{shortlist_dims: "64,128", shortlist_k: [100, 200], rerank_dims: 384}``."""
    if not isinstance(value, dict) or set(value) != set(FUNNEL_SETTING_KEYS):
        raise ConfigError(f"{where}: expected a mapping with the keys {', '.join(FUNNEL_SETTING_KEYS)}, got {value!r}")
    parts = []
    for key in FUNNEL_SETTING_KEYS:
        item = value[key]
        if isinstance(item, list) and all(isinstance(number, int) and not isinstance(number, bool) for number in item):
            parts.append(",".join(str(number) for number in item))
        elif isinstance(item, (str, int)) and not isinstance(item, bool):
            parts.append(str(item))
        else:
            raise ConfigError(f"{where}: {key}: expected a string such as \"64,128\" or a list of integers, got {item!r}")
    return parts[0], parts[1], parts[2]


def load_study(path: str | Path, *, output: str | Path | None = None) -> StudyConfig:
    """Read and check a YAML study config; ``output`` overrides the file's ``output``.

    Relative local paths in the file are taken from the current directory, as on the
    command line. Every pair's settings are checked here, so a bad value fails before
    any data is loaded.
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")

    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; expected keys: {', '.join(STUDY_KEYS)}")
    for key in ("models", "datasets"):
        if not raw.get(key):
            raise ConfigError(f"{path}: {key}: missing or empty; list at least one")
    models_raw = raw["models"] if isinstance(raw["models"], list) else [raw["models"]]
    models = [parse_model_entry(value, f"{path}: models[{number}]") for number, value in enumerate(models_raw)]
    datasets_raw = raw["datasets"] if isinstance(raw["datasets"], list) else [raw["datasets"]]
    if not all(isinstance(item, str) and item.strip() for item in datasets_raw):
        raise ConfigError(f"{path}: datasets: expected a list of BEIR names or folders, got {raw['datasets']!r}")
    datasets = [expand_path(item.strip()) for item in datasets_raw]

    names = [dataset_name(spec) for spec in datasets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{path}: datasets: two entries are both named {repeated[0]!r}; their results would share one partition")
    for number, entry in enumerate(models):
        for requested in entry.datasets or ():
            if requested not in datasets and requested not in names:
                raise ConfigError(f"{path}: models[{number}].datasets: {requested!r} is not in the study's datasets {names}")

    target = output if output is not None else raw.get("output")
    if target is None:
        raise ConfigError(f"{path}: output: missing; set a folder or a URI such as s3://bucket/prefix")
    timeout = raw.get("resource_timeout_s", 0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise ConfigError(f"{path}: resource_timeout_s: expected a number of seconds, 0 or more, got {timeout!r}")

    study = StudyConfig(
        models=models,
        datasets=datasets,
        output=expand_path(str(target)),
        settings=parse_settings(raw, str(path)),
        resource_timeout_s=float(timeout),
        source=str(path),
    )
    try:
        pairs = study.sweep_configs()
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not pairs:
        raise ConfigError(f"{path}: no (model, dataset) pair to run; check the models' datasets lists")
    try:
        parse_measures(list(pairs[0].measures))
        if pairs[0].dims != "all":
            # The full dim is known only once vectors exist, so this checks the syntax alone.
            parse_dims(pairs[0].dims, MAX_CHECKED_DIM)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    labels = [(pair.model_name, dataset_name(pair.dataset)) for pair in pairs]
    repeated_pairs = sorted({label for label in labels if labels.count(label) > 1})
    if repeated_pairs:
        raise ConfigError(f"{path}: models: two entries are both named {repeated_pairs[0][0]!r} on {repeated_pairs[0][1]!r}; give one a different name")
    return study
