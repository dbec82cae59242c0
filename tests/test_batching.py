"""The request batcher's policy (sentdisc.serving.batching), on a model that takes a fixed time
per call: asyncio only, no HTTP."""
import asyncio
import time

import numpy as np
import pytest

from sentdisc.serving.batching import Batcher

CALL_S = 0.02  # what one featurize call takes, whatever its size


def _batcher(wait_s: float, max_batch_size: int = 32) -> Batcher:
    async def featurize(texts):
        await asyncio.sleep(CALL_S)
        return np.arange(len(texts), dtype=np.float32)[:, None]

    return Batcher(featurize, max_batch_size, wait_s)


async def _closed_loop(batcher: Batcher, clients: int, rounds: int, think_s: float = 0.002):
    """Clients that each send again ``think_s`` after their answer, as HTTP clients do."""
    async def client(i):
        await asyncio.sleep(i * 1e-4)  # they start one by one
        for _ in range(rounds):
            await batcher.features([f"text {i}"])
            await asyncio.sleep(think_s)

    await asyncio.gather(*(client(i) for i in range(clients)))
    sizes = batcher.sizes  # call size -> requests answered by calls of that size
    return clients * rounds / sum(n / size for size, n in sizes.items())  # requests per call


def test_a_lone_request_never_waits_for_the_timeout():
    async def main():
        batcher = _batcher(wait_s=1.0)
        times = []
        for _ in range(5):  # one client, one request at a time: each is the one expected
            t0 = time.perf_counter()
            await batcher.features(["hello"])
            times.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)
        return times

    assert max(asyncio.run(main())) < CALL_S + 0.1


def test_a_request_after_a_quiet_spell_starts_at_once():
    async def main():
        batcher = _batcher(wait_s=0.3)
        await asyncio.gather(*(batcher.features([str(i)]) for i in range(8)))  # 8 answered
        await asyncio.sleep(0.4)  # longer than wait_s: nobody is expected any more
        t0 = time.perf_counter()
        await batcher.features(["late"])
        return time.perf_counter() - t0

    assert asyncio.run(main()) < CALL_S + 0.1


@pytest.mark.parametrize("clients", [8, 32])
def test_closed_loop_clients_fill_every_call(clients):
    """With the wait, the clients answered together come back together: calls hold all of
    them. Without it (wait 0) they split into groups that take turns, and each round of the
    clients costs two calls."""
    filled = asyncio.run(_closed_loop(_batcher(wait_s=0.05), clients, rounds=10))
    split = asyncio.run(_closed_loop(_batcher(wait_s=0.0), clients, rounds=10))
    assert filled > 0.85 * clients, filled  # (the first call holds the first client alone)
    assert split < 0.6 * clients, split  # the behaviour the wait exists to prevent


def test_the_wait_is_bounded_when_the_answered_clients_do_not_come_back():
    async def main():
        batcher = _batcher(wait_s=0.1)
        await asyncio.gather(*(batcher.features([str(i)]) for i in range(16)))
        t0 = time.perf_counter()  # only one of the 16 comes back
        await batcher.features(["only one"])
        return time.perf_counter() - t0

    took = asyncio.run(main())
    assert 0.05 < took < 0.1 + CALL_S + 0.1, took


def test_each_request_gets_its_own_rows_and_the_cap_holds():
    async def main():
        batcher = _batcher(wait_s=0.0, max_batch_size=4)
        texts = [[f"{i}-{j}" for j in range(i % 3 + 1)] for i in range(10)]
        results = await asyncio.gather(*(batcher.features(t) for t in texts))
        return texts, results, batcher.stats()

    texts, results, stats = asyncio.run(main())
    for t, (feats, shared) in zip(texts, results, strict=True):
        assert len(feats) == len(t) and 1 <= shared <= 4
    assert stats["max_batch_size_seen"] == 4 and stats["requests"] == 10
