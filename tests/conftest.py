"""Shared fixtures: one real local Ray per test session, a tiny checkpoint, the shared data."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("SENTDISC_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not present: set SENTDISC_DATA or put it at ../shared/data")
    return path


# --- a real S3 API on 127.0.0.1 (moto's server mode), for every test and every Ray worker ---

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
_S3_SERVER = None


# Ray Train's controller takes a checkpoint report once per health check (2 s by default) and
# waits a minute for workers that do not come: tiny test runs would mostly wait. Ray Train
# hands these to its controller from the driver's environment.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}


def pytest_configure(config):
    """Start the S3 server before anything starts Ray: Ray workers take the environment the
    session's Ray was started with, endpoint and credentials included."""
    global _S3_SERVER
    for k, v in TRAIN_ENV.items():
        os.environ.setdefault(k, v)
    # precision auto would be bf16 on a CPU with native bf16 and fp32 elsewhere: the tests
    # compare against float32 references, so they fix it (bf16 is tested where asked for, and
    # auto's decision for every kind of hardware: test_precision.py)
    os.environ.setdefault("SENTDISC_PRECISION", "fp32")
    # each test's runs go to the store beside its outputs, not to the developer's MLflow server
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from sentdisc.serving.ingress import apply_serve_env

    apply_serve_env()  # every Ray the tests start serves as users are told to run it
    # ...except that a deleted or replaced replica drains for 2 s, not 30 (so HAProxy has
    # stopped routing to it): the tests delete and redeploy apps often
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # tests that need it skip with a reason
        return
    port = free_port()
    _S3_SERVER = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    _S3_SERVER.start()
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")


def pytest_unconfigure(config):
    if _S3_SERVER is not None:
        _S3_SERVER.stop()


def free_ports(n: int) -> list[int]:
    """n distinct free ports: each socket stays bound until all are picked, since the kernel may
    hand a just-released port out again (two picked one after another once were the same)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op a block runs, forward and backward: (op, operand dtypes, operand shapes,
    output dtype)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in args if isinstance(a, torch.Tensor)] + [
            t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else None
        self.ops.append((func._overloadpacket.__name__, tuple(t.dtype for t in flat),
                         tuple(tuple(t.shape) for t in flat), out_dtype))
        return out


def new_bucket() -> str:
    """A fresh, empty bucket on the local S3 server (any fixture scope); its name."""
    if _S3_SERVER is None:
        pytest.skip("moto[server] is not installed: no local S3 API to test against")
    import uuid

    import pyarrow.fs as pafs

    name = f"t-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], scheme="http",
                      allow_bucket_creation=True).create_dir(name)
    return name


@pytest.fixture
def s3_bucket():
    """A fresh, empty bucket on the local S3 server: its name."""
    return new_bucket()


def start_local_ray():
    import ray

    from sentdisc.runtime import forget_stale_cluster

    forget_stale_cluster()  # else Train's placement-group cleaner stalls on a dead address
    # address="local": always a fresh instance, never a `ray start` cluster found on the machine.
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **aws}},
             # Ray kills an idle worker process over its soft limit (num_cpus) after 1 s, and the
             # next test's tasks start new ones (~2 s of a core each: Python, ray, torch);
             # kept 2 min, they are reused across tests: test_transfer + test_train 145 -> 128 s.
             _system_config={"idle_worker_killing_time_threshold_ms": 120_000})


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once for the whole session (each start costs seconds)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


_SERVE_PORTS: dict = {}  # the session Ray's address -> the port its Serve answers on


@pytest.fixture(scope="module")
def serve_port(ray_local):
    """Serve on the session's Ray, started once per Ray instance (a Serve shutdown takes ~30 s):
    its HTTP port. Modules deploy and delete their own applications on it; ray_local shuts it
    down. Keyed by the Ray instance: a module (the multi-node harness) that stops the session's
    Ray for its own cluster and starts a new one afterwards gets a new Serve here."""
    import ray
    from ray import serve

    here = ray.get_runtime_context().gcs_address
    if here not in _SERVE_PORTS:
        _SERVE_PORTS[here] = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _SERVE_PORTS[here]})
    return _SERVE_PORTS[here]


def routed(url: str, timeout: float = 60) -> str:
    """``url`` once the app answers its /healthz (200, or 503 with the reason it cannot
    serve). ``serve.run`` returns when the replicas are up, but HAProxy learns the new route a
    moment later (asynchronously, from Serve's controller): until then every path is a 404."""
    import time

    import requests

    deadline, last = time.time() + timeout, "no answer"
    while time.time() < deadline:
        try:
            r = requests.get(url + "/healthz", timeout=10)
            if r.status_code != 404:
                return url
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last = repr(e)
        time.sleep(0.2)
    pytest.fail(f"{url}/healthz not routed {timeout:.0f} s after serve.run: {last}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny mLSTM (random weights) saved in the checkpoint format."""
    from sentdisc import ByteLM, ModelConfig, save

    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=8, rnn_size=32, layers=1))
    return save(model, tmp_path_factory.mktemp("ckpt") / "tiny")


def fit_mean_classifier(model, texts, labels, directory):
    """A classifier.json L1-fitted (C=100) on mean features of ``texts``, with its top-3-neuron
    model, saved in ``directory``: (Classifier, path)."""
    import numpy as np

    from sentdisc import featurize
    from sentdisc.classifier import Classifier, fit_result_to_classifier
    from sentdisc.sweep import _l1_logreg

    feats = featurize(model, texts, kind="mean")
    labels = np.asarray(labels)
    full = _l1_logreg(100.0, 0, 1000, "liblinear").fit(feats, labels)
    coef = full.coef_[0]
    neurons = [int(n) for n in np.argsort(-np.abs(coef))[:3]]
    top = _l1_logreg(100.0, 0, 1000, "liblinear").fit(feats[:, neurons], labels)
    clf = fit_result_to_classifier(coef, full.intercept_[0], 100.0, neurons, top.coef_[0],
                                   top.intercept_[0], 100.0, feature_kind="mean", layer=-1)
    assert np.abs(clf.coef).max() > 0, "degenerate classifier: the test could not fail"
    path = clf.save(Path(directory) / "classifier.json")
    return Classifier.load(path), path
