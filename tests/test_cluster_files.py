"""Keep the cluster files true: they parse, name things that exist, and agree with the code."""
import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from sentdisc.config import OutputConfig, parse
from sentdisc.data.readers import DataConfig
from sentdisc.model import ModelConfig
from sentdisc.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted([*REPO.glob("cluster/**/*.yaml"), *REPO.glob("jobs/configs/*.yaml"),
                REPO / "serve" / "config.yaml"])


def load(rel):
    return yaml.safe_load((REPO / rel).read_text())


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def job_argv(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "jobs/pretrain.py"], entrypoint
    return words[2:]


def test_rayjob_runs_an_existing_job_with_arguments_its_parser_accepts(monkeypatch):
    job = load("cluster/kuberay/rayjob-pretrain.yaml")
    argv = job_argv(job["spec"]["entrypoint"])
    assert (REPO / "jobs" / "pretrain.py").exists()
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).exists(), config
    monkeypatch.chdir(REPO)
    model, data, train, _ = parse([ModelConfig, DataConfig, TrainConfig, OutputConfig], argv)
    assert model.rnn_size == 4096 and train.use_gpu and data.train == "/data/amazon/reviews"


def test_images_and_workdirs_match_the_dockerfile():
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    assert "WORKDIR /app" in docker and "pip install --no-cache-dir -e /app" in docker
    for rel in ("cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-pretrain.yaml",
                "cluster/kuberay/rayservice.yaml"):
        text = (REPO / rel).read_text()
        assert "image: sentdisc:latest" in text and "RAY_AUTH_MODE" in text, rel


def test_rayservice_serves_exactly_serve_config():
    service = load("cluster/kuberay/rayservice.yaml")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert apps == load("serve/config.yaml")["applications"]


def test_serve_import_paths_exist():
    for app in load("serve/config.yaml")["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_cluster_launcher_installs_the_project_and_uses_token_auth():
    launcher = load("cluster/gpu-cluster.yaml")
    assert any("pip install" in c and "sentdisc" in c for c in launcher["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(launcher[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert launcher["head_node_type"] in launcher["available_node_types"]


def test_local_script_names_existing_files():
    script = (REPO / "cluster" / "local.sh").read_text()
    assert "RAY_AUTH_MODE=token" in script
    for rel in ("serve/config.yaml", "jobs/configs/local.yaml"):
        assert rel in script and (REPO / rel).exists()


def test_job_configs_parse_with_their_parsers(monkeypatch):
    monkeypatch.chdir(REPO)
    for cfg in ("jobs/configs/local.yaml", "jobs/configs/paper.yaml"):
        model, data, train, _ = parse([ModelConfig, DataConfig, TrainConfig, OutputConfig],
                                      ["--config", cfg])
        assert model.rnn_type == "mlstm"
