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


def pytest_collection_modifyitems(items):
    """Train runs first, on a Ray no earlier test has touched: after other modules' Ray Data
    work in the same driver process, a Train run restarted after a killed worker was seen to
    wait for data forever (the same tests pass alone, every time)."""
    items.sort(key=lambda item: item.path.name != "test_train.py")


def start_local_ray():
    import ray

    from sentdisc.runtime import forget_stale_cluster

    forget_stale_cluster()  # else Train's placement-group cleaner stalls on a dead address
    # address="local": always a fresh instance, never a `ray start` cluster found on the machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny mLSTM (random weights) saved in the checkpoint format."""
    from sentdisc import ByteLM, ModelConfig, save

    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=8, rnn_size=32, layers=1))
    return save(model, tmp_path_factory.mktemp("ckpt") / "tiny")
