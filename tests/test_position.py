"""The data position (sentdisc.data.position) on the orders a rank really sees records in."""
import numpy as np

from sentdisc.data.position import Position

LINES, BLOCK = 50_000, 2_000


def _shuffled_blocks(blocks, seed=0):
    """(file, line) of ``blocks`` in turn, each block's lines permuted as --shuffle does."""
    rng = np.random.default_rng(seed)
    for b in blocks:
        for line in rng.permutation(np.arange(b * BLOCK, min((b + 1) * BLOCK, LINES))):
            yield "a.json", int(line)


def test_shuffled_blocks_end_as_one_range_each():
    # a rank handed every other block (the rest went to another rank), each permuted
    mine = list(range(0, LINES // BLOCK, 2))
    position, taken = Position(), set()
    for name in _shuffled_blocks(mine):
        position.take(*name)
        taken.add(name)
    assert position.state() == {"a.json": [[b * BLOCK, (b + 1) * BLOCK - 1] for b in mine]}
    assert all((("a.json", line) in position) == (("a.json", line) in taken)
               for line in range(-1, LINES + 2))
    # every block: one range, and the same union a checkpoint of several ranks would make
    every = list(range(LINES // BLOCK))
    for name in _shuffled_blocks(every, seed=1):
        position.take(*name)
    assert position.state() == {"a.json": [[0, LINES - 1]]}
    assert Position.union([position.state()]).state() == position.state()


def test_a_partly_taken_shuffled_block_holds_exactly_its_lines():
    rng = np.random.default_rng(2)
    order = rng.permutation(BLOCK)[: BLOCK // 2]
    position = Position()
    for line in order:
        position.take("a.json", int(line))
        position.take("a.json", int(line))  # taken twice (a restarted epoch): still once
    ranges = position.ranges["a.json"]
    assert all(a[1] + 1 < b[0] for a, b in zip(ranges, ranges[1:]))  # sorted, none touching
    assert {line for first, last in ranges for line in range(first, last + 1)} == set(
        int(line) for line in order)
    assert all((("a.json", line) in position) == (line in set(order.tolist()))
               for line in range(-1, BLOCK + 1))
