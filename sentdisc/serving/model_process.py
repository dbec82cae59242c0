"""The model in a process of its own, featurizing one running batch that texts join and leave
at any chunk.

Why a process: a model thread inside the server shares the GIL with the event loop that
parses requests. Each torch op hands the GIL back and must win it again, and a busy loop keeps
it for its whole switch interval, so the two take turns. Measured here: the plain uvicorn
server at 32 clients kept 1.0 core busy and left the second idle. A featurize call next to a
busy Python thread ran 300x slower. In a process of its own the model runs at in-process speed
while the loop answers HTTP on the other core.

Why a running batch: featurize's pool (sentdisc.features) already refills a row as soon as its
text ends. Here its queue is fed while it runs: a request's texts join the rows at the next
chunk boundary (every ``STREAM_CHUNK`` bytes), and each request is answered once its own texts
end. The model never waits for a round of clients to come back, and no call pays for its
longest text. Batching whole calls instead was measured: at 32 clients, closed-loop requests
took turns in two groups, and a call of 32 random texts ran at 0.52 of the length-sorted
ceiling.

One child per server, started with ``spawn`` (so none of the server's threads are forked),
holds the one model. Other model work (heatmaps, generation) is sent as calls, which run
between chunks; a function sent takes ``MODEL`` where the model goes. Only this server's own
objects cross the pipe (texts, arrays, the library's exceptions). The child exits when its
parent dies: a killed Serve replica leaves nothing behind.
"""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future

import numpy as np

STREAM_CHUNK = 32  # bytes between admissions: a new text waits at most this many steps


class _ModelPlaceholder:
    """Stands for the child's model in a call's arguments."""


MODEL = _ModelPlaceholder()


class ModelProcessDied(RuntimeError):
    """The model's process is gone (killed, out of memory): this server cannot answer."""


class ModelProcess:
    def __init__(self, checkpoint: str, device: str, threads: int, precision: str = "auto"):
        """Start the child and load ``checkpoint`` there. Returns once it is loaded; a load
        error is raised here, as the library raised it. ``precision``: of featurize's
        products, decided for the child's device (``sentdisc.precision``)."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(theirs, os.getpid(), threads),
                                    name="sentdisc-model", daemon=True)
        self._process.start()
        theirs.close()
        self.died: str | None = None
        self._waiting: dict[int, Future] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="sentdisc-model-replies", daemon=True).start()
        try:
            self.config, self.device, self.pid, self.precision, self.precision_reason = \
                self._request("load", checkpoint, device, precision).result()
        except BaseException:
            self.close()
            raise

    def configure(self, layer: int, kind: str, rows: int) -> None:
        """What featurize computes (the probe's layer and kind) and how many texts the running
        batch holds at most. The size applies from the next chunk on (below the texts running,
        none joins until they end under it); layer and kind once the running batch empties."""
        self._request("configure", layer, kind, rows).result()

    async def featurize(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Features of ``texts`` [n, H], and how many texts the model held when they ended."""
        return await asyncio.wrap_future(self._request("featurize", texts))

    async def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the child (between chunks), ``MODEL`` its model."""
        return await asyncio.wrap_future(self._request("call", fn, args, kwargs))

    def close(self) -> None:
        # The child keeps nothing worth a goodbye; closing the pipe alone would not wake it
        # while the reply thread still blocks in a read on the same pipe.
        self._process.terminate()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def _request(self, op: str, *payload) -> Future:
        future: Future = Future()
        if self.died:
            raise ModelProcessDied(self.died)
        rid = next(self._ids)
        self._waiting[rid] = future
        try:
            with self._send_lock:
                self._conn.send((op, rid, payload))
        except (OSError, ValueError):
            self._waiting.pop(rid, None)
            self._mark_dead()
            raise ModelProcessDied(self.died) from None
        return future

    def _read(self) -> None:
        """Replies, on a thread of their own: the event loop never blocks on the pipe."""
        while True:
            try:
                ok, rid, value = self._conn.recv()
            except (EOFError, OSError):
                break
            future = self._waiting.pop(rid, None)
            if future is not None and not future.cancelled():
                future.set_result(value) if ok else future.set_exception(value)
        self._mark_dead()

    def _mark_dead(self) -> None:
        if self.died is None:
            self.died = "the model process exited unexpectedly (killed, or out of memory)"
        for future in list(self._waiting.values()):
            if not future.done():
                future.set_exception(ModelProcessDied(self.died))
        self._waiting.clear()


# -- in the child -------------------------------------------------------------------------------

def _child_main(conn, parent: int, threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))

    def exit_with_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True, name="exit-with-parent").start()
    _Child(conn).serve()


class _Child:
    """The model, its running batch, and the requests whose texts are in it."""

    def __init__(self, conn):
        self.conn, self.model = conn, None
        self.layer, self.kind, self.rows = -1, "cell", 32
        self.encoded: dict[int, bytes] = {}  # text id -> its bytes, while queued or running
        self.queued: deque[int] = deque()
        self.running = 0  # texts the pool has taken from the queue that have not ended
        self.owner: dict[int, tuple[int, int]] = {}  # text id -> (request id, position)
        self.requests: dict[int, list] = {}  # request id -> [texts left, features]
        self.text_ids = itertools.count()

    def serve(self) -> None:
        import torch

        while True:
            try:
                self.handle(self.conn.recv())  # idle: wait for work
            except (EOFError, OSError):
                return
            try:
                with torch.inference_mode():  # as featurize
                    self.stream()
            except Exception as e:  # every text in the batch fails with it
                for rid in list(self.requests):
                    self.reply(rid, False, e)
                self.requests.clear(), self.owner.clear(), self.encoded.clear()
                self.queued.clear()
                self.running = 0

    def stream(self) -> None:
        from sentdisc.features import featurize_pool

        while self.queued:
            # A pool computes the layer and kind it started with; a new size reaches it at its
            # next admission (pool_size).
            kind = self.kind
            for ids, feats in featurize_pool(self.model, self.encoded, self, self.pool_size,
                                              self.layer, [kind], STREAM_CHUNK, self.run):
                self.finished(ids, feats[kind])

    def pool_size(self) -> int:
        """Rows the pool may hold, asked before every admission. Messages are read here too:
        with every row busy the pool takes nothing from the queue, and a retune or a call
        must still apply from the next chunk on."""
        while self.conn.poll():
            self.handle(self.conn.recv())
        return self.rows

    # the pool's queue: it asks whenever a row is free; whatever arrived meanwhile is read first
    def __iter__(self):
        return self

    def __next__(self) -> int:
        while self.conn.poll():
            self.handle(self.conn.recv())
        # a retune read just above binds the rest of this admission too
        if not self.queued or self.running >= self.rows:
            raise StopIteration
        self.running += 1
        return self.queued.popleft()

    def handle(self, message) -> None:
        op, rid, payload = message
        try:
            if op == "featurize":
                self.admit(rid, payload[0])
                return  # answered when its texts end
            value = getattr(self, op)(*payload)
        except Exception as e:  # the parent maps it (InputError: 422, else 500)
            self.reply(rid, False, e)
            return
        self.reply(rid, True, value)

    def reply(self, rid: int, ok: bool, value) -> None:
        try:
            self.conn.send((ok, rid, value))
        except OSError:
            raise
        except Exception as e:  # a value that does not pickle
            self.conn.send((False, rid, RuntimeError(f"{type(value).__name__}: {e}")))

    def load(self, checkpoint: str, device: str, precision: str):
        import torch

        from sentdisc.checkpoint import load
        from sentdisc.precision import Hardware, choose

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda"):  # said before loading: else a pin_memory error
            if not torch.cuda.is_available():
                raise ValueError(f"device={device} but no CUDA device is visible")
            index, count = torch.device(device).index or 0, torch.cuda.device_count()
            if index >= count:
                raise ValueError(f"device={device} but {count} CUDA device"
                                 f"{'s are' if count > 1 else ' is'} visible (cuda:0..)")
        self.model = load(checkpoint, map_location=device).eval()
        self.precision, why = choose(precision, Hardware.detect(device))
        return self.model.config, device, os.getpid(), self.precision, why

    def configure(self, layer: int, kind: str, rows: int) -> None:
        from sentdisc.features import KINDS
        from sentdisc.model import check_layer

        if kind not in KINDS:
            raise ValueError(f"feature kind {kind!r} is not one of {KINDS}")
        from sentdisc.features import _chunk_runner

        self.layer = check_layer(layer, len(self.model.layers))
        self.kind, self.rows = kind, max(1, int(rows))
        # eager: a captured CUDA step is for a fixed pool (features.feature_plan)
        self.run = _chunk_runner(self.model, self.layer, [kind], STREAM_CHUNK,
                                 np.array([STREAM_CHUNK]), self.rows, self.precision, "off")

    def call(self, fn, args: tuple, kwargs: dict):
        swap = lambda a: self.model if isinstance(a, _ModelPlaceholder) else a
        return fn(*map(swap, args), **{k: swap(v) for k, v in kwargs.items()})

    def admit(self, rid: int, texts: list[str]) -> None:
        from sentdisc.text import encode_list

        encoded = encode_list(list(texts), False)
        self.requests[rid] = [len(encoded),
                              np.zeros((len(encoded), self.model.config.rnn_size), np.float32)]
        for position, data in enumerate(encoded):
            text_id = next(self.text_ids)
            self.encoded[text_id] = data
            self.owner[text_id] = (rid, position)
            self.queued.append(text_id)

    def finished(self, ids: list[int], feats: np.ndarray) -> None:
        # The rows of the chunk these ended in: after a retune down, rows admitted under the
        # old size run on, and the size alone would understate them.
        held, self.running = self.running, self.running - len(ids)
        for text_id, row in zip(ids, feats, strict=True):
            rid, position = self.owner.pop(text_id)
            del self.encoded[text_id]
            request = self.requests[rid]
            request[1][position] = row
            request[0] -= 1
            if request[0] == 0:
                del self.requests[rid]
                self.reply(rid, True, (request[1], held))
