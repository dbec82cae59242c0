"""Request batching for one model: continuous, so a lone request never waits.

Every request's texts join a queue; one runner task takes everything queued (up to
``max_batch_size`` requests) each time the model is free and makes it one featurize call. Requests
that arrive while a call runs therefore share the next one, with no timer involved: under load
batches fill by themselves, and a request to an idle model starts at once. ``wait_s`` > 0 adds a
short wait when the model was idle, for callers that prefer fuller batches to latency.

Plain asyncio (not ``@serve.batch``, which only runs inside a Serve replica), so the same
batching serves a Serve replica and the plain FastAPI baseline of the benchmarks.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import numpy as np

Featurize = Callable[[list[str]], Awaitable[np.ndarray]]


class Batcher:
    def __init__(self, featurize: Featurize, max_batch_size: int = 32, wait_s: float = 0.0):
        self.featurize, self.max_batch_size, self.wait_s = featurize, max_batch_size, wait_s
        self.sizes: Counter = Counter()  # requests per featurize call -> calls
        self._pending: list[tuple[list[str], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None

    def configure(self, max_batch_size: int, wait_s: float) -> None:
        self.max_batch_size, self.wait_s = max_batch_size, wait_s

    async def features(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Features of one request's texts, and how many requests shared its featurize call."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((texts, future))
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = loop.create_task(self._run())
        self._wake.set()
        features, shared = await future
        self.sizes[shared] += 1
        return features, shared

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wait_s > 0 and len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            while self._pending:
                group = self._pending[:self.max_batch_size]
                del self._pending[:len(group)]
                await self._featurize_group(group)

    async def _featurize_group(self, group) -> None:
        flat = [t for texts, _ in group for t in texts]
        try:
            feats = await self.featurize(flat)
        except BaseException as e:  # inputs were checked: a server fault, for all of them
            for _, future in group:
                if not future.done():
                    future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        start = 0
        for texts, future in group:
            if not future.done():  # a cancelled request (client went away) is skipped
                future.set_result((feats[start:start + len(texts)], len(group)))
            start += len(texts)

    def stats(self) -> dict:
        n = sum(self.sizes.values())
        return {"requests": n, "max_batch_size_seen": max(self.sizes, default=0),
                "mean_batch_size": sum(k * v for k, v in self.sizes.items()) / max(n, 1),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}
