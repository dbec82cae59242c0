"""``sentdisc data preprocess SRC DST``: encode a corpus once into Parquet shards.

The original tool's ``-preprocess``: parsing JSON and running the text preprocessing costs
more than reading bytes, so a corpus read for many epochs (or many runs) is encoded once with
Ray Data, in parallel over its files. Training then points ``--train`` at DST and reads the
``bytes`` column directly (``data_format`` auto-detects it). Bad records are written too, with
their ``error``, so the counts still reach the training metrics; ``file`` holds the source
name relative to SRC, so a split of DST equals the same split of SRC.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from sentdisc.data.readers import (
    FORMATS,
    DataConfig,
    DataError,
    _root_of,
    as_data_error,
    read_dataset,
    resolve_paths,
)
from sentdisc.runtime import ensure_ray

MANIFEST = "_manifest.json"  # leading '_': resolve_paths skips it when DST is read back


def _relative_names(root: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    prefix = root.rstrip(os.sep) + os.sep

    def rel(batch: pa.Table) -> pa.Table:
        names = pc.replace_substring(batch.column("file"), prefix, "", max_replacements=1)
        return batch.set_column(batch.schema.get_field_index("file"), "file", names)

    return rel


def preprocess_corpus(src, dst: str, cfg: DataConfig, overwrite: bool = False) -> dict:
    """Read SRC with ``cfg``, write encoded Parquet shards to DST; return the manifest."""
    import pyarrow.parquet as pq

    files = resolve_paths(src)
    if os.path.isdir(dst) and any(not f.startswith(".") for f in os.listdir(dst)) and not overwrite:
        raise DataError(f"{dst}: folder is not empty (pass --overwrite to replace its shards)")
    if overwrite and os.path.isdir(dst):
        for name in os.listdir(dst):
            if name.endswith(".parquet") or name == MANIFEST:
                os.remove(os.path.join(dst, name))
    os.makedirs(dst, exist_ok=True)
    ensure_ray(include_dashboard=False, log_to_driver=False)
    cfg = dataclasses.replace(cfg, shuffle=False)
    start = time.time()
    ds = read_dataset(files, cfg).map_batches(_relative_names(_root_of(files)),
                                              batch_format="pyarrow", batch_size=None)
    try:
        ds.write_parquet(dst)
    except Exception as e:  # strict mode: one clear line instead of Ray's traceback
        err = as_data_error(e)
        if err is None:
            raise
        raise err from None
    counts: dict = {"records": 0, "bytes": 0}
    shards = sorted(f for f in os.listdir(dst) if f.endswith(".parquet"))
    for name in shards:  # the error and bytes columns only: cheap next to the write
        table = pq.read_table(os.path.join(dst, name), columns=["bytes", "error"])
        for err in table.column("error").to_pylist():
            key = f"skipped_{err}" if err else "records"
            counts[key] = counts.get(key, 0) + 1
        import pyarrow.compute as pc
        counts["bytes"] += int(pc.sum(pc.binary_length(table.column("bytes"))).as_py() or 0)
    manifest = {"source": [os.path.abspath(f) for f in files], "shards": len(shards),
                "counts": counts, "seconds": round(time.time() - start, 2),
                "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                           if k in ("text_key", "label_key", "data_format", "delim",
                                    "loose_json", "transliterate", "strict")}}
    with open(os.path.join(dst, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main(argv=None) -> int:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="sentdisc data preprocess",
                                description="Encode a corpus once into Parquet shards of bytes")
    p.add_argument("src", help="files, folders, globs or a comma list")
    p.add_argument("dst", help="output folder of Parquet shards")
    p.add_argument("--text_key", default=defaults.text_key)
    p.add_argument("--label_key", default=None)
    p.add_argument("--data_format", default="auto", choices=[f for f in FORMATS if f != "encoded"])
    p.add_argument("--delim", default=defaults.delim)
    p.add_argument("--loose_json", action=argparse.BooleanOptionalAction, default=defaults.loose_json)
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--transliterate", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in DST")
    args = p.parse_args(argv)
    cfg = DataConfig(text_key=args.text_key, label_key=args.label_key,
                     data_format=args.data_format, delim=args.delim, loose_json=args.loose_json,
                     strict=args.strict, transliterate=args.transliterate)
    try:
        manifest = preprocess_corpus(args.src, args.dst, cfg, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    skipped = {k: v for k, v in c.items() if k.startswith("skipped_")}
    print(f"wrote {manifest['shards']} shards to {args.dst}: {c['records']} records, "
          f"{c['bytes'] / 1e6:.1f} MB in {manifest['seconds']} s"
          + (f"; skipped {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
