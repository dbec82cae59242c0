"""The README's Python block ("From Python") runs as written, on a tiny checkpoint and its
classifier in place of the walk-through's."""
import re
from pathlib import Path

import numpy as np
from conftest import fit_mean_classifier

from sentdisc import featurize, load
from sentdisc.text import preprocess

README = Path(__file__).resolve().parents[1] / "README.md"
WALKTHROUGH_CLASSIFIER = "experiments/local/transfer/sst2/classifier.json"


def python_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_from_python_block_runs_as_written(tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint)
    texts = ["great fun, loved it", "dull and boring", "a joy to watch", "a waste of time"]
    clf, path = fit_mean_classifier(model, texts, [1, 0, 1, 0], tmp_path)
    clf.checkpoint = str(tiny_checkpoint)  # as transfer records the checkpoint it read
    clf.save(path)
    code = python_block("### 8. From Python")
    assert WALKTHROUGH_CLASSIFIER in code
    scope = {}
    exec(code.replace(WALKTHROUGH_CLASSIFIER, str(path)), scope)

    texts = scope["texts"]
    want = featurize(model, texts, kind="mean")
    np.testing.assert_array_equal(scope["features"], want)
    assert scope["labels"] == clf.predict_labels(want)
    assert set(scope["labels"]) <= set(clf.labels)
    probabilities = scope["probabilities"]
    assert probabilities.shape == (len(texts), 2)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-9)
    chars, values = scope["chars"], scope["values"]
    assert "".join(chars).strip() == preprocess(texts[0]).strip() and len(values) == len(chars)
    assert scope["sample"].startswith("This movie is") and len(scope["sample"]) > 100
