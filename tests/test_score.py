"""Batch scoring: a corpus with known bad records -> Parquet that equals, row by row (matched
by file and line), the classifier applied in process to the same texts; bad input -> exit 2."""
import contextlib
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import fit_mean_classifier

from sentdisc import featurize, load
from sentdisc.data.synth import synthesize
from sentdisc.recipes.score import main

# Texts the preprocessing changes (HTML entities, one escaped twice, a newline, edge spaces),
# and records that are malformed for a reason synth does not inject here.
TRICKY = [{"reviewerID": "T1", "reviewText": "Terrible &amp; bad, AT&T style"},
          {"reviewerID": "T2", "reviewText": "I &lt;3 it &amp;lt; really &copy"},
          {"reviewerID": "T3", "reviewText": "  line\nbreak and   spaces  "},
          {"reviewerID": "T4", "reviewText": "Caf\u00e9 cr\u00e8me \U0001F600 was fine"},
          {"reviewerID": "0042", "reviewText": "A JSON string id that looks like a number"},
          {"reviewerID": "T5"},                        # missing_key: no text
          {"reviewText": "no id at all"}]              # missing_key: no id
# Ids a number parser would rewrite (000123 -> 123, 1e5 -> 100000.0, True -> true, nan -> NaN)
# beside ones it would not: one column of mixed looks.
CSV = ('reviewerID,reviewText\nC1,"Good value, would buy again"\nC2,"Two\nlines &amp; a quote"""\n'
       '000123,Arrived on time.\n1e5,Broke after a week.\nTrue,"Fine, nothing more."\nnan,Love it.\n')
FIT_TEXTS = ["This movie was wonderful, I loved every minute.", "Terrible. A waste of money.",
             "Best purchase I have made all year.", "The plot made no sense at all.",
             "Highly recommended, great fun.", "Awful acting, boring and slow."]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def classifier(model, tmp_path_factory):
    clf, path = fit_mean_classifier(model, FIT_TEXTS, [1, 0, 1, 0, 1, 0], tmp_path_factory.mktemp("clf"))
    return clf, str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two gzipped dump-shaped shards with every kind of bad record synth injects, a loose
    JSON file of tricky texts and a CSV: (folder, synth manifest)."""
    root = tmp_path_factory.mktemp("corpus")
    manifest = synthesize(str(root), shards=2, records_per_shard=40, bad_fraction=0.2, seed=3,
                          max_record_bytes=2048)  # over-long records ~3 KB: not capped here
    (root / "tricky.json").write_text("".join(json.dumps(r) + "\n" for r in TRICKY))
    (root / "more.csv").write_text(CSV)
    # a numeric id: its JSON text, a string like every other id
    (root / "numeric.json").write_text(json.dumps({"reviewerID": 7, "reviewText": "ok."}) + "\n")
    return root, manifest


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """The command's own lines on stderr (Ray Data logs its execution there too)."""
    return [line for line in stderr.splitlines() if line.startswith("score:")]


def args(tiny_checkpoint, classifier, corpus, output, *extra) -> list:
    return ["--load_model", str(tiny_checkpoint), "--classifier", classifier[1],
            "--data", str(corpus[0]), "--text_key", "reviewText", "--id_key", "reviewerID",
            "--output", str(output), "--replicas", "2", "--batch_size", "8", *extra]


@pytest.fixture(scope="module")
def scored(ray_local, tiny_checkpoint, classifier, corpus):
    """One scoring run shared by the assertions, written to S3 (the local S3 API):
    (exit code, stdout, rows, summary)."""
    from conftest import new_bucket

    from sentdisc import storage

    output = f"s3://{new_bucket()}/scored/run"
    code, out, err = run_main(args(tiny_checkpoint, classifier, corpus, output, "--examples", "5"))
    assert code == 0, err
    fs, path = storage.filesystem(output)
    rows = pq.read_table(path, filesystem=fs).to_pylist()  # small here; the job never collects
    return code, out, rows, storage.read_json(storage.join(output, "_summary.json"))


def source_lines(root: Path) -> dict:
    """{(file, line): raw line} of every JSON file in the corpus, read here independently."""
    lines = {}
    for path in sorted(p for p in root.glob("*.json*") if not p.name.startswith("_")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        for i, raw in enumerate(data.removesuffix(b"\n").split(b"\n"), 1):
            lines[(str(path), i)] = raw
    return lines


def csv_texts(root: Path) -> dict:
    import csv

    with open(root / "more.csv", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        out = {}
        for row in reader:  # the reader numbers a CSV record by its first physical line
            out[(str(root / "more.csv"), reader.line_num - row[1].count("\n"))] = row
        return out


def test_one_row_per_well_formed_record_and_malformed_counted(scored, corpus):
    _, out, rows, summary = scored
    root, manifest = corpus
    expected = manifest["expected"]
    # tricky.json: 5 good, 2 missing_key; more.csv: 6 good; numeric.json: 1 good
    good_extra, bad_extra = 5 + 6 + 1, 2
    assert len(rows) == summary["rows_written"] == expected["records"] + good_extra
    assert len({(r["file"], r["line"]) for r in rows}) == len(rows)
    want = {k[len("skipped_"):]: v for k, v in expected.items() if k.startswith("skipped_") and v}
    want["missing_key"] += bad_extra
    assert summary["malformed"] == want
    assert summary["malformed_total"] == sum(want.values())
    assert summary["lines"] == summary["records"] + summary["malformed_total"]
    assert summary["columns"] == list(rows[0]) == [
        "file", "line", "id", "label", "prob", "prob_top", "neuron_value", "capped"]
    assert "score: wrote" in out and "texts/s" in out and "ETA" in out


def test_malformed_examples_are_the_first_bad_lines(scored, corpus):
    _, _, rows, summary = scored
    good = {(r["file"], r["line"]) for r in rows}
    bad = sorted((set(source_lines(corpus[0])) | set(csv_texts(corpus[0]))) - good)
    assert len(bad) == summary["malformed_total"]
    listed = [(e["file"], e["line"]) for e in summary["malformed_examples"]]
    assert listed == bad[:5]
    assert all(e["reason"] in summary["malformed"] for e in summary["malformed_examples"])


def test_scores_equal_the_classifier_in_process(scored, corpus, model, classifier):
    _, _, rows, summary = scored
    clf = classifier[0]
    lines, csv_rows = source_lines(corpus[0]), csv_texts(corpus[0])
    texts, ids = [], []
    for r in rows:
        key = (r["file"], r["line"])
        if key in csv_rows:
            rid, text = csv_rows[key]
        else:
            obj = json.loads(lines[key])
            rid, text = obj["reviewerID"], obj["reviewText"]
        texts.append(text)
        ids.append(rid if isinstance(rid, str) else json.dumps(rid))
    feats = featurize(model, texts, kind=clf.feature_kind, layer=clf.layer)
    got = {k: np.array([r[k] for r in rows]) for k in ("prob", "prob_top", "neuron_value", "label")}
    np.testing.assert_allclose(got["neuron_value"], feats[:, clf.neuron], atol=1e-5)
    np.testing.assert_allclose(got["prob"], clf.predict_proba(feats), atol=1e-5)
    np.testing.assert_allclose(got["prob_top"], clf.predict_proba_top(feats), atol=1e-5)
    agree = got["label"] == np.array(clf.predict_labels(feats), dtype=object)  # label names
    assert agree.all() or np.abs(got["prob"][~agree] - 0.5).max() < 1e-5
    assert got["prob"].std() > 1e-3, "probabilities all alike: the comparison could not fail"
    assert [r["id"] for r in rows] == ids and "7" in ids
    assert all(r["capped"] == 0 for r in rows)
    assert (summary["neuron"], summary["sign"]) == (clf.neuron, clf.sign)
    assert summary["feature_kind"] == "mean"
    assert set(got["label"]) <= {"negative", "positive"} and summary["labels"] == clf.labels


def test_ids_come_out_exactly_as_written(scored, corpus):
    _, _, rows, _ = scored
    root = corpus[0]
    ids = {(r["file"], r["line"]): r["id"] for r in rows}
    in_csv = {key: row[0] for key, row in csv_texts(root).items()}  # the cells, as written
    assert {key: ids[key] for key in in_csv} == in_csv
    assert {"000123", "1e5", "True", "nan"} <= set(in_csv.values())
    line = next(i for i, r in enumerate(TRICKY, 1) if r.get("reviewerID") == "0042")
    assert ids[(str(root / "tricky.json"), line)] == "0042"  # a JSON string stays that string
    assert ids[(str(root / "numeric.json"), 1)] == "7"  # a JSON number: its JSON text


def test_unknown_text_key_exits_2_naming_the_key(ray_local, tiny_checkpoint, classifier,
                                                 corpus, tmp_path):
    argv = args(tiny_checkpoint, classifier, corpus, tmp_path / "out")
    argv[argv.index("--text_key") + 1] = "reviewTxt"
    code, _, err = run_main(argv)
    assert code == 2
    (line,) = error_lines(err)
    assert "'reviewTxt' (--text_key)" in line and str(corpus[0]) in line
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--classifier", "nope.json", "nope.json does not exist"),
    ("--load_model", "no_ckpt", "checkpoint .*no_ckpt does not exist"),
    ("--data", "no_corpus", "no_corpus: no such file or folder"),
    ("--classifier", "wrong_size.json", "expects rnn_size 16 features, checkpoint .* 32"),
    ("--output", "full", "full is not empty"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, classifier, corpus, tmp_path, flag,
                                         value, message):
    import re

    from sentdisc.classifier import fit_result_to_classifier

    fit_result_to_classifier(np.ones(16), 0.0, 1.0, [0], [1.0], 0.0, 1.0).save(
        tmp_path / "wrong_size.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.parquet").write_bytes(b"")
    argv = args(tiny_checkpoint, classifier, corpus, tmp_path / "out")
    argv[argv.index(flag) + 1] = str(tmp_path / value)
    code, _, err = run_main(argv)
    assert code == 2, err
    (line,) = error_lines(err)
    assert re.search(message, line), err


class _NoCounter:
    class add:  # the counter actor's method, called as ``counter.add.remote(...)``
        @staticmethod
        def remote(*_):
            return None


def test_binary_label_column_is_the_classifiers_label_name(tiny_checkpoint, model, classifier):
    """A binary classifier whose labels are ['1', '0']: the label column says what
    Classifier.predict_labels says, the name, not the class index (which reads inverted)."""
    from sentdisc.classifier import Classifier
    from sentdisc.score import _ScoreReplica, columns

    d = classifier[0].to_dict()
    d["labels"] = ["1", "0"]
    clf = Classifier.from_dict(d)
    replica = _ScoreReplica(str(tiny_checkpoint), d, 8, 256, 1, _NoCounter, columns("", clf),
                            "fp32")
    n = len(FIT_TEXTS)
    out = replica({"text": np.array(FIT_TEXTS, dtype=object), "file": np.array(["f"] * n),
                   "line": np.arange(1, n + 1), "capped": np.zeros(n, dtype=np.int64),
                   "error": np.array([""] * n)})
    feats = featurize(model, FIT_TEXTS, kind=clf.feature_kind, layer=clf.layer, precision="fp32")
    want = clf.predict_labels(feats)
    assert list(out["label"]) == want and set(want) == {"0", "1"}
    np.testing.assert_allclose(out["prob"], clf.predict_proba(feats), atol=1e-5)  # P(labels[1])
    assert [str(i) for i in clf.predict(feats)] != want  # the indices would have been wrong


def _copy_corpus(corpus, tmp_path) -> Path:
    import shutil

    data = tmp_path / "mc"
    data.mkdir()
    for name in ("tricky.json", "more.csv"):
        shutil.copy(corpus[0] / name, data / name)
    return data


@pytest.mark.parametrize("output, data_of", [
    ("{data}", "{data}"), ("{data}/", "{data}/more.csv"), ("{data}/scored", "{data}"),
    ("{tmp}", "{data}"), ("file://{data}", "{data}/tricky.json,{data}/more.csv"),
    ("{tmp}", "{data}/*.json")])
def test_output_that_is_holds_or_lies_in_the_data_is_refused_before_scoring(
        tiny_checkpoint, classifier, corpus, tmp_path, monkeypatch, output, data_of):
    """The corpus is never written into, nor deleted by --overwrite: one line, exit 2, before
    Ray starts, the corpus untouched."""
    import sentdisc.runtime

    data = _copy_corpus(corpus, tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in data.iterdir())
    monkeypatch.setattr(sentdisc.runtime, "ensure_ray", lambda **_: pytest.fail("Ray started"))
    argv = args(tiny_checkpoint, classifier, (data,), "x", "--overwrite")
    argv[argv.index("--output") + 1] = output.format(data=data, tmp=tmp_path)
    argv[argv.index("--data") + 1] = data_of.format(data=data)
    code, _, err = run_main(argv)
    assert code == 2, err
    (line,) = error_lines(err)
    assert "--data path" in line and "outside it" in line, line
    assert sorted((p.name, p.read_bytes()) for p in data.iterdir()) == before


def test_output_beside_the_data_is_accepted(tmp_path):
    from sentdisc.score import check_output_apart

    (tmp_path / "mc").mkdir()
    for output, data in ((tmp_path / "mcx", tmp_path / "mc"), (tmp_path / "out", tmp_path / "*.json"),
                         ("s3://b/ab", "s3://b/a"), ("gs://b/a", "s3://b/a")):
        check_output_apart(str(output), str(data))


@pytest.mark.parametrize("extra, message", [
    (["--precision", "bogus"], r"--precision must be one of auto, fp32, bf16, got 'bogus'"),
])
def test_bad_options_are_one_line_before_ray(tiny_checkpoint, classifier, corpus, tmp_path,
                                            monkeypatch, extra, message):
    import re

    import sentdisc.runtime

    monkeypatch.setattr(sentdisc.runtime, "ensure_ray", lambda **_: pytest.fail("Ray started"))
    code, _, err = run_main(args(tiny_checkpoint, classifier, corpus, tmp_path / "out", *extra))
    assert code == 2, err
    (line,) = error_lines(err)
    assert re.search(message, line), err
    assert "Traceback" not in err


def test_id_key_on_a_text_corpus_is_refused(tiny_checkpoint, classifier, tmp_path, monkeypatch):
    """A .txt file's records have no fields: --id_key would score every one with a null id."""
    import sentdisc.runtime

    monkeypatch.setattr(sentdisc.runtime, "ensure_ray", lambda **_: pytest.fail("Ray started"))
    (tmp_path / "lines.txt").write_text("good movie\nbad movie\n")
    code, _, err = run_main(args(tiny_checkpoint, classifier, (tmp_path / "lines.txt",),
                                 tmp_path / "out"))
    assert code == 2, err
    (line,) = error_lines(err)
    assert "--id_key reviewerID" in line and "lines.txt is read as text" in line, line
