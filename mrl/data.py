"""Load a retrieval benchmark in BEIR layout: corpus, queries and qrels.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``).
A dataset given by name is downloaded once from the official BEIR archive, checked
against its published MD5 and unpacked into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"

# MD5 of each official archive, as published in the BEIR README's dataset table.
BEIR_ARCHIVE_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}

DOWNLOAD_TIMEOUT_S = 30


class DataError(ValueError):
    """Invalid or missing benchmark input; the message names the file, line and value."""


@dataclass
class Dataset:
    """A benchmark ready for retrieval: texts in file order, qrels as a frame.

    ``query_ids`` holds only the queries that have judgements in the split, because
    queries without qrels are left out of evaluation, as BEIR does.
    """

    name: str
    path: Path
    split: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: pd.DataFrame
    content_hash: str
    warnings: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """Return the cache root: ``$MRL_CACHE``, else the user's cache folder for mrl."""
    configured = os.environ.get("MRL_CACHE")
    if configured:
        return Path(configured).expanduser()

    import platformdirs

    return Path(platformdirs.user_cache_dir("mrl"))


def normalise_id(value: object, source: str) -> str:
    """Return an id as a string: a JSON number becomes its decimal string, strings stay as they are."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{source}: _id must be a string or a number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line, skipping a UTF-8 byte-order mark."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")

    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {line.strip()[:80]!r}")
            yield number, record


def read_texts(path: Path, *, with_title: bool) -> tuple[list[str], list[str]]:
    """Read ids and texts from a corpus or queries file.

    A document's text is its title and text joined by one space and stripped, as BEIR
    and MTEB build it. A duplicate ``_id`` is an error that names both lines.
    """
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}

    for number, record in iter_jsonl(path):
        source = f"{path}:{number}"
        if "_id" not in record:
            raise DataError(f"{source}: record has no _id")
        if not isinstance(record.get("text"), str):
            raise DataError(f"{source}: record {record['_id']!r} has no text (expected a string field 'text')")

        record_id = normalise_id(record["_id"], source)
        if record_id in first_line:
            raise DataError(f"{source}: duplicate _id {record_id!r}, first seen on line {first_line[record_id]}")
        first_line[record_id] = number

        text = record["text"]
        title = record.get("title") if with_title else None
        if isinstance(title, str) and title:
            text = f"{title} {text}"
        ids.append(record_id)
        texts.append(text.strip())

    return ids, texts


def read_qrels(path: Path) -> pd.DataFrame:
    """Read a qrels TSV into a frame of ``query_id``, ``doc_id``, ``relevance`` and ``line``.

    The header line (``query-id corpus-id score``) is optional. Ids stay strings.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")

    rows: list[tuple[str, str, int, int]] = []
    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            columns = line.rstrip("\r\n").split("\t")
            if len(columns) != 3:
                raise DataError(
                    f"{path}:{number}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                    f"got {len(columns)}: {line.strip()[:80]!r}"
                )
            query_id, doc_id, score = columns
            if number == 1 and score.strip().lower() == "score":
                continue
            try:
                relevance = int(score)
            except ValueError:
                raise DataError(f"{path}:{number}: score must be an integer, got {score!r}") from None
            rows.append((query_id.strip(), doc_id.strip(), relevance, number))

    return pd.DataFrame(rows, columns=["query_id", "doc_id", "relevance", "line"])


def hash_files(paths: list[Path]) -> str:
    """Return the SHA-256 over the bytes of the files, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_beir(folder: Path, *, split: str = "test", strict: bool = False, name: str | None = None) -> Dataset:
    """Load and check a BEIR folder.

    Errors stop the load: missing or malformed files, duplicate ids, qrels that match
    no query or no document. Warnings are collected on the dataset (and raised as
    errors with ``strict``): a judged query without text is dropped, and a judged
    document missing from the corpus is kept, so scores stay comparable with BEIR.
    """
    folder = Path(folder)
    corpus_path = folder / "corpus.jsonl"
    queries_path = folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (corpus_path, queries_path, qrels_path):
        if not path.is_file():
            raise DataError(f"{path}: file not found (expected a BEIR folder with corpus.jsonl, queries.jsonl and qrels/{split}.tsv)")

    corpus_ids, corpus_texts = read_texts(corpus_path, with_title=True)
    all_query_ids, all_query_texts = read_texts(queries_path, with_title=False)
    qrels = read_qrels(qrels_path)
    if qrels.empty:
        raise DataError(f"{qrels_path}: no judgements found")

    known_queries = set(all_query_ids)
    known_docs = set(corpus_ids)
    query_known = qrels["query_id"].isin(known_queries)
    doc_known = qrels["doc_id"].isin(known_docs)
    if not query_known.any():
        raise DataError(
            f"{qrels_path}: no query id matches {queries_path} "
            f"(first qrels query id {qrels['query_id'].iloc[0]!r}, first query id {all_query_ids[0] if all_query_ids else None!r})"
        )
    if not doc_known.any():
        raise DataError(
            f"{qrels_path}: no corpus id matches {corpus_path} "
            f"(first qrels corpus id {qrels['doc_id'].iloc[0]!r}, first document id {corpus_ids[0] if corpus_ids else None!r})"
        )

    warnings: list[str] = []
    for row in qrels[~query_known].itertuples():
        warnings.append(f"{qrels_path}:{row.line}: query {row.query_id!r} has no text in {queries_path}; its judgements are dropped")
    for row in qrels[query_known & ~doc_known].itertuples():
        warnings.append(
            f"{qrels_path}:{row.line}: document {row.doc_id!r} is not in {corpus_path}; "
            "the judgement is kept, as BEIR keeps it, so it counts as a relevant document never retrieved"
        )
    duplicated = qrels.duplicated(["query_id", "doc_id"], keep="last")
    for row in qrels[duplicated].itertuples():
        warnings.append(f"{qrels_path}:{row.line}: judgement of {row.query_id!r}, {row.doc_id!r} repeats later in the file; the last one counts")
    if strict and warnings:
        raise DataError(f"{len(warnings)} warning(s) with --strict; the first: {warnings[0]}")

    qrels = qrels[query_known & ~duplicated].reset_index(drop=True)
    judged = set(qrels["query_id"])
    query_ids = [query_id for query_id in all_query_ids if query_id in judged]
    query_texts = [text for query_id, text in zip(all_query_ids, all_query_texts) if query_id in judged]

    return Dataset(
        name=name or folder.resolve().name,
        path=folder,
        split=split,
        corpus_ids=corpus_ids,
        corpus_texts=corpus_texts,
        query_ids=query_ids,
        query_texts=query_texts,
        qrels=qrels,
        content_hash=hash_files([corpus_path, queries_path, qrels_path]),
        warnings=warnings,
    )


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_archive(archive: Path, destination: Path) -> None:
    """Unpack a zip archive, refusing members that would land outside ``destination``."""
    root = destination.resolve()
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.namelist():
            target = (root / member).resolve()
            if not target.is_relative_to(root):
                raise DataError(f"{archive}: member {member!r} would be written outside {root}")
        zipped.extractall(root)


def find_beir_root(folder: Path) -> Path:
    """Return the folder under ``folder`` that contains ``corpus.jsonl``; archives wrap it in a folder named for the dataset."""
    for candidate in [folder, *sorted(path for path in folder.iterdir() if path.is_dir())]:
        if (candidate / "corpus.jsonl").is_file():
            return candidate
    raise DataError(f"{folder}: no corpus.jsonl found after unpacking")


def beir_url(name: str) -> str:
    """Return the archive URL of a BEIR dataset; ``$MRL_BEIR_URL`` (a template with ``{name}``) overrides the official host, for mirrors."""
    return os.environ.get("MRL_BEIR_URL", BEIR_URL).format(name=name)


def download_beir(name: str, cache: Path, *, url: str | None = None, md5: str | None = None) -> Path:
    """Download, check and unpack a BEIR archive once; return the unpacked folder.

    The archive is written to a temporary name and the folder is unpacked into a
    temporary folder, each renamed only when complete, so an interrupted download
    leaves nothing that a later run would mistake for data.
    """
    target = cache / "datasets" / name
    if target.is_dir():
        return find_beir_root(target)

    url = url or beir_url(name)
    expected_md5 = md5 if md5 is not None else BEIR_ARCHIVE_MD5.get(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading BEIR dataset %s from %s", name, url)

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as scratch:
        archive = Path(scratch) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, archive.open("wb") as stream:
                shutil.copyfileobj(response, stream, 1 << 20)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise DataError(
                f"could not download dataset {name!r} from {url}: {error}. "
                "Without network access, pass a local BEIR folder with --dataset PATH."
            ) from None

        actual_md5 = md5_file(archive)
        if expected_md5 and actual_md5 != expected_md5:
            raise DataError(f"{url}: archive MD5 is {actual_md5}, expected {expected_md5}; the download is corrupt or the archive changed")
        if not zipfile.is_zipfile(archive):
            raise DataError(f"{url}: the download is not a zip archive")

        unpacked = Path(scratch) / "unpacked"
        extract_archive(archive, unpacked)
        find_beir_root(unpacked)
        os.replace(unpacked, target)

    return find_beir_root(target)


def load_dataset(spec: str, *, split: str = "test", strict: bool = False, cache: Path | None = None) -> Dataset:
    """Load a dataset given as a BEIR folder path or an official BEIR dataset name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_beir(path, split=split, strict=strict)

    looks_like_path = os.sep in spec or spec.startswith(".")
    if looks_like_path:
        raise DataError(f"{spec}: folder not found")
    if spec not in BEIR_ARCHIVE_MD5:
        log.warning("%r is not a known BEIR dataset name; trying %s without an MD5 check", spec, beir_url(spec))

    folder = download_beir(spec, cache or cache_dir())
    return load_beir(folder, split=split, strict=strict, name=spec)
