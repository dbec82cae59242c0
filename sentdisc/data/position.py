"""Where an epoch is: which records have been taken, whatever the number of workers.

Ray Data hands blocks to whichever rank asks next, so no rank's count of rows says where the
epoch is. What does is the set of records taken so far, by (file, line): it is the same
whichever ranks took them, so a run restored on any number of workers can pass over exactly
those. It is kept as ranges of lines per file. A rank's rows of one file arrive in line order
within a block, with gaps only where a line belongs to another split (validation, test) or was
handed to another rank; the split is a pure function of (file, line), so a gap made only of
other splits' lines continues the range, and the ranges stay about one per block. With
``--shuffle`` a block's rows arrive permuted: a line joins the ranges next to it, so the block
still ends as one range, broken only where another split's line sits (about 1 line in 500 with
the default split: hashing the gaps at every out-of-order line would cost more than it saves).
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np

MAX_GAP = 64  # lines: a longer gap is taken to be another rank's rows, without hashing it

InSplit = Callable[[str, np.ndarray], np.ndarray]  # (file, lines) -> bool: lines of this split


class Position:
    """Records taken this epoch, as {file: [[first_line, last_line], ...]} (sorted, merged)."""

    def __init__(self, ranges: dict | None = None, in_split: InSplit | None = None):
        self.in_split = in_split
        self.ranges: dict[str, list[list[int]]] = {f: [list(r) for r in rs]
                                                   for f, rs in (ranges or {}).items()}
        self._starts: dict[str, list[int]] = {}

    def take(self, file: str, line: int) -> None:
        ranges = self.ranges.setdefault(file, [])
        if ranges and ranges[-1][0] <= line <= ranges[-1][1]:
            return
        if ranges and line > ranges[-1][1] and self._continues(file, ranges[-1][1], line):
            ranges[-1][1] = line
            return
        # --shuffle permutes each block's rows, so most lines land before the last range or past
        # a gap the block's later rows fill: joining the ranges a line touches keeps one range
        # per block, where inserting it alone would keep one per record
        i = bisect.bisect_right(ranges, line, key=lambda r: r[0])
        if i and line <= ranges[i - 1][1]:
            return
        left = i > 0 and ranges[i - 1][1] == line - 1
        right = i < len(ranges) and ranges[i][0] == line + 1
        if left and right:
            ranges[i - 1][1] = ranges.pop(i)[1]
        elif left:
            ranges[i - 1][1] = line
        elif right:
            ranges[i][0] = line
        else:
            ranges.insert(i, [line, line])
        self._starts.pop(file, None)

    def _continues(self, file: str, last: int, line: int) -> bool:
        """Whether every line strictly between ``last`` and ``line`` is another split's."""
        if line == last + 1:
            return True
        if line - last - 1 > MAX_GAP or self.in_split is None:
            return False
        return not self.in_split(file, np.arange(last + 1, line, dtype=np.int64)).any()

    def __contains__(self, record: tuple[str, int]) -> bool:
        file, line = record
        ranges = self.ranges.get(file)
        if not ranges:
            return False
        starts = self._starts.get(file)
        if starts is None or len(starts) != len(ranges):
            starts = self._starts[file] = [r[0] for r in ranges]
        i = bisect.bisect_right(starts, line) - 1
        return i >= 0 and line <= ranges[i][1]

    def __len__(self) -> int:
        return sum(len(rs) for rs in self.ranges.values())

    def state(self) -> dict:
        return {f: [list(r) for r in rs] for f, rs in self.ranges.items()}

    @classmethod
    def union(cls, states: list[dict], in_split: InSplit | None = None) -> Position:
        """One position from several ranks' (or checkpoints') states, ranges merged."""
        merged = cls(in_split=in_split)
        for file in sorted({f for s in states for f in s}):
            ranges = sorted(r for s in states for r in s.get(file, []))
            out: list[list[int]] = []
            for first, last in ranges:
                if out and (first <= out[-1][1] + 1 or merged._continues(file, out[-1][1], first)):
                    out[-1][1] = max(out[-1][1], last)
                else:
                    out.append([first, last])
            merged.ranges[file] = out
        return merged


def split_membership(lo: float, hi: float, root: str, seed: int) -> InSplit:
    """``in_split`` for the split [lo, hi) of a corpus rooted at ``root`` (sentdisc.data.splits)."""
    from sentdisc.data.splits import split_fraction

    def in_split(file: str, lines: np.ndarray) -> np.ndarray:
        u = split_fraction(np.full(len(lines), file, dtype=object), lines, root, seed)
        return (u >= lo) & (u < hi)

    return in_split
