"""Pretraining on a real local Ray: DDP over two CPU workers, a worker killed and recovered,
explicit resume, outputs on disk. One Train run is shared by several tests (each costs ~20 s+)."""
import json
import math
import random
import time
from pathlib import Path

import pytest

from sentdisc.checkpoint import load, load_optimizer_state, load_train_state
from sentdisc.config import OutputConfig, expand, parse
from sentdisc.data.readers import DataConfig
from sentdisc.errors import InputError
from sentdisc.model import ModelConfig
from sentdisc.recipes import pretrain as recipe
from sentdisc.report import merge_rows, read_history
from sentdisc.train import TrainConfig, lr_multiplier, plan_iterations, pretrain

WORDS = ("good bad great awful movie book plot story acting boring fun love hate "
         "the a was is and but not very").split()
BAD_LINES = [b'{"reviewText": "broken json\n', b'{"summary": "no text field"}\n',
             b'{"reviewText": ""}\n', b'{"reviewText": "caf\xe9 latte"}\n']
REASONS = ("bad_json", "missing_key", "empty_text", "invalid_utf8")
N_SHARDS, N_LINES = 4, 240
REPO = Path(__file__).resolve().parents[1]
MAX_ITERS, FAIL_AT, SAVE_ITERS, LR = 40, 17, 10, 3e-3


def write_corpus(folder, seed=0):
    """Loose-JSON shards with one malformed record of each kind every 40 lines."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bad = dict.fromkeys(REASONS, 0)
    for s in range(N_SHARDS):
        with open(folder / f"shard{s}.json", "wb") as f:
            for i in range(N_LINES):
                if i % 10 == 3:
                    k = (i // 10) % 4
                    f.write(BAD_LINES[k])
                    bad[REASONS[k]] += 1
                    continue
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
                f.write(json.dumps({"reviewText": f"This {text}.", "overall": 5}).encode() + b"\n")
    return bad


def tiny_configs(tmp, name, **train):
    model = ModelConfig(embed_size=8, rnn_size=32)
    data = DataConfig(train=str(tmp / "corpus"), split="90,10,0")
    cfg = dict(batch_size=8, seq_length=32, lr=LR, max_iters=MAX_ITERS, log_interval=5,
               save_iters=SAVE_ITERS, num_workers=2, keep_checkpoints=3, max_failures=1)
    cfg.update(train)
    return model, data, TrainConfig(**cfg), OutputConfig(str(tmp / "runs"), name)


@pytest.fixture(scope="module")
def ddp_run(ray_local, tmp_path_factory):
    """2 CPU workers, DDP, rank 1 SIGKILLs itself once at iteration FAIL_AT."""
    tmp = tmp_path_factory.mktemp("pretrain")
    bad = write_corpus(tmp / "corpus")
    summary = pretrain(*tiny_configs(tmp, "ddp", fail_at_iter=FAIL_AT), progress=False)
    return tmp, bad, summary


def _param_sum(model):
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def test_ddp_loss_falls_and_ranks_stay_identical(ddp_run):
    tmp, _, summary = ddp_run
    rows = [r for r in summary["rows"] if not r.get("final")]
    assert len(rows) >= MAX_ITERS // 5
    first, last = rows[0]["loss"], summary["rows"][-1]["loss"]
    assert last < first - 0.2, (first, last)
    for row in summary["rows"]:
        assert row["world_size"] == 2
        assert len(row["param_checksums"]) == 2
        assert row["param_checksum_spread"] == 0.0, row["param_checksums"]
    # the checksum really is of the weights: the final checkpoint's parameters sum to it
    final = load(summary["checkpoint"])
    assert math.isclose(_param_sum(final), summary["rows"][-1]["param_checksum"], rel_tol=1e-12)
    # and the weights moved: the checksums of successive reports differ
    assert len({r["param_checksum"] for r in rows}) > len(rows) // 2


def test_killed_worker_is_recovered_from_checkpoint(ddp_run):
    tmp, _, summary = ddp_run
    marker = tmp / "runs" / "ddp" / ".fail_at_iter_done"
    assert marker.exists(), "the fault was never injected"
    assert f"iteration {FAIL_AT}" in marker.read_text()
    before = [r for r in summary["rows"] if r["resumed_from"] == 0]
    after = [r for r in summary["rows"] if r["resumed_from"] > 0]
    restored = FAIL_AT // SAVE_ITERS * SAVE_ITERS
    assert before and after and {r["resumed_from"] for r in after} == {restored}
    assert after[0]["iteration"] == restored + 5  # the count continued, not restarted
    assert summary["iterations"] == MAX_ITERS
    for row in after:  # the lr schedule continued: linear decay over MAX_ITERS
        assert row["lr"] == pytest.approx(LR * (1 - row["iteration"] / MAX_ITERS), abs=1e-12)
    # history.csv keeps one row per iteration: the dead attempt's rows after the checkpoint go
    history = read_history(summary["history"])
    its = [r["iteration"] for r in history if not r.get("final")]
    assert its == list(range(5, MAX_ITERS + 1, 5))
    assert load_train_state(summary["checkpoint"])["iteration"] == MAX_ITERS


def test_outputs_and_malformed_records_counted(ddp_run):
    tmp, bad, summary = ddp_run
    run_dir = tmp / "runs" / "ddp"
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = read_history(run_dir / "history.csv")
    assert {"loss", "bpb", "lr", "bytes_per_s", "skipped_bad_json", "eta_s"} <= set(history[0])
    final = history[-1]
    assert final["final"] is True
    for reason in REASONS:  # every kind seen by the workers was counted, none invented
        assert 0 < final[f"skipped_{reason}"] <= bad[reason], reason
    assert final["skipped_total"] == sum(final[f"skipped_{r}"] for r in REASONS)
    assert summary["skipped_total"] == final["skipped_total"]
    # bits per byte is loss / ln 2, val evaluated after training near the training loss
    assert final["bpb"] == pytest.approx(final["loss"] / math.log(2))
    assert summary["val_bpb"] is not None and abs(summary["val_bpb"] - summary["train_bpb"]) < 0.5
    assert summary["test_bpb"] is None  # split 90,10,0 has no test set
    assert final["bytes_seen"] == MAX_ITERS * 8 * 32
    # Ray Train kept the newest checkpoints only; the final one is in sentdisc's format
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert len(kept) <= 3 and kept[-1] == f"checkpoint_{MAX_ITERS:08d}_final", kept
    assert load(run_dir / "checkpoint_final").config.rnn_size == 32
    assert json.loads((run_dir / "summary.json").read_text())["val_bpb"] == summary["val_bpb"]


def test_resume_continues_iteration_lr_and_optimizer(ddp_run):
    tmp, _, first = ddp_run
    source = tmp / "runs" / "ddp" / f"checkpoint_{3 * SAVE_ITERS:08d}"
    assert source.exists(), sorted(p.name for p in source.parent.iterdir())
    resumed_at = load_train_state(source)["iteration"]
    summary = pretrain(*tiny_configs(tmp, "resumed", resume=str(source), num_workers=1),
                       progress=False)
    rows = [r for r in summary["rows"] if not r.get("final")]
    assert rows[0]["resumed_from"] == resumed_at and rows[0]["iteration"] == resumed_at + 5
    assert summary["iterations"] == MAX_ITERS
    lr_first = {r["iteration"]: r["lr"] for r in first["rows"]}
    for row in rows:
        assert row["lr"] == pytest.approx(lr_first[row["iteration"]], abs=1e-12)
    # Adam's step count carried over: 40 steps in all, not 10
    state = load_optimizer_state(summary["checkpoint"])["optimizer"]["state"]
    assert int(next(iter(state.values()))["step"]) == MAX_ITERS
    assert load_train_state(summary["checkpoint"])["iteration"] == MAX_ITERS


def test_a_resume_behind_the_runs_newest_checkpoint_is_refused(ddp_run):
    tmp, _, _ = ddp_run
    run = tmp / "runs" / "ddp"
    older = run / f"checkpoint_{3 * SAVE_ITERS:08d}"  # (kept: the resume test uses it)
    with pytest.raises(InputError, match=(
            rf"--resume {older} \(iteration {3 * SAVE_ITERS}\) is behind {run}/checkpoint_\d+"
            r"_final \(iteration \d+\), the newest checkpoint of .*: to continue from it, give "
            r"the run its own --experiment_name")):
        pretrain(*tiny_configs(tmp, "ddp", resume=str(older)), progress=False)


def test_missing_path_fails_before_any_worker(ray_local, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = recipe.main(["--train", str(tmp_path / "no_such_corpus"), "--rnn_size", "16",
                        "--max_iters", "5", "--experiment_dir", str(runs)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no_such_corpus" in err and "no such file" in err
    assert not runs.exists()  # nothing started, nothing written


def test_the_start_line_says_what_the_run_asks_of_which_cluster(ray_local):
    from sentdisc.train.resources import starting_line

    assert starting_line(TrainConfig(num_workers="1-3", worker_resources="trainer=1")) == (
        "starting 1-3 (elastic) Ray Train workers x 1 CPU + 1 trainer (gloo) on 4 CPUs (1 node); "
        "the first report comes once they are up and have read their first data")
    assert starting_line(TrainConfig(cpus_per_worker=0.5)).startswith(
        "starting 1 Ray Train worker x 0.5 CPU (gloo) on 4 CPUs (1 node); the first report "
        "comes once it is up")


def test_count_train_bytes_matches_the_encoded_good_records(ddp_run):
    from sentdisc.data.readers import read_dataset
    from sentdisc.text import encode
    from sentdisc.train import count_train_bytes

    tmp, _, _ = ddp_run
    expected = 0
    for path in sorted((tmp / "corpus").glob("*.json")):
        for raw in path.read_bytes().splitlines():
            try:
                text = json.loads(raw).get("reviewText")
            except ValueError:
                continue
            if text:
                expected += len(encode(text))
    assert count_train_bytes(read_dataset(str(tmp / "corpus"), DataConfig())) == expected


def test_linear_schedule_needs_run_length_for_uncountable_data(ddp_run, monkeypatch):
    from sentdisc.train import driver

    tmp, _, _ = ddp_run
    monkeypatch.setattr(driver, "COUNT_LIMIT_BYTES", 0)  # as if the corpus were terabytes
    corpus = DataConfig(train=str(tmp / "corpus"))
    with pytest.raises(ValueError, match="max_iters"):
        plan_iterations(corpus, TrainConfig(), None)
    assert plan_iterations(corpus, TrainConfig(lr_scheduler="none"), None) is None
    assert plan_iterations(corpus, TrainConfig(max_iters=7), None) == 7


def test_lr_schedules():
    linear = lr_multiplier(TrainConfig(max_iters=100), 100)
    assert [linear(i) for i in (0, 50, 100, 150)] == [1.0, 0.5, 0.0, 0.0]
    warm = lr_multiplier(TrainConfig(warmup_iters=4, lr_scheduler="none"), None)
    assert [warm(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    expo = lr_multiplier(TrainConfig(lr_scheduler="ExponentialLR", lr_factor=0.5), None)
    assert [expo(i) for i in range(3)] == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=3, num_workers="2-4"), "must be >= the most workers"),
    (dict(num_workers="4-2"), "MIN-MAX"),
    (dict(num_workers="two"), "MIN-MAX"),
    (dict(optimizer_type="Adamm"), "not a torch.optim optimizer"),
    (dict(precision="fp16"), "needs use_gpu"),
    (dict(lr_scheduler="cosine"), "lr_scheduler"),
    (dict(seq_length=0), "seq_length"),
])
def test_bad_train_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_configs_parse_and_paths_expand(monkeypatch, tmp_path):
    classes = [ModelConfig, DataConfig, TrainConfig, OutputConfig]
    model, data, train, _ = parse(classes, ["--config", str(REPO / "jobs/configs/paper.yaml")])
    assert (model.rnn_size, model.embed_size, model.weight_norm) == (4096, 64, "all")
    assert (train.batch_size, train.seq_length, train.lr) == (128, 256, 5e-4)
    assert (train.optimizer_type, train.schedule, train.use_gpu, train.num_workers) == (
        "Adam", "linear", True, 8)
    local = ["--config", str(REPO / "jobs/configs/local.yaml"), "--rnn_size", "64"]
    monkeypatch.setenv("SENTDISC_DATA", str(tmp_path))
    model, data, train, out = parse(classes, local)  # parse expands the path fields
    assert model.rnn_size == 64 and not train.use_gpu and train.max_iters > 0
    assert out.experiment_name == "local"
    assert data.train == f"{tmp_path}/amazon_blitzer/reviews"
    monkeypatch.delenv("SENTDISC_DATA")
    assert parse(classes, local)[1].train.endswith("shared/data/amazon_blitzer/reviews")
    assert expand("${NO_SUCH_VAR_X:-/fallback}/a") == "/fallback/a"
    with pytest.raises(ValueError, match="NO_SUCH_VAR_X"):
        expand("$NO_SUCH_VAR_X/a")


def test_the_total_batch_is_kept_on_any_number_of_workers():
    from sentdisc.train.config import per_worker_batch

    for world in range(1, 9):
        shares = [per_worker_batch(10, world, r) for r in range(world)]
        assert sum(shares) == 10 and max(shares) - min(shares) <= 1, (world, shares)
    tc = TrainConfig(batch_size=8, num_workers="2-4")
    assert (tc.min_workers, tc.max_workers, tc.scaling) == (2, 4, (2, 4))
    assert TrainConfig(num_workers="3-3", batch_size=6).scaling == 3


def test_history_rows_after_a_restart_replace_the_dead_attempt():
    rows = merge_rows([], [{"iteration": i} for i in (5, 10, 15)])
    rows = merge_rows(rows, [{"iteration": 15, "resumed_from": 10}, {"iteration": 20},
                             {"iteration": 20, "final": True}])
    assert [(r["iteration"], r.get("resumed_from")) for r in rows] == [
        (5, None), (10, None), (15, 10), (20, None), (20, None)]
    assert rows[-1]["final"]


def test_a_corpus_of_only_bad_records_fails_on_the_driver_with_the_counts(ray_local, tmp_path,
                                                                          capsys):
    import time

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.json").write_bytes(b"".join(BAD_LINES * 5) + b'{"reviewText": 12345}\n\n')
    t0 = time.time()
    code = recipe.main(["--train", str(folder), "--rnn_size", "16", "--max_iters", "5",
                        "--experiment_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "every record of --train" in err and str(folder) in err
    for reason in ("5 bad_json", "5 missing_key", "5 empty_text", "5 invalid_utf8", "1 not_text",
                   "1 blank"):
        assert reason in err, (reason, err)
    assert time.time() - t0 < 60


def test_an_over_long_record_is_capped_and_the_run_sized_to_what_the_packer_uses(ray_local,
                                                                                 tmp_path):
    from sentdisc.data import BytePacker, read_dataset
    from sentdisc.data.readers import survey

    rng = random.Random(3)
    folder = tmp_path / "long"
    folder.mkdir()
    with open(folder / "a.json", "w") as f:
        for i in range(30_000):  # ~3 MB of reviews: much more than batch x max_record_bytes
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
            f.write(json.dumps({"reviewText": text}) + "\n")
            if i == 200:  # one 5 MB record, as the corpus fuzz found
                f.write(json.dumps({"reviewText": "spam " * 1_000_000}) + "\n")
    cfg = DataConfig(train=str(folder), split="1,0,0")
    tc = TrainConfig(batch_size=4, seq_length=32, lr_scheduler="linear")
    ds = read_dataset(str(folder), cfg)
    planned = plan_iterations(cfg, tc, ds)
    counts = survey(ds)
    assert counts["capped_records"] == 1 and counts["capped_bytes"] > 4_000_000
    packer = BytePacker(4, 32)
    windows = sum(1 for _ in packer.windows(ds.iter_batches(batch_format="numpy")))
    # the linear schedule reaches 0 where the epoch really ends: the packer drains its streams
    # at the end (the capped record's tail included), so the plan is exact on one worker
    assert planned == windows, (planned, windows, packer.counts)
    assert packer.counts["capped_records"] == 1 and packer.counts["dropped_bytes"] == 0


def test_history_read_while_it_is_written_leaves_out_the_partial_row(tmp_path):
    from sentdisc.report import read_history, write_history

    rows = [{"iteration": i, "loss": 1.0 / i, "world_size": 2} for i in range(1, 4)]
    path = write_history(rows, tmp_path / "history.csv")
    whole = path.read_text()
    path.write_text(whole[:whole.rindex(",")])  # the last row cut mid-way, as a reader may see
    assert read_history(path) == rows[:2]
    path.write_text(whole)
    assert read_history(path) == rows


def test_a_failed_history_write_is_said_once_retried_and_the_watchdog_lives_on(ray_local, capsys):
    from sentdisc.train.progress import Progress, send

    handed = []

    def on_rows(rows):  # as a storage outage would: the first two writes fail
        handed.append([r["iteration"] for r in rows])
        if len(handed) <= 2:
            raise OSError("s3://bucket/run/history.csv: connection reset")

    with Progress(printed=False, on_rows=on_rows, every_s=0.1, stall_warn_s=1.0) as watch:
        send(watch.actor_name, {"iteration": 5})
        deadline = time.time() + 20
        while len(handed) < 3 and time.time() < deadline:
            time.sleep(0.05)
        send(watch.actor_name, {"iteration": 10})
        time.sleep(1.5)  # no report for longer than stall_warn_s: the watchdog still speaks
    out = capsys.readouterr().out
    assert handed[:3] == [[5], [5], [5]] and handed[-1] == [10], handed  # none lost
    assert out.count("could not record the reports (OSError: s3://bucket/run/history.csv: "
                     "connection reset)") == 1, out
    assert "recording the reports again" in out and "waiting for the cluster" in out, out
