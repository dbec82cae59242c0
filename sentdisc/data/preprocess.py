"""``sentdisc data preprocess SRC DST``: encode a corpus once into Parquet shards.

The original tool's ``-preprocess``: parsing JSON and running the text preprocessing costs
more than reading bytes, so a corpus read for many epochs (or many runs) is encoded once with
Ray Data, in parallel over its files. Training then points ``--train`` at DST and reads the
``bytes`` column directly (``data_format`` auto-detects it). SRC and DST may be on any two
storages (``s3://in`` -> ``s3://out`` included) and SRC may be compressed (the dump's
``.json.gz``). Bad records are written too, with their ``error``, so the counts still reach
the training metrics; ``file`` holds the source name relative to SRC's root, which the split
key also uses (compression suffix dropped), so a split of DST equals the same split of SRC.
An input with no good record at all (every record lacks --text_key, say, or every file is
empty) is a DataError naming SRC and the counts by reason, and leaves no shards in DST.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time

from sentdisc import storage
from sentdisc.data.config import FORMATS, DataConfig, DataError
from sentdisc.data.paths import corpus_root, list_corpus
from sentdisc.data.readers import (
    as_data_error,
    read_dataset,
    read_files,
    skipped_by_reason,
    survey,
)
from sentdisc.errors import InputError
from sentdisc.runtime import ensure_ray

MANIFEST = "_manifest.json"  # leading '_': listing skips it when DST is read back


def _relative_names(root: str):
    """The ``file`` column relative to SRC's root: the corpus's own names, as split keys are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prefix = root.rstrip("/") + "/"

    def rel(batch: pa.Table) -> pa.Table:
        names = pc.replace_substring_regex(batch.column("file"), "^" + re.escape(prefix), "")
        return batch.set_column(batch.schema.get_field_index("file"), "file", names)

    return rel


def _prepare_dst(dst: str, overwrite: bool) -> None:
    shards = [uri for uri, _ in storage.list_files(dst)] if storage.is_dir(dst) else []
    if shards and not overwrite:
        raise DataError(f"{dst}: folder is not empty (pass --overwrite to replace its shards)")
    _delete_shards(dst, shards)
    storage.makedirs(dst)


def _shards(dst: str) -> list[str]:
    return [uri for uri, _ in storage.list_files(dst) if uri.endswith(".parquet")]


def _delete_shards(dst: str, shards: list[str]) -> None:
    fs, _ = storage.filesystem(dst)
    for uri in shards:
        if uri.endswith(".parquet"):
            fs.delete_file(storage.filesystem(uri)[1])


def _source_name(src) -> str:
    return src if isinstance(src, str) else ",".join(map(str, src))


def _no_records(src, cfg: DataConfig, counts: dict) -> DataError:
    """The error for an input without one good record: SRC, the lines, the counts by reason,
    and the key when every record lacks it."""
    bad = skipped_by_reason(counts)
    by_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(bad.items(),
                                                                  key=lambda kv: -kv[1]))
    lacking = ""
    if bad.get("missing_key") == counts["lines"]:
        keys = f"{cfg.text_key!r} (--text_key)" + (
            f" or {cfg.label_key!r} (--label_key)" if cfg.label_key else "")
        lacking = f": every record lacks {keys}"
    return DataError(f"{_source_name(src)}: no good record to encode in {counts['lines']} "
                     f"lines (skipped: {by_reason or 'none'}){lacking}; nothing written")


def preprocess_corpus(src, dst: str, cfg: DataConfig, overwrite: bool = False) -> dict:
    """Read SRC with ``cfg``, write encoded Parquet shards to DST (any two storages); return
    the manifest, also written to DST/_manifest.json."""
    files = list_corpus(src)  # every path problem, on both sides, before any Ray task
    if storage.is_uri(dst):
        storage.check_access(dst, "output")
    dst = storage.absolute(dst)
    inside = [uri for uri, _ in files if uri.startswith(dst.rstrip("/") + "/")]
    if inside:  # --overwrite would delete them before they are read
        raise DataError(f"{dst}: the output folder holds input files ({inside[0]}, ...): "
                        "write the shards outside the corpus")
    if all(size == 0 for _, size in files):
        raise DataError(f"{_source_name(src)}: no records to encode (every input file is "
                        f"empty: {', '.join(uri for uri, _ in files[:3])}"
                        f"{', ...' if len(files) > 3 else ''})")
    _prepare_dst(dst, overwrite)
    ensure_ray(include_dashboard=False, log_to_driver=False)
    cfg = dataclasses.replace(cfg, shuffle=False)
    root = corpus_root([uri for uri, _ in files])
    start = time.time()
    ds = read_files(files, cfg).map_batches(_relative_names(root), batch_format="pyarrow",
                                             batch_size=None)
    fs, path = storage.filesystem(dst)
    try:
        ds.write_parquet(path, filesystem=fs)
        shards = _shards(dst)
        if not shards:  # compressed files that hold nothing: Ray wrote no shard
            raise DataError(f"{_source_name(src)}: no records to encode (the input files "
                            "hold no lines)")
        # The counts, read back from what was written: the error, bytes and capped columns.
        counts = survey(read_dataset(dst, DataConfig(data_format="encoded")))
        if not counts["records"]:
            _delete_shards(dst, shards)
            raise _no_records(src, cfg, counts)
    except Exception as e:  # strict mode: one clear line instead of Ray's traceback
        err = as_data_error(e)
        if err is None:
            raise
        raise err from None
    manifest = {"source": [uri for uri, _ in files], "root": root,
                "shards": sum(uri.endswith(".parquet") for uri, _ in storage.list_files(dst)),
                "counts": counts, "seconds": round(time.time() - start, 2),
                "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                           if k in ("text_key", "label_key", "data_format", "delim", "loose_json",
                                    "transliterate", "strict", "max_record_bytes")}}
    storage.write_json(storage.join(dst, MANIFEST), manifest)
    return manifest


def main(argv=None) -> int:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="sentdisc data preprocess",
                                description="Encode a corpus once into Parquet shards of bytes")
    p.add_argument("src", help="files, folders, globs or a comma list; local or URIs (s3://...)")
    p.add_argument("dst", help="output folder of Parquet shards, local or a URI")
    p.add_argument("--text_key", default=defaults.text_key)
    p.add_argument("--label_key", default=None)
    p.add_argument("--data_format", default="auto", choices=[f for f in FORMATS if f != "encoded"])
    p.add_argument("--delim", default=defaults.delim)
    p.add_argument("--loose_json", action=argparse.BooleanOptionalAction, default=defaults.loose_json)
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--transliterate", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max_record_bytes", type=int, default=defaults.max_record_bytes)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in DST")
    args = p.parse_args(argv)
    try:
        cfg = DataConfig(text_key=args.text_key, label_key=args.label_key,
                         data_format=args.data_format, delim=args.delim,
                         loose_json=args.loose_json, strict=args.strict,
                         transliterate=args.transliterate, max_record_bytes=args.max_record_bytes)
        manifest = preprocess_corpus(args.src, args.dst, cfg, overwrite=args.overwrite)
    except InputError as e:  # a DataError, or a StorageError naming the URI
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    skipped = {k: v for k, v in c.items() if k.startswith("skipped_") and v}
    print(f"wrote {manifest['shards']} shards to {args.dst}: {c['records']} records, "
          f"{c['bytes'] / 1e6:.1f} MB in {manifest['seconds']} s"
          + (f"; skipped {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
