"""``sentdisc data synth DST``: a corpus shaped like the Amazon dump, with known bad records.

Writes ``shards`` loose-JSON files (gzipped by default, as the dump ships) of Amazon-like
records (reviewerID, asin, reviewerName, helpful, reviewText, overall, summary,
unixReviewTime, reviewTime) whose review text is word salad of realistic length (log-normal,
median ~70 words, like the dump's), to any storage ``sentdisc.storage`` writes. Into each
shard go, at seeded positions and in exact numbers, the bad records a corpus fuzz found:

    bad_json (a cut line)  nul_byte (a raw NUL in the text)  missing_key  not_text (a number,
    list, object or bool)  empty_text  invalid_utf8 (raw bytes, a lone surrogate escape)
    blank (an empty line)  over_long (a good record above max_record_bytes: capped)

``_synth.json`` beside the shards holds the lines and the injected numbers per shard and in
total, and ``expected``: what ``survey`` and the packer must report for the corpus (records,
bytes after capping, skipped_<reason>, capped_records, capped_bytes, lines), so tests and
benchmarks compare reported counts to injected ones.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import sys

import numpy as np

from sentdisc import storage
from sentdisc.data.config import COMPRESSIONS, REASONS, DataConfig
from sentdisc.text import END_PAD, FRONT_PAD

MANIFEST = "_synth.json"
BAD_KINDS = ("bad_json", "nul_byte", "missing_key", "not_text", "empty_text", "invalid_utf8", "blank")
COUNTER = {"nul_byte": "skipped_bad_json", "over_long": "capped_records",
           **{k: f"skipped_{k}" for k in BAD_KINDS if k != "nul_byte"}}
_SYLLABLES = ("ka to ri mo sa ne lu fi da pe zo ra ti gu no be la mi so ve ku ha ji "
              "wo ta re si po ma de ly cu ro an el in or un est ing ly ble").split()
_SPECIAL = ["café", "naïve", "über", "jalapeño", "crème", "日本", "très"]  # some UTF-8 beyond ASCII
_NAMES = ["J. Smith", "Amazon Customer", "Kindle Reader", "M. Lopez", "bookworm", "A. Chen"]


def _vocabulary(rng: np.random.Generator, size: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Words with Zipf frequencies; a tenth again with a comma, a tenth with a full stop."""
    words = sorted({"".join(rng.choice(_SYLLABLES, rng.integers(1, 4))) for _ in range(size)})
    words = np.array(words + _SPECIAL, dtype=object)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    rng.shuffle(weights)
    words = np.concatenate([words, words + ",", words + "."])
    weights = np.concatenate([weights * 0.8, weights * 0.1, weights * 0.1])
    return words, weights / weights.sum()


class _Salad:
    """Review texts drawn in bulk: one vectorised draw of word indices per shard."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.words, self.p = _vocabulary(rng)
        self.ascii = np.array([w.isascii() for w in self.words])

    def texts(self, n_words: np.ndarray, ascii_only: bool = False) -> list[str]:
        p = np.where(self.ascii, self.p, 0.0) if ascii_only else self.p
        idx = self.rng.choice(len(self.words), size=int(n_words.sum()), p=p / p.sum())
        ends = np.cumsum(n_words)
        return [" ".join(self.words[idx[e - k:e]]) for k, e in zip(n_words, ends)]


def _record(rng: np.random.Generator, text: str, summary: str) -> dict:
    t = int(rng.integers(946684800, 1404172800))  # 2000 .. mid-2014, as in the dump
    day = np.datetime64(t, "s").astype("datetime64[D]").item()
    helpful = int(rng.integers(0, 20))
    return {"reviewerID": "A" + "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"), 13)),
            "asin": f"{int(rng.integers(10**9)):010d}", "reviewerName": str(rng.choice(_NAMES)),
            "helpful": [int(rng.integers(0, helpful + 1)), helpful], "reviewText": text,
            "overall": float(rng.integers(1, 6)), "summary": summary,
            "unixReviewTime": t, "reviewTime": f"{day.month:02d} {day.day:02d}, {day.year}"}


def _bad_line(kind: str, rec: dict, k: int) -> bytes:
    """The k-th bad line of this kind, made from a good record."""
    line = json.dumps(rec).encode()
    at = line.index(b'"reviewText": "') + len(b'"reviewText": "')
    if kind == "bad_json":
        return line[: max(1, at - 3 - k % 7)]  # cut before the text ends: never valid JSON
    if kind == "nul_byte":
        return line[:at + 1] + b"\x00" + line[at + 1:]
    if kind == "invalid_utf8":
        if k % 2:
            return line[:at + 1] + b"\xff\xfe" + line[at + 1:]
        rec = {**rec, "reviewText": "lone \ud800 surrogate " + rec["reviewText"]}
    elif kind == "missing_key":
        rec = {key: v for key, v in rec.items() if key != "reviewText"}
    elif kind == "not_text":
        rec = {**rec, "reviewText": [42, 3.5, ["a", "list"], {"an": "object"}, True][k % 5]}
    elif kind == "empty_text":
        rec = {**rec, "reviewText": ["", "   ", "\n\t "][k % 3]}
    elif kind == "blank":
        return [b"", b"   ", b"\t"][k % 3]
    return json.dumps(rec).encode()


def _shard(rng: np.random.Generator, salad: _Salad, n_lines: int, bad_fraction: float,
           cap: int) -> tuple[bytes, dict]:
    """One shard's bytes (uncompressed) and what went into it."""
    n_bad = int(round(n_lines * bad_fraction))
    n_long = min(max(1, n_bad // 20) if n_bad else 0, n_lines - n_bad)
    kinds = np.full(n_lines, "", dtype=object)
    where = rng.permutation(n_lines)
    kinds[where[:n_bad]] = [BAD_KINDS[k % len(BAD_KINDS)] for k in range(n_bad)]
    kinds[where[n_bad:n_bad + n_long]] = "over_long"
    texts = salad.texts(np.clip(rng.lognormal(np.log(70), 0.9, n_lines), 3, 2000).astype(np.int64))
    summaries = salad.texts(rng.integers(2, 8, n_lines))
    # over-long texts: ~1.6x the cap in ASCII words, so the cut falls on a character boundary
    longs = iter(salad.texts(np.full(n_long, max(cap // 4, 1)), ascii_only=True))
    info = {"lines": n_lines, "records": 0, "bytes": 0, "capped_bytes": 0,
            "uncompressed_bytes": 0, "injected": dict.fromkeys((*BAD_KINDS, "over_long"), 0)}
    lines = []
    for i in range(n_lines):
        text = next(longs) if kinds[i] == "over_long" else texts[i]
        rec = _record(rng, text, summaries[i])
        if kinds[i] in BAD_KINDS:
            lines.append(_bad_line(kinds[i], rec, info["injected"][kinds[i]]))
            info["injected"][kinds[i]] += 1
            continue
        size, kept = _encoded_size(text, cap)
        if kept < size:
            info["injected"]["over_long"] += 1
            info["capped_bytes"] += size - kept
        info["records"] += 1
        info["bytes"] += kept
        lines.append(json.dumps(rec).encode())
    data = b"\n".join(lines) + b"\n"
    info["uncompressed_bytes"] = len(data)
    return data, info


def _encoded_size(text: str, cap: int) -> tuple[int, int]:
    """(encoded size, size once capped) of a text with no '&', newline or edge space, which
    the preprocessing only pads; the cap never splits a character."""
    data = (FRONT_PAD + text + END_PAD).encode()
    return len(data), len(data[:cap].decode("utf-8", "ignore").encode())


def _compress(data: bytes, compression: str | None) -> bytes:
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)  # mtime 0: same seed, same bytes
    if compression == "bz2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data)
    import pyarrow as pa

    return pa.Codec(compression).compress(data, asbytes=True)  # zstd, lz4 (frame format)


def synthesize(dst: str, shards: int = 4, records_per_shard: int = 1000, bad_fraction: float = 0.01,
               seed: int = 0, compression: str | None = "gzip",
               max_record_bytes: int | None = None) -> dict:
    """Write the corpus to ``dst`` (a folder or URI); return the manifest written beside it."""
    compression = None if compression in (None, "", "none") else compression
    suffixes = {codec: ext for ext, codec in COMPRESSIONS.items()}
    if compression is not None and compression not in suffixes:
        raise ValueError(f"compression {compression!r}: one of none, {', '.join(suffixes)}")
    cap = max_record_bytes or DataConfig().max_record_bytes
    salad = _Salad(np.random.default_rng(seed))
    files = []
    for s in range(shards):
        data, info = _shard(np.random.default_rng([seed, s]), salad, records_per_shard,
                            bad_fraction, cap)
        name = f"reviews-{s:03d}.json{suffixes.get(compression, '')}"
        storage.write_bytes(storage.join(dst, name), _compress(data, compression))
        files.append({"name": name, **info})
    injected = {k: sum(f["injected"][k] for f in files) for k in (*BAD_KINDS, "over_long")}
    expected = {"lines": sum(f["lines"] for f in files), "records": sum(f["records"] for f in files),
                "bytes": sum(f["bytes"] for f in files),
                "capped_bytes": sum(f["capped_bytes"] for f in files),
                **{f"skipped_{r}": 0 for r in REASONS}, "capped_records": 0}
    for kind, n in injected.items():
        expected[COUNTER[kind]] += n
    manifest = {"seed": seed, "shards": shards, "records_per_shard": records_per_shard,
                "bad_fraction": bad_fraction, "compression": compression or "none",
                "max_record_bytes": cap, "files": files, "injected": injected, "expected": expected,
                "uncompressed_bytes": sum(f["uncompressed_bytes"] for f in files)}
    storage.write_json(storage.join(dst, MANIFEST), manifest)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sentdisc data synth",
                                description="Write a dump-shaped corpus with known bad records")
    p.add_argument("dst", help="folder or URI (s3://bucket/prefix) to write the shards to")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--records", type=int, default=1000, help="lines per shard")
    p.add_argument("--bad_fraction", type=float, default=0.01, help="share of bad lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", default="gzip", choices=["none", *COMPRESSIONS.values()])
    p.add_argument("--max_record_bytes", type=int, default=DataConfig().max_record_bytes,
                   help="the cap the over-long records are made to exceed")
    args = p.parse_args(argv)
    for flag, value, ok in (("--shards", args.shards, args.shards >= 1),
                            ("--records", args.records, args.records >= 1),
                            ("--bad_fraction", args.bad_fraction, 0 <= args.bad_fraction <= 1)):
        if not ok:
            p.error(f"{flag} {value}: expected {'0..1' if flag == '--bad_fraction' else '>= 1'}")
    try:
        m = synthesize(args.dst, args.shards, args.records, args.bad_fraction, args.seed,
                       args.compression, args.max_record_bytes)
    except storage.StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['shards']} shards to {args.dst}: {m['expected']['lines']} lines, "
          f"{m['uncompressed_bytes'] / 1e6:.1f} MB uncompressed; injected {m['injected']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
