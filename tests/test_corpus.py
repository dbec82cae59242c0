"""Corpora as they ship: generated dump shards with known bad records, gzip, byte-range reads of
large files, the local S3 server, and storage errors, on real Ray, real files and a real S3 API."""
import gzip
import io
import json
import os
import time

import numpy as np
import pytest

from sentdisc import storage
from sentdisc.data import (
    BytePacker,
    DataConfig,
    DataError,
    as_data_error,
    build_datasets,
    formats,
    read_dataset,
)
from sentdisc.data.datasource import CorpusDatasource, plan_pieces
from sentdisc.data.paths import list_corpus, on_one_filesystem
from sentdisc.data.readers import survey
from sentdisc.data.splits import split_key
from sentdisc.data.synth import synthesize
from sentdisc.text import encode

CAP = 4096  # a small max_record_bytes keeps the over-long records (and the files) small


def rows_by_key(ds, root):
    """{(split key, line): (bytes, error, capped)}: the rows of a dataset by their own name."""
    return {(split_key(r["file"], root), r["line"]): (r["bytes"], r["error"], r["capped"])
            for r in ds.take_all()}


def plain_copy(src, dst):
    """The decompressed copy of every x.json.gz in src, as x.json in dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".gz"):
            (dst / name[:-3]).write_bytes(gzip.decompress((src / name).read_bytes()))


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """Three gzipped dump shards with every kind of bad record, and the generator's manifest."""
    folder = tmp_path_factory.mktemp("dump")
    manifest = synthesize(str(folder), shards=3, records_per_shard=1500, bad_fraction=0.05, seed=11,
                          max_record_bytes=CAP)
    return folder, manifest


# ----------------------------------------------------------------------------- no Ray


@pytest.mark.parametrize("read_bytes", [1, 5, 64, 1 << 20])
def test_line_arrays_split_exactly_whatever_the_read_size(read_bytes, monkeypatch):
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 300)
    rng = np.random.default_rng(read_bytes)
    lines = [b"x" * int(n) + b"\n" for n in rng.integers(0, 120, 200)]
    lines[50] = b"y" * 1000 + b"\n"  # over the (patched) line limit: reported, not buffered
    data = b"".join(lines) + b"no newline at the end"
    got = []
    for item in formats.line_arrays(io.BytesIO(data), read_bytes=read_bytes):
        got += [item] if isinstance(item, tuple) else item.to_pylist()
    want = lines[:50] + [("too_long", "a line over 300 bytes")] + lines[51:] + [b"no newline at the end"]
    assert got == want
    # a byte range keeps the lines that start before its limit, whole
    limit = sum(map(len, lines[:10])) + 1
    ranged = [a.to_pylist() for a in formats.line_arrays(io.BytesIO(data), limit, read_bytes)]
    assert sum(ranged, []) == lines[:11]


def read_without_ray(path, cfg):
    """The rows of one file through the real read and parse stages, in this process."""
    import pyarrow as pa
    from pyarrow import fs as pafs

    from sentdisc.data.datasource import Piece, _Reader
    from sentdisc.data.records import parse_records

    blocks = _Reader(cfg, "", (), 0).read(pafs.LocalFileSystem(), Piece(str(path), path.stat().st_size))
    return pa.concat_tables(parse_records(cfg)(b) for b in blocks).to_pylist()


@pytest.mark.parametrize("name", ["bom.csv", "bom.tsv", "bom.csv.gz"])
def test_csv_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name):
    delim = "\t" if ".tsv" in name else ","
    data = "\ufeff" + f"sentence{delim}id\nfine product{delim}000123\nbroke in a day{delim}1e5\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(data.encode()) if name.endswith(".gz") else data.encode())
    rows = read_without_ray(path, DataConfig(text_key="sentence", label_key="id"))
    assert [(r["line"], r["error"], r["bytes"], r["label"]) for r in rows] == [
        (2, "", encode("fine product").tobytes(), "000123"),
        (3, "", encode("broke in a day").tobytes(), "1e5")]


def test_csv_id_that_is_not_utf8_is_a_counted_bad_record(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_bytes(b"sentence,id\nfine,A1\nalso fine,B\xff2\nstill fine,C3\n")
    rows = read_without_ray(path, DataConfig(text_key="sentence", label_key="id"))
    assert [(r["label"], r["error"]) for r in rows] == [
        ("A1", ""), (None, "invalid_utf8"), ("C3", "")]


@pytest.mark.parametrize("flags,said", [(["--bad_fraction", "1.5"], "--bad_fraction 1.5"),
                                        (["--records", "0"], "--records 0: expected >= 1")])
def test_synth_refuses_what_it_cannot_write(tmp_path, capsys, flags, said):
    from sentdisc.data.synth import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "c"), *flags])
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_labels_of_any_json_type_in_one_block_come_out_as_one_string_column(tmp_path):
    path = tmp_path / "ids.json"
    ids = ["T1", 7, 1.5, True, "0042", [1, "x"], {"a": "é"}]
    path.write_text("".join(json.dumps({"t": "fine", "id": i}) + "\n" for i in ids))
    rows = read_without_ray(path, DataConfig(text_key="t", label_key="id"))
    assert [r["label"] for r in rows] == [
        "T1", "7", "1.5", "true", "0042", '[1, "x"]', '{"a": "é"}']


def test_bad_storage_input_is_one_line_on_the_driver_within_seconds(monkeypatch):
    import socket

    import ray

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    started = ray.is_initialized()
    cases = {"no bucket": ("s3://sentdisc-no-such-bucket/shards/", {}, "does not exist"),
             "no credentials": ("s3://any/shards/", {"AWS_ACCESS_KEY_ID": None,
                                                     "AWS_SECRET_ACCESS_KEY": None}, "no AWS credentials"),
             "no endpoint": ("s3://any/shards/", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port}"},
                             "cannot reach the storage endpoint")}
    try:
        for what, (uri, env, message) in cases.items():
            with monkeypatch.context() as m:
                for key, value in env.items():
                    m.delenv(key) if value is None else m.setenv(key, value)
                storage._s3.cache_clear()  # the S3 filesystem is cached with the old endpoint
                t0 = time.time()
                with pytest.raises(storage.StorageError) as info:
                    build_datasets(DataConfig(train=uri))
                assert time.time() - t0 < 15, what
                text = str(info.value)
                assert message in text and uri in text and "\n" not in text, what
    finally:
        storage._s3.cache_clear()
    assert ray.is_initialized() == started  # failed on the driver: nothing was launched


# ----------------------------------------------------------------------------- Ray


def test_injected_bad_records_are_counted_exactly(ray_local, dump):
    folder, manifest = dump
    cfg = DataConfig(max_record_bytes=CAP)
    counts = survey(read_dataset(str(folder), cfg))
    assert {k: counts[k] for k in manifest["expected"]} == manifest["expected"]
    assert counts["lines"] == sum(f["lines"] for f in manifest["files"])  # every line is a row
    rows = rows_by_key(read_dataset(str(folder), cfg), str(folder))
    for f in manifest["files"]:  # every good record present, as an independent parse encodes it
        raw = gzip.decompress((folder / f["name"]).read_bytes()).split(b"\n")[:-1]
        assert sorted(line for name, line in rows if name == f["name"][:-3]) == list(
            range(1, len(raw) + 1))
        for i, line in enumerate(raw, 1):
            try:
                text = json.loads(line.decode())["reviewText"]
                want = encode(text).tobytes() if isinstance(text, str) and text.strip() else b""
            except (ValueError, KeyError, UnicodeError):  # bad JSON or UTF-8, no text, surrogates
                want = b""
            want = want[:CAP].decode("utf-8", "ignore").encode()  # capped, a character kept whole
            assert rows[(f["name"][:-3], i)][0] == want, (f["name"], i)
    packer = BytePacker(16, 256)
    for _ in packer.windows(read_dataset(str(folder), cfg).iter_batches(batch_format="pyarrow")):
        pass
    for key in ("records", "bytes", "capped_records", "capped_bytes"):
        assert packer.counts[key] == manifest["expected"][key], key
    for key, n in manifest["expected"].items():
        if key.startswith("skipped_"):
            assert packer.counts.get(key, 0) == n, key


def test_gzip_corpus_reads_packs_and_splits_as_its_decompressed_copy(ray_local, dump, tmp_path):
    from ray.data import DataContext

    folder, _ = dump
    plain_copy(folder, tmp_path / "plain")
    cfg = DataConfig(max_record_bytes=CAP)
    assert rows_by_key(read_dataset(str(folder), cfg), str(folder)) == rows_by_key(
        read_dataset(str(tmp_path / "plain"), cfg), str(tmp_path / "plain"))
    ctx = DataContext.get_current()
    ordered = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the packer's windows depend on record order
    try:
        windows = []
        for src in (folder, tmp_path / "plain"):
            batches = read_dataset(str(src), cfg).iter_batches(batch_format="pyarrow")
            windows.append([(w.x.numpy().tobytes(), w.reset.numpy().tobytes())
                            for w in BytePacker(3, 64).windows(batches)])
    finally:
        ctx.execution_options.preserve_order = ordered
    assert windows[0] == windows[1] and len(windows[0]) > 100
    val = [{(split_key(r["file"], str(src)), r["line"]) for r in build_datasets(
        DataConfig(train=str(src), split="4,1,1", seed=5, max_record_bytes=CAP))["val"].take_all()}
        for src in (folder, tmp_path / "plain")]
    assert val[0] == val[1] and 300 < len(val[0]) < 1000


@pytest.mark.parametrize("codec", ["bz2", "zstd", "lz4", "xz"])
def test_every_compression_reads_as_the_plain_file(ray_local, tmp_path, codec):
    plain = synthesize(str(tmp_path / "plain"), shards=1, records_per_shard=300, bad_fraction=0.05,
                       seed=8, compression="none")
    packed = synthesize(str(tmp_path / codec), shards=1, records_per_shard=300, bad_fraction=0.05,
                        seed=8, compression=codec)
    assert packed["files"][0]["name"] != plain["files"][0]["name"]
    assert rows_by_key(read_dataset(str(tmp_path / codec), DataConfig()), str(tmp_path / codec)) == \
        rows_by_key(read_dataset(str(tmp_path / "plain"), DataConfig()), str(tmp_path / "plain"))


@pytest.mark.timeout(120)
def test_corrupt_gzip_named_in_strict_mode_counted_otherwise(ray_local, tmp_path):
    manifest = synthesize(str(tmp_path / "c"), shards=2, records_per_shard=3000, bad_fraction=0, seed=2)
    bad = tmp_path / "c" / manifest["files"][1]["name"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a download cut in half
    counts = survey(read_dataset(str(tmp_path / "c"), DataConfig()))
    assert counts["skipped_corrupt_file"] == 1 and counts["corrupt_files"][0].startswith(f"{bad}:")
    lines = sorted(r["line"] for r in read_dataset(str(bad), DataConfig()).take_all() if not r["error"])
    assert 0 < len(lines) < 3000 and lines == list(range(1, len(lines) + 1))  # the lines before it
    assert counts["records"] == 3000 + len(lines)
    with pytest.raises(Exception) as info:
        read_dataset(str(tmp_path / "c"), DataConfig(strict=True)).take_all()
    err = as_data_error(info.value)
    assert isinstance(err, DataError) and str(err).startswith(f"{bad}:{len(lines) + 1}: corrupt_file: ")


def test_large_file_read_as_byte_ranges_with_exact_line_numbers(ray_local, tmp_path):
    synthesize(str(tmp_path / "big"), shards=1, records_per_shard=2500, bad_fraction=0.03, seed=4,
               compression="none")  # over-long lines of ~100 KB span several ranges
    root = str(tmp_path / "big")
    path = os.path.join(root, "reviews-000.json")
    whole = read_dataset(path, DataConfig())
    ranged_cfg = DataConfig(read_task_bytes=64 << 10)
    files = list_corpus(path)
    fs, _, inner = on_one_filesystem([uri for uri, _ in files])
    pieces = plan_pieces(fs, [(inner[0], files[0][1])], ranged_cfg)
    assert len(pieces) > 20 and pieces[0].first_line == 1
    source = CorpusDatasource([(inner[0], files[0][1])], ranged_cfg, fs)
    assert len(source.get_read_tasks(200)) == len(pieces)  # one read task per range
    assert rows_by_key(read_dataset(path, ranged_cfg), root) == rows_by_key(whole, root)
    # gzipped, the same file has no ranges: one read task streams it, the parsing is a stage apart
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "reviews-000.json.gz").write_bytes(gzip.compress(open(path, "rb").read(), 1))
    streamed = read_dataset(str(tmp_path / "gz"), ranged_cfg)
    assert rows_by_key(streamed, str(tmp_path / "gz")) == rows_by_key(whole, root)
    assert "ReadCorpus->MapBatches" not in streamed.stats()


def test_s3_shards_read_and_split_as_the_local_copy(ray_local, dump, s3_bucket):
    folder, manifest = dump
    remote = f"s3://{s3_bucket}/shards"
    storage.upload(str(folder), remote)
    cfg = DataConfig(max_record_bytes=CAP)
    local = rows_by_key(read_dataset(str(folder), cfg), str(folder))
    assert rows_by_key(read_dataset(remote + "/", cfg), remote) == local
    assert len(read_dataset(f"{remote}/*-00[02].json.gz", cfg).take_all()) == 3000  # a glob on S3
    val = [{(split_key(r["file"], src), r["line"]) for r in build_datasets(
        DataConfig(train=src, split="4,1,1", seed=5, max_record_bytes=CAP))["val"].take_all()}
        for src in (str(folder), remote)]
    assert val[0] == val[1]


def test_preprocess_s3_to_s3_from_gzip(ray_local, dump, s3_bucket):
    from sentdisc.data.preprocess import main

    folder, manifest = dump
    src, dst = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/enc"
    storage.upload(str(folder), src)
    assert main([src, dst, "--max_record_bytes", str(CAP)]) == 0
    written = storage.read_json(storage.join(dst, "_manifest.json"))
    assert {k: written["counts"][k] for k in manifest["expected"]} == manifest["expected"]
    cfg = DataConfig(max_record_bytes=CAP)
    encoded = read_dataset(dst, cfg).take(1)[0]
    assert encoded["file"].startswith("reviews-") and encoded["file"].endswith(".json.gz")
    assert rows_by_key(read_dataset(dst, cfg), dst) == rows_by_key(read_dataset(src, cfg), src)
    val = [{(split_key(r["file"], root), r["line"]) for r in build_datasets(
        DataConfig(train=root, split="4,1,1", seed=5, max_record_bytes=CAP))["val"].take_all()}
        for root in (src, dst)]
    assert val[0] == val[1]


def test_preprocess_of_an_empty_file_names_the_input(tmp_path, capsys):
    from sentdisc.data.preprocess import main

    (tmp_path / "empty.json").write_text("")
    assert main([str(tmp_path / "empty.json"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sentdisc data preprocess: error: {tmp_path / 'empty.json'}: no "
                          "records to encode (every input file is empty") and "out" not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_preprocess_with_no_good_record_is_a_data_error(ray_local, tmp_path, capsys):
    # it wrote an empty shard, printed "0 records ... skipped {...}" and exited 0
    from sentdisc.data.preprocess import main

    src = tmp_path / "tiny.json"
    src.write_text("".join(json.dumps({"text": f"review {i}"}) + "\n" for i in range(200)))
    assert main([str(src), str(tmp_path / "out"), "--text_key", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"sentdisc data preprocess: error: {src}: no good record to encode in 200 "
                   "lines (skipped: 200 missing_key): every record lacks 'nosuch' (--text_key); "
                   "nothing written")
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".parquet"]
    assert main([str(src), str(tmp_path / "out"), "--text_key", "text"]) == 0  # still usable
