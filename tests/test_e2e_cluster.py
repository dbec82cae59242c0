"""The path a user walks, on a real `ray start --head` cluster with token auth:

pretrain job -> transfer job on its checkpoint -> `serve deploy` -> HTTP queries ->
`serve deploy` with new batch settings (the running replica retunes, no restart) -> stop.

The cluster is started with `ray start --head --block` in its own process group and stopped by
signalling that process (the group is killed after it), not by `ray stop`, which would also
kill the test session's own Ray.
"""
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

POSITIVE = ["great", "wonderful", "loved it", "excellent", "a joy", "superb", "brilliant"]
NEGATIVE = ["awful", "terrible", "hated it", "boring", "a mess", "dreadful", "waste of time"]


def healthz(base: str) -> dict:
    """/healthz's report, {} while the app does not answer (not up yet, or redeploying)."""
    try:
        r = requests.get(f"{base}/healthz", timeout=5)
        return r.json() if r.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return {}


def write_corpus(d: Path):
    """Tiny loose-JSON shards (unlabeled) and labeled CSV splits with an obvious signal."""
    import random

    rng = random.Random(0)
    d.mkdir(parents=True)
    (d / "reviews").mkdir()
    for shard in range(2):
        with open(d / "reviews" / f"part-{shard}.json", "w") as f:
            for i in range(60):
                words = rng.choice(POSITIVE + NEGATIVE)
                f.write(json.dumps({"reviewText": f"This film was {words}. Review {shard}-{i}.",
                                    "overall": 5.0}) + "\n")
    for split, n in (("train", 80), ("val", 30), ("test", 30)):
        rows = ["label,sentence"]
        for i in range(n):
            label = i % 2
            words = rng.choice(POSITIVE if label else NEGATIVE)
            rows.append(f'{label},"the movie was {words} number {i}"')
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")


class Cluster:
    def __init__(self, tmp: Path):
        agent_ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                       "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")
        self.gcs, self.dash, self.http, *agent = free_ports(3 + len(agent_ports))
        # Nothing of the test session's own Ray (ray.init exports RAY_* into this process)
        # may leak into the cluster or the CLI: they must find only this cluster.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "PYTHONPATH": str(REPO), "RAY_ADDRESS": f"http://127.0.0.1:{self.dash}",
                    # `python` in a job's entrypoint is this environment's, as in an activated venv
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    # On SIGTERM a node first drains (30 s by default) so Serve can move its
                    # replicas elsewhere: a one-node cluster has nowhere to move them to.
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.log = open(tmp / "ray_head.log", "w")
        # `ray start` records its address for later `ray.init()` calls; killing the head leaves
        # that record pointing at nothing, so it is put back as it was on stop.
        from sentdisc.runtime import address_file
        self.address_file = address_file()
        self.recorded = self.address_file.read_text() if self.address_file.exists() else None
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
             "--num-cpus=4", "--disable-usage-stats",
             # The session's own Ray holds the default agent ports on this machine.
             *(f"--{name}={port}" for name, port in zip(agent_ports, agent))],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.run("ray", "job", "list", check=False, timeout=30).returncode == 0:
                return
            if self.proc.poll() is not None:
                log = (tmp / "ray_head.log").read_text()
                raise RuntimeError(f"ray start exited: {log[-2000:]}")
            time.sleep(2)
        raise RuntimeError("the head node's job API did not come up in 120 s")

    def run(self, tool, *args, check=True, timeout=600):
        out = subprocess.run([str(BIN / tool), *args], env=self.env, cwd=REPO, text=True,
                             capture_output=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def submit(self, *job_args):
        return self.run("ray", "job", "submit", "--working-dir", str(REPO), "--", "python",
                        *job_args)

    def serve_deploy(self, config: dict, path: Path):
        path.write_text(yaml.safe_dump(config))
        self.run("serve", "deploy", str(path), "--address", self.env["RAY_ADDRESS"])

    def stop(self):
        # SIGTERM to `ray start` alone: it stops its processes in order in seconds. Signalled
        # all at once, the group's raylet and GCS wait on each other for a minute or more.
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the cluster is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.recorded is None:
            self.address_file.unlink(missing_ok=True)
        else:
            self.address_file.write_text(self.recorded)
        self.log.close()


def test_pretrain_transfer_serve_on_a_ray_start_cluster(tmp_path):
    data = tmp_path / "data"
    write_corpus(data)
    exp = tmp_path / "experiments"
    cluster = Cluster(tmp_path)
    try:
        # More workers than the cluster's CPUs can hold with any left for Ray Data: the job
        # fails in seconds, its output naming the numbers (it used to hang, silently).
        t0 = time.time()
        out = cluster.run("ray", "job", "submit", "--working-dir", str(REPO), "--", "python",
                          "jobs/pretrain.py", "--train", str(data / "reviews"), "--rnn_size",
                          "16", "--max_iters", "5", "--num_workers", "4", "--batch_size", "8",
                          "--experiment_dir", str(exp), check=False, timeout=120)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "needs 5 CPUs" in text and "has 4 CPUs" in text, text[-3000:]
        assert time.time() - t0 < 60, time.time() - t0

        out = cluster.submit(
            "jobs/pretrain.py", "--train", str(data / "reviews"), "--rnn_size", "32",
            "--embed_size", "8", "--batch_size", "8", "--seq_length", "32", "--max_iters", "30",
            "--save_iters", "15", "--num_workers", "2", "--experiment_dir", str(exp),
            "--experiment_name", "e2e", "--split", "10,1,1")
        assert "succeeded" in (out.stdout + out.stderr).lower(), (out.stdout + out.stderr)[-3000:]
        ckpt = exp / "e2e" / "checkpoint_final"
        assert (ckpt / "model.safetensors").exists() and (exp / "e2e" / "history.csv").exists()

        out = cluster.submit(
            "jobs/transfer.py", "--load_model", str(ckpt), "--train", str(data / "train.csv"),
            "--valid", str(data / "val.csv"), "--test", str(data / "test.csv"),
            "--text_key", "sentence", "--label_key", "label", "--experiment_dir", str(exp),
            "--experiment_name", "e2e", "--feature_kind", "mean")
        assert "succeeded" in (out.stdout + out.stderr).lower(), (out.stdout + out.stderr)[-3000:]
        clf = exp / "e2e" / "transfer" / "data" / "classifier.json"
        assert clf.exists(), sorted(p.name for p in (exp / "e2e" / "transfer").rglob("*"))

        config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
        config["http_options"] = {"host": "127.0.0.1", "port": cluster.http}
        for app in config["applications"]:
            app.setdefault("args", {}).update(checkpoint=str(ckpt), classifier=str(clf))
        cluster.serve_deploy(config, tmp_path / "serve.yaml")
        base = f"http://127.0.0.1:{cluster.http}"
        deadline = time.time() + 180
        while time.time() < deadline:
            if healthz(base):
                break
            time.sleep(2)
        else:
            status = cluster.run("serve", "status", "--address", cluster.env["RAY_ADDRESS"],
                                 check=False)
            raise AssertionError(f"serve app never became healthy:\n{status.stdout}")

        texts = ["the movie was superb", "the movie was dreadful"]
        feats = requests.post(f"{base}/featurize", json={"texts": texts}, timeout=60)
        assert feats.status_code == 200 and len(feats.json()["features"][0]) == 32
        sent = requests.post(f"{base}/sentiment", json={"texts": texts}, timeout=60).json()
        assert [r["label"] in ("positive", "negative") for r in sent["results"]] == [True, True]
        heat = requests.post(f"{base}/heatmap", json={"text": texts[0], "format": "png"},
                             timeout=60)
        assert heat.status_code == 200 and heat.content[:8] == b"\x89PNG\r\n\x1a\n"
        gen = requests.post(f"{base}/generate", json={"prompt": "the movie", "length": 20,
                                                      "temperature": 1.0}, timeout=60)
        assert gen.status_code == 200 and "the movie" in gen.json()["text"]
        assert requests.get(f"{base}/", timeout=30).status_code == 200
        retune_in_place(cluster, config, base, tmp_path / "serve-retuned.yaml")
    finally:
        cluster.stop()


def _replicas(base: str, want: int = 2, timeout: float = 120) -> dict:
    """What /healthz says, per answering replica: (tag, pid) -> body, once ``want`` (the
    config's min_replicas) answer. The app is healthy when its first replica is up; the second
    may still be starting."""
    seen, deadline = {}, time.time() + timeout
    while len(seen) < want:
        assert time.time() < deadline, f"{want} replicas never answered: {seen}"
        seen.update({(h["replica"], h["pid"]): h for h in (healthz(base) for _ in range(20)) if h})
    return seen


def retune_in_place(cluster: Cluster, config: dict, base: str, path: Path):
    """The same config with new batch settings in the deployment's user_config, `serve deploy`
    again: Serve calls reconfigure() on the running replicas instead of replacing them."""
    before = _replicas(base)
    server = next(d for d in config["applications"][0]["deployments"]
                  if d["name"] == "SentdiscServer")
    assert {h["max_batch_size"] for h in before.values()} == \
        {server["user_config"]["max_batch_size"]}
    server["user_config"] = {"max_batch_size": 7}
    cluster.serve_deploy(config, path)
    deadline = time.time() + 120
    after = _replicas(base)
    while {h.get("max_batch_size") for h in after.values()} != {7}:
        assert time.time() < deadline, f"batch settings never changed: {after}"
        time.sleep(1)
        after = _replicas(base)
    assert set(after) <= set(before), "a replica was restarted, not reconfigured"
    sent = requests.post(f"{base}/sentiment", json={"texts": ["fine"] * 3}, timeout=60)
    assert sent.status_code == 200 and int(sent.headers["X-Batch-Size"]) <= 7
