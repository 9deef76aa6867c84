"""Study configs, result storage, resource checks and cluster.yaml, without a Ray cluster."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import ray
import yaml
from pyarrow.fs import FSSpecHandler, PyFileSystem

from mrl import pipeline
from mrl.cli import main
from mrl.config import ConfigError, load_study
from mrl.storage import StoragePath, hive_folder
from tests.conftest import write_beir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def beir_folders(tmp_path) -> tuple[Path, Path]:
    corpus = [{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}]
    queries = [{"_id": "q1", "text": "one?"}]
    first = write_beir(tmp_path / "first", corpus, queries, [("q1", "d1", 1)])
    second = write_beir(tmp_path / "second", corpus, queries, [("q1", "d2", 1)])
    return first, second


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


# Study configs


@pytest.mark.parametrize("name", ["qwen3-0.6b-nfcorpus.yaml", "minilm-scifact.yaml"])
def test_shipped_configs_load(name):
    study = load_study(REPO / "jobs" / "configs" / name)

    assert len(study.sweep_configs()) == 1
    assert study.output.startswith(os.path.expanduser("~"))


def test_original_study_config_matches_study():
    study = load_study(REPO / "jobs" / "configs" / "qwen3-0.6b-nfcorpus.yaml")
    [config] = study.sweep_configs()

    assert config.model_name == "Qwen/Qwen3-Embedding-0.6B"
    assert config.dataset == "nfcorpus"
    assert config.dims == "1:1024"
    assert config.indexes == ("exact", "hnsw")
    assert config.device == "cuda"
    assert study.resource_timeout_s > 0


def test_study_expands_models_by_datasets(tmp_path, beir_folders):
    first, second = beir_folders
    config = write_config(
        tmp_path / "study.yaml",
        {
            "models": ["org/model-a", {"model": "org/model-b", "query_prompt": "query: ", "max_seq_length": 128}],
            "datasets": [str(first), str(second)],
            "dims": [8, 16],
            "indexes": "exact",
            "measures": "nDCG@10 R@100",
            "top_k": 10,
            "hnsw": {"connectivity": 8},
            "batch_size": 4,
            "output": "s3://bucket/prefix",
        },
    )

    study = load_study(config)
    pairs = study.sweep_configs()

    assert [(pair.model_name, Path(pair.dataset).name) for pair in pairs] == [
        ("org/model-a", "first"), ("org/model-a", "second"), ("org/model-b", "first"), ("org/model-b", "second"),
    ]
    assert study.output == "s3://bucket/prefix"
    assert pairs[0].dims == [8, 16]
    assert pairs[0].indexes == ("exact",)
    assert pairs[0].measures == ("nDCG@10", "R@100")
    assert pairs[0].top_k == 10
    assert pairs[0].hnsw.connectivity == 8
    assert pairs[0].hnsw.expansion_add == 128
    assert pairs[0].batch_size == 4
    assert pairs[0].query_prompt is None
    assert pairs[2].query_prompt == "query: "
    assert pairs[2].max_seq_length == 128


def test_study_embeddings_template_and_datasets(tmp_path, beir_folders):
    first, second = beir_folders
    config = write_config(
        tmp_path / "study.yaml",
        {
            "models": [
                {"name": "api-model", "embeddings": str(tmp_path / "vectors" / "{dataset}")},
                {"model": "org/model", "datasets": ["second"]},
            ],
            "datasets": [str(first), str(second)],
            "output": str(tmp_path / "out"),
        },
    )

    pairs = load_study(config).sweep_configs()

    assert [(pair.model_name, Path(pair.dataset).name) for pair in pairs] == [("api-model", "first"), ("api-model", "second"), ("org/model", "second")]
    assert pairs[0].embeddings == tmp_path / "vectors" / "first"
    assert pairs[1].embeddings == tmp_path / "vectors" / "second"
    assert pairs[2].embeddings is None


def test_embeddings_folder_as_model(tmp_path, beir_folders, scifact_embeddings):
    config = write_config(tmp_path / "study.yaml", {"models": [str(scifact_embeddings)], "datasets": [str(beir_folders[0])], "output": "out"})

    [pair] = load_study(config).sweep_configs()

    assert pair.embeddings == scifact_embeddings
    assert pair.model is None
    assert pair.model_name == scifact_embeddings.name


def test_output_override_and_relative_output(tmp_path, beir_folders, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "study.yaml", {"models": ["org/model"], "datasets": [str(beir_folders[0])], "output": "results/study"})

    assert load_study(config).output == "results/study"
    assert load_study(config, output="gs://bucket/run").output == "gs://bucket/run"
    assert StoragePath.parse(load_study(config).output).path == (tmp_path / "results" / "study").as_posix()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"extra": 1}, "unknown key 'extra'"),
        ({"output": None}, "output: missing"),
        ({"models": []}, "models: missing or empty"),
        ({"datasets": [1]}, "datasets: expected a list of BEIR names or folders"),
        ({"dims": 1.5}, "dims: expected a string"),
        ({"dims": "8:"}, "invalid --dims '8:'"),
        ({"measures": ["nDCG@ten"]}, "invalid measure 'nDCG@ten'"),
        ({"indexes": ["ivf"]}, "invalid index 'ivf'"),
        ({"top_k": 0}, "top_k: expected a positive integer, got 0"),
        ({"strict": "yes"}, "strict: expected true or false"),
        ({"hnsw": {"ef": 10}}, "hnsw: unknown key 'ef'"),
        ({"hnsw": {"connectivity": 0}}, "connectivity must be at least 1"),
        ({"resource_timeout_s": -1}, "resource_timeout_s: expected a number of seconds"),
        ({"models": [{"embeddings": "/vectors/{dataset}"}]}, "name: missing"),
        ({"models": ["/vectors/{dataset}"]}, "needs a name"),
        ({"models": [{"model": "a", "embeddings": "b"}]}, "either model or embeddings"),
        ({"models": [{"name": "a"}]}, "set model"),
        ({"models": [{"model": "a", "color": "red"}]}, "models[0]: unknown key 'color'"),
        ({"models": [{"model": "a", "datasets": ["nfcorpus"]}]}, "'nfcorpus' is not in the study's datasets"),
        ({"models": ["org/a", "org/a"]}, "two entries are both named 'org/a'"),
    ],
)
def test_invalid_study_names_key(tmp_path, beir_folders, change, message):
    settings = {"models": ["org/model"], "datasets": [str(beir_folders[0])], "output": str(tmp_path / "out"), **change}
    config = write_config(tmp_path / "study.yaml", settings)

    with pytest.raises(ConfigError) as raised:
        load_study(config)

    assert message in str(raised.value)
    assert str(config) in str(raised.value)


def test_datasets_with_same_name_rejected(tmp_path, beir_folders):
    other = write_beir(tmp_path / "elsewhere" / "first", [{"_id": "d", "text": "t"}], [{"_id": "q", "text": "t"}], [("q", "d", 1)])
    config = write_config(tmp_path / "study.yaml", {"models": ["org/model"], "datasets": [str(beir_folders[0]), str(other)], "output": "out"})

    with pytest.raises(ConfigError, match="both named 'first'"):
        load_study(config)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_study(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("models: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_study(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_study(tmp_path / "list.yaml")


def test_cli_config_rejects_other_options(tmp_path, beir_folders, capsys):
    config = write_config(tmp_path / "study.yaml", {"models": ["org/model"], "datasets": [str(beir_folders[0])], "output": "out"})

    code = main(["sweep", "--config", str(config), "--dims", "8", "--top-k", "5"])

    assert code == 2
    assert "--dims, --top-k cannot be combined with --config" in capsys.readouterr().err


# Result storage


def test_hive_folder_round_trips_names(tmp_path):
    root = StoragePath.parse(tmp_path / "metrics")
    names = [("Qwen/Qwen3-Embedding-0.6B", "nfcorpus"), ("model with space%", "cqadupstack/android")]
    for model, dataset in names:
        root.join(hive_folder(model, dataset), "metrics.parquet").write_parquet(pa.table({"dim": [1, 2], "value": [0.5, 0.6]}))

    table = ds.dataset(tmp_path / "metrics", partitioning="hive").to_table()

    assert hive_folder("Qwen/Qwen3-Embedding-0.6B", "nfcorpus") == "model=Qwen%2FQwen3-Embedding-0.6B/dataset=nfcorpus"
    assert sorted(set(zip(table.column("model").to_pylist(), table.column("dataset").to_pylist()))) == sorted(names)
    assert len([path for path in (tmp_path / "metrics").iterdir()]) == 2, "each model is one folder level"


def test_local_writes_leave_no_temporary_files(tmp_path):
    target = StoragePath.parse(tmp_path / "a" / "b" / "data.json")

    target.write_json({"x": 1})
    target.write_json({"x": 2})

    assert json.loads((tmp_path / "a" / "b" / "data.json").read_text()) == {"x": 2}
    assert [path.name for path in (tmp_path / "a" / "b").iterdir()] == ["data.json"]


class FailingMoveHandler(FSSpecHandler):
    """A local file system whose rename fails, as when the disk fills up during a write."""

    def move(self, source, destination):
        raise OSError("disk full")


def test_failed_write_keeps_old_file(tmp_path):
    StoragePath.parse(tmp_path / "data.bin").write_bytes(b"old")
    failing = PyFileSystem(FailingMoveHandler(fsspec.filesystem("file")))
    target = StoragePath(failing, (tmp_path / "data.bin").as_posix(), str(tmp_path / "data.bin"))

    with pytest.raises(OSError, match="disk full"):
        target.write_bytes(b"new")

    assert (tmp_path / "data.bin").read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["data.bin"]


def test_file_uri_and_listing(tmp_path):
    root = StoragePath.parse(f"file://{tmp_path}/out")
    root.join("parts", "part-00001.parquet").write_parquet(pa.table({"dim": [1]}))
    root.join("parts", ".part-00002.parquet.1234.tmp").write_bytes(b"partial")

    assert root.is_local
    assert [path.name for path in root.join("parts").files(".parquet")] == ["part-00001.parquet"]
    assert root.join("parts").remove_temporary_files() == 1
    assert root.join("parts", "part-00001.parquet").read_parquet().column("dim").to_pylist() == [1]
    assert root.join("missing").files() == []


def test_non_local_file_system(tmp_path):
    memory = PyFileSystem(FSSpecHandler(fsspec.filesystem("memory")))
    root = StoragePath(memory, "/mrl-test-store", "memory://mrl-test-store")

    root.join("x", "table.parquet").write_parquet(pa.table({"dim": [3]}))

    assert not root.is_local
    assert root.join("x", "table.parquet").read_parquet().column("dim").to_pylist() == [3]
    assert [folder.name for folder in root.folders()] == ["x"]
    root.join("x").remove_folder()
    assert root.folders() == []


def test_invalid_uri_names_it():
    with pytest.raises(ValueError, match="invalid output URI 'nosuchscheme://x'"):
        StoragePath.parse("nosuchscheme://x")


# Ray jobs and resources


def test_relative_output_rejected_in_job(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))

    with pytest.raises(ValueError, match="'results/x' is a relative path, but this Ray job runs in a temporary copy"):
        pipeline.check_output_location("results/x", "output")
    pipeline.check_output_location("/data/results", "output")
    pipeline.check_output_location("~/results", "output")
    pipeline.check_output_location("s3://bucket/results", "output")


def test_relative_output_accepted_outside_job(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)

    pipeline.check_output_location("results/x", "output")


def fake_cluster(monkeypatch, nodes: list[dict]) -> None:
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0) + amount
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node} for node in nodes])
    monkeypatch.setattr(ray, "cluster_resources", lambda: totals)


def test_unmet_request_fails_at_once(monkeypatch):
    fake_cluster(monkeypatch, [{"CPU": 4.0}, {"CPU": 4.0}])

    with pytest.raises(pipeline.ResourceError) as raised:
        pipeline.require_resources({"CPU": 8}, "embedding actors", 0)

    assert "embedding actors need {'CPU': 8} on one node, but no node of the Ray cluster has it" in str(raised.value)
    assert "'CPU': 8.0" in str(raised.value), "the message lists the cluster's resources"
    pipeline.require_resources({"CPU": 4}, "sweep tasks", 0)


def test_unmet_request_times_out(monkeypatch, caplog):
    fake_cluster(monkeypatch, [{"CPU": 2.0}])
    requested = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda bundles: requested.append(bundles))
    monkeypatch.setattr(pipeline, "RESOURCE_POLL_S", 0.05)

    with caplog.at_level(logging.INFO, logger="mrl.pipeline"), pytest.raises(pipeline.ResourceError, match="none joined within 0.2 s"):
        pipeline.require_resources({"GPU": 1}, "embedding actors on device 'cuda'", 0.2)

    assert requested == [[{"GPU": 1}]]
    assert "asking the autoscaler and waiting up to 0.2 s" in caplog.text


def test_gpu_check_before_embedding(monkeypatch):
    fake_cluster(monkeypatch, [{"CPU": 2.0}])
    configs = pairs_with_device("cuda")

    with pytest.raises(pipeline.ResourceError, match="embedding actors on device 'cuda' need \\{'GPU': 1\\}"):
        pipeline.check_embedding_resources(configs, 0)


def pairs_with_device(device: str):
    from mrl.config import SweepConfig

    return [SweepConfig(model="org/model", dataset="nfcorpus", device=device), SweepConfig(embeddings=Path("/vectors"), dataset="nfcorpus", device=device)]


def test_progress_logs_estimate(monkeypatch, caplog):
    monkeypatch.setattr(pipeline, "PROGRESS_INTERVAL_S", 0.0)
    progress = pipeline.Progress("pair 1 of 2 (m on d)", total=10, resumed=4)

    with caplog.at_level(logging.INFO, logger="mrl.pipeline"):
        progress.update(0)
        progress.update(3)
        progress.update(3)

    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("pair 1 of 2 (m on d): 4 of 10 dims done (4 resumed)")
    assert "time left unknown" in lines[0]
    assert "7 of 10 dims done" in lines[1]
    assert "s left" in lines[1]
    assert "10 of 10 dims done" in lines[2]
    assert lines[2].endswith("finished")


# cluster.yaml


def test_cluster_yaml_valid_for_ray():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))

    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_node_types():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))
    types = config["available_node_types"]
    gpu = [node for node in types.values() if node["resources"].get("GPU")]
    cpu = [node for name, node in types.items() if name != config["head_node_type"] and not node["resources"].get("GPU")]

    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in types
    assert len(gpu) == 1
    assert len(cpu) == 1
    for node in gpu + cpu:
        assert 0 <= node["min_workers"] <= node["max_workers"]
    assert cpu[0]["min_workers"] >= 1, "sweep tasks find a CPU worker without waiting for the autoscaler"
    assert config["file_mounts"] == {"~/mrl": "."}
    for commands in (config["setup_commands"], gpu[0]["worker_setup_commands"]):
        assert any("pip install" in command and "~/mrl" in command for command in commands)


def test_cluster_images_match_ray_version():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))
    images = [config["docker"]["head_image"], config["docker"]["worker_image"]]
    images += [node["docker"]["worker_image"] for node in config["available_node_types"].values() if "docker" in node]

    for image in images:
        assert image.split(":")[1].startswith(f"{ray.__version__}-"), f"{image} runs another Ray version than this client ({ray.__version__})"
