"""Heatmaps and neuron-controlled generation on a real tiny model; real files, real PNG/SVG."""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from sentdisc import ByteLM, ModelConfig, featurize, load, viz
from sentdisc.recipes import visualize
from sentdisc.recipes.visualize import contained_path, safe_filename
from sentdisc.text import encode, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Héllo 😀 wörld &amp; bye\tnow"  # 2- and 4-byte characters, an HTML entity, a tab


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def strong_model(tiny_checkpoint):
    """The tiny model with neuron 7 made to matter: its hidden unit drives the output bytes
    strongly (in a random 32-unit model one unit barely moves the logits, so holding it would
    not visibly change the text)."""
    m = load(tiny_checkpoint)
    with torch.no_grad():
        m.head.weight[:, 7] = 40 * torch.randn(256, generator=torch.Generator().manual_seed(0))
    return m


def _trace(model, data: bytes, neuron, layer=-1, kind="cell"):
    x = torch.tensor([list(data)])
    return model.trace(x, layer=layer, kind=kind)[0, :, neuron].numpy()


# --- values ----------------------------------------------------------------------------------

def test_values_equal_trace_after_each_characters_last_byte(model):
    chars, values = viz.neuron_values(model, TEXT, 5)
    shown = preprocess(TEXT)[2:-1]  # the pads are fed to the model but not shown
    assert "".join(chars) == shown == "Héllo 😀 wörld & bye\tnow"
    assert len(values) == len(chars) and values.dtype == np.float32
    full = _trace(model, encode(TEXT).tobytes(), 5)
    ends = np.cumsum([len(c.encode()) for c in preprocess(TEXT)]) - 1
    np.testing.assert_array_equal(values, full[ends[2:-1]])
    assert chars[6] == "😀" and values[6] == full[2 + 6 + 1 + 3]  # 'Héllo ' is 7 bytes
    # The model input is featurize's: its final cell state (after the end pad) is this trace's.
    assert full[-1] == pytest.approx(featurize(model, [TEXT])[0, 5], abs=1e-5)
    _, neg = viz.neuron_values(model, TEXT, 5, negate=True)
    np.testing.assert_array_equal(neg, -values)
    _, hidden = viz.neuron_values(model, TEXT, 5, kind="hidden")
    np.testing.assert_allclose(hidden, _trace(model, encode(TEXT).tobytes(), 5, kind="hidden")[ends[2:-1]],
                               atol=1e-5)
    assert not np.allclose(hidden, values)


def test_values_of_a_lower_layer():
    torch.manual_seed(1)
    m = ByteLM(ModelConfig(embed_size=8, rnn_size=16, layers=2)).eval()
    _, v0 = viz.neuron_values(m, "good film", 3, layer=0)
    _, v1 = viz.neuron_values(m, "good film", 3, layer=-1)
    data = encode("good film").tobytes()
    np.testing.assert_array_equal(v0, _trace(m, data, 3, layer=0)[2:-1])
    np.testing.assert_array_equal(v1, _trace(m, data, 3, layer=1)[2:-1])
    assert not np.allclose(v0, v1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text="   \n  ", neuron=0), "empty after preprocessing"),
    (dict(text="ok", neuron=32), r"neuron must be an integer in \[0, 32\)"),
    (dict(text="ok", neuron=-1), "neuron must be"),
    (dict(text="ok", neuron=0, layer=3), "layer 3 out of range"),
    (dict(text="ok", neuron=0, kind="mean"), "kind must be 'cell' or 'hidden'"),
    (dict(text="bad \ud800 surrogate", neuron=0), "not valid Unicode"),
])
def test_bad_value_requests_are_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        viz.neuron_values(model, **kwargs)


def test_bytes_to_chars_handles_invalid_utf8():
    data = b"a\xc3\xa9\xff\xe2\x82"  # 'a', 'é', a stray byte, a truncated 3-byte character
    chars, values = viz.bytes_to_chars(data, [0, 1, 2, 3, 4, 5])
    assert chars == ["a", "é", "\ufffd", "\ufffd"]
    assert values.tolist() == [0, 2, 3, 5]


# --- generation ------------------------------------------------------------------------------

def test_overwrite_holds_the_neuron_exactly_and_changes_the_text(strong_model):
    model = strong_model
    prompt = "This movie was "
    free = viz.generate_text(model, prompt, 40, 1.0, neuron=7, seed=3)
    held = viz.generate_text(model, prompt, 40, 1.0, neuron=7, overwrite=1.0, seed=3)
    p = held["prompt_end"]
    assert p == len(prompt) and "".join(held["chars"][:p]) == prompt
    # From the last prompt character on, every value the model produced is the forced one.
    assert np.all(held["values"][p - 1:] == 1.0) and held["forced"] == 1.0
    assert held["text"] != free["text"] and held["text"].startswith(prompt)
    assert not np.all(free["values"][p:] == 1.0)
    # negate: the cell is held at -1, shown as +1; identical to forcing -1 directly.
    neg = viz.generate_text(model, prompt, 40, 1.0, neuron=7, overwrite=1.0, negate=True, seed=3)
    minus = viz.generate_text(model, prompt, 40, 1.0, neuron=7, overwrite=-1.0, seed=3)
    assert neg["forced"] == -1.0 and neg["text"] == minus["text"] != held["text"]
    assert np.all(neg["values"][p - 1:] == 1.0) and np.all(minus["values"][p - 1:] == -1.0)


def test_free_generation_values_are_the_chosen_neurons_trace(model):
    out = viz.generate_text(model, "Great", 30, 1.0, neuron=9, seed=5)
    g = torch.Generator().manual_seed(5)
    data, _ = model.generate(b"\n Great", 30, temperature=1.0, generator=g)
    expected_chars, expected = viz.bytes_to_chars(data, _trace(model, data, 9))
    assert out["chars"] == expected_chars[2:] and out["prompt_end"] == 5
    np.testing.assert_array_equal(out["values"], expected[2:])


def test_generation_is_reproducible_with_a_seed(model):
    a = viz.generate_text(model, "I lov", 50, 1.0, neuron=2, seed=11)
    b = viz.generate_text(model, "I lov", 50, 1.0, neuron=2, seed=11)
    c = viz.generate_text(model, "I lov", 50, 1.0, neuron=2, seed=12)
    assert a["text"] == b["text"] and np.array_equal(a["values"], b["values"])
    assert a["text"] != c["text"]
    # The prompt keeps its open word (no end pad) unless it ends in whitespace.
    assert a["text"].startswith("I lov") and a["prompt_end"] == 5
    assert viz.generate_text(model, "", 5, 0.0)["prompt_end"] == 0


def test_bad_generation_requests(model):
    with pytest.raises(ValueError, match="overwrite needs a neuron"):
        viz.generate_text(model, "x", 5, 1.0, overwrite=1.0)
    with pytest.raises(ValueError, match="seq_length"):
        viz.generate_text(model, "x", -1, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        viz.generate_text(model, "x", 5, float("nan"))


# --- rendering -------------------------------------------------------------------------------

def _png(data: bytes) -> np.ndarray:
    img = Image.open(BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB")).astype(int)


def test_png_decodes_with_the_expected_size_and_colours():
    chars = list("ab" + "x" * 128)  # 130 characters -> 3 lines of 64
    values = np.zeros(130)
    values[0], values[1] = 2.0, -2.0
    img = _png(viz.render_png(chars, values, prompt_end=70, title="test"))
    expected_w = 2 * viz.MARGIN + 64 * viz.CELL_W
    expected_h = viz.MARGIN + viz.TITLE_H + 3 * viz.CELL_H + viz.LEGEND_H
    assert img.shape == (expected_h, expected_w, 3)
    assert viz.png_size(130, title="test") == (expected_w, expected_h)
    top = viz.MARGIN + viz.TITLE_H
    r, g, b = img[top + 2, viz.MARGIN + 1]  # corner of cell 0 (away from the glyph)
    assert g > 80 and g > r + 40  # positive: green
    r, g, b = img[top + 2, viz.MARGIN + viz.CELL_W + 1]
    assert r > 120 and r > g + 40  # negative: red
    r, g, b = img[top + viz.CELL_H + viz.CELL_H // 2, viz.MARGIN + 6 * viz.CELL_W]  # line 1, col 6
    assert b > 150 and b > r + 80  # the prompt-end bar
    r, g, b = img[top + 2, viz.MARGIN + 3 * viz.CELL_W + 1]  # value 0: the pale middle colour
    assert min(r, g, b) > 150
    # One more line of text is exactly one cell taller; no title drops the title band.
    assert _png(viz.render_png(chars * 2, np.r_[values, values])).shape[:2] == (
        viz.MARGIN + 5 * viz.CELL_H + viz.LEGEND_H, expected_w)
    assert _png(viz.render_png(["a"], [0.0], width=10)).shape[:2] == viz.png_size(1, 10)[::-1]


def test_render_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 characters but 1 values"):
        viz.render_png(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="prompt_end"):
        viz.render_svg(["a"], [1.0], prompt_end=5)
    with pytest.raises(ValueError, match="too many"):
        viz.render_html(["a"] * (viz.MAX_CHARS + 1), np.zeros(viz.MAX_CHARS + 1))


HOSTILE = list('<&>"\'') + ["]]>", "\x00", "\x07", "\u2028", "\ufeff", "\u0301", "\n", "😀", " "]


def test_svg_is_valid_xml_with_hostile_characters():
    values = np.linspace(-1, 1, len(HOSTILE))
    svg = viz.render_svg(HOSTILE, values, prompt_end=3, title='<b>"t" & \'x\'</b>')
    root = ET.fromstring(svg)  # raises on any unescaped character
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for ch in '<&>"\'':
        assert ch in texts
    assert '<b>"t" & \'x\'</b>' in texts and "]]>" in texts and "\x00" not in svg
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert "end of prompt" in titles and len(titles) == len(HOSTILE) + 1


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.texts, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.texts.append(data)


def test_html_escapes_every_character():
    chars = list("<script>alert('x')</script>") + HOSTILE
    page = viz.render_html(chars, np.zeros(len(chars)), prompt_end=4, title="<i>t</i>")
    assert "<script" not in page and "<i>" not in page and "&lt;i&gt;t&lt;/i&gt;" in page
    parser = _Spans()
    parser.feed(page)
    assert "script" not in parser.tags and "i" not in parser.tags
    assert "".join(parser.texts).count("<script>alert('x')</script>") == 1  # shown as text
    fragment = viz.render_html(["a"], [0.5], full_page=False)
    assert fragment.startswith("<style>") and "<html>" not in fragment


# --- file names ------------------------------------------------------------------------------

BAD_TEXTS = ["../../../etc/passwd", "/etc/passwd", "a\x00b", "..", ".", "", "x" * 10_000,
             "日本語のレビュー", "..\\..\\windows", "CON", "a/b", "a?b", "\ud800"]


def test_safe_filename_never_makes_a_path(tmp_path):
    names = [safe_filename(t, ".png") for t in BAD_TEXTS]
    for name in names:
        assert re.fullmatch(r"[a-z0-9-]{1,40}-[0-9a-f]{12}\.png", name), name
        assert contained_path(tmp_path, name).parent == tmp_path.resolve()
    assert len(set(names)) == len(names)  # the hash keeps same-slug texts apart
    assert safe_filename("Great movie!", ".png").startswith("great-movie-")
    for suffix in ("/x.png", "../x", "", "a\x00"):
        with pytest.raises(ValueError, match="suffix"):
            safe_filename("t", suffix)
    for name in ("../x", "..", "a/b", "x\x00"):
        with pytest.raises(ValueError):
            contained_path(tmp_path, name)
    # A symlink already sitting at the name cannot redirect the write outside.
    outside = tmp_path / "outside.png"
    (tmp_path / "heatmaps").mkdir()
    (tmp_path / "heatmaps" / "evil.png").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        contained_path(tmp_path / "heatmaps", "evil.png")


def test_hostile_texts_stay_inside_the_heatmap_folder(tiny_checkpoint, tmp_path, capsys):
    exp = tmp_path / "exp"
    for text in ["../../../escaped", "/tmp/abs", "a\x00b", "y" * 600, "ünïcödé 日本 ../x"]:
        assert visualize.main(["--load_model", str(tiny_checkpoint), "--text", text, "--neuron", "1",
                               "--experiment_dir", str(exp), "--formats", "png,json"]) == 0
    folder = exp / "default" / "heatmaps"
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 10 and all(p.parent == folder for p in written)
    assert capsys.readouterr().out.count(str(folder)) == 10


# --- entry points ----------------------------------------------------------------------------

def test_cli_heatmap_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from sentdisc.cli import main as cli_main

    rc = cli_main(["heatmap", "--load_model", str(tiny_checkpoint), "--text", "What a great film!",
                   "--neuron", "3", "--experiment_dir", str(tmp_path), "--experiment_name", "e1",
                   "--formats", "png,svg,html,json"])
    assert rc == 0
    paths = [p for p in capsys.readouterr().out.split() if p.startswith(str(tmp_path))]
    assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "svg", "html", "json"]
    assert all(os.path.dirname(p) == str(tmp_path / "e1" / "heatmaps") for p in paths)
    img = _png(open(paths[0], "rb").read())
    assert img.shape[:2] == viz.png_size(18, title="t")[::-1]
    ET.parse(paths[1])
    record = json.load(open(paths[3], encoding="utf-8"))
    chars, values = viz.neuron_values(load(tiny_checkpoint), "What a great film!", 3)
    assert record["chars"] == chars and np.allclose(record["values"], values)


def test_cli_generate_from_classifier_defaults(tiny_checkpoint, tmp_path, capsys):
    from sentdisc.classifier import Classifier

    coef = np.zeros(32)
    coef[7], coef[3] = -2.0, 1.0
    clf = Classifier(coef=coef, intercept=0.0, C=1.0, neurons=[7, 3], signs=[-1, 1],
                     top_coef=[-2.0, 1.0], top_intercept=0.0, top_C=1.0, feature_kind="cell",
                     layer=-1, checkpoint=str(tiny_checkpoint)).save(tmp_path / "classifier.json")
    common = ["--classifier", str(clf), "--text", "The plot ", "--overwrite", "1",
              "--seq_length", "30", "--temperature", "1.0", "--experiment_dir", str(tmp_path),
              "--formats", "json,png"]
    assert visualize.generate_main(common) == 0
    out = capsys.readouterr().out
    assert out.startswith("generated: ")
    record = json.load(open(out.split()[-2], encoding="utf-8"))
    # Top neuron, negative sign -> negated: the cell was held at -1, displayed as +1.
    assert record["neuron"] == 7 and record["negate"] is True
    assert record["prompt_end"] == 9 and all(v == 1.0 for v in record["values"][8:])
    direct = viz.generate_text(load(tiny_checkpoint), "The plot ", 30, 1.0, neuron=7,
                               overwrite=-1.0, seed=1234)
    assert record["chars"] == direct["chars"]
    # Told otherwise: --no-negate and an explicit neuron (positive sign in the classifier).
    assert visualize.main(common + ["--generate", "--no-negate", "--neuron", "3"]) == 0
    record = json.load(open(capsys.readouterr().out.split()[-2], encoding="utf-8"))
    assert record["neuron"] == 3 and record["negate"] is False


def _label_classifier(checkpoint, path):
    """A multi-class classifier whose labels stand for neurons with known signs: books 5 (+),
    dvd 9 (-), and kitchen 5 as well, weighted negatively: the top-neuron list gave 5 to books
    (kitchen has none of its own there), but 5 is what stands for kitchen, negated."""
    from sentdisc.classifier import Classifier, rank_neurons

    labels = ["books", "dvd", "kitchen"]
    coef = np.zeros((3, 32))
    coef[0, 5], coef[1, 9], coef[2, 5], coef[2, 12] = 2.0, -3.0, -2.5, -1.5
    neurons, signs, serves = rank_neurons(coef, 1, labels)
    assert serves == ["books", "dvd"]  # the case the test is about: kitchen has none of its own
    return Classifier(coef=coef, intercept=np.zeros(3), neurons=neurons, signs=signs,
                      neuron_labels=serves, feature_kind="cell", label_kind="multiclass",
                      labels=labels, checkpoint=str(checkpoint)).save(path)


@pytest.mark.parametrize("label, neuron, negate", [
    ("books", 5, False), ("dvd", 9, True), ("kitchen", 5, True)])
def test_cli_label_shows_that_labels_neuron_with_its_sign(tiny_checkpoint, tmp_path, capsys,
                                                          label, neuron, negate):
    clf = _label_classifier(tiny_checkpoint, tmp_path / "classifier.json")
    text = "Great extras on this disc"
    assert visualize.main(["--classifier", str(clf), "--label", label, "--text", text,
                           "--experiment_dir", str(tmp_path), "--formats", "json"]) == 0
    record = json.load(open(capsys.readouterr().out.split()[-1], encoding="utf-8"))
    assert (record["neuron"], record["negate"], record["label"]) == (neuron, negate, label)
    chars, values = viz.neuron_values(load(tiny_checkpoint), text, neuron, negate=negate)
    assert record["chars"] == chars and np.allclose(record["values"], values)


@pytest.mark.parametrize("args, message", [
    (["--label", "toys"], "label 'toys' is not one of the classifier's labels (books, dvd, "
                          "kitchen)"),
    (["--label", "dvd", "--neuron", "3"], "give --neuron or --label, not both"),
    (["--label", "dvd", "--classifier", ""], "--label needs --classifier"),
    (["--label", "positive", "--classifier", "{binary}"], "a binary classifier's neurons are "
                                                          "not per label"),
])
def test_cli_bad_label_is_one_clear_line(tiny_checkpoint, tmp_path, capsys, args, message):
    from sentdisc.classifier import Classifier

    clf = _label_classifier(tiny_checkpoint, tmp_path / "classifier.json")
    binary = Classifier(coef=np.ones(32), intercept=0.0, neurons=[7], signs=[1]).save(
        tmp_path / "binary.json")
    args = [a.replace("{binary}", str(binary)) for a in args]
    assert visualize.main(["--load_model", str(tiny_checkpoint), "--classifier", str(clf),
                           "--experiment_dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--load_model", "/nonexistent/ckpt"], "does not exist"),
    (["--neuron", "500"], "neuron must be an integer"),
    (["--text", "  "], "empty after preprocessing"),
    (["--classifier", "{tmp}/missing.json"], "classifier file"),
    (["--classifier", "{tmp}/bad.json"], "not a sentdisc classifier"),
    (["--experiment_name", "../up"], "plain folder name"),
    (["--formats", "png,exe"], "--formats"),
    (["--generate", "--overwrite", "1", "--neuron", "-3"], "neuron must be"),
    # refused before the model runs (its trace would hold every byte's states)
    # counted as drawn: the cleaned text, not the pads the user did not write
    (["--text", "&amp;" * 20_001, "--formats", "json"], "20001 characters is too many to draw"),
    (["--generate", "--text", "ab", "--seq_length", "19999"],
     "20001 characters with --seq_length is too many"),
    (["--device", "bogus"], "--device 'bogus' is not a torch device"),
    (["--width", "2"], "width must be an integer >= 3"),
])
def test_cli_bad_input_is_one_clear_line(tiny_checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "bad.json").write_text(json.dumps({"neurons": "seven", "signs": []}))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--load_model", str(tiny_checkpoint), "--experiment_dir", str(tmp_path / "exp")]
    assert visualize.main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "exp" / "default" / "heatmaps").exists() or not any(
        (tmp_path / "exp" / "default" / "heatmaps").iterdir())


def test_job_script_generates(tiny_checkpoint, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "jobs", "visualize.py"), "--generate",
         "--load_model", str(tiny_checkpoint), "--neuron", "2", "--overwrite", "-1",
         "--seq_length", "20", "--experiment_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    png = proc.stdout.split()[-1]
    assert png.endswith(".png") and os.path.dirname(png) == str(tmp_path / "default" / "heatmaps")
    assert _png(open(png, "rb").read()).shape[2] == 3


def test_labels_with_dollar_signs_draw_as_written(tmp_path):
    # price classes ($, $$, $$$) are data, not TeX: matplotlib would read "$$" as math and fail
    from sentdisc import report

    labels = ["$", "$$", "$$$"]
    report.plot_confusion(tmp_path / "c.png", np.eye(3, dtype=int), labels, "test")
    report.plot_neuron_weights(tmp_path / "w.png", np.ones((3, 8)), [1, 2, 3], 0.5, labels)
    png = viz.render_png(list("cost $$ here"), np.zeros(12), title="label $$")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "w.png").stat().st_size > 0


def test_generation_takes_numpy_numbers(model):
    # np.float32 was refused as "temperature must be a finite number"
    a = viz.generate_text(model, "hi", 5, np.float32(0.5), neuron=2, overwrite=np.float32(1.0),
                          seed=3)
    b = viz.generate_text(model, "hi", 5, 0.5, neuron=2, overwrite=1.0, seed=3)
    assert a["text"] == b["text"] and a["forced"] == 1.0
    with pytest.raises(ValueError, match="temperature"):
        viz.generate_text(model, "hi", 5, True)
    with pytest.raises(ValueError, match="overwrite"):
        viz.generate_text(model, "hi", 5, 1.0, neuron=2, overwrite=np.bool_(True))


@pytest.mark.parametrize("width", [1, 2])
def test_png_too_narrow_for_its_colour_bar_is_a_clear_error(width):
    with pytest.raises(ValueError, match=f"width must be an integer >= 3 .*got {width}"):
        viz.render_png(["a", "b"], [0.0, 1.0], width=width)
    img = _png(viz.render_png(["a", "b"], [0.0, 1.0], width=3))
    assert img.shape[:2] == viz.png_size(2, 3)[::-1]
    ET.fromstring(viz.render_svg(["a", "b"], [0.0, 1.0], width=width))  # no bar to fit


def test_svg_title_and_label_with_control_characters_are_well_formed():
    title, label = "t\x00i\x07tle\x1b\nend", "lab\x01el\u0301"
    svg = viz.render_svg(["a"], [0.5], title=title, label=label)
    root = ET.fromstring(svg)  # raised "not well-formed (invalid token)"
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert viz.display_text(title) in texts and viz.display_text(label) in texts
    assert viz.display_text(title) == "t\u00b7i\u00b7tle\u00b7\u21b5end"
    assert viz.display_text(label).endswith("el\u0301")  # a combining mark stays on its letter
    page = viz.render_html(["a"], [0.5], title=title, label=label)
    assert "\x00" not in page and "\x07" not in page
    assert _png(viz.render_png(["a"], [0.5], title=title, label=label)).shape[2] == 3


def test_cli_heatmap_refuses_a_device_this_machine_lacks(tiny_checkpoint, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for prog in (visualize.heatmap_main, visualize.generate_main):
        assert prog(["--load_model", str(tiny_checkpoint), "--device", "cuda",
                     "--experiment_dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "--device 'cuda': CUDA is not available" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_cli_heatmap_uses_the_checkpoints_own_classifier(tiny_checkpoint, tmp_path, capsys):
    # score and serve use a fine-tuned checkpoint's classifier.json; heatmap drew neuron 0
    import shutil

    from sentdisc.classifier import Classifier

    ckpt = tmp_path / "finetuned"
    shutil.copytree(tiny_checkpoint, ckpt)
    coef = np.zeros(32)
    coef[11] = -3.0
    Classifier(coef=coef, intercept=0.0, neurons=[11], signs=[-1], feature_kind="hidden",
               layer=-1).save(ckpt / "classifier.json")
    text = "good movie"
    args = ["--load_model", str(ckpt), "--text", text, "--experiment_dir", str(tmp_path),
            "--formats", "json"]
    assert visualize.heatmap_main(args) == 0
    record = json.load(open(capsys.readouterr().out.split()[-1], encoding="utf-8"))
    assert (record["neuron"], record["negate"], record["kind"]) == (11, True, "hidden")
    chars, values = viz.neuron_values(load(ckpt), text, 11, kind="hidden", negate=True)
    assert record["chars"] == chars and np.allclose(record["values"], values)
    # told otherwise, as with --classifier
    assert visualize.heatmap_main(args + ["--neuron", "4", "--no-negate", "--kind", "cell"]) == 0
    record = json.load(open(capsys.readouterr().out.split()[-1], encoding="utf-8"))
    assert (record["neuron"], record["negate"], record["kind"]) == (4, False, "cell")
    # a checkpoint without one: neuron 0 as before
    assert visualize.heatmap_main(["--load_model", str(tiny_checkpoint), *args[2:]]) == 0
    assert json.load(open(capsys.readouterr().out.split()[-1], encoding="utf-8"))["neuron"] == 0


def test_cli_text_file_drops_a_byte_order_mark(tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / "review.txt"
    f.write_bytes("\ufeffGreat film".encode("utf-8"))
    assert visualize.heatmap_main(["--load_model", str(tiny_checkpoint), "--text_file", str(f),
                                   "--experiment_dir", str(tmp_path), "--formats", "json"]) == 0
    record = json.load(open(capsys.readouterr().out.split()[-1], encoding="utf-8"))
    assert record["text"] == "Great film"


def test_cli_text_file_cap_counts_the_users_characters(tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / "long.txt"
    f.write_text("x" * viz.MAX_CHARS)  # exactly the cap: drawn
    base = ["--load_model", str(tiny_checkpoint), "--experiment_dir", str(tmp_path),
            "--formats", "json"]
    assert visualize.heatmap_main(base + ["--text_file", str(f)]) == 0
    capsys.readouterr()
    f.write_text("x" * (viz.MAX_CHARS + 1))
    assert visualize.heatmap_main(base + ["--text_file", str(f)]) == 2
    assert f"{viz.MAX_CHARS + 1} characters is too many" in capsys.readouterr().err
