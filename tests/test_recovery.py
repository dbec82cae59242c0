"""A run that cannot fit, a run whose data can never be read, a run stopped by Ctrl-C or SIGTERM
and a driver killed mid-run, on the session's real Ray: each ends in seconds with its reason,
or resumes where it stopped."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentdisc import storage
from sentdisc.checkpoint import incomplete_reason
from sentdisc.recipes import pretrain as recipe
from sentdisc.report import read_history

REPO = Path(__file__).resolve().parents[1]
WORDS = "good bad great awful movie plot acting boring fun love hate the was and not".split()


def corpus(folder: Path, records: int = 1500, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "a.json", "w") as f:
        for _ in range(records):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
            f.write(json.dumps({"reviewText": text}) + "\n")
    return folder


def test_a_run_that_cannot_fit_fails_within_seconds_with_the_numbers(ray_local, tmp_path,
                                                                     capsys):
    # the session's Ray has 4 CPUs: 4 workers x 1 CPU leave none for Ray Data's read tasks
    t0 = time.time()
    code = recipe.main(["--train", str(corpus(tmp_path / "c", 50)), "--rnn_size", "16",
                        "--max_iters", "5", "--num_workers", "4", "--batch_size", "8",
                        "--experiment_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "needs 5 CPUs" in err and "cluster has 4 CPUs" in err and "--num_workers 3" in err
    assert "--cpus_per_worker 0.75" in err
    assert time.time() - t0 < 30


def test_the_watchdog_stops_a_run_whose_data_can_never_be_read(ray_local, tmp_path, capsys):
    # 2 workers x 2 CPUs take all 4 and --ingest_cpus 0 lets it start: Ray Data's read tasks
    # can never be scheduled, and without the watchdog this run would wait forever.
    t0 = time.time()
    code = recipe.main(["--train", str(corpus(tmp_path / "c", 50)), "--rnn_size", "16",
                        "--max_iters", "5", "--num_workers", "2", "--cpus_per_worker", "2",
                        "--ingest_cpus", "0", "--stall_warn_s", "4", "--stall_fail_s", "12",
                        "--experiment_dir", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == 1, captured.err[-2000:]
    assert "no report from the workers" in captured.err and "CPU 0/4 free" in captured.err
    assert "workers hold 4+ of the cluster's 4 CPUs" in captured.err, captured.err
    assert "waiting for the cluster" in captured.out  # the warning came first
    assert time.time() - t0 < 120


def test_a_diverged_run_stops_at_its_first_report_and_saves_no_checkpoint_from_it(
        ray_local, tmp_path, capsys):
    # an Adam step of 1e30 makes every weight non-finite at once
    code = recipe.main(["--train", str(corpus(tmp_path / "c", 200)), "--split", "1,0,0",
                        "--rnn_size", "16", "--embed_size", "8", "--batch_size", "4",
                        "--seq_length", "32", "--lr", "1e30", "--lr_scheduler", "none",
                        "--max_iters", "500", "--log_interval", "5", "--save_iters", "5",
                        "--experiment_dir", str(tmp_path / "runs"), "--experiment_name", "d"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and len(err) == 1, captured.err[-3000:]
    assert re.fullmatch(r"pretrain: failed: training diverged at iteration 5: loss nan, param_checksum "
                        r"nan \(lr 1\.00e\+30\); no checkpoint is saved from it: lower --lr "
                        r"\(or --clip\)", err[0]), err[0]
    assert "not saving iteration 5's checkpoint: loss nan" in captured.out, captured.out[-3000:]
    assert not list((tmp_path / "runs" / "d").glob("checkpoint_*"))


def _driver(argv: list, log: Path) -> subprocess.Popen:
    """``python jobs/pretrain.py ...`` as a user runs it, in its own process group, joined to
    the session's Ray (as `ray job submit` would have it)."""
    import ray

    # The session's RAY_* settings stay behind, but for its token (Ray's auth is on).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k.startswith("RAY_AUTH")}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "pretrain.py"), *argv],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_iteration(proc, run: Path, log: Path, iteration: int, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = [r["iteration"] for r in read_history(run / "history.csv")] \
            if (run / "history.csv").exists() else []
        if done and max(done) >= iteration:
            return
        time.sleep(0.5)
    raise AssertionError(f"no report of iteration {iteration}: {log.read_text()[-3000:]}")


def assert_the_jobs_own_lines(lines: list):
    """The terminal shows the job's own lines (Ray Data's plans and progress blocks go to its
    log file only), and the job says what it starts before its workers' silent start-up."""
    ray_data = [line for line in lines
                if re.search(r"(streaming_executor|logging_progress)\.py|Running Dataset", line)]
    assert not ray_data, "\n".join(ray_data[:5])
    job = [line for line in lines if line.startswith("[pretrain] ")]
    assert job[0].startswith("[pretrain] starting 1 Ray Train worker x 1 CPU (gloo) on 4 CPUs "
                             "(1 node); the first report comes once it is up"), job[:3]
    assert job[1].startswith("[pretrain] precision auto: "), job[:3]  # the worker's first


@pytest.mark.parametrize("sig,name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_stopped_run_says_in_one_line_which_checkpoint_it_continues_from(ray_local, tmp_path,
                                                                          sig, name):
    # SIGINT to the group is what a terminal sends on Ctrl-C; SIGTERM is what `ray job stop`
    # sends a job's driver
    runs = tmp_path / "runs"
    run, log = runs / "c", tmp_path / "driver.log"
    driver = _driver(["--train", str(corpus(tmp_path / "c")), "--split", "1,0,0", "--rnn_size",
                      "32", "--embed_size", "8", "--batch_size", "4", "--seq_length", "32",
                      "--max_iters", "2000", "--log_interval", "5", "--save_iters", "10",
                      "--experiment_dir", str(runs), "--experiment_name", "c"], log)
    try:
        _wait_for_iteration(driver, run, log, 15)
        os.killpg(driver.pid, sig)
        assert driver.wait(120) == 128 + sig, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    lines = log.read_text().strip().splitlines()
    assert_the_jobs_own_lines(lines)
    last = lines[-1]
    done = max(r["iteration"] for r in read_history(run / "history.csv"))
    said = re.fullmatch(rf"pretrain: interrupted: stopped by {name} at iteration (\d+); the "
                        r"same command continues from (\S+)", last)
    assert said and int(said[1]) == done, last
    newest = Path(said[2])  # (its workers may save once more while the run aborts)
    assert newest.parent == run and incomplete_reason(newest) is None, last
    assert 10 <= int(newest.name[len("checkpoint_"):]) <= done < 2000, last


def test_a_killed_driver_reruns_from_its_newest_complete_checkpoint(ray_local, tmp_path):
    runs = tmp_path / "runs"
    argv = ["--train", str(corpus(tmp_path / "c")), "--split", "1,0,0", "--rnn_size", "32",
            "--embed_size", "8", "--batch_size", "4", "--seq_length", "32", "--max_iters", "120",
            "--log_interval", "5", "--save_iters", "10", "--keep_checkpoints", "30",
            "--experiment_dir", str(runs), "--experiment_name", "k"]
    run = runs / "k"
    first = _driver(argv, tmp_path / "first.log")
    _wait_for_iteration(first, run, tmp_path / "first.log", 35)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything in its group, no cleanup
    first.wait(30)
    time.sleep(3)  # its workers belong to the session's Ray and may save once more before dying
    saved = sorted(p.name for p in run.glob("checkpoint_0*"))
    # the newest whole one (a checkpoint being written when the driver died does not count)
    newest = max(int(n[len("checkpoint_"):].split("_")[0]) for n in saved
                 if incomplete_reason(run / n) is None)
    assert 30 <= newest < 120, saved  # killed mid-run (a tiny model runs 120 iterations in s)

    second = _driver(argv, tmp_path / "second.log")
    assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    out = (tmp_path / "second.log").read_text()
    assert f"resuming from {storage.join(str(run), f'checkpoint_{newest:08d}')}" in out, out
    history = read_history(run / "history.csv")
    its = [r["iteration"] for r in history if not r.get("final")]
    assert its == list(range(5, 121, 5)), its  # every report once: the killed run's kept
    assert {r["resumed_from"] for r in history if r["iteration"] > newest} == {newest}
