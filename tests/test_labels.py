"""Label kinds and bad labels: what prepare_data makes of a labeled table, and the one-line
errors (file, row, column) that stop a run before any featurization."""
import bz2
import csv
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from sentdisc.data.config import DataError
from sentdisc.labeled import LabeledDataConfig, TransferError, prepare_data, read_table


def write_csv(path: Path, header, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


CATEGORIES = ["books", "dvd", "electronics", "kitchen"]


@pytest.fixture
def blitzer(tmp_path):
    """train/val/test tables shaped like the Amazon-Blitzer CSVs: label, category, text."""
    def rows(n, seed):
        rng = np.random.default_rng(seed)
        return [[int(rng.integers(0, 2)), CATEGORIES[i % 4], f"review {seed}-{i}"]
                for i in range(n)]
    header = ("label", "category", "text")
    return {split: write_csv(tmp_path / "blitzer" / f"{split}.csv", header, rows(n, seed))
            for split, n, seed in (("train", 40, 0), ("val", 12, 1), ("test", 12, 2))}


def config(tables, **kw) -> LabeledDataConfig:
    return LabeledDataConfig(train=tables["train"], valid=tables["val"], test=tables["test"],
                             text_key="text", **kw)


def test_kinds_are_read_off_the_data(blitzer):
    data = prepare_data(config(blitzer, label_key="label"))
    assert (data["spec"].kind, data["spec"].labels) == ("binary", ("negative", "positive"))
    assert set(data["train"].labels.tolist()) == {0, 1}

    data = prepare_data(config(blitzer, label_key="category"))
    spec = data["spec"]
    assert (spec.kind, spec.labels) == ("multiclass", tuple(CATEGORIES))
    train = data["train"]
    assert [spec.labels[i] for i in train.labels[:4]] == CATEGORIES  # rows cycle the classes
    assert "multiclass: 4 labels of 'category'" in spec.describe()

    # a declared label set fixes the classes and their order
    data = prepare_data(config(blitzer, label_key="category", labels="kitchen,dvd,books,electronics"))
    assert data["spec"].labels == ("kitchen", "dvd", "books", "electronics")
    assert data["train"].labels[:4].tolist() == [2, 1, 3, 0]


def test_multilabel_from_several_columns(tmp_path):
    rows = [[i % 2, int(i % 4 == 0), int(i % 3 == 0), f"text {i}"] for i in range(30)]
    path = write_csv(tmp_path / "ml" / "train.csv", ("positive", "books", "dvd", "text"), rows)
    data = prepare_data(LabeledDataConfig(train=path, text_key="text",
                                          label_key="books,dvd,positive"))
    spec, train, val = data["spec"], data["train"], data["val"]
    assert (spec.kind, spec.labels) == ("multilabel", ("books", "dvd", "positive"))
    assert train.labels.shape == (len(train), 3) and val.labels.shape == (len(val), 3)
    assert len(train) + len(val) == 30
    first = rows[int(train.rows_in_file[0]) - 1]
    assert train.labels[0].tolist() == [first[1], first[2], first[0]]


def test_integer_ratings_are_classes_in_numeric_order(tmp_path):
    rows = [[r, f"{r} stars, review {i}"] for i, r in enumerate([1, 2, 3, 4, 7, 8, 9, 10] * 5)]
    path = write_csv(tmp_path / "imdb" / "train.csv", ("rating", "text"), rows)
    data = prepare_data(LabeledDataConfig(train=path, text_key="text", label_key="rating"))
    assert data["spec"].labels == ("1", "2", "3", "4", "7", "8", "9", "10")
    assert data["spec"].kind == "multiclass"
    # --binarize_sent still makes them binary, the middle (5.5) dropping nothing here
    data = prepare_data(LabeledDataConfig(train=path, text_key="text", label_key="rating",
                                          binarize_sent=True))
    assert data["spec"].kind == "binary" and data["spec"].midpoint == 5.5


@pytest.mark.parametrize("case, message", [
    ("missing column", r"train: .*train.csv: no column 'genre' \(columns: label, category, text\)"),
    ("outside the set", r"val.csv: row 3: column 'category' holds 'toys', not one of the labels "
                        r"that train holds: \[books, dvd, electronics, kitchen\]"),
    ("outside declared", r"train.csv: row 4: column 'category' holds 'kitchen', not one of the "
                         r"labels declared by --labels"),
    ("not 0/1", r"ml.csv: row 5: column 'dvd' holds '2': a multi-label column holds 0 or 1"),
    ("absent from train", r"train.csv: column 'category': class\(es\) \['toys'\] of the label set "
                          r".* absent from train"),
    ("one class", r"one.csv: training labels of 'label' hold one class only"),
    ("label never 1", r"ml.csv: column 'dvd' has no positive \(1\) row in train"),
])
def test_bad_labels_name_file_row_and_column(blitzer, tmp_path, case, message):
    kw = {"label_key": "category"}
    if case == "missing column":
        kw = {"label_key": "genre"}
    elif case == "outside the set":
        rows = list(csv.reader(open(blitzer["val"])))
        rows[3][1] = "toys"  # the third data row
        write_csv(Path(blitzer["val"]), rows[0], rows[1:])
    elif case == "outside declared":
        kw["labels"] = "books,dvd,electronics"
    elif case in ("not 0/1", "label never 1"):
        rows = [[i % 2, 2 if (case == "not 0/1" and i == 4) else int(case == "not 0/1"
                                                                      and i % 3 == 0), f"t {i}"]
                for i in range(10)]
        blitzer["train"] = write_csv(tmp_path / "ml.csv", ("books", "dvd", "text"), rows)
        kw = {"label_key": "books,dvd"}
    elif case == "absent from train":
        kw["labels"] = "books,dvd,electronics,kitchen,toys"
    elif case == "one class":
        blitzer["train"] = write_csv(tmp_path / "one.csv", ("label", "text"),
                                     [[1, f"t {i}"] for i in range(10)])
        kw = {"label_key": "label"}
    with pytest.raises(TransferError, match=message) as e:
        prepare_data(config(blitzer, **kw))
    assert "\n" not in str(e.value)


def test_bad_labels_stop_the_command_before_featurizing(blitzer, tiny_checkpoint, tmp_path,
                                                       capsys):
    from sentdisc.recipes.transfer import main

    code = main(["--load_model", str(tiny_checkpoint), "--train", blitzer["train"],
                 "--valid", blitzer["val"], "--text_key", "text", "--label_key", "category",
                 "--labels", "books,dvd", "--experiment_dir", str(tmp_path / "exp")])
    captured = capsys.readouterr()
    assert code == 2
    (line,) = [x for x in captured.err.splitlines() if x.strip()]
    assert "transfer: error:" in line and "train.csv: row 3: column 'category'" in line
    assert "transforming" not in captured.out and "Traceback" not in captured.err
    assert not (tmp_path / "exp").exists()


def test_labeled_tables_read_like_corpora_compressed(tmp_path):
    """The corpora's format table and codecs: lz4 (which labeled sets lacked), gzip, bz2,
    zstd, xz; a .json of lines or of one array."""
    import lzma

    import pyarrow.fs as pafs

    body = b"label,text\n1,good\n0,bad\n"
    lines = b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n'
    local = pafs.LocalFileSystem()
    for codec in ("lz4", "zstd"):
        with local.open_output_stream(str(tmp_path / f"t.csv.{'zst' if codec == 'zstd' else codec}"),
                                      compression=codec) as f:
            f.write(body)
    (tmp_path / "t.tsv.gz").write_bytes(gzip.compress(body.replace(b",", b"\t")))
    (tmp_path / "t.json.bz2").write_bytes(bz2.compress(lines))
    (tmp_path / "t.json.xz").write_bytes(lzma.compress(json.dumps(
        [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]).encode()))
    for name in ("t.csv.lz4", "t.csv.zst", "t.tsv.gz", "t.json.bz2", "t.json.xz"):
        df = read_table(str(tmp_path / name), "text", "label")
        assert df["text"].tolist() == ["good", "bad"] and df["label"].tolist() == [1, 0], name


@pytest.mark.parametrize("text, why", [
    ("   ", r"empty 'text'$"),
    ("&nbsp;&#10; &#x20;", r"empty 'text' after preprocessing \('&nbsp;&#10; &#x20;': HTML "
                           r"entities of whitespace only\)"),
])
def test_a_text_empty_once_preprocessed_stops_the_run_naming_its_row(tmp_path, text, why):
    """Such a text featurizes, but has no heatmap to draw: it failed extremes.html after the
    whole sweep, before classifier.json and results.json were written."""
    rows = [[i % 2, f"review {i}"] for i in range(10)]
    rows[6][1] = text
    path = write_csv(tmp_path / "t" / "train.csv", ("label", "text"), rows)
    with pytest.raises(TransferError, match=r"train: .*train.csv: row 7: " + why) as e:
        prepare_data(LabeledDataConfig(train=path, text_key="text"))
    assert "\n" not in str(e.value)
    rows[6][1] = "&amp;"  # an entity of something is text
    write_csv(Path(path), ("label", "text"), rows)
    assert "&amp;" in read_table(path, "text", "label")["text"].tolist()


def test_a_utf8_bom_is_ignored_as_the_corpus_readers_ignore_it(tmp_path):
    bom = b"\xef\xbb\xbf"
    records = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    (tmp_path / "lines.jsonl").write_bytes(bom + b"\n".join(json.dumps(r).encode()
                                                            for r in records))
    (tmp_path / "array.json").write_bytes(bom + json.dumps(records).encode())
    (tmp_path / "lines.json.gz").write_bytes(gzip.compress((tmp_path / "lines.jsonl")
                                                           .read_bytes()))
    (tmp_path / "t.csv").write_bytes(bom + b"label,text\n1,good\n0,bad\n")
    for name in ("lines.jsonl", "array.json", "lines.json.gz", "t.csv"):
        df = read_table(str(tmp_path / name), "text", "label")
        assert df["text"].tolist() == ["good", "bad"] and df["label"].tolist() == [1, 0], name


@pytest.mark.parametrize("body, row", [
    (b"text,label\nGreat, loved it,1\nbad,0\n", 1),   # pandas made "Great" the index
    (b"text,label\nbad,0\n\nGreat, loved it,1\n", 2),  # pandas' tokenizer error; blank skipped
])
def test_an_unquoted_comma_in_a_text_names_the_row(tmp_path, row, body):
    (tmp_path / "t.csv").write_bytes(body)
    with pytest.raises(DataError, match=rf"t.csv: row {row} has 3 fields, the header 2: quote "
                                        r"texts that contain commas$"):
        read_table(str(tmp_path / "t.csv"), "text", "label")
    (tmp_path / "t.csv").write_bytes(b'text,label\n"Great, loved it",1\nbad,0\n')
    assert read_table(str(tmp_path / "t.csv"), "text", "label")["text"][0] == "Great, loved it"


@pytest.mark.parametrize("missing", ["NA", "NaN", "nan", "", "null"])
def test_na_strings_in_a_label_column_are_missing_labels_not_a_class(tmp_path, missing):
    rows = [[i % 2, f"review {i}"] for i in range(10)]
    rows[4][0] = missing
    rows[6][1] = "NA"  # a text "NA" stays a text
    path = write_csv(tmp_path / "t" / "train.csv", ("label", "text"), rows)
    with pytest.raises(TransferError, match=r"train.csv: 1 of 10 rows have no 'label' \(first "
                                            r"at row 5\)"):
        prepare_data(LabeledDataConfig(train=path, text_key="text"))
    data = prepare_data(LabeledDataConfig(train=path, text_key="text", drop_unlabeled=True))
    assert data["spec"].labels == ("negative", "positive") and data["train"].dropped == \
        {"unlabeled": 1}
    assert "NA" in data["train"].texts + data["val"].texts


@pytest.mark.parametrize("name, record, column, kind, what", [
    ("t.jsonl", {"text": ["x"], "label": 1}, "text", "a list", "text"),
    ("t.jsonl", {"text": "x", "label": {"a": 1}}, "label", "an object", "a label"),
    ("t.parquet", {"text": "x", "label": [1, 0]}, "label", "a list", "a label"),
])
def test_a_list_or_object_cell_names_file_row_and_column(tmp_path, name, record, column, kind,
                                                         what):
    records = [{"text": "fine", "label": 0}, record]
    if name.endswith(".parquet"):
        import pandas as pd

        pd.DataFrame({"text": ["fine", "x"], "label": [[0], [1, 0]]}).to_parquet(tmp_path / name)
    else:
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DataError, match=rf"{name}: row [12]: column '{column}' holds {kind}, "
                                        rf"not {what}$"):
        read_table(str(tmp_path / name), "text", "label")


@pytest.mark.parametrize("kw, said", [
    ({"label_key": "label,label"}, "label_key lists 'label' twice"),
    ({"label_key": "label", "labels": "0,1,0"}, "labels lists '0' twice"),
    ({"label_key": "label", "labels": "1,1.0"}, "labels lists '1' and '1.0', the same class"),
    ({"label_key": "label", "labels": "0,1", "binarize_sent": True},
     "labels and binarize_sent exclude each other"),
    ({"label_key": "a,b", "labels": "0,1"}, "labels declares the classes of one label column"),
    ({"label_key": "a", "label_kind": "multilabel", "labels": "0,1"},
     "labels declares the classes of one label column"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
])
def test_label_flags_that_cannot_work_fail_at_once(kw, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        LabeledDataConfig(train="t.csv", **kw)


def test_declared_labels_match_cells_as_cells_are_normalized(blitzer):
    data = prepare_data(config(blitzer, label_key="label", labels="1.0,0.0"))
    spec = data["spec"]
    assert spec.labels == ("1", "0") and spec.declared
    assert {0, 1} == set(data["train"].labels.tolist())


@pytest.mark.parametrize("kw, blamed", [
    ({"max_train": 3, "valid": True}, r"the 3 training rows left by --max_train 3 \(the whole "
                                      r"file holds every class: raise --max_train\)"),
    ({"val_fraction": 0.9}, r"the 4 training rows left by --val_fraction 0.9 \(the whole file "
                            r"holds every class: lower --val_fraction\)"),
])
def test_a_class_lost_to_a_subset_blames_the_flag_not_the_file(blitzer, kw, blamed):
    cfg = LabeledDataConfig(train=blitzer["train"], text_key="text", label_key="category",
                            valid=blitzer["val"] if kw.pop("valid", False) else "", **kw)
    with pytest.raises(TransferError, match=r"train.csv: column 'category': class\(es\) .* "
                                            r"absent from " + blamed) as e:
        prepare_data(cfg)
    assert "\n" not in str(e.value)
