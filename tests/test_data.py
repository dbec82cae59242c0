"""Readers, splits, preprocess, read_table and fetch on real Ray and real files."""
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sentdisc.data import DataConfig, DataError, as_data_error, build_datasets, read_dataset
from sentdisc.data.readers import resolve_paths
from sentdisc.data.splits import split_fraction
from sentdisc.labeled import read_table
from sentdisc.text import encode


def write_shards(folder, n_shards=3, per_shard=40, bad=False):
    """Loose-JSON shards; with bad=True some malformed lines of every kind in shard 0."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for s in range(n_shards):
        path = folder / f"reviews-{s}.json"
        with open(path, "wb") as f:
            for i in range(per_shard):
                text = f"Review {s}-{i}: {'great' if i % 2 else 'poor &amp; slow'}\nline two"
                texts[(str(path), i + 1)] = text
                f.write(json.dumps({"reviewText": text, "overall": i % 5 + 1}).encode() + b"\n")
    if bad:
        with open(folder / "reviews-0.json", "ab") as f:
            f.write(b'{"reviewText": "cut off\n')                      # bad_json
            f.write(b'{"summary": "no text"}\n')                       # missing_key
            f.write(b'{"reviewText": "   "}\n')                        # empty_text
            f.write(b'{"reviewText": "caf\xe9 latin-1"}\n')            # invalid_utf8
            f.write(b'{"reviewText": "lone \\ud800 surrogate"}\n')     # invalid_utf8
            f.write(b'\n')                                             # blank
            f.write(b'{"reviewText": "still read after bad lines"}\n')
    return texts


def rows_of(ds):
    return sorted(ds.take_all(), key=lambda r: (r["file"], r["line"]))


def test_missing_path_fails_before_ray(tmp_path):
    import ray

    started = ray.is_initialized()
    with pytest.raises(DataError, match="nope.json: no such file"):
        read_dataset(str(tmp_path / "nope.json"), DataConfig())
    with pytest.raises(DataError, match=r"\*.zzz: glob matches no files"):
        build_datasets(DataConfig(train=str(tmp_path / "*.zzz")))
    write_shards(tmp_path / "ok", 1, 2)
    with pytest.raises(DataError, match="missing_valid"):
        build_datasets(DataConfig(train=str(tmp_path / "ok"), valid=str(tmp_path / "missing_valid")))
    assert ray.is_initialized() == started  # failed on the driver, nothing launched


def test_resolve_paths_files_folders_globs_lists(tmp_path):
    write_shards(tmp_path / "a", 2, 1)
    write_shards(tmp_path / "b" / "deep", 1, 1)
    (tmp_path / "a" / "_SUCCESS").write_text("")
    (tmp_path / "a" / ".hidden").write_text("")
    got = resolve_paths(f"{tmp_path / 'a'}, {tmp_path / 'b'}")
    assert [os.path.relpath(p, tmp_path) for p in got] == [
        "a/reviews-0.json", "a/reviews-1.json", "b/deep/reviews-0.json"]
    assert resolve_paths(str(tmp_path / "**" / "*.json")) == got
    assert resolve_paths(str(tmp_path / "a" / "reviews-1.json")) == [got[1]]


def test_loose_json_bytes_match_text_encode(ray_local, tmp_path):
    texts = write_shards(tmp_path / "c", 3, 40)
    rows = rows_of(read_dataset(str(tmp_path / "c"), DataConfig()))
    assert len(rows) == 120
    for r in rows:
        assert r["error"] == ""
        assert r["bytes"] == encode(texts[(r["file"], r["line"])]).tobytes()  # one preprocessing
    assert b"&amp;" not in rows[0]["bytes"] and b"\n line two" not in rows[0]["bytes"]


def test_malformed_records_kept_as_counted_rows_and_strict_names_file_line(ray_local, tmp_path):
    write_shards(tmp_path / "d", 2, 5, bad=True)
    rows = rows_of(read_dataset(str(tmp_path / "d"), DataConfig()))
    bad = {(os.path.basename(r["file"]), r["line"]): r["error"] for r in rows if r["error"]}
    assert bad == {("reviews-0.json", 6): "bad_json", ("reviews-0.json", 7): "missing_key",
                   ("reviews-0.json", 8): "empty_text", ("reviews-0.json", 9): "invalid_utf8",
                   ("reviews-0.json", 10): "invalid_utf8", ("reviews-0.json", 11): "blank"}
    assert all(r["bytes"] == b"" for r in rows if r["error"])
    assert sum(1 for r in rows if not r["error"]) == 11  # 10 good + the one after the bad lines
    assert any(r["line"] == 12 and r["bytes"] == encode("still read after bad lines").tobytes()
               for r in rows)
    with pytest.raises(Exception) as info:
        read_dataset(str(tmp_path / "d"), DataConfig(strict=True)).take_all()
    err = as_data_error(info.value)
    assert isinstance(err, DataError)
    assert str(err).startswith(f"{tmp_path / 'd' / 'reviews-0.json'}:6: bad_json")


def test_other_formats(ray_local, tmp_path):
    texts = ["first review", "second, with comma", 'third "quoted"\nmultiline', "fourth"]
    labels = [1, 0, 1, 0]
    folder = tmp_path / "fmt"
    folder.mkdir()
    pd.DataFrame({"label": labels, "sentence": texts}).to_csv(folder / "a.csv", index=False)
    pd.DataFrame({"label": labels, "sentence": texts}).to_csv(folder / "b.tsv", index=False, sep="\t")
    pq.write_table(pa.table({"sentence": texts, "label": labels}), folder / "c.parquet")
    with open(folder / "d.json", "w") as f:
        json.dump([{"sentence": t, "label": y} for t, y in zip(texts, labels)], f)
    cfg = DataConfig(text_key="sentence", label_key="label", loose_json=False)
    rows = read_dataset(str(folder), cfg).take_all()
    assert len(rows) == 16 and all(r["error"] == "" for r in rows)
    for name in ("a.csv", "b.tsv", "c.parquet", "d.json"):
        mine = sorted((r for r in rows if r["file"].endswith(name)), key=lambda r: r["line"])
        assert [r["bytes"] for r in mine] == [encode(t).tobytes() for t in texts], name
        # a label (scoring's id) as written, or its JSON: one type whatever the format
        assert [r["label"] for r in mine] == [str(y) for y in labels], name
    csv_lines = [r["line"] for r in rows if r["file"].endswith("a.csv")]
    assert sorted(csv_lines) == [2, 3, 4, 6]  # the quoted newline makes the 3rd record 2 lines
    # plain text: one sample per line; semicolon-delimited CSV through delim
    (folder / "e.txt").write_text("alpha\nbeta\n")
    (tmp_path / "f.csv").write_text("sentence;label\nx y;1\n")
    got = read_dataset(str(folder / "e.txt"), DataConfig()).take_all()
    assert [r["bytes"] for r in sorted(got, key=lambda r: r["line"])] == [encode("alpha").tobytes(),
                                                                           encode("beta").tobytes()]
    got = read_dataset(str(tmp_path / "f.csv"), DataConfig(text_key="sentence", delim=";")).take_all()
    assert got[0]["bytes"] == encode("x y").tobytes()
    # a CSV without the text column: every row counted missing_key, the columns named in strict
    rows = read_dataset(str(folder / "a.csv"), DataConfig(text_key="reviewText")).take_all()
    assert {r["error"] for r in rows} == {"missing_key"}
    with pytest.raises(Exception) as info:
        read_dataset(str(folder / "a.csv"), DataConfig(text_key="reviewText", strict=True)).take_all()
    assert "a.csv:2: missing_key: no column 'reviewText' (columns: label, sentence)" in str(
        as_data_error(info.value))


def test_shuffle_keeps_every_record_and_changes_order(ray_local, tmp_path):
    write_shards(tmp_path / "sh", 2, 60)
    plain = read_dataset(str(tmp_path / "sh"), DataConfig()).take_all()
    mixed = read_dataset(str(tmp_path / "sh"), DataConfig(shuffle=True, seed=5)).take_all()
    assert sorted(r["bytes"] for r in mixed) == sorted(r["bytes"] for r in plain)
    lines = [r["line"] for r in mixed if r["file"].endswith("reviews-0.json")]
    assert lines != sorted(lines)  # records shuffled within a file's chunk


def test_split_is_deterministic_disjoint_and_complete(ray_local, tmp_path):
    write_shards(tmp_path / "s", 3, 200)
    cfg = DataConfig(train=str(tmp_path / "s"), split="8,1,1", seed=7)
    keys = {}
    for run in range(2):
        sets = build_datasets(cfg)
        keys[run] = {k: {(r["file"], r["line"]) for r in ds.select_columns(["file", "line"]).take_all()}
                     for k, ds in sets.items()}
    assert keys[0] == keys[1]
    train, val, test = keys[0]["train"], keys[0]["val"], keys[0]["test"]
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 600
    assert 420 < len(train) < 540 and 30 < len(val) < 90 and 30 < len(test) < 90
    # another seed gives another split; a moved corpus keeps its split (relative names)
    other = build_datasets(DataConfig(train=str(tmp_path / "s"), split="8,1,1", seed=8))
    assert {(r["file"], r["line"]) for r in other["val"].take_all()} != val
    files = np.array([f for f, _ in sorted(val)], dtype=object)
    lines = np.array([line for _, line in sorted(val)], dtype=np.int64)
    moved = np.array([os.path.join("/elsewhere", os.path.basename(f)) for f in files], dtype=object)
    assert np.array_equal(split_fraction(files, lines, str(tmp_path / "s"), 7),
                          split_fraction(moved, lines, "/elsewhere", 7))
    # explicit valid path; split proportions then apply to train/test only; zero share -> None
    write_shards(tmp_path / "v", 1, 10)
    sets = build_datasets(DataConfig(train=str(tmp_path / "s"), valid=str(tmp_path / "v"), split="1,0,0"))
    assert sets["test"] is None and sets["val"].count() == 10 and sets["train"].count() == 600


def test_preprocess_never_deletes_its_input(tmp_path, capsys):
    from sentdisc.data.preprocess import main

    write_shards(tmp_path / "raw", 1, 5)
    before = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert main([str(tmp_path / "raw"), str(tmp_path / "raw"), "--overwrite"]) == 2
    assert "the output folder holds input files" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == before
    assert main([str(tmp_path / "raw"), str(tmp_path / "enc"), "--max_record_bytes", "0"]) == 2
    assert "--max_record_bytes must be at least 64" in capsys.readouterr().err


def test_preprocess_writes_encoded_shards_read_back_without_reencoding(ray_local, tmp_path):
    from sentdisc.data.preprocess import main

    write_shards(tmp_path / "raw", 2, 30, bad=True)
    dst = tmp_path / "enc"
    assert main([str(tmp_path / "raw"), str(dst), "--label_key", "overall"]) == 0
    manifest = json.loads((dst / "_manifest.json").read_text())
    # label_key demands a label: the no-label bad lines count as missing_key here
    assert manifest["counts"]["records"] == 60
    assert manifest["counts"]["skipped_missing_key"] == 4 and manifest["counts"]["skipped_bad_json"] == 1
    shards = [p for p in os.listdir(dst) if p.endswith(".parquet")]
    columns = set(pq.read_schema(dst / shards[0]).names)
    assert shards and columns >= {"bytes", "error", "file", "line", "label"}
    cfg = DataConfig(label_key="overall")
    raw = {(os.path.basename(r["file"]), r["line"]): r
           for r in read_dataset(str(tmp_path / "raw"), cfg).take_all()}
    enc = {(r["file"], r["line"]): r for r in read_dataset(str(dst), cfg).take_all()}
    assert enc.keys() == raw.keys()
    assert all(enc[k]["bytes"] == raw[k]["bytes"] and enc[k]["error"] == raw[k]["error"] for k in raw)
    # the same split whether read raw or encoded
    split = dict(split="2,1,1", seed=3)
    a = build_datasets(DataConfig(train=str(tmp_path / "raw"), **split))["val"].take_all()
    b = build_datasets(DataConfig(train=str(dst), **split))["val"].take_all()
    assert sorted((os.path.basename(r["file"]), r["line"]) for r in a) == sorted(
        (r["file"], r["line"]) for r in b)
    # refusing to mix a second run into a full folder
    assert main([str(tmp_path / "raw"), str(dst)]) == 2


def test_read_table(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"label": [1, 0], "sentence": ["good", "bad, really"]}).to_csv(path, index=False)
    df = read_table(str(path), "sentence", "label")
    assert list(df.columns) == ["text", "label"] and df["text"].tolist() == ["good", "bad, really"]
    with pytest.raises(DataError, match=r"no column 'text' \(columns: label, sentence\)"):
        read_table(str(path), "text", "label")
    (tmp_path / "t.json").write_text('{"reviewText": "a", "overall": 5}\n{"reviewText": "b", "overall": 1}\n')
    df = read_table(str(tmp_path / "t.json"), "reviewText", "overall")
    assert df["text"].tolist() == ["a", "b"] and df["label"].tolist() == [5, 1]
    pq.write_table(pa.table({"text": ["x"], "label": [1]}), tmp_path / "t.parquet")
    assert read_table(str(tmp_path / "t.parquet"), "text", "label")["label"].tolist() == [1]
    (tmp_path / "t.tsv").write_text("label\ttext\n1\tx\n0\t\n")
    with pytest.raises(DataError, match="row 2"):
        read_table(str(tmp_path / "t.tsv"), "text", "label")  # empty text named by row
    with pytest.raises(DataError, match="no such file"):
        read_table(str(tmp_path / "none.csv"), "text")
    # Unlabeled rows (IMDB's null ratings) pass through for transfer's --drop_unlabeled.
    (tmp_path / "u.json").write_text('{"reviewText": "a", "overall": null}\n'
                                     '{"reviewText": "b", "overall": 7}\n')
    df = read_table(str(tmp_path / "u.json"), "reviewText", "overall")
    assert df["text"].tolist() == ["a", "b"] and pd.isna(df["label"][0]) and df["label"][1] == 7


def test_read_table_shared_sst2(shared_data):
    df = read_table(str(shared_data / "sst2" / "test.csv"), "sentence", "label")
    assert len(df) == 1821 and set(df["label"]) == {0, 1}



def test_an_empty_id_is_a_missing_id_in_every_format():
    """A CSV's empty id cell is counted as a JSON null id is (missing_key), not scored with
    an id of ''."""
    from sentdisc.data.records import json_record

    for raw in (b'{"t": "good", "id": ""}', b'{"t": "good", "id": "  "}',
                b'{"t": "good", "id": null}'):
        text, label, error, _ = json_record(raw, "t", "id")
        assert (text, label, error) == (None, None, "missing_key"), raw
    assert json_record(b'{"t": "good", "id": "000123"}', "t", "id")[:3] == \
        ("good", "000123", "")
    assert json_record(b'{"t": "good", "id": 0}', "t", "id")[:3] == ("good", "0", "")
