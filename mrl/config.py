"""Settings of one sweep: a model (or precomputed vectors) on one dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mrl.evaluate import DEFAULT_MEASURES
from mrl.sweep import INDEXES, HnswParams

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-0.6B"
DEFAULT_DATASET = "nfcorpus"
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

    def __post_init__(self) -> None:
        unknown = [index for index in self.indexes if index not in INDEXES]
        if unknown or not self.indexes:
            raise ValueError(f"invalid index {unknown[0] if unknown else ''!r}; expected one or more of {', '.join(INDEXES)}")
        if self.top_k < 1:
            raise ValueError(f"top-k must be at least 1, got {self.top_k}")
        for name in ("connectivity", "expansion_add", "expansion_search"):
            if getattr(self.hnsw, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self.hnsw, name)}")

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
