"""Keep the cluster files true: they parse, name things that exist, and agree with the code."""
import importlib
import posixpath
import shlex
from pathlib import Path

import pytest
import yaml

from sentdisc.config import OutputConfig, parse
from sentdisc.data.readers import DataConfig
from sentdisc.model import ModelConfig
from sentdisc.tracking import TrackingConfig
from sentdisc.train import TrainConfig
from sentdisc.train.resources import fit_problem
from sentdisc.transfer import TransferConfig, output_dir

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted([*REPO.glob("cluster/**/*.yaml"), *REPO.glob("jobs/configs/*.yaml"),
                REPO / "serve" / "config.yaml"])


def load(rel):
    return yaml.safe_load((REPO / rel).read_text())


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def job_argv(entrypoint: str, job: str = "pretrain") -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", f"jobs/{job}.py"], entrypoint
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
    for path in REPO.glob("cluster/kuberay/*.yaml"):
        rel, text = path.relative_to(REPO), path.read_text()
        assert "image: sentdisc:latest" in text and "RAY_AUTH_MODE" in text, rel


def test_rayservice_serves_exactly_serve_config_but_its_paths():
    service = load("cluster/kuberay/rayservice.yaml")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    local = load("serve/config.yaml")["applications"]
    # the paths name files on the cluster's volume (as local.sh serve swaps in its own)
    for app in (*apps, *local):
        del app["args"]["checkpoint"], app["args"]["classifier"]
    assert apps == local


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


# --- what a cluster file holds: its nodes, its volumes, the runs it submits ----------------------

# Ray on EC2 counts a node's vCPUs and GPUs from its instance type
INSTANCES = {"m6i.2xlarge": {"CPU": 8}, "p4d.24xlarge": {"CPU": 96, "GPU": 8}}


def ray_cluster(doc: dict) -> dict:
    """A KubeRay manifest's cluster: a RayCluster's spec, a RayJob's or a RayService's own."""
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def largest_nodes(path: Path) -> list[dict]:
    """The Ray resources of each node of the cluster ``path`` describes, at its largest:
    the driver trusts an autoscaler to grow, but it grows no further than this."""
    doc = yaml.safe_load(path.read_text())
    if "available_node_types" in doc:  # the cluster launcher
        types = doc["available_node_types"]
        size = lambda t: {**INSTANCES[types[t]["node_config"]["InstanceType"]],
                          **types[t].get("resources", {})}
        workers = [size(t) for t in types if t != doc["head_node_type"]
                   for _ in range(min(types[t]["max_workers"], doc["max_workers"]))]
        return [size(doc["head_node_type"]), *workers]
    cluster = ray_cluster(doc)
    autoscaling = cluster.get("enableInTreeAutoscaling", False)

    def node(group):  # KubeRay starts Ray with the container's limits unless told otherwise
        container = group["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        params = group.get("rayStartParams", {})
        return {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
                "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}

    return [node(cluster["headGroupSpec"]),
            *(node(g) for g in cluster.get("workerGroupSpecs", [])
              for _ in range(g["maxReplicas"] if autoscaling else g["replicas"]))]


def submitted_pretraining(path: Path) -> list[list[str]]:
    """The arguments of every pretraining run ``path`` submits: a RayJob's entrypoint, and the
    commands its comments tell one to run."""
    text = path.read_text()
    spec = yaml.safe_load(text).get("spec")
    commands = [spec["entrypoint"]] if isinstance(spec, dict) and "entrypoint" in spec else []
    comments = "\n".join(line.strip().lstrip("#") for line in text.splitlines()
                         if line.strip().startswith("#"))
    commands += comments.replace("\\\n", " ").splitlines()
    start = "python jobs/pretrain.py"
    return [job_argv(c[c.index(start):]) for c in commands if start in c]


def test_every_submitted_pretraining_fits_the_cluster_it_is_submitted_to(monkeypatch):
    monkeypatch.chdir(REPO)
    checked, problems = set(), {}
    for path in sorted([*REPO.glob("cluster/kuberay/*.yaml"), REPO / "cluster/gpu-cluster.yaml"]):
        rel = str(path.relative_to(REPO))
        for argv in submitted_pretraining(path):
            _, _, train, _ = parse([ModelConfig, DataConfig, TrainConfig, OutputConfig], argv)
            checked.add(rel)
            # the rule the driver applies before any worker starts (train.resources.check_fits)
            if problem := fit_problem(train, largest_nodes(path)):
                problems[rel] = problem
    assert problems == {}
    assert checked >= {"cluster/kuberay/rayjob-pretrain.yaml", "cluster/kuberay/raycluster.yaml",
                       "cluster/gpu-cluster.yaml"}


def on_volume(doc: dict, path: str) -> tuple[str, str]:
    """(claim, path inside it) of ``path`` as every pod of the manifest sees it; a path that
    is not on one volume, at one place, in every pod fails."""
    cluster = ray_cluster(doc)
    seen = set()
    for group in (cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        full = posixpath.normpath(posixpath.join(container.get("workingDir", "/"), path))
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        where = None
        for mount in sorted(container.get("volumeMounts", []),
                            key=lambda m: -len(m["mountPath"])):
            rel = posixpath.relpath(full, mount["mountPath"])
            if not rel.startswith("..") and mount["name"] in claims:
                where = (claims[mount["name"]],
                         posixpath.normpath(posixpath.join(mount.get("subPath", ""), rel)))
                break
        assert where, f"{full} is on the pod's own disk, which no other pod sees"
        seen.add(where)
    assert len(seen) == 1, seen
    return seen.pop()


def test_rayservice_serves_what_the_rayjobs_wrote_on_the_shared_volume(monkeypatch):
    monkeypatch.chdir(REPO)
    pretrain = load("cluster/kuberay/rayjob-pretrain.yaml")
    *_, out = parse([ModelConfig, DataConfig, TrainConfig, OutputConfig],
                    job_argv(pretrain["spec"]["entrypoint"]))
    # where train.driver saves the run's last checkpoint
    final = on_volume(pretrain, f"{out.run_dir}/checkpoint_final")
    transfer = load("cluster/kuberay/rayjob-transfer.yaml")
    cfg, tout, _ = parse([TransferConfig, OutputConfig, TrackingConfig],
                         job_argv(transfer["spec"]["entrypoint"], "transfer"))
    assert on_volume(transfer, cfg.load_model) == final
    classifier = on_volume(transfer, f"{output_dir(cfg, tout)}/classifier.json")
    service = load("cluster/kuberay/rayservice.yaml")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert on_volume(service, app["args"]["checkpoint"]) == final
    assert on_volume(service, app["args"]["classifier"]) == classifier
