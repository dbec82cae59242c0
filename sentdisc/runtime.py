"""Connecting to Ray: the one place every job and library entry point does it.

``ray.init()`` with no address joins the cluster named by ``RAY_ADDRESS`` (set by ``ray job
submit``) or by the address file ``ray start --head`` leaves in Ray's temp folder, else starts
a local Ray. A head node that was killed rather than stopped leaves that file behind, and
``ray.init()`` (and Ray's own state API inside Train) then waits minutes for a GCS that is gone.
We check the address first and, when nothing answers there, say so and remove the record, as
``ray stop`` would have, so a local Ray starts.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Optional


def address_file() -> Path:
    """Where ``ray start --head`` records its address (Ray's default temp folder)."""
    try:
        from ray._common.utils import get_ray_address_file
        return Path(get_ray_address_file(None))
    except Exception:  # private API moved: fall back to where it has always been
        return Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def stale_cluster_address(path: Optional[Path] = None) -> Optional[str]:
    """The address recorded in ``path`` (default: Ray's address file) when nothing answers
    there; None when there is no record or the cluster is up."""
    try:
        recorded = Path(path or address_file()).read_text().strip()
    except OSError:
        return None
    return recorded if recorded and not reachable(recorded) else None


def reachable(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def ensure_ray(**init_kwargs) -> None:
    """Join this process's cluster or start a local Ray, once per process; Ray Data's
    informational lines go to its log file only (``ray_data_to_log_file``)."""
    import ray

    ray_data_to_log_file()
    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS") and "address" not in init_kwargs:
        forget_stale_cluster()  # with no record left, ray.init() starts a local Ray
    ray.init(**init_kwargs)


def ray_data_to_log_file() -> None:
    """Keep Ray Data's INFO lines (execution plans, multi-line progress blocks) off this
    process's terminal, in ``ray-data.log`` of the session's logs as before; its warnings
    still print. A job prints its own progress (bytes/s, ETA), and Ray Data's blocks would
    interleave with it. ("console" is the handler's name in Ray Data's logging config, the one
    ``RAY_DATA_LOGGING_CONFIG`` replaces.)"""
    import logging

    import ray.data  # noqa: F401 -- configures its loggers on import

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(max(handler.level, logging.WARNING))


def forget_stale_cluster() -> bool:
    """Remove an address file that points at nothing, as ``ray stop`` would have. Ray's own
    internals (Train's placement-group cleaner, the state API) read it too and stall on it,
    even inside a local Ray. Returns whether there was one."""
    stale = stale_cluster_address()
    if not stale:
        return False
    print(f"[sentdisc] no Ray cluster answers at {stale} (a stale address file from a head "
          f"node that was killed, not stopped): removing it and starting a local Ray", flush=True)
    address_file().unlink(missing_ok=True)
    return True
