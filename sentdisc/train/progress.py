"""The driver's view of a running job: every report's metrics, as they happen, and a watchdog.

Rank 0 sends each report's row (with every rank's parameter checksum and node) to a small
named actor on the driver's node (where Ray Train's controller lives too, so losing another
node loses neither); a thread on the driver polls that actor once a second, prints a progress
line per row and hands the rows to whoever writes the history and the experiment tracking
(``sentdisc.tracking``: the driver's node is the only one that must reach the tracking store).
The rows do not go through ``ray.train.report``: its controller collects one report per health
check (2 s), and a worker reporting faster blocks until it does, so only checkpoints are
reported to Ray Train. The same thread is the stall watchdog: no report for ``stall_warn_s``
and it prints what the cluster is waiting for; for ``stall_fail_s`` and it stops the run (as
Ctrl-C would) so that ``pretrain`` fails with that diagnosis instead of waiting forever.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Optional

from sentdisc.report import human_time, progress_line


def _metrics_log_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class MetricsLog:
        """Rows reported by the workers, for the driver to print and write out."""

        def __init__(self):
            self.rows = []

        def append(self, row: dict):
            self.rows.append(row)

        def since(self, n: int) -> list:
            return self.rows[n:]

    return MetricsLog


def reports(world_rank: int) -> bool:
    """Whether this rank sends report rows to the driver: rank 0 only, so the history and the
    experiment tracking (``sentdisc.tracking``, fed from these rows) hold one row per report
    however many workers there are."""
    return world_rank == 0


def send(actor_name: str, row: dict) -> None:
    """Rank 0: hand one report's row to the driver (fire and forget)."""
    import ray

    ray.get_actor(actor_name).append.remote(row)


def note(actor_name: str, text: str) -> None:
    """Rank 0: a line for the driver to print (a decision and its reason), not a row."""
    send(actor_name, {NOTE: text})


NOTE = "note"


def diverged(row: dict) -> Optional[str]:
    """What is not finite in a report's row (its interval's loss, or the weights' checksum),
    or None: the one test of a diverged run, for the workers (which then save no checkpoint)
    and the driver (which stops the run)."""
    bad = [f"{key} {row[key]}" for key in ("loss", "param_checksum")
           if row.get(key) is not None and not math.isfinite(row[key])]
    return ", ".join(bad) or None


class Progress:
    """Rows from the workers while a Train run is fitted: ``actor_name`` goes to the workers,
    ``with progress:`` polls around ``trainer.fit()``, ``rows`` holds every row seen, and
    ``failed`` the reason if it stopped the run (a stall, a diverged loss)."""

    def __init__(self, prefix: str = "[pretrain]", printed: bool = True,
                 on_rows: Optional[Callable[[list], None]] = None, every_s: float = 1.0,
                 stall_warn_s: float = 0.0, stall_fail_s: float = 0.0,
                 diagnose: Optional[Callable[[], str]] = None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.prefix, self.printed, self.on_rows, self.every_s = prefix, printed, on_rows, every_s
        self.stall_warn_s, self.stall_fail_s = stall_warn_s, stall_fail_s
        self.diagnose = diagnose or _waiting_for
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor_name = f"sentdisc-progress-{uuid.uuid4().hex[:12]}"
        self.log = _metrics_log_class().options(name=self.actor_name,
                                                scheduling_strategy=here).remote()
        self.rows: list[dict] = []
        self._seen = 0  # entries read from the actor: rows and notes
        self._unrecorded: list[dict] = []  # rows on_rows failed on: handed over again
        self._failure: Optional[str] = None  # the last failure said, so it is said once
        self.failed: Optional[str] = None
        self.can_stop = True  # False when fit() runs off the main thread: warn only
        self._last = time.monotonic()
        self._warned_at = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> Progress:
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        try:
            self.drain()
        except Exception as e:
            self._say_failure(e)
            print(f"{self.prefix} {len(self._unrecorded)} report(s) could not be recorded: "
                  f"{self._failure}", flush=True)
        ray.kill(self.log)

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.drain()
                self._watch()
            except Exception as e:  # the watchdog must outlive a failed write (or hang unsaid)
                self._say_failure(e)

    def _say_failure(self, e: Exception) -> None:
        said = f"{type(e).__name__}: {e}"
        if said != self._failure:
            print(f"{self.prefix} could not record the reports ({said}); "
                  f"trying again each {self.every_s:g} s", flush=True)
        self._failure = said

    def _watch(self) -> None:
        """Say what the cluster waits for when no report came for a while; stop the run
        when it has been too long."""
        quiet = time.monotonic() - self._last
        if self.stall_fail_s and quiet >= self.stall_fail_s and self.can_stop:
            self._stop_run(f"no report from the workers for {human_time(quiet)} "
                           f"(--stall_fail_s {self.stall_fail_s:g}): {self.diagnose()}")
        elif self.stall_warn_s and quiet >= self.stall_warn_s and \
                quiet - self._warned_at >= self.stall_warn_s:
            self._warned_at = quiet
            print(f"{self.prefix} no report for {human_time(quiet)}: waiting for the cluster: "
                  f"{self.diagnose()}", flush=True)

    def _stop_run(self, reason: str) -> None:
        """Stop the run (as Ctrl-C would: Ray Train aborts it) so that it fails with
        ``reason``; off the main thread nothing can stop it, so it is only said."""
        if self.failed is not None:
            return
        if not self.can_stop:
            print(f"{self.prefix} warning: {reason}", flush=True)
            self.failed = ""  # said once
            return
        self.failed = reason
        print(f"{self.prefix} stopping the run: {reason}", flush=True)
        os.kill(os.getpid(), signal.SIGINT)

    def drain(self) -> None:
        import ray

        new = ray.get(self.log.since.remote(self._seen))
        if new:
            self._seen += len(new)
            self._last, self._warned_at = time.monotonic(), 0.0
            for row in new:
                if self.printed:
                    print(f"{self.prefix} {row[NOTE] if NOTE in row else row_line(row)}",
                          flush=True)
            new = [row for row in new if NOTE not in row]
            self.rows.extend(new)
            for row in new:
                if diverged(row):
                    self._stop_run(
                        f"training diverged at iteration {row.get('iteration')}: "
                        f"{diverged(row)} (lr {row.get('lr', float('nan')):.2e}); no checkpoint "
                        f"is saved from it: lower --lr (or --clip)")
            self._unrecorded.extend(new)
        if self.on_rows is None or not self._unrecorded:
            return
        self.on_rows(self._unrecorded)  # raising, they stay for the next drain's try
        if self._failure:
            print(f"{self.prefix} recording the reports again", flush=True)
        self._unrecorded, self._failure = [], None


def _waiting_for() -> str:
    from sentdisc.train.resources import waiting_for

    return waiting_for()


def row_line(row: dict) -> str:
    """A report's progress line; the final report adds held-out bits per byte, a validation
    (fine-tuning) its score and the best so far."""
    line = progress_line(row)
    held_out = [f"{k} {row[k]:.3f}" for k in ("val_bpb", "test_bpb") if row.get(k) is not None]
    if row.get("final") and held_out:
        line += " | " + " ".join(held_out)
    if row.get("final") and row.get("best_score") is not None:
        line += (f" | best val {row.get('val_metric') or 'score'} {row['best_score']:.4f} at iter "
                 f"{row['best_iteration']}{' (stopped early)' if row.get('stopped_early') else ''}")
    elif row.get("val_score") is not None:
        line += (f" | val {row.get('val_metric', 'score')} {row['val_score']:.4f} (best "
                 f"{row['best_score']:.4f} at iter {row['best_iteration']})")
    return line
