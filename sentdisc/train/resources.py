"""Will the run fit on this cluster? Checked before it starts; and, while it runs, what it waits for.

A Train run reserves ``num_workers x cpus_per_worker`` CPUs (and a GPU each) for the whole
run. Ray Data's read and preprocess tasks feed it from what is left: if nothing is left they
are never scheduled and the workers wait for data forever (Ray's own "may hang forever" warning
lands in a worker's log, not in the job's output). So the driver checks, within seconds, that
the cluster can hold the workers and leave ``ingest_cpus`` for Ray Data, and otherwise fails
with the numbers and the ways out; an autoscaling cluster is trusted to grow.
"""
from __future__ import annotations

from sentdisc.errors import InputError
from sentdisc.train.config import TrainConfig


class ResourceError(InputError):
    """The run cannot fit on the cluster as configured."""


def can_autoscale() -> bool:
    """Whether an autoscaler may add nodes (Ray records its cluster config in the GCS)."""
    try:
        import ray._private.state

        return bool(ray._private.state.state.get_max_resources_from_cluster_config())
    except Exception:  # an older Ray without it: assume a fixed cluster (checked strictly)
        return False


def check_fits(tc: TrainConfig) -> None:
    """Fail now, with the numbers and a fix, if the run cannot be scheduled."""
    import ray

    if can_autoscale():
        return
    problem = fit_problem(tc, [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")])
    if problem:
        raise ResourceError(problem)


def fit_problem(tc: TrainConfig, nodes: list[dict]) -> str | None:
    """Why the run cannot be scheduled on a fixed cluster of ``nodes`` (each node's Ray
    resources, e.g. ``{"CPU": 32, "GPU": 8}``), with the numbers and the ways out; None when
    it fits. Pure, so that a cluster described in a file is held to the same rule before it
    exists (tests/test_cluster_files.py)."""
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    workers, per = tc.min_workers, tc.cpus_per_worker
    where = _size(cpus, gpus, len(nodes), ", no autoscaler")
    if tc.use_gpu and gpus < workers:
        return (f"the run needs {workers} GPUs (one per worker) but the cluster has {where}: "
                f"use fewer --num_workers or add GPU nodes")
    largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if per > largest:
        return (f"one worker needs {_num(per)} CPUs but the largest node has "
                f"{_num(largest)}: lower --cpus_per_worker")
    need = workers * per + tc.ingest_cpus
    if need > cpus + 1e-9:
        fixes = [f"--num_workers {max(1, int((cpus - tc.ingest_cpus) // per))}"
                 if cpus - tc.ingest_cpus >= per else None,
                 f"--cpus_per_worker {_num((cpus - tc.ingest_cpus) / workers)}"
                 if cpus - tc.ingest_cpus > 0 else None,
                 "add a node (ray start --address=HEAD:6379)"]
        asked = f"{workers} worker{'s' if workers != 1 else ''} x {_num(per)} CPU"
        # a run that reads no data through Ray Data (fine-tuning) leaves nothing for it
        stuck = (f"{asked} + {_num(tc.ingest_cpus)} for Ray Data's read and preprocess tasks "
                 f"(--ingest_cpus), but the cluster has {where}, so the data would never be read"
                 if tc.ingest_cpus else
                 f"{asked}, but the cluster has {where}, so the workers could never all start")
        return (f"the run needs {_num(need)} CPUs: {stuck}. "
                f"Use {', or '.join(f for f in fixes if f)}")
    return None


def _cluster_size(note: str = "") -> str:
    """'4 CPUs and 1 GPUs (2 nodes<note>)': what the cluster has now, as every message says it."""
    import ray

    total = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return _size(total.get("CPU", 0.0), total.get("GPU", 0.0), nodes, note)


def _size(cpus: float, gpus: float, nodes: int, note: str = "") -> str:
    return (f"{_num(cpus)} CPUs" + (f" and {_num(gpus)} GPUs" if gpus else "")
            + f" ({nodes} node{'s' if nodes != 1 else ''}{note})")


def starting_line(tc: TrainConfig) -> str:
    """What the run is about to start, said before Ray Train starts it: the workers take tens
    of seconds to come up (processes, torch, DDP, their first data) and print nothing until
    then."""
    lo, hi = tc.min_workers, tc.max_workers
    count = f"{lo}" if lo == hi else f"{lo}-{hi} (elastic)"
    each = f"{_num(tc.cpus_per_worker)} CPU" + (" + 1 GPU" if tc.use_gpu else "") + \
        "".join(f" + {_num(v)} {k}" for k, v in tc.extra_resources.items())
    where = _cluster_size(" now, autoscaling" if can_autoscale() else "")
    they = "they are up and have read their" if hi != 1 else "it is up and has read its"
    return (f"starting {count} Ray Train worker{'s' if hi != 1 else ''} x {each} "
            f"({'nccl' if tc.use_gpu else 'gloo'}) on {where}; the first report comes once "
            f"{they} first data")


def waiting_for() -> str:
    """One line on what the cluster is waiting for: free CPUs/GPUs and the demands that cannot
    be scheduled (tasks, actors, placement groups), from the GCS (no dashboard needed)."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"{k} {_num(free.get(k, 0.0))}/{_num(total[k])} free" for k in ("CPU", "GPU")
             if k in total]
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
        for d in demands.ray_task_actor_demand:
            for b in d.bundles_by_count:
                parts.append(f"{b.count} task(s)/actor(s) waiting for {_bundle(b.bundle)}")
        for d in demands.placement_group_demand:
            parts.append(f"a placement group waiting for "
                         f"{', '.join(_bundle(b.bundle) for b in d.bundles_by_count)}")
    except Exception as e:  # the diagnosis must never be what fails
        parts.append(f"(pending demands unavailable: {type(e).__name__})")
    return "; ".join(parts)


def stall_diagnosis(tc: TrainConfig) -> str:
    """What a run that stopped reporting waits for: the cluster's free resources and pending
    demands, and what the run's own workers hold. (Ray Data submits no task it has no budget
    for, so a starved read shows as a full cluster, not as a pending task.)"""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    held = tc.min_workers * tc.cpus_per_worker
    return (f"{waiting_for()}; the run's workers hold {_num(held)}+ of the cluster's "
            f"{_num(cpus)} CPUs, which leaves Ray Data at most {_num(max(cpus - held, 0))} "
            f"for reading and preprocessing (--ingest_cpus {_num(tc.ingest_cpus)}); if "
            f"nothing else holds them, lower --num_workers or --cpus_per_worker, or add a node")


def _bundle(bundle: dict) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in sorted(bundle.items())) + "}"


def _num(v: float) -> str:
    return f"{v:g}"
