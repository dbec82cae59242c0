"""Serve under failure, over real HTTP: a replica SIGKILLed under load, and a replica whose
checkpoint cannot be loaded. Ray runs with the ingress settings users are told to use
(sentdisc.serving.ingress, applied in conftest.py): HAProxy retries a request whose replica died
before answering on another replica."""
import collections
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import routed

CLIENT_TIMEOUT_S = 30


@pytest.fixture
def deployed():
    """Deploys apps on the session's Serve and deletes them after the test: their replicas
    hold CPUs the later modules' training runs need."""
    from ray import serve

    names = []

    def deploy(name, *args, **kwargs):
        names.append(name)
        return _deploy(name, *args, **kwargs)

    yield deploy
    for name in names:
        serve.delete(name)


def _deploy(name, checkpoint, port, replicas, broken=None, classifier=None, **options):
    from ray import serve

    from sentdisc.serving import SentdiscServer
    from sentdisc.serving.args import AppArgs, check_args

    args = check_args(AppArgs(checkpoint=str(checkpoint), classifier=classifier))
    if broken:
        broken()  # after the builder's checks: only the replica can find out
    app = SentdiscServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0.5},
                                 user_config={}, **options).bind(args)
    serve.run(app, name=name, route_prefix=f"/{name}")
    return routed(f"http://127.0.0.1:{port}/{name}")


def _pids(url: str, want: int, timeout: float = 30) -> dict:
    """Replica pid -> its model process's pid, for ``want`` replicas."""
    seen, deadline = {}, time.time() + timeout
    while len(seen) < want and time.time() < deadline:
        health = requests.get(url + "/healthz", timeout=10).json()
        seen[health["pid"]] = health.get("model_pid")
    return seen


def _model_processes(pid: int) -> list[int]:
    """The live children of process ``pid`` started by multiprocessing's spawn (a replica's
    model process is its only one), from /proc: the replica runs on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # not a process, or it exited while being read
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _load(url: str, seconds: float, clients: int, on_start=None, retries: int = 0) -> list:
    """``clients`` threads posting /featurize for ``seconds``; each outcome (status or the
    exception's name, Retry-After, seconds). With ``retries``, a client retries what a client
    should (after Retry-After): a 503, a dropped connection, and the ingress's own bare 500 for
    a response the killed replica had begun (HAProxy cannot retry a response already under
    way); it records the final outcome. The app's own errors are JSON and never retried."""
    outcomes, stop = [], time.time() + seconds
    failures = _load.failures = []

    def one(session):
        for attempt in range(retries + 1):
            t0, cut = time.time(), False
            try:
                r = session.post(url + "/featurize", json={"texts": ["a fine day " * 8]},
                                 timeout=CLIENT_TIMEOUT_S)
                out = (r.status_code, r.headers.get("retry-after"), time.time() - t0)
                cut = r.status_code == 500 and r.text.strip() == "Internal Server Error"
                if r.status_code == 500:
                    failures.append(r.text[:200])
            except requests.ConnectionError:
                out = ("ConnectionError", None, time.time() - t0)
            except requests.Timeout:
                return ("Timeout", None, time.time() - t0)
            if out[0] == 200 or attempt == retries or not (
                    out[0] in (503, "ConnectionError") or (out[0] == 500 and cut)):
                return out
            time.sleep(float(out[1] or 0.5))
        return out

    def client():
        session = requests.Session()
        while time.time() < stop:
            outcomes.append(one(session))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    if on_start:
        on_start()
    for t in threads:
        t.join()
    return outcomes


def test_replica_killed_under_load_loses_no_request(serve_port, tiny_checkpoint, deployed):
    url = deployed("two", tiny_checkpoint, serve_port, replicas=2)
    pids = _pids(url, 2)
    assert len(pids) == 2, pids

    def kill_one():
        time.sleep(2)
        os.kill(min(pids), signal.SIGKILL)

    outcomes = _load(url, 8, clients=8, on_start=kill_one, retries=5)
    codes = collections.Counter(o[0] for o in outcomes)
    assert set(codes) == {200}, codes  # every request answered, with a client's retries at most
    assert max(o[2] for o in outcomes) < CLIENT_TIMEOUT_S
    assert len(outcomes) > 50, codes
    # the lost replica is replaced: two answer again; its model process went with it
    assert len(_pids(url, 2, timeout=60)) == 2
    assert _gone(pids[min(pids)], 10)


def test_replica_killed_without_retries_never_hangs(serve_port, tiny_checkpoint, deployed):
    url = deployed("two-raw", tiny_checkpoint, serve_port, replicas=2)
    pids = _pids(url, 2)

    def kill_one():
        time.sleep(1.5)
        os.kill(min(pids), signal.SIGKILL)

    outcomes = _load(url, 5, clients=8, on_start=kill_one)
    codes = collections.Counter(o[0] for o in outcomes)
    # A request the dead replica had not answered is retried on the other by the ingress when
    # its connection was refused or came back empty; one whose response was cut mid-way shows
    # as a dropped connection or HAProxy's own 500 (Ray maps its 502 to 500): at most the
    # requests in flight. Nothing hangs, and a 503 always says when to retry.
    assert set(codes) <= {200, 503, 500, "ConnectionError"}, (codes, _load.failures)
    assert all(f == "Internal Server Error" for f in _load.failures), _load.failures  # not ours
    assert all(o[1] is not None for o in outcomes if o[0] == 503)
    assert codes["ConnectionError"] + codes[500] <= 8, codes
    assert codes[200] > 0.95 * len(outcomes), codes
    assert max(o[2] for o in outcomes) < CLIENT_TIMEOUT_S


def test_unloadable_checkpoint_reported_in_healthz_without_a_crash_loop(
        serve_port, tiny_checkpoint, tmp_path, deployed):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)

    def truncate():
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    url = deployed("broken", ckpt, serve_port, replicas=1, broken=truncate)
    first = requests.get(url + "/healthz", timeout=30)
    assert first.status_code == 503, first.text
    body = first.json()
    assert body["status"] == "unavailable" and "cannot load" in body["reason"], body
    assert str(ckpt) in body["reason"] and "Traceback" not in first.text
    r = requests.post(url + "/featurize", json={"texts": ["hi"]}, timeout=30)
    # no Retry-After: this replica will not load it on a retry (a fixed checkpoint needs a
    # redeploy), so a client that obeys the header would retry forever
    assert r.status_code == 503 and "retry-after" not in r.headers, r.headers
    assert body["reason"] in r.json()["detail"][0]["msg"]
    time.sleep(3)  # the same process still answers: no restart loop
    again = requests.get(url + "/healthz", timeout=30).json()
    assert again["pid"] == body["pid"] and again["reason"] == body["reason"]


def test_a_replica_whose_classifier_fails_after_the_weights_loaded_keeps_no_model_process(
        serve_port, tiny_checkpoint, tmp_path, deployed):
    from sentdisc.classifier import fit_result_to_classifier

    clf = fit_result_to_classifier(np.ones(32), 0.0, 1.0, [0], [1.0], 0.0, 1.0).save(
        tmp_path / "classifier.json")

    def corrupt():  # read by the replica only once its model process holds the weights
        clf.write_text("{not json")

    # health checked every second: a replica reported unhealthy would be restarted at once
    url = deployed("no-classifier", tiny_checkpoint, serve_port, replicas=1, broken=corrupt,
                   classifier=str(clf), health_check_period_s=1, health_check_timeout_s=5)
    body = requests.get(url + "/healthz", timeout=30).json()
    assert body["status"] == "unavailable" and "not valid JSON" in body["reason"], body
    r = requests.post(url + "/featurize", json={"texts": ["hi"]}, timeout=30)
    assert r.status_code == 503 and body["reason"] in r.json()["detail"][0]["msg"], r.text
    assert _model_processes(body["pid"]) == []
    time.sleep(5)  # several health checks: still the same replica, still saying why
    again = requests.get(url + "/healthz", timeout=30).json()
    assert again["pid"] == body["pid"] and again["reason"] == body["reason"], again


def test_a_dead_model_process_is_a_503_then_a_new_replica(serve_port, tiny_checkpoint,
                                                          deployed):
    # health checked every second (the deployment's default is 10 s; Serve wants 3 misses)
    url = deployed("lost-model", tiny_checkpoint, serve_port, replicas=1,
                   health_check_period_s=1, health_check_timeout_s=5)
    ((pid, model_pid),) = _pids(url, 1).items()
    os.kill(model_pid, signal.SIGKILL)  # as the kernel's OOM killer would
    time.sleep(0.5)
    r = requests.post(url + "/featurize", json={"texts": ["still there?"]}, timeout=30)
    assert r.status_code == 503 and r.headers.get("retry-after"), r.text
    assert "model process exited" in r.json()["detail"][0]["msg"]
    # the replica fails its next health check and Serve starts another, with a model process
    deadline, health = time.time() + 90, {}
    while time.time() < deadline:
        try:
            health = requests.get(url + "/healthz", timeout=10).json()
        except (requests.RequestException, ValueError):
            health = {}
        if health.get("status") == "ok" and health.get("pid") != pid:
            break
        time.sleep(1)
    assert health.get("status") == "ok" and health["pid"] != pid, health
    ok = requests.post(url + "/featurize", json={"texts": ["back again"]}, timeout=30)
    assert ok.status_code == 200
