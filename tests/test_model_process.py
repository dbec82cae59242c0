"""The model's own process (sentdisc.serving.model_process), through the plain uvicorn server
over real HTTP: answers equal the library's in process; a dead model process makes the server
say so (503 with the reason, no 500, no hang); a dead server leaves no model process behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("zombie") < 0


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


@pytest.fixture
def plain_server(tiny_checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentdisc.serving.plain", f"checkpoint={tiny_checkpoint}",
         f"port={port}"], env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            return requests.get(url + "/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    _wait(healthy, 120, "the plain server answers /healthz")
    yield url, proc
    proc.kill()
    proc.wait(30)


def test_features_equal_the_library_and_come_from_another_process(plain_server,
                                                                  tiny_checkpoint):
    from sentdisc import featurize, load

    url, proc = plain_server
    health = requests.get(url + "/healthz", timeout=10).json()
    assert health["pid"] == proc.pid and health["model_pid"] not in (proc.pid, os.getpid())
    texts = ["a fine day", "not good at all", "x" * 300]
    got = requests.post(url + "/featurize", json={"texts": texts}, timeout=30).json()
    want = featurize(load(str(tiny_checkpoint)), texts, kind="cell")
    np.testing.assert_allclose(np.array(got["features"]), want, atol=1e-5)


def test_a_dead_model_process_is_a_503_with_the_reason(plain_server):
    url, proc = plain_server
    model_pid = requests.get(url + "/healthz", timeout=10).json()["model_pid"]
    os.kill(model_pid, signal.SIGKILL)
    r = requests.post(url + "/featurize", json={"texts": ["still there?"]}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"], (r.status_code, r.text)
    assert "model process exited" in r.json()["detail"][0]["msg"]
    health = requests.get(url + "/healthz", timeout=10)
    assert health.status_code == 503 and "model process exited" in health.json()["reason"]


def test_a_killed_server_leaves_no_model_process(plain_server):
    url, proc = plain_server
    model_pid = requests.get(url + "/healthz", timeout=10).json()["model_pid"]
    proc.kill()
    proc.wait(30)
    _wait(lambda: not _alive(model_pid), 10, f"model process {model_pid} exits with its parent")
