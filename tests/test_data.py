"""BEIR loading: ids, text joining, errors that name file and line, warnings, downloads."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from mrl.data import DataError, download_beir, load_beir, load_dataset
from tests.conftest import write_beir

CORPUS = [
    {"_id": "007", "title": "Bond", "text": "Licensed to kill. "},
    {"_id": 7, "title": "", "text": "A number id."},
    {"_id": "d3", "text": "No title field."},
]
QUERIES = [{"_id": "q1", "text": "who is bond"}, {"_id": 2, "text": "numbers"}, {"_id": "q-unjudged", "text": "never judged"}]
QRELS = [("q1", "007", 1), ("2", "7", 2)]


def test_ids_stay_strings(tmp_path):
    dataset = load_beir(write_beir(tmp_path, CORPUS, QUERIES, QRELS))

    assert dataset.corpus_ids == ["007", "7", "d3"]
    assert dataset.query_ids == ["q1", "2"]
    assert set(dataset.qrels["doc_id"]) == {"007", "7"}
    assert dataset.warnings == []


def test_text_joins_title_and_text(tmp_path):
    dataset = load_beir(write_beir(tmp_path, CORPUS, QUERIES, QRELS))

    assert dataset.corpus_texts == ["Bond Licensed to kill.", "A number id.", "No title field."]


def test_unjudged_queries_left_out(tmp_path):
    dataset = load_beir(write_beir(tmp_path, CORPUS, QUERIES, QRELS))

    assert "q-unjudged" not in dataset.query_ids


def test_byte_order_mark_is_skipped(tmp_path):
    folder = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        path = folder / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    dataset = load_beir(folder)

    assert dataset.corpus_ids[0] == "007"
    assert dataset.query_ids[0] == "q1"
    assert len(dataset.qrels) == 2


def test_content_hash_changes_with_content(tmp_path):
    first = load_beir(write_beir(tmp_path / "a", CORPUS, QUERIES, QRELS))
    second = load_beir(write_beir(tmp_path / "b", CORPUS[:2] + [{"_id": "d3", "text": "changed"}], QUERIES, QRELS))

    assert first.content_hash != second.content_hash


@pytest.mark.parametrize(
    ("corpus_lines", "expected"),
    [
        (['{"_id": "a", "text": "x"}', '{"_id": "b", "text": '], r"corpus.jsonl:2: malformed JSON"),
        (['{"_id": "a", "text": "x"}', '{"text": "no id"}'], r"corpus.jsonl:2: record has no _id"),
        (['{"_id": "a", "title": "only a title"}'], r"corpus.jsonl:1: record 'a' has no text"),
        (['{"_id": "a", "text": "x"}', "", '{"_id": "a", "text": "y"}'], r"corpus.jsonl:3: duplicate _id 'a', first seen on line 1"),
        (['[1, 2]'], r"corpus.jsonl:1: expected a JSON object"),
    ],
)
def test_corpus_errors_name_line(tmp_path, corpus_lines, expected):
    folder = write_beir(tmp_path, [], [{"_id": "q1", "text": "q"}], [("q1", "a", 1)])
    (folder / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")

    with pytest.raises(DataError, match=expected):
        load_beir(folder)


@pytest.mark.parametrize(
    ("qrels_text", "expected"),
    [
        ("query-id\tcorpus-id\tscore\nq1\ta\n", r"test.tsv:2: expected 3 tab-separated columns .* got 2"),
        ("query-id\tcorpus-id\tscore\nq1\ta\t1\t0\n", r"test.tsv:2: expected 3 tab-separated columns .* got 4"),
        ("query-id\tcorpus-id\tscore\nq1\ta\thigh\n", r"test.tsv:2: score must be an integer, got 'high'"),
        ("query-id\tcorpus-id\tscore\nq1\ta\t1.5\n", r"test.tsv:2: score must be an integer, got '1.5'"),
        ("query-id\tcorpus-id\tscore\nqX\ta\t1\n", r"no query id matches .*queries.jsonl"),
        ("query-id\tcorpus-id\tscore\nq1\tzzz\t1\n", r"no corpus id matches .*corpus.jsonl"),
        ("query-id\tcorpus-id\tscore\n", r"no judgements found"),
    ],
)
def test_qrels_errors_name_line(tmp_path, qrels_text, expected):
    folder = write_beir(tmp_path, [{"_id": "a", "text": "x"}], [{"_id": "q1", "text": "q"}], [])
    (folder / "qrels" / "test.tsv").write_text(qrels_text)

    with pytest.raises(DataError, match=expected):
        load_beir(folder)


def test_missing_file_is_named(tmp_path):
    folder = write_beir(tmp_path, CORPUS, QUERIES, QRELS)
    (folder / "queries.jsonl").unlink()

    with pytest.raises(DataError, match=r"queries.jsonl: file not found"):
        load_beir(folder)


def test_missing_split_is_named(tmp_path):
    folder = write_beir(tmp_path, CORPUS, QUERIES, QRELS)

    with pytest.raises(DataError, match=r"qrels/dev.tsv: file not found"):
        load_beir(folder, split="dev")


def test_warnings_for_unknown_query_and_missing_document(tmp_path):
    qrels = [("q1", "007", 1), ("q1", "gone", 1), ("q-no-text", "7", 1)]
    dataset = load_beir(write_beir(tmp_path, CORPUS, QUERIES, qrels))

    assert len(dataset.warnings) == 2
    assert "test.tsv:4: query 'q-no-text' has no text" in dataset.warnings[0]
    assert "test.tsv:3: document 'gone' is not in" in dataset.warnings[1]
    assert dataset.query_ids == ["q1"]
    assert "gone" in set(dataset.qrels["doc_id"]), "a judged document missing from the corpus is kept, as BEIR keeps it"


def test_strict_turns_warnings_into_errors(tmp_path):
    folder = write_beir(tmp_path, CORPUS, QUERIES, [("q1", "007", 1), ("q1", "gone", 1)])

    with pytest.raises(DataError, match=r"--strict.*test.tsv:3: document 'gone'"):
        load_beir(folder, strict=True)


def test_unknown_folder_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        load_dataset(str(tmp_path / "nowhere"), cache=tmp_path)


def make_archive(tmp_path: Path, name: str) -> Path:
    """Zip a small BEIR folder the way the official archives are laid out: ``<name>/corpus.jsonl`` and so on."""
    source = write_beir(tmp_path / "source" / name, CORPUS, QUERIES, QRELS)
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in source.rglob("*"):
            zipped.write(path, Path(name) / path.relative_to(source))
    return archive


@pytest.fixture
def archive_server(tmp_path):
    """Serve ``tmp_path/served`` over HTTP on 127.0.0.1 and yield the URL template and a request log."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, format, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_port}/{{name}}.zip", requests
    server.shutdown()
    server.server_close()


def test_download_by_name_once(tmp_path, archive_server, monkeypatch):
    served, url_template, requests = archive_server
    shutil.copy(make_archive(tmp_path, "tinybeir"), served / "tinybeir.zip")
    monkeypatch.setenv("MRL_BEIR_URL", url_template)
    cache = tmp_path / "cache"

    first = load_dataset("tinybeir", cache=cache)
    second = load_dataset("tinybeir", cache=cache)

    assert first.name == "tinybeir"
    assert first.corpus_ids == ["007", "7", "d3"]
    assert second.content_hash == first.content_hash
    assert requests == ["/tinybeir.zip"], "the second load reads the cache instead of downloading again"
    assert not [path for path in (cache / "datasets").iterdir() if path.name.startswith(".")], "no temporary files stay behind"


def test_download_checks_md5(tmp_path, archive_server):
    served, url_template, _ = archive_server
    archive = make_archive(tmp_path, "tinybeir")
    shutil.copy(archive, served / "tinybeir.zip")

    with pytest.raises(DataError, match=r"archive MD5 is .* expected 0+"):
        download_beir("tinybeir", tmp_path / "cache", url=url_template.format(name="tinybeir"), md5="0" * 32)

    good_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    folder = download_beir("tinybeir", tmp_path / "cache", url=url_template.format(name="tinybeir"), md5=good_md5)
    assert (folder / "corpus.jsonl").is_file()


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("MRL_BEIR_URL", f"http://127.0.0.1:{closed_port}/{{name}}.zip")

    with pytest.raises(DataError, match=r"could not download dataset 'nfcorpus' .*--dataset PATH"):
        load_dataset("nfcorpus", cache=tmp_path)
    assert not (tmp_path / "datasets" / "nfcorpus").exists()


def test_archive_member_outside_folder_is_rejected(tmp_path, archive_server):
    served, url_template, _ = archive_server
    with zipfile.ZipFile(served / "evil.zip", "w") as zipped:
        zipped.writestr("../escape.txt", "x")

    with pytest.raises(DataError, match="outside"):
        download_beir("evil", tmp_path / "cache", url=url_template.format(name="evil"), md5="")
    assert not (tmp_path / "escape.txt").exists()


def test_scifact_loads(scifact):
    dataset = load_beir(scifact)

    assert len(dataset.corpus_ids) == 5183
    assert len(dataset.query_ids) == 300
    assert len(dataset.qrels) == 339
    assert dataset.warnings == []
    assert all(isinstance(doc_id, str) for doc_id in dataset.corpus_ids)
    first = json.loads((scifact / "corpus.jsonl").open().readline())
    assert dataset.corpus_texts[0] == f"{first['title']} {first['text']}".strip()
