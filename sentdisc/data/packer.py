"""Records -> "transposed" training windows: B parallel byte streams read T bytes at a time.

As in Radford et al. (2017) and NVIDIA's sentiment-discovery, a batch is not B independent
samples but B long byte streams, each made of whole records laid end to end. Row b of
consecutive windows continues the same stream, so the recurrent state carried from one window
to the next is the state of the text that really preceded it. A stream that runs out takes the
next whole record from the (in-order) record queue.

Windows are [B, T+1] and overlap by one byte: inputs ``x[:, :-1]``, targets ``x[:, 1:]``, and
the next window starts with this window's last byte. ``reset[b, t]`` asks the model to zero row
b's state before reading input ``x[b, t]``:

- ``persist_state=0``: wherever a record starts (each record read from a fresh state);
- ``persist_state=1``: all rows at the first window of each epoch (state flows across records);
- ``persist_state=-1``: never.

Batches are pulled from the iterator only when a stream needs bytes, so memory is the current
Ray batch plus B partial records whatever the corpus size.

When the input runs out, what the streams still hold is not dropped: the epoch ends with
``ceil(left / (B T))`` more windows into which it is re-packed (``_drain``). Each stream keeps
its own bytes as far as they fit, so its state carries on; what overflows (a long record that
one stream held while the others ran dry) moves to rows with room, starting there as a record
would (reset under ``persist_state=0``); rows that end early are padded, and ``Window.valid``
says which targets are real. So every byte of an epoch is a target once, and a worker's epoch
is exactly ``ceil((bytes - B) / (B T))`` windows, which is what the driver plans the run by.
The drain's plan is part of the state, so a packer restored in the middle of it gives the
same windows as the one that saved it.

``counts``: ``records`` and ``bytes`` packed, ``dropped_bytes`` (partial streams dropped when a
run resumes on another number of workers or with another batch or seq_length, or a byte a
moved piece loses to a row that held nothing), ``windows``,
``capped_records`` / ``capped_bytes`` (records cut to max_record_bytes, from the ``capped``
column), ``resumed_past`` (rows a restored run passed over: taken before its checkpoint) and
``skipped_<reason>`` per bad row, reasons from ``REASONS``.

Where the epoch is: ``position`` (``sentdisc.data.position``), the (file, line) ranges of every
row taken, when rows carry ``file`` and ``line`` (the readers' do); rows without them are
counted instead (``records_consumed``), which resumes exactly only for the same input order.
"""
from __future__ import annotations

import base64
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sentdisc.data.position import Position, split_membership

# Always present; skipped_<reason> keys appear as those reasons are met.
COUNTS = ("records", "bytes", "dropped_bytes", "windows", "capped_records", "capped_bytes",
          "resumed_past")


@dataclass
class Window:
    x: torch.Tensor      # int64 [B, T+1]: inputs x[:, :-1], targets x[:, 1:]
    reset: torch.Tensor  # bool [B, T]: zero the state before reading x[:, t]
    n_bytes: int         # bytes predicted in this window (B * T, fewer in an epoch's last)
    valid: torch.Tensor | None = None  # bool [B, T]: real targets (None: all), the last ones


def _rows(batch) -> tuple[list, list | None, list | None, list | None, list | None]:
    """A batch (dict of numpy arrays, or a pyarrow Table) -> (bytes, error, capped, file, line)
    values (None for a column the batch lacks)."""
    if hasattr(batch, "column_names"):  # pyarrow Table / RecordBatch
        col = lambda name: batch.column(name).to_pylist() if name in batch.column_names else None
    else:
        col = lambda name: list(batch[name]) if name in batch else None
    return col("bytes"), col("error"), col("capped"), col("file"), col("line")


class BytePacker:
    """Packs a stream of record batches into [B, T+1] windows with a reset mask.

    ``split``: {lo, hi, root, seed} of the split being read (``readers.train_split``), so the
    position's ranges can span other splits' lines; ``trace``: called with (file, line) of each
    record as it enters a stream (tests of the data position).
    """

    def __init__(self, batch_size: int, seq_length: int, persist_state: int = 0,
                 split: dict | None = None, trace=None):
        if batch_size < 1 or seq_length < 1:
            raise ValueError(f"batch_size and seq_length must be >= 1, got {batch_size}, {seq_length}")
        if persist_state not in (-1, 0, 1):
            raise ValueError(f"persist_state must be -1, 0 or 1, got {persist_state}")
        self.B, self.T, self.persist_state = batch_size, seq_length, persist_state
        self.counts: dict = dict.fromkeys(COUNTS, 0)
        self.epoch = 0
        self._in_split = split_membership(**split) if split else None
        self.position = Position(in_split=self._in_split)  # rows taken this epoch, by name
        self._past = Position()  # rows a restored epoch passes over (every rank's, taken before)
        self._consumed = 0       # rows taken from this epoch's input, bad ones included
        self._skip = 0           # rows to pass over by count (inputs without file and line)
        self._trace = trace
        self._reset_all = persist_state != -1
        self._clear_streams()

    def _clear_streams(self):
        # Per stream: pending bytes (a window starts at buf[0]) and record starts within buf.
        self._buf = [bytearray() for _ in range(self.B)]
        self._starts: list[deque] = [deque() for _ in range(self.B)]
        self._carried = False  # True once buf[0] of each stream was a target already
        self._drain_left = 0   # windows the epoch's drain still has to give, as planned

    def new_epoch(self) -> None:
        """Start a new pass (the streams were drained by the last one's windows, or are
        dropped, counted, when it stopped early) and, for persist_state 1, reset every row at
        the next window."""
        self._drop_partial()
        self.epoch += 1
        self._consumed = 0
        self._skip = 0
        self.position, self._past = Position(in_split=self._in_split), Position()
        self._reset_all = self.persist_state != -1

    def _drop_partial(self):
        # A stream's first byte was already a target of the previous window, hence the -1.
        self.counts["dropped_bytes"] += sum(max(len(b) - int(self._carried), 0) for b in self._buf)
        self._clear_streams()

    def _records(self, batches: Iterable) -> Iterator[bytes]:
        """Good records in input order; bad rows counted as skipped_<reason>, records cut to
        max_record_bytes as capped_records (and the bytes cut as capped_bytes)."""
        for batch in batches:
            data, errors, capped, files, lines = _rows(batch)
            for i, value in enumerate(data):
                if self._skip:
                    self._skip -= 1
                    self._consumed += 1
                    continue
                if files is not None:
                    name = (files[i], int(lines[i]))
                    if name in self._past:
                        self.counts["resumed_past"] += 1
                        continue
                    self.position.take(*name)
                self._consumed += 1
                reason = errors[i] if errors is not None else ""
                if not reason and (value is None or len(value) == 0):
                    reason = "empty_text"
                if reason:
                    key = f"skipped_{reason}"
                    self.counts[key] = self.counts.get(key, 0) + 1
                    continue
                self.counts["records"] += 1
                self.counts["bytes"] += len(value)
                if capped is not None and capped[i]:
                    self.counts["capped_records"] += 1
                    self.counts["capped_bytes"] += int(capped[i])
                if self._trace is not None and files is not None:
                    self._trace(files[i], int(lines[i]))
                yield bytes(value)

    def windows(self, batches: Iterable) -> Iterator[Window]:
        """Yield windows until the input runs out, then the windows its streams still fill
        (``_drain``)."""
        B, T = self.B, self.T
        records = self._records(batches)
        # Join the input before the first window, even when restored streams could fill it:
        # a Ray Data streaming split starts an epoch only once every rank has asked for data,
        # so a rank that trains on its buffers first leaves the others blocked at that barrier
        # while it blocks in DDP's all-reduce waiting for them.
        first = next(records, None)
        if first is not None:
            records = itertools.chain((first,), records)
            self._drain_left = 0  # more input after all: the drain is planned again at its end
        elif self._drain_left:
            # restored in an epoch's drain: planning it again from the rows it left gives other
            # windows (rows still over T + 1 bytes would make full windows first)
            yield from self._drain_windows()
            self._reset_all = self.persist_state != -1
            return
        while True:
            x = np.empty((B, T + 1), np.uint8)
            reset = np.zeros((B, T), bool)
            for b in range(B):  # fill every stream first: an incomplete window is not emitted
                buf, starts = self._buf[b], self._starts[b]
                while len(buf) < T + 1:
                    rec = next(records, None)
                    if rec is None:
                        yield from self._drain()
                        self._reset_all = self.persist_state != -1
                        return
                    starts.append(len(buf))
                    buf += rec
            for b in range(B):
                self._cut_row(b, x, reset)
            self._window_done(reset)
            yield Window(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(reset), B * T)

    def _cut_row(self, b: int, x: np.ndarray, reset: np.ndarray) -> int:
        """Row ``b`` of a window: up to T + 1 bytes of stream ``b`` into ``x[b]``, its record
        starts into ``reset[b]``; the stream moves on by T. Returns the bytes copied."""
        T, buf, starts = self.T, self._buf[b], self._starts[b]
        m = min(len(buf), T + 1)
        x[b, :m] = np.frombuffer(buf, np.uint8, count=m)
        if self.persist_state == 0:
            for s in starts:
                if s < T:
                    reset[b, s] = True
        # Keep the last byte: it is the next window's first input.
        del buf[:T]
        while starts and starts[0] < T:
            starts.popleft()
        for i in range(len(starts)):
            starts[i] -= T
        return m

    def _window_done(self, reset: np.ndarray) -> None:
        self._carried = True
        if self._reset_all:
            reset[:, 0] = True
            self._reset_all = False
        self.counts["windows"] += 1

    def _drain(self) -> Iterator[Window]:
        """The epoch's last windows: every byte the streams still hold, re-packed."""
        B, T = self.B, self.T
        carried = int(self._carried)
        # bytes each stream still has to predict: all but its first, which is an input only
        # (a target of the last window when carried, else the first byte the stream read)
        left = sum(max(len(b) - 1, 0) for b in self._buf)
        n = -(-left // (B * T))
        if n == 0:
            self.counts["dropped_bytes"] += sum(max(len(b) - carried, 0) for b in self._buf)
            self._clear_streams()
            return
        room = n * T + 1  # bytes a row holds over n windows
        pieces = []       # what overflows its own row: (bytes, record starts within them)
        for b in range(B):
            buf, starts = self._buf[b], self._starts[b]
            if len(buf) > room:  # the row keeps [0, room): its last byte was a target
                rest = bytes(buf[room:])
                pieces.append((rest, [s - room for s in starts if s >= room]))
                del buf[room:]
                self._starts[b] = deque(s for s in starts if s < room)
        for piece, starts in pieces:
            while piece:
                b = min(range(B), key=lambda r: len(self._buf[r]))  # the row with most room
                buf = self._buf[b]
                if not buf:  # its first byte is an input only: one byte goes unpredicted
                    self.counts["dropped_bytes"] += 1
                take = min(room - len(buf), len(piece))
                if take == 0:  # cannot happen (B rows of room hold what B streams held)
                    self.counts["dropped_bytes"] += len(piece)
                    break
                at = len(buf)
                self._starts[b].extend([at] + [at + s for s in starts if 0 < s < take])
                buf += piece[:take]
                piece, starts = piece[take:], [s - take for s in starts if s >= take]
        self._drain_left = n
        yield from self._drain_windows()

    def _drain_windows(self) -> Iterator[Window]:
        """The drain's planned windows still to come (``_drain_left``), cut from its rows."""
        B, T = self.B, self.T
        while self._drain_left:
            x = np.zeros((B, T + 1), np.uint8)
            valid = np.zeros((B, T), bool)
            reset = np.zeros((B, T), bool)
            for b in range(B):
                m = self._cut_row(b, x, reset)
                valid[b, :max(m - 1, 0)] = True
            self._window_done(reset)
            self._drain_left -= 1  # before the yield: a checkpoint there sees what is left
            yield Window(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(reset),
                         int(valid.sum()), torch.from_numpy(valid))
        self._clear_streams()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """JSON-able: where the epoch is (the rows taken: ``position``, or their count) plus
        each stream's pending bytes.

        Resuming feeds the same epoch's input from its start; the packer passes over what was
        taken, so windows continue exactly where they stopped (``load_state_dict``; in an
        epoch's drain too: ``drain_left`` keeps its plan), or, on another number of workers or
        another batch or seq_length, from every rank's taken rows at once (``resume``)."""
        past = Position.union([self._past.state(), self.position.state()])
        return {
            "batch_size": self.B, "seq_length": self.T, "persist_state": self.persist_state,
            "epoch": self.epoch, "records_consumed": self._consumed,
            "position": past.state(),
            "reset_all": self._reset_all, "counts": dict(self.counts),
            "streams": [base64.b64encode(bytes(b)).decode("ascii") for b in self._buf],
            "starts": [list(s) for s in self._starts], "carried": self._carried,
            "drain_left": self._drain_left,
        }

    def load_state_dict(self, state: dict, position: dict | None = None) -> None:
        """Continue this packer's own epoch exactly: its streams and what it had taken (or
        ``position``: what every rank had taken, of which this one's is a part)."""
        if (state["batch_size"], state["seq_length"]) != (self.B, self.T):
            raise ValueError(f"packer state is for batch {state['batch_size']} x seq "
                             f"{state['seq_length']}, this packer is {self.B} x {self.T}")
        position = state.get("position") or {} if position is None else position
        self.resume(state["epoch"], position, state["counts"])
        if not state.get("position"):  # inputs without file and line: pass over by count
            self._skip = int(state["records_consumed"])
        self._reset_all = bool(state["reset_all"])
        self._buf = [bytearray(base64.b64decode(s)) for s in state["streams"]]
        self._starts = [deque(int(v) for v in s) for s in state["starts"]]
        self._carried = bool(state.get("carried", True))
        self._drain_left = int(state.get("drain_left", 0))

    def has_past(self) -> bool:
        """Whether a restored epoch has records to pass over."""
        return len(self._past) > 0

    def resume(self, epoch: int, position: dict, counts: dict | None = None) -> None:
        """Continue an epoch from the rows every rank had taken (``Position.union`` of their
        states), with fresh streams: what this rank's streams held of partly packed records is
        lost (at most batch_size records), and nothing is read twice."""
        self.epoch = int(epoch)
        self._consumed, self._skip = 0, 0
        self._past = Position(position)
        self.position = Position(in_split=self._in_split)
        self.counts = {**dict.fromkeys(COUNTS, 0), **(counts or {})}  # older states lack some
