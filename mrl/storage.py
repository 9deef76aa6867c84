"""Read and write result files on any file system pyarrow supports: a local folder or a URI.

A study's output may be a local folder or a URI such as ``s3://bucket/prefix``; both
go through ``pyarrow.fs``. Every write is atomic: a local file is written under a
temporary name that starts with a dot and then renamed, and an object store makes an
object visible only when its upload completes. Readers of a Parquet dataset skip
names that start with ``.`` or ``_``, so they never see a half-written file.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# File systems whose objects appear only once an upload completes; they have no real
# folders, so no folder is created before a write.
OBJECT_STORES = {"s3", "gcs", "abfs"}
PARTITION_SCHEMA = pa.schema([("model", pa.string()), ("dataset", pa.string())])


def hive_folder(model: str, dataset: str) -> str:
    """Return the hive partition folder ``model=<model>/dataset=<dataset>`` for a pair.

    pyarrow percent-encodes each value (``/`` becomes ``%2F``), so any name makes one
    path component, and ``pyarrow.dataset`` decodes it back when it reads the dataset.
    """
    partitioning = ds.partitioning(PARTITION_SCHEMA, flavor="hive")
    folder, _ = partitioning.format((pc.field("model") == model) & (pc.field("dataset") == dataset))
    return folder


@dataclass(frozen=True)
class StoragePath:
    """A file or folder on a pyarrow file system, with the URI or path the user gave for messages."""

    filesystem: pafs.FileSystem
    path: str
    display: str

    @classmethod
    def parse(cls, location: str | Path) -> StoragePath:
        """Parse a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` understands.

        A local path may start with ``~`` or contain ``$VARIABLES``; a relative one is
        taken from the current directory.
        """
        text = str(location)
        if "://" in text:
            try:
                filesystem, path = pafs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
                raise ValueError(f"invalid output URI {text!r}: {error}") from None
            return cls(filesystem, path.rstrip("/"), text.rstrip("/"))
        local = Path(os.path.expandvars(text)).expanduser().absolute()
        return cls(pafs.LocalFileSystem(), local.as_posix(), str(local))

    @property
    def is_local(self) -> bool:
        return self.filesystem.type_name == "local"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def join(self, *names: str) -> StoragePath:
        """Return the path below this one; each name may contain ``/``."""
        return StoragePath(self.filesystem, posixpath.join(self.path, *names), posixpath.join(self.display, *names))

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def list(self, *, recursive: bool = False) -> list[pafs.FileInfo]:
        """Return the entries in this folder, or nothing when it does not exist."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        return sorted(self.filesystem.get_file_info(selector), key=lambda info: info.path)

    def files(self, suffix: str = "") -> list[StoragePath]:
        """Return the files directly in this folder whose names end with ``suffix``, skipping hidden ones."""
        return [
            StoragePath(self.filesystem, info.path, posixpath.join(self.display, info.base_name))
            for info in self.list()
            if info.type == pafs.FileType.File and info.base_name.endswith(suffix) and not info.base_name.startswith(".")
        ]

    def folders(self) -> list[StoragePath]:
        return [
            StoragePath(self.filesystem, info.path, posixpath.join(self.display, info.base_name))
            for info in self.list()
            if info.type == pafs.FileType.Directory
        ]

    def remove_folder(self) -> None:
        self.filesystem.delete_dir(self.path)

    def remove_temporary_files(self) -> int:
        """Delete leftover ``.*.tmp`` files of writes that a killed process never finished; return how many."""
        removed = 0
        for info in self.list():
            if info.type == pafs.FileType.File and info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                self.filesystem.delete_file(info.path)
                removed += 1
        return removed

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` to this path atomically.

        The bytes are complete before the write starts, so the only failure left is the
        write itself. A local file is written under a hidden temporary name, then
        renamed, which is atomic on POSIX file systems.
        """
        parent = posixpath.dirname(self.path)
        if self.filesystem.type_name in OBJECT_STORES:
            # NOTE: an object store shows an object only when its upload completes, so
            # no temporary name is needed.
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(data)
            return

        self.filesystem.create_dir(parent, recursive=True)
        temporary = posixpath.join(parent, f".{self.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            self.filesystem.move(temporary, self.path)
        except BaseException:
            if self.filesystem.get_file_info(temporary).type != pafs.FileType.NotFound:
                self.filesystem.delete_file(temporary)
            raise

    def write_parquet(self, table: pa.Table) -> None:
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        self.write_bytes(buffer.getvalue().to_pybytes())

    def write_json(self, data: object) -> None:
        self.write_bytes((json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_parquet(self) -> pa.Table:
        return pq.read_table(self.path, filesystem=self.filesystem)

    def __str__(self) -> str:
        return self.display
