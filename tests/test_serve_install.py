"""The serving application ships in the wheel: built from the project, installed outside the
checkout, `sentdisc serve` (the README's command: `serve run` of sentdisc.serving:build_app with
the ingress environment) of a config answers over real HTTP, behind HAProxy."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(600)

# Run in a fresh interpreter with only the install dir on the path: which sentdisc is imported,
# and did the page (package data) come with it?
WHERE = """
import importlib.resources, sentdisc, sentdisc.serving
page = importlib.resources.files("sentdisc.serving").joinpath("page.html")
print(sentdisc.__file__)
print(page.is_file() and "<textarea" in page.read_text(encoding="utf-8"))
"""


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project as a non-editable wheel, installed into a folder of its own."""
    if run(sys.executable, "-m", "pip", "--version", timeout=60).returncode != 0:
        pytest.skip("pip is not available in this environment: cannot build a wheel")
    if run(sys.executable, "-c", "import setuptools.build_meta", timeout=60).returncode != 0:
        pytest.skip("the build backend (setuptools) is not installed: cannot build a wheel")
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree, and the
    # checkout is shared with people working in it.
    src = tmp / "src"
    shutil.copytree(REPO / "sentdisc", src / "sentdisc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # --no-build-isolation: the venv's setuptools builds it; isolation would fetch one from the
    # network. --no-deps: only this project's wheel, nothing downloaded.
    out = run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation",
              "-w", tmp / "dist", timeout=300)
    assert out.returncode == 0, f"pip wheel failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    (wheel,) = (tmp / "dist").glob("sentdisc-*.whl")
    target = tmp / "site"
    out = run(sys.executable, "-m", "pip", "install", "--no-deps", "--target", target, wheel,
              timeout=300)
    assert out.returncode == 0, f"pip install failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return target


def serve_config(port: int, checkpoint: Path, classifier: Path) -> dict:
    """serve/config.yaml's application (import path, args) on ``port``, at the test's files;
    its deployment options stay the code's defaults (one 1-CPU replica fits any machine)."""
    app = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    args = {**app["args"], "checkpoint": str(checkpoint), "classifier": str(classifier)}
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": app["name"], "route_prefix": app["route_prefix"],
                              "import_path": app["import_path"], "args": args}]}


def wait_for_sentiment(url: str, proc: subprocess.Popen, log: Path, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve run exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            r = requests.post(url + "/sentiment", json={"texts": ["a fine film"]}, timeout=10)
            if r.status_code == 200:
                return r
        except requests.RequestException:  # not up yet
            pass
        time.sleep(2)
    raise AssertionError(f"no 200 from /sentiment in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def haproxy_of_its_own(base: Path, stats_port: int, metrics_port: int) -> dict:
    """HAProxy's ports and files for a second Serve on this machine (the session's holds the
    defaults): the environment variables Serve reads them from. Serve adds a 56-character node
    id to each path and HAProxy takes a socket path of at most 97, so `base` must be short."""
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state")}


# On Ctrl-C each replica behind HAProxy drains for Serve's minimum of 30 s (so that a load
# balancer stops routing to it) before Serve shuts down: the one setting this test changes.
QUICK_STOP = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


@pytest.fixture
def short_dir():
    """A folder with a short path (pytest's tmp_path can be too long for a Unix socket)."""
    path = Path(tempfile.mkdtemp(prefix="hap", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_installed_wheel_serves_with_sentdisc_serve(installed, tiny_checkpoint, tmp_path,
                                                     short_dir):
    from sentdisc.classifier import fit_result_to_classifier

    clf = fit_result_to_classifier([0.5] * 32, 0.0, 1.0, [3], [0.5], 0.0, 1.0).save(
        tmp_path / "classifier.json")
    # Nothing of the checkout or of this session's Ray (ray.init exports RAY_* variables, and
    # the tests run with the ingress environment): the wheel on the path, as a fresh shell
    # would have it, and `--address local` starts a Ray of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(installed)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = run(sys.executable, "-c", WHERE, cwd=work, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    module, page_ok = out.stdout.split()
    assert Path(module).is_relative_to(installed), f"imported {module}, not the wheel's"
    assert page_ok == "True", "page.html is not in the wheel"

    port, stats_port, metrics_port = free_ports(3)
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(port, tiny_checkpoint, clf)))
    log = tmp_path / "serve_run.log"
    haproxy = haproxy_of_its_own(short_dir, stats_port, metrics_port)
    with open(log, "w") as sink:
        proc = subprocess.Popen([str(installed / "bin" / "sentdisc"), "serve", str(config),
                                 "--address", "local"], cwd=work,
                                env={**env, **haproxy, **QUICK_STOP},
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        body = wait_for_sentiment(url, proc, log, timeout=300).json()
        assert body["neuron"] == 3 and body["results"][0]["label"] in ("positive", "negative")
        page = requests.get(url + "/", timeout=30)
        assert page.status_code == 200 and "<textarea" in page.text
        # the fast path, set by the command itself: HAProxy, and no warning about the proxy
        assert requests.get(url + "/healthz", timeout=30).json()["ingress"] == "haproxy"
        printed = log.read_text()
        assert "sentdisc serve: RAY_SERVE_ENABLE_HA_PROXY='1'" in printed
        assert "Python proxy" not in printed
    finally:
        stop(proc)
    assert "sentdisc serve: stopping: Serve drains each replica for 2 s first" in log.read_text()


def stop(proc: subprocess.Popen):
    """Ctrl-C to serve run's process group, so that it shuts Serve and its Ray down; then
    whatever is left of the group is killed."""
    for sig, grace in ((signal.SIGINT, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
