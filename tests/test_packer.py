"""The transposed byte packer: exact streams, resets, counts, lazy input, resume, Ray shards."""
import json
import threading

import numpy as np
import pytest

from sentdisc.data.packer import BytePacker
from sentdisc.train.driver import windows_per_epoch


def make_records(n, seed=0, bad_every=0):
    """Random records (some longer than a window) and error rows, as Ray batches would hold."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            rows.append((b"", ["bad_json", "missing_key", "invalid_utf8"][(i // bad_every) % 3]))
        else:
            length = int(rng.integers(1, 40))
            rows.append((rng.integers(0, 256, length, dtype=np.uint8).tobytes(), ""))
    return rows


def as_batches(rows, sizes=(3, 7, 1, 11)):
    out, i, k = [], 0, 0
    while i < len(rows):
        chunk = rows[i:i + sizes[k % len(sizes)]]
        out.append({"bytes": np.array([r[0] for r in chunk], dtype=object),
                    "error": np.array([r[1] for r in chunk], dtype=object)})
        i, k = i + len(chunk), k + 1
    return out


def expected_windows(records, B, T, persist_state):
    """Independent model of the packer in absolute stream coordinates.

    Window k needs bytes [k*T, k*T+T] of every stream; streams 0..B-1 in turn take whole
    records from the queue until they hold that many. Reset where a record starts (0), at
    window 0 column 0 (1), never (-1).
    """
    streams = [[] for _ in range(B)]       # list of ints
    starts = [set() for _ in range(B)]
    queue = list(records)
    out = []
    k = 0
    while True:
        need = k * T + T + 1
        for b in range(B):
            while len(streams[b]) < need and queue:
                starts[b].add(len(streams[b]))
                streams[b].extend(queue.pop(0))
        if any(len(s) < need for s in streams):
            return out, streams
        x = np.array([s[k * T:need] for s in streams], dtype=np.int64)
        reset = np.zeros((B, T), bool)
        for b in range(B):
            for t in range(T):
                if persist_state == 0 and (k * T + t) in starts[b]:
                    reset[b, t] = True
        if persist_state == 1 and k == 0:
            reset[:, 0] = True
        out.append((x, reset))
        k += 1


@pytest.mark.parametrize("persist_state", [0, 1, -1])
@pytest.mark.parametrize("B,T", [(1, 5), (3, 4), (4, 16)])
def test_packer_reproduces_streams_exactly(B, T, persist_state):
    rows = make_records(120, seed=B * 100 + T, bad_every=9)
    good = [r[0] for r in rows if not r[1]]
    packer = BytePacker(B, T, persist_state)
    got = list(packer.windows(as_batches(rows)))
    want, streams = expected_windows(good, B, T, persist_state)
    full = [w for w in got if w.valid is None]  # until the input runs out: the reference's
    assert len(full) == len(want) > 0
    for w, (x, reset) in zip(full, want):
        assert w.x.shape == (B, T + 1) and w.reset.shape == (B, T)
        assert np.array_equal(w.x.numpy(), x)
        assert np.array_equal(w.reset.numpy(), reset)
        assert w.n_bytes == B * T
    # consecutive windows overlap by exactly one byte
    for a, b in zip(full, full[1:]):
        assert np.array_equal(a.x[:, -1].numpy(), b.x[:, 0].numpy())
    c = packer.counts
    assert c["records"] == len(good)
    assert c["bytes"] == sum(map(len, good))
    for reason in ("bad_json", "missing_key", "invalid_utf8"):
        assert c[f"skipped_{reason}"] == sum(r[1] == reason for r in rows) > 0
    # the epoch's last windows drain the streams: every byte is a target once, but each
    # stream's first, which is an input only; nothing is dropped, and the count is the plan's
    tail = got[len(full):]
    assert all(w.valid is not None and w.n_bytes == int(w.valid.sum()) for w in tail)
    assert c["dropped_bytes"] == 0
    assert c["bytes"] == sum(w.n_bytes for w in got) + B
    assert len(got) == windows_per_epoch(c["bytes"], B, T)


def test_each_stream_is_whole_records_in_order():
    rows = make_records(200, seed=5)
    good = [r[0] for r in rows]
    B, T = 4, 8
    packer = BytePacker(B, T, 0)
    wins = [w for w in packer.windows(as_batches(rows)) if w.valid is None]  # before the drain
    for b in range(B):
        stream = bytes(wins[0].x[b].numpy().astype(np.uint8)) + b"".join(
            bytes(w.x[b, 1:].numpy().astype(np.uint8)) for w in wins[1:])
        # input x[b, t] of window i is byte i*T + t of the stream; resets mark record starts
        starts = sorted(i * T + t for i, w in enumerate(wins) for t in range(T) if w.reset[b, t])
        assert starts[0] == 0
        pieces = [stream[s:e] for s, e in zip(starts, starts[1:])]
        idx = [good.index(p) for p in pieces]  # ValueError if a piece is not a whole record
        assert idx == sorted(idx) and len(set(idx)) == len(idx)  # increasing corpus order


def test_new_epoch_resets_every_row():
    rows = make_records(60, seed=1)
    for persist_state, want_first in [(1, True), (-1, False)]:
        packer = BytePacker(2, 6, persist_state)
        first = list(packer.windows(as_batches(rows)))
        packer.new_epoch()
        second = list(packer.windows(as_batches(rows)))
        assert packer.epoch == 1
        same = [np.array_equal(a.x.numpy(), b.x.numpy()) for a, b in zip(first, second)]
        assert same == [True] * len(first)
        assert bool(second[0].reset[:, 0].all()) is want_first
        assert not second[1].reset.any()  # state persists inside the epoch (persist 1 / -1)


def test_a_long_record_among_short_ones_is_drained_not_dropped():
    """One record at the 64 KiB cap among short ones: the stream holding it would have outlived
    the others by hundreds of windows, and its tail was dropped (the run sized at 162
    iterations ended at 105). Now the last windows re-pack what the streams hold: every byte
    is trained once, the epoch is the planned number of windows, the rows stay full."""
    rng = np.random.default_rng(0)
    short = [rng.integers(32, 127, int(rng.integers(200, 1200)), dtype=np.uint8).tobytes()
             for _ in range(150)]
    rows = [(r, "") for r in short[:10]] + [(b"L" * (64 << 10), "")] + [(r, "") for r in short[10:]]
    B, T = 8, 128
    packer = BytePacker(B, T, 0)
    got = list(packer.windows(as_batches(rows)))
    c = packer.counts
    assert c["dropped_bytes"] == 0 and c["bytes"] == sum(w.n_bytes for w in got) + B
    assert len(got) == windows_per_epoch(c["bytes"], B, T)  # what the driver plans
    tail = [w for w in got if w.valid is not None]
    assert sum(int(w.valid.sum()) for w in tail) >= 0.9 * len(tail) * B * T  # rows kept full
    long_row_starts = sum(int(w.reset.sum()) for w in tail)
    assert long_row_starts >= 2  # the long record's overflow starts afresh in other rows


def test_consumes_batches_lazily():
    pulled = []

    def batches():
        for i, batch in enumerate(as_batches(make_records(2000, seed=2), sizes=(10,))):
            pulled.append(i)
            yield batch

    packer = BytePacker(2, 8, 0)
    it = packer.windows(batches())
    next(it)
    assert len(pulled) <= 2  # a 2x9 byte window needs at most a couple of 10-record batches


def test_resume_continues_exactly():
    rows = make_records(300, seed=3, bad_every=7)
    B, T = 3, 10
    full = [w.x.numpy() for w in BytePacker(B, T, 0).windows(as_batches(rows))]
    packer = BytePacker(B, T, 0)
    it = packer.windows(as_batches(rows))
    head = [next(it).x.numpy() for _ in range(7)]
    state = json.loads(json.dumps(packer.state_dict()))  # must survive JSON
    resumed = BytePacker(B, T, 0)
    resumed.load_state_dict(state)
    tail = [w.x.numpy() for w in resumed.windows(as_batches(rows))]
    assert len(head) + len(tail) == len(full)
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, full))
    assert resumed.counts["records"] == BytePacker_counts(rows, B, T)["records"]
    with pytest.raises(ValueError, match="batch 3 x seq 10"):
        BytePacker(4, 10, 0).load_state_dict(state)


def test_a_checkpoint_in_the_epochs_drain_continues_exactly():
    """Restored in the drain, the packer planned it again from the rows it had left: rows still
    over T + 1 bytes made full windows first, then a smaller re-pack, so other windows than the
    run that saved it would have trained (a long record's overflow makes the plan visible)."""
    rows = make_records(40, seed=8)
    rows.insert(5, (b"L" * 300, ""))
    B, T = 4, 6
    for persist_state in (0, 1, -1):
        full = list(BytePacker(B, T, persist_state).windows(as_batches(rows)))
        first_tail = next(i for i, w in enumerate(full) if w.valid is not None)
        assert len(full) - first_tail >= 3
        for k in range(first_tail + 1, len(full) + 1):  # saved after k windows, in the drain
            packer = BytePacker(B, T, persist_state)
            it = packer.windows(as_batches(rows))
            head = [next(it) for _ in range(k)]
            resumed = BytePacker(B, T, persist_state)
            resumed.load_state_dict(json.loads(json.dumps(packer.state_dict())))
            tail = list(resumed.windows(as_batches(rows)))
            assert len(head) + len(tail) == len(full), (persist_state, k)
            for a, b in zip(head + tail, full):
                assert np.array_equal(a.x.numpy(), b.x.numpy()), (persist_state, k)
                assert np.array_equal(a.reset.numpy(), b.reset.numpy()), (persist_state, k)
                assert (a.valid is None) == (b.valid is None), (persist_state, k)
                if b.valid is not None:
                    assert np.array_equal(a.valid.numpy(), b.valid.numpy()), (persist_state, k)
                assert a.n_bytes == b.n_bytes
            assert resumed.counts["dropped_bytes"] == 0


def test_another_batch_or_seq_length_resumes_as_another_number_of_workers_does():
    """Resumed with another --batch_size or --seq_length on as many workers, each worker
    restored its own streams, of the old shape: ValueError in every worker, Ray Train
    restarting them to max_failures. The loop's condition (``streams_change``) now sends that
    change where another number of workers goes: fresh streams, the epoch continued past every
    rank's taken records, none read twice, none passed over."""
    from sentdisc.data.position import Position
    from sentdisc.train.loop import streams_change

    rows = make_records(300, seed=9)
    batches = as_batches(rows)
    line = 0
    for b in batches:  # the readers' file and line columns, which the position is made of
        n = len(b["bytes"])
        b["file"] = np.array(["a.json"] * n, dtype=object)
        b["line"] = np.arange(line + 1, line + n + 1)
        line += n
    shares = [batches[0::2], batches[1::2]]  # two ranks' disjoint shards
    saved = []
    for r in range(2):
        packer = BytePacker(2, 16, 0)
        it = packer.windows(shares[r])
        for _ in range(5):
            next(it)
        saved.append(json.loads(json.dumps(packer.state_dict())))
    assert streams_change(saved, 2, 4, 16) == ""
    assert streams_change(saved, 2, 4, 8) == "batch 4 x seq 16 as batch 4 x seq 8"
    assert streams_change(saved, 2, 6, 16) == "batch 4 x seq 16 as batch 6 x seq 16"
    assert streams_change(saved, 1, 4, 16) == "2 workers on 1"
    uneven = [dict(saved[0], batch_size=3), saved[1]]  # batch 5 on 2 workers: 3 + 2 streams
    assert streams_change(uneven, 2, 5, 16) == ""
    assert streams_change(uneven, 2, 4, 16) == "batch 5 x seq 16 as batch 4 x seq 16"
    with pytest.raises(ValueError, match="batch 2 x seq 16"):  # what each worker used to do
        BytePacker(2, 8, 0).load_state_dict(saved[0])
    taken = Position.union([st["position"] for st in saved])
    packed = []
    for r in range(2):
        packer = BytePacker(2, 8, 0, trace=lambda f, n: packed.append(n))
        packer.resume(saved[0]["epoch"], taken.state())
        for _ in packer.windows(shares[r]):
            pass
    before = [n for n in range(1, line + 1) if ("a.json", n) in taken]
    assert before and sorted(packed + before) == list(range(1, line + 1))


def _restored_with_full_streams(B, T):
    """A packer restored mid-epoch whose saved streams already hold more than one window."""
    packer = BytePacker(B, T, 0)
    it = packer.windows(as_batches([(b"y" * (3 * T), "")] * (2 * B)))
    next(it)
    restored = BytePacker(B, T, 0)
    restored.load_state_dict(json.loads(json.dumps(packer.state_dict())))
    assert all(len(buf) > T for buf in restored._buf)
    return restored


def test_restored_packer_joins_its_input_before_the_first_window():
    # Ray Data's streaming split starts an epoch only when every rank asks for data; a rank
    # that trained on its saved streams first would deadlock DDP (see the Ray test below).
    pulled = []

    def batches():
        pulled.append("started")
        yield from as_batches(make_records(50, seed=5))

    next(_restored_with_full_streams(2, 8).windows(batches()))
    assert pulled == ["started"]


def BytePacker_counts(rows, B, T):
    packer = BytePacker(B, T, 0)
    for _ in packer.windows(as_batches(rows)):
        pass
    return packer.counts


def test_bad_arguments():
    with pytest.raises(ValueError, match="persist_state"):
        BytePacker(2, 4, 2)
    with pytest.raises(ValueError, match="batch_size"):
        BytePacker(0, 4, 0)


def test_two_ray_workers_get_disjoint_shards_packed_exactly(ray_local, tmp_path):
    """Each of 2 Train workers' shards, as the run's DataConfig splits the dataset, packs
    exactly the records it received; together they hold the whole corpus once, an odd number
    of records too (Ray Train's own DataConfig splits equal=True, dropping one here)."""
    from sentdisc.data import DataConfig, read_dataset
    from sentdisc.train.resume import data_config

    texts = []
    for shard in range(4):
        with open(tmp_path / f"part-{shard}.json", "w") as f:
            for i in range(50 + (shard == 0)):
                text = f"shard {shard} review {i} " + "x" * (i % 13)
                texts.append(text)
                f.write(json.dumps({"reviewText": text}) + "\n")
    ds = read_dataset(str(tmp_path), DataConfig())
    # as Ray Train V2 configures each dataset (no worker handles; node ids only for locality)
    splits = [s["train"] for s in data_config(str(tmp_path / "run"), "").configure(
        {"train": ds}, 2, None, None)]
    seen = [[], []]
    windows = [[], []]
    packers = [BytePacker(2, 16, 0), BytePacker(2, 16, 0)]

    def consume(rank):
        def batches():
            for batch in splits[rank].iter_batches(batch_size=8, batch_format="numpy"):
                seen[rank].extend(bytes(b) for b in batch["bytes"])
                yield batch
        windows[rank] = [(w.x.numpy(), w.reset.numpy()) for w in packers[rank].windows(batches())
                         if w.valid is None]  # the windows before the epoch's drain

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    from sentdisc.text import encode
    corpus = sorted(encode(t).tobytes() for t in texts)
    assert sorted(seen[0] + seen[1]) == corpus
    assert not set(seen[0]) & set(seen[1]) and seen[0] and seen[1]
    for rank in range(2):
        want, _ = expected_windows(seen[rank], 2, 16, 0)
        assert len(windows[rank]) == len(want) > 0
        for (x, reset), (wx, wreset) in zip(windows[rank], want):
            assert np.array_equal(x, wx) and np.array_equal(reset, wreset)


def test_restored_and_fresh_ranks_do_not_deadlock_on_a_streaming_split(ray_local, tmp_path):
    """Two DDP-like consumers in lockstep after a restore: rank 0's saved streams fill its first
    window, rank 1 starts empty. Both must get their first window (the split's epoch barrier
    needs both to ask for data) before meeting at the all-reduce stand-in."""
    from sentdisc.data import DataConfig, read_dataset

    for shard in range(4):
        with open(tmp_path / f"part-{shard}.json", "w") as f:
            for i in range(50):
                f.write(json.dumps({"reviewText": f"review {i} " + "z" * (i % 17)}) + "\n")
    splits = read_dataset(str(tmp_path), DataConfig()).streaming_split(2, equal=False)
    packers = [_restored_with_full_streams(2, 16), BytePacker(2, 16, 0)]
    all_reduce = threading.Barrier(2, timeout=60)
    got = [None, None]

    def rank(r):
        it = packers[r].windows(splits[r].iter_batches(batch_size=8, batch_format="numpy"))
        got[r] = next(it, None)
        all_reduce.wait()  # raises BrokenBarrierError in the rank that waited in vain
        for _ in it:  # drain, so the split's epoch finishes
            pass

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "the ranks deadlocked"
    assert not all_reduce.broken and got[0] is not None and got[1] is not None
