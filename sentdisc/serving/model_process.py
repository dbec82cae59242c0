"""The model in a process of its own, so that torch work never waits for the server's GIL.

A model thread inside the server shares the GIL with the event loop that parses requests. Each
torch op hands the GIL back and must win it again, and a busy loop keeps it for its whole switch
interval, so the two take turns. Measured here: the plain uvicorn server at 32 clients kept 1.0
core busy and left the second idle. A featurize call next to a busy Python thread ran 300x
slower. In a process of its own the model runs at in-process speed while the loop answers HTTP
on the other core.

One child per server, started with ``spawn`` (so none of the server's threads are forked),
holds the one model and runs calls in order, like a single model thread would. A function sent
there takes ``MODEL`` where the model goes. Only this server's own objects cross the pipe
(texts, arrays, the library's exceptions). The child exits when its parent dies: a killed Serve
replica leaves nothing behind.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

_model = None  # the child's model


class _ModelPlaceholder:
    """Stands for the child's model in a call's arguments."""


MODEL = _ModelPlaceholder()


class ModelProcessDied(RuntimeError):
    """The model's process is gone (killed, out of memory): this server cannot answer."""


class ModelProcess:
    def __init__(self, checkpoint: str, device: str, threads: int):
        """Start the child and load ``checkpoint`` there. Returns once it is loaded; a load
        error is raised here, as the library raised it."""
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_child,
                                         initargs=(os.getpid(), threads))
        try:
            self.config, self.device, self.pid = self._pool.submit(
                _load, checkpoint, device).result()
        except BaseException:
            self.close()
            raise
        self.died: str | None = None

    async def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the child, ``MODEL`` replaced by its model."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, _call, fn, args, kwargs)
        except BrokenProcessPool:
            self.died = "the model process exited unexpectedly (killed, or out of memory)"
            raise ModelProcessDied(self.died) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- in the child -------------------------------------------------------------------------------

def _start_child(parent: int, threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))

    def exit_with_parent():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True, name="exit-with-parent").start()


def _load(checkpoint: str, device: str):
    import torch

    from sentdisc.checkpoint import load

    global _model
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _model = load(checkpoint, map_location=device)
    return _model.config, device, os.getpid()


def _call(fn, args: tuple, kwargs: dict):
    swap = lambda a: _model if isinstance(a, _ModelPlaceholder) else a
    return fn(*map(swap, args), **{k: swap(v) for k, v in kwargs.items()})
