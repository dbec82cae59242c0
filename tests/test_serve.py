"""Ray Serve app over real HTTP: a running Serve instance on the tiny checkpoint, requests sent
with `requests` to 127.0.0.1 (no test client), values compared with the library in process."""
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import fit_mean_classifier, free_port, routed

from sentdisc import featurize, load, viz

REPO = Path(__file__).resolve().parents[1]
APP_NAME = "sentdisc-test"
LIMITS = dict(max_texts=8, max_text_bytes=2000, max_generate_length=64)
# The deployment's user_config; a long wait makes concurrent requests share batches reliably.
BATCHING = dict(max_batch_size=16)
TEXTS = ["This movie was wonderful, I loved every minute.",
         "Terrible. A waste of money &amp; time!",
         "Caf\u00e9 cr\u00e8me was fine \U0001F600",
         "Meh.",
         "It is what it is.",
         "Best purchase I have made all year; highly recommended.",
         "The plot made no sense\nand the acting was wooden.",
         "ok"]



@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def classifier(model, tmp_path_factory):
    clf, path = fit_mean_classifier(model, TEXTS, [1, 0, 1, 0, 1, 1, 0, 0], tmp_path_factory.mktemp("clf"))
    return clf, path


def app_args(tiny_checkpoint, classifier) -> dict:
    return {"checkpoint": str(tiny_checkpoint), "classifier": str(classifier[1]), **LIMITS}


@pytest.fixture(scope="module")
def url(serve_port, tiny_checkpoint, classifier):
    from ray import serve

    from sentdisc.serving import make_app

    app = make_app(app_args(tiny_checkpoint, classifier), batching=BATCHING)
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        yield routed(f"http://127.0.0.1:{serve_port}")
    finally:
        serve.delete(APP_NAME)


def post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=60, **kw)


# --- endpoints -----------------------------------------------------------------------------

def test_healthz_openapi_and_docs(url):
    r = requests.get(url + "/healthz", timeout=30)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["rnn_size"] == 32 and h["classifier"] is True
    assert h["feature_kind"] == "mean"  # taken from the classifier
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    for path in ("/featurize", "/sentiment", "/heatmap", "/generate"):
        assert "post" in spec["paths"][path], path
    schemas = spec["components"]["schemas"]
    assert schemas["FeaturizeRequest"]["additionalProperties"] is False
    # this deployment's caps are in its schema, so a client (or a fuzzer) can know them
    texts = schemas["SentimentRequest"]["properties"]["texts"]
    assert texts["maxItems"] == LIMITS["max_texts"]
    assert texts["items"]["maxLength"] == LIMITS["max_text_bytes"]
    gen = schemas["GenerateRequest"]["properties"]
    assert gen["length"]["maximum"] == LIMITS["max_generate_length"]
    assert gen["temperature"]["minimum"] == 0 and gen["seed"]["anyOf"][0]["maximum"] == 2**32 - 1
    assert schemas["HeatmapRequest"]["properties"]["neuron"]["anyOf"][0]["maximum"] == 31
    for path in ("/featurize", "/sentiment", "/classify", "/heatmap", "/generate"):
        assert {"400", "413", "422", "500", "503"} <= set(spec["paths"][path]["post"]["responses"]), path
    assert "409" in spec["paths"]["/sentiment"]["post"]["responses"]
    assert schemas["ClassifyRequest"]["properties"]["texts"]["maxItems"] == LIMITS["max_texts"]
    # /docs: Swagger UI from the app's own assets, nothing from a CDN
    docs = requests.get(url + "/docs", timeout=30)
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
    assert assets and all(a.startswith("/") for a in assets), assets
    for a in assets:
        assert requests.get(url + a, timeout=30).status_code == 200, a


def test_schemathesis_finds_no_contract_failure(url, tmp_path):
    """Every check schemathesis has, against this deployment's own /openapi.json: no 500s,
    responses that match their schemas and documented status codes, valid requests accepted,
    invalid ones rejected (bounded examples: the suite's time budget)."""
    cli = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    out = subprocess.run([cli, "run", url + "/openapi.json", "--checks", "all",
                          "--max-examples", "12", "--seed", "1", "--request-timeout", "60",
                          "--generation-database", "none", "--no-color"],
                         capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]


def test_featurize_equals_in_process(url, model):
    r = post(url, "/featurize", {"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array(body["features"], dtype=np.float32)
    want = featurize(model, TEXTS, kind="mean")
    assert got.shape == (len(TEXTS), 32) and body["kind"] == "mean" and body["neurons"] is None
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert int(r.headers["X-Batch-Size"]) >= 1
    r = post(url, "/featurize", {"texts": TEXTS[:2], "neurons": [5, 0, 31]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["features"]), want[:2][:, [5, 0, 31]], atol=1e-5)


def test_sentiment_equals_classifier_on_features(url, model, classifier):
    clf = classifier[0]
    r = post(url, "/sentiment", {"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    feats = featurize(model, TEXTS, kind="mean")
    prob = clf.predict_proba(feats)
    assert body["neuron"] == clf.neuron
    assert len(body["results"]) == len(TEXTS)
    for res, p, f in zip(body["results"], prob, feats, strict=True):
        assert res["probability"] == pytest.approx(p, abs=1e-5)
        assert res["label"] == ("positive" if p >= 0.5 else "negative")
        assert res["neuron_value"] == pytest.approx(f[clf.neuron], abs=1e-5)
    # the classifier was fitted to separate these texts: both labels occur
    assert {res["label"] for res in body["results"]} == {"positive", "negative"}


def test_classify_binary_is_the_classifier_on_features(url, model, classifier):
    clf = classifier[0]
    r = post(url, "/classify", {"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label_kind"] == "binary" and body["labels"] == ["negative", "positive"]
    feats = featurize(model, TEXTS, kind="mean")
    want = clf.label_proba(feats)
    for res, p, said in zip(body["results"], want, clf.predict_labels(feats), strict=True):
        assert res["label"] == said and res["labels"] == [said]
        assert list(res["probabilities"]) == ["negative", "positive"]
        np.testing.assert_allclose(list(res["probabilities"].values()), p, atol=1e-5)
        assert sum(res["probabilities"].values()) == pytest.approx(1, abs=1e-6)


def _multi_classifier(kind: str, labels: list, path: Path):
    """A classifier of ``kind`` over the tiny model's mean features, random but fixed."""
    from sentdisc.classifier import Classifier, rank_neurons

    rng = np.random.default_rng(3)
    coef = rng.normal(size=(len(labels), 32)) * 3
    neurons, signs, serves = rank_neurons(coef, 1, labels)
    clf = Classifier(coef=coef, intercept=rng.normal(size=len(labels)), neurons=neurons,
                     signs=signs, neuron_labels=serves, feature_kind="mean", label_kind=kind,
                     labels=labels)
    clf.save(path)
    return clf


MULTI_KINDS = ("multiclass", "multilabel")
MULTI_LABELS = ["books", "dvd", "electronics", "kitchen"]


@pytest.fixture(scope="module")
def multi_kind_apps(serve_port, tiny_checkpoint, tmp_path_factory):
    """An app per non-binary kind, deployed together (their replicas start in parallel):
    {kind: (url, classifier)}."""
    from ray import serve

    from sentdisc.serving import make_app

    apps, targets = {}, []
    for kind in MULTI_KINDS:
        path = tmp_path_factory.mktemp(kind) / "classifier.json"
        clf = _multi_classifier(kind, MULTI_LABELS, path)
        app = make_app({"checkpoint": str(tiny_checkpoint), "classifier": str(path), **LIMITS})
        targets.append(serve.RunTarget(app, name=f"sentdisc-{kind}", route_prefix=f"/{kind}"))
        apps[kind] = (f"http://127.0.0.1:{serve_port}/{kind}", clf)
    serve.run_many(targets)
    for url, _ in apps.values():
        routed(url)
    try:
        yield apps
    finally:  # both at once, and gone before the next test (their replicas hold CPUs)
        names = [f"sentdisc-{kind}" for kind in MULTI_KINDS]
        for name in names:
            serve.delete(name, _blocking=False)
        deadline = time.time() + 60
        while set(names) & set(serve.status().applications) and time.time() < deadline:
            time.sleep(0.2)


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_multi_kind_app_classifies_and_sentiment_points_to_classify(multi_kind_apps, model,
                                                                    kind):
    url, clf = multi_kind_apps[kind]
    labels = MULTI_LABELS
    r = post(url, "/classify", {"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label_kind"] == kind and body["labels"] == labels
    feats = featurize(model, TEXTS, kind="mean")
    want, said = clf.label_proba(feats), clf.predict_labels(feats)
    for res, p, names in zip(body["results"], want, said, strict=True):
        assert list(res["probabilities"]) == labels
        np.testing.assert_allclose(list(res["probabilities"].values()), p, atol=1e-5)
        if kind == "multiclass":
            assert sum(res["probabilities"].values()) == pytest.approx(1, abs=1e-6)
            assert res["label"] == names and res["labels"] == [names]
        else:  # every label over 0.5
            assert res["label"] is None and res["labels"] == names
            assert names == [lab for lab, q in zip(labels, p) if q > 0.5]
    r = post(url, "/sentiment", {"texts": ["fine"]})
    assert r.status_code == 409
    msg = r.json()["detail"][0]["msg"]
    assert "/classify" in msg and kind in msg and "books" in msg
    assert requests.get(url + "/healthz", timeout=30).json()["label_kind"] == kind
    # a label's neuron, signed by its weight for that label, for heatmaps and generation
    for label in labels:
        neuron, sign = clf.top_neuron_of(label)
        r = post(url, "/heatmap", {"text": TEXTS[0], "label": label, "format": "json"})
        assert r.status_code == 200, r.text
        _, values = viz.neuron_values(model, TEXTS[0], neuron, kind="hidden", negate=sign < 0)
        assert (r.json()["neuron"], r.json()["negated"]) == (neuron, sign < 0)
        np.testing.assert_allclose(r.json()["values"], values, atol=1e-5)
    r = post(url, "/generate", {"prompt": "a", "length": 5, "label": "dvd", "overwrite": 1})
    assert r.status_code == 200 and r.json()["neuron"] == clf.top_neuron_of("dvd")[0], r.text
    for bad, loc, msg in (
            ({"label": "toys"}, ["body", "label"], "not one of the classifier's labels (books"),
            ({"label": "dvd", "neuron": 3}, ["body"], "give neuron or label, not both")):
        r = post(url, "/heatmap", {"text": "fine", **bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text
        assert msg in r.json()["detail"][0]["msg"], r.text
    spec = requests.get(url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    assert spec["HeatmapRequest"]["properties"]["label"]["anyOf"][0]["enum"] == labels


def test_heatmap_png_svg_json(url, model, classifier):
    clf = classifier[0]
    text = "Great value <b>&</b> fast shipping \u2014 five stars"
    r = post(url, "/heatmap", {"text": text, "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    r = post(url, "/heatmap", {"text": text, "format": "svg", "neuron": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.lstrip().startswith("<svg") and "<b>" not in r.text  # escaped
    r = post(url, "/heatmap", {"text": text, "format": "json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    negate = clf.sign < 0
    chars, values = viz.neuron_values(model, text, clf.neuron, kind="hidden", negate=negate)
    assert body["neuron"] == clf.neuron and body["negated"] == negate
    assert body["chars"] == chars
    np.testing.assert_allclose(body["values"], values, atol=1e-5)
    r = post(url, "/heatmap", {"text": text, "label": "positive"})  # a binary classifier's
    assert r.status_code == 422 and "not per label" in r.json()["detail"][0]["msg"], r.text


def test_generate_seeded_forced_and_in_process(url, model, classifier):
    req = {"prompt": "I loved it", "length": 20, "temperature": 1.0, "seed": 7, "neuron": 4}
    a = post(url, "/generate", req)
    b = post(url, "/generate", req)
    assert a.status_code == 200, a.text
    a, b = a.json(), b.json()
    assert a["text"] == b["text"] and a["text"].startswith("I loved it")
    want = viz.generate_text(model, "I loved it", 20, 1.0, neuron=4, seed=7)
    assert a["text"] == want["text"] and a["prompt_end"] == want["prompt_end"]
    np.testing.assert_allclose(a["trace"], want["values"], atol=1e-5)
    assert len(a["trace"]) == len(a["chars"]) == len(a["text"])
    r = post(url, "/generate", {"prompt": "x", "length": 10, "neuron": 4, "overwrite": 0.75,
                                "seed": 1}).json()
    # the forced neuron holds its value from the last prompt character on
    np.testing.assert_allclose(r["trace"][r["prompt_end"] - 1:], 0.75, atol=1e-6)
    # default neuron: the classifier's sentiment neuron
    assert post(url, "/generate", {"length": 5}).json()["neuron"] == classifier[0].neuron


@pytest.mark.parametrize("temperature", [0.0, 1e-38, 1e-300])
def test_generate_at_tiny_temperature_is_greedy_and_finite(url, model, temperature):
    # fuzzing found 1e-300 -> 500 ("probability tensor contains inf, nan"): below 1e-4 the
    # next byte is the argmax, the same text as temperature 0
    req = {"prompt": "hi", "length": 5, "temperature": temperature, "neuron": 1,
           "overwrite": 99.0}
    r = post(url, "/generate", req)
    assert r.status_code == 200, r.text
    body = r.json()
    greedy = viz.generate_text(model, "hi", 5, 0.0, neuron=1, overwrite=99.0)
    assert body["text"] == greedy["text"]
    assert all(isinstance(v, float) and np.isfinite(v) for v in body["trace"])


def test_concurrent_requests_are_batched(url, model, classifier):
    # requests of 1-3 texts of different lengths: each must get back exactly its own rows
    texts = [[f"review {i}: " + "good " * (i % 5) + "bad " * j for j in range(1 + i % 3)]
             for i in range(16)]

    def call(t):
        r = post(url, "/sentiment", {"texts": t})
        return r.status_code, int(r.headers["X-Batch-Size"]), r.json()

    with ThreadPoolExecutor(16) as pool:
        out = list(pool.map(call, texts))
    assert all(code == 200 for code, _, _ in out)
    sizes = [b for _, b, _ in out]
    assert max(sizes) > 1, f"no request was batched with another: {sizes}"
    # batching changes nothing in the answers
    clf = classifier[0]
    for t, (_, _, got) in zip(texts, out, strict=True):
        want = clf.predict_proba(featurize(model, t, kind="mean"))
        np.testing.assert_allclose([r["probability"] for r in got["results"]], want, atol=1e-5)
    stats = requests.get(url + "/stats", timeout=30).json()
    assert stats["max_batch_size_seen"] > 1 and stats["requests"] >= 16


def healthz_when(url, done, timeout=60) -> dict:
    """/healthz once ``done(health)`` holds (a redeploy takes a moment to reach the proxy)."""
    deadline = time.time() + timeout
    while True:
        try:
            h = requests.get(url + "/healthz", timeout=30).json()
        except (requests.RequestException, ValueError):  # the old replica going away
            h = {}
        if (h and done(h)) or time.time() > deadline:
            return h
        time.sleep(0.5)


def test_redeploy_with_new_user_config_retunes_batching(url, tiny_checkpoint, classifier):
    from ray import serve

    from sentdisc.serving import make_app

    h = requests.get(url + "/healthz", timeout=30).json()
    assert h["max_batch_size"] == 16
    args = app_args(tiny_checkpoint, classifier)
    # serve.run gives a Python-built application a new code version, so Serve replaces the
    # replica here; the in-place retune by `serve deploy` is tests/test_e2e_cluster.py's.
    serve.run(make_app(args, batching={"max_batch_size": 2}),
              name=APP_NAME, route_prefix="/")
    try:
        h = healthz_when(url, lambda h: h["max_batch_size"] == 2)
        assert h.get("max_batch_size") == 2, h
        # the model obeys it: its running batch holds two texts at most
        with ThreadPoolExecutor(8) as pool:
            sizes = [int(r.headers["X-Batch-Size"]) for r in pool.map(
                lambda t: post(url, "/sentiment", {"texts": [t]}), TEXTS)]
        assert max(sizes) == 2, sizes
    finally:
        serve.run(make_app(args, batching=BATCHING), name=APP_NAME, route_prefix="/")
        assert healthz_when(url, lambda h: h["max_batch_size"] == 16).get("max_batch_size") == 16


def test_bad_user_config_is_one_clear_error():
    from sentdisc.serving import AppArgsError, BatchConfig, build_app

    # batch settings were builder arguments once: the error says where they live now
    with pytest.raises(AppArgsError, match="max_batch_size: a batch setting, set in the "
                                           "deployment's user_config"):
        build_app({"checkpoint": "anywhere", "max_batch_size": 8})

    with pytest.raises(AppArgsError, match="max_batch_size: Input should be less than or equal"):
        BatchConfig.model_validate({"max_batch_size": 5000})
    with pytest.raises(AppArgsError, match="batch_size: Extra inputs .* Known: max_batch_size"):
        BatchConfig.model_validate({"batch_size": 8})


def test_old_import_path_still_works(monkeypatch):
    import sentdisc.serving

    monkeypatch.syspath_prepend(str(REPO))
    import serve.app

    assert serve.app.build_app is sentdisc.serving.build_app
    assert serve.app.AppArgs is sentdisc.serving.AppArgs


def test_page_is_self_contained_and_calls_the_api(url):
    r = requests.get(url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'post("sentiment"' in html and 'post("heatmap"' in html and "<textarea" in html
    assert "http://" not in html and "https://" not in html  # no CDN: nothing external


def _chromium():
    """A headless Chromium driven through chromedriver (the distribution's packages, which
    .ci/run installs when absent); None when this machine has neither."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900",
                 "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def browser():
    b = _chromium()
    if b is None:
        pytest.skip("no chromium + chromedriver here (.ci/run installs the distribution's)")
    yield b
    b.quit()


ARTIFACTS = Path(os.environ.get("SENTDISC_TEST_ARTIFACTS", REPO / "test-artifacts"))


def test_page_typing_a_review_updates_sentiment_and_heatmap(url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    verdict = lambda: browser.find_element(By.ID, "verdict").text
    heat = lambda: browser.find_element(By.ID, "heat").get_attribute("src") or ""
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    wait.until(lambda b: re.match(r"(positive|negative) +\(p = ", verdict()))
    first_verdict, first_heat = verdict(), heat()
    assert first_heat.startswith("blob:")
    review = "Awful. It broke after two days and support never answered."
    box = browser.find_element(By.ID, "review")
    box.clear()
    box.send_keys(review)
    want = post(url, "/sentiment", {"texts": [review]}).json()["results"][0]
    shown = f"{want['label']}  (p = {want['probability']:.3f}"
    wait.until(lambda b: verdict().startswith(shown.replace("  ", " ")) or shown in verdict())
    wait.until(lambda b: heat().startswith("blob:") and heat() != first_heat)
    assert verdict() != first_verdict
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "page_after_typing.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    assert browser.find_element(By.ID, "caption").text == \
        f"heatmap: neuron {post(url, '/sentiment', {'texts': ['x']}).json()['neuron']}, " \
        f"the sentiment neuron"


def test_page_of_a_multiclass_app_under_its_prefix_heatmaps_the_top_labels_neuron(
        multi_kind_apps, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = multi_kind_apps["multiclass"]  # served under /multiclass/: the page calls its own
    wait = WebDriverWait(browser, 30, poll_frequency=0.5)  # endpoints there, not the root's

    def page(b):  # reloaded while the browser's kept-alive connection still reaches the
        b.get(url + "/")  # HAProxy from before this app was added (it answers 404)
        return b.find_elements(By.ID, "review")

    text = wait.until(page)[0].get_attribute("value")
    res = post(url, "/classify", {"texts": [text]}).json()["results"][0]
    top = max(res["probabilities"], key=res["probabilities"].get)
    caption = lambda: browser.find_element(By.ID, "caption").text
    wait.until(lambda b: caption() == f"heatmap: the neuron that stands for {top}")
    assert browser.find_element(By.ID, "verdict").text.startswith(res["label"])
    assert browser.find_element(By.ID, "heat").get_attribute("src").startswith("blob:")
    assert browser.find_element(By.ID, "status").text == ""
    assert browser.find_element(By.ID, "docs").get_attribute("href") == url + "/docs"


def test_docs_render_from_the_apps_own_assets(url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/docs")
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path"))
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/featurize", "/sentiment", "/heatmap", "/generate"} <= paths, paths
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(url) for u in loaded), loaded  # nothing from a CDN
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs.png"))


# --- bad requests --------------------------------------------------------------------------

BIG = "x" * (LIMITS["max_text_bytes"] + 1)
BAD = [
    ("malformed json", "/featurize", b'{"texts": ["a"', 422),
    ("not an object", "/sentiment", b'["a"]', 422),
    ("empty body", "/sentiment", b"", 422),
    ("texts not a list", "/featurize", {"texts": "abc"}, 422),
    ("text not a string", "/sentiment", {"texts": [1]}, 422),
    ("no texts", "/sentiment", {"texts": []}, 422),
    ("missing field", "/sentiment", {}, 422),
    ("unknown field", "/sentiment", {"texts": ["a"], "path": "/etc/passwd"}, 422),
    ("unknown field generate", "/generate", {"length": 5, "checkpoint": "/tmp"}, 422),
    ("too many texts", "/sentiment", {"texts": ["a"] * 9}, 422),
    ("text too long", "/featurize", {"texts": ["a", BIG]}, 422),
    ("heatmap text too long", "/heatmap", {"text": BIG}, 422),
    ("prompt too long", "/generate", {"prompt": BIG, "length": 5}, 422),
    ("length over cap", "/generate", {"length": 65}, 422),
    ("length as string", "/generate", {"length": "10"}, 422),
    ("negative length", "/generate", {"length": -1}, 422),
    ("negative temperature", "/generate", {"length": 5, "temperature": -1.0}, 422),
    ("neuron out of range", "/heatmap", {"text": "hi", "neuron": 32}, 422),
    ("negative neuron", "/featurize", {"texts": ["hi"], "neurons": [-1]}, 422),
    ("neurons out of range", "/featurize", {"texts": ["hi"], "neurons": [0, 99]}, 422),
    ("bad format", "/heatmap", {"text": "hi", "format": "gif"}, 422),
    ("blank heatmap text", "/heatmap", {"text": "   ", "format": "json"}, 422),
    # one rule for texts on every endpoint: at least one non-whitespace character
    ("empty sentiment text", "/sentiment", {"texts": ["fine", ""]}, 422),
    ("blank featurize text", "/featurize", {"texts": [" \n "]}, 422),
    ("empty heatmap text", "/heatmap", {"text": ""}, 422),
    # found by fuzzing: each gets its documented 4xx
    ("overwrite beyond bounds", "/generate", {"length": 5, "neuron": 0, "overwrite": 1e39}, 422),
    ("seed of 2^64", "/generate", {"length": 5, "seed": 2**64}, 422),
    ("temperature over bound", "/generate", {"length": 5, "temperature": 1e9}, 422),
    ("lone surrogate", "/sentiment", b'{"texts": ["ok", "\\ud800"]}', 422),
    ("body over cap", "/sentiment", b'{"texts": ["' + b"a" * 200_000 + b'"]}', 413),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx(url, name, path, body, status):
    if isinstance(body, bytes):
        r = requests.post(url + path, data=body, timeout=60,
                          headers={"Content-Type": "application/json"})
    else:
        r = post(url, path, body)
    assert r.status_code == status, (name, r.status_code, r.text[:500])
    detail = r.json()["detail"]  # one error shape everywhere: a list of {loc, msg, type}
    assert detail and all({"loc", "msg", "type"} <= set(d) for d in detail), detail
    assert "Traceback" not in r.text and "long long" not in r.text
    if name == "body over cap":  # refused from the header, before the body is parsed
        assert "request body" in detail[0]["msg"], detail


@pytest.fixture(scope="module")
def plain_url(tiny_checkpoint, classifier):
    """The plain baseline (sentdisc.serving.plain, no Ray) with the same args, in its own
    process: the body cap is make_api's, so both apps must keep it."""
    port = free_port()
    args = [f"{k}={v}" for k, v in app_args(tiny_checkpoint, classifier).items()]
    proc = subprocess.Popen([sys.executable, "-m", "sentdisc.serving.plain", *args,
                             f"port={port}"], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"the plain server exited with {proc.returncode}"
            assert time.time() < deadline, "the plain server did not answer /healthz"
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.parametrize("app", ["url", "plain_url"])
def test_a_text_blank_once_preprocessed_is_the_same_422_on_every_endpoint(app, request):
    """Texts that pass a plain non-whitespace check but that the model reads as blank (entities
    of whitespace; \\x1c, whitespace to Python, not to pydantic's regex): each endpoint refuses
    them alike, naming the text, as the schema says, before any model work."""
    url = request.getfixturevalue(app)
    spec = requests.get(url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    assert "HTML entities" in spec["HeatmapRequest"]["properties"]["text"]["description"]
    assert "HTML entities" in spec["FeaturizeRequest"]["properties"]["texts"]["items"][
        "description"]
    for blank in ["&nbsp;", " &#10;&Tab; ", "\x1c"]:
        for path, body, loc in [
                ("/featurize", {"texts": ["fine", blank]}, ["body", "texts", 1]),
                ("/sentiment", {"texts": [blank]}, ["body", "texts", 0]),
                ("/classify", {"texts": ["fine", "ok", blank]}, ["body", "texts", 2]),
                ("/heatmap", {"text": blank, "format": "json"}, ["body", "text"])]:
            r = post(url, path, body)
            assert r.status_code == 422, (blank, path, r.status_code, r.text[:500])
            detail = r.json()["detail"]
            assert [(d["loc"], d["type"]) for d in detail] == [(loc, "blank_text")], detail
            assert "blank once preprocessed" in detail[0]["msg"], detail
    # an entity that is not whitespace is text
    assert post(url, "/featurize", {"texts": ["&amp;"]}).status_code == 200


@pytest.mark.parametrize("app", ["url", "plain_url"])
def test_chunked_body_over_cap_is_413_before_it_is_read_whole(app, request):
    url = request.getfixturevalue(app)
    limit = 6 * LIMITS["max_texts"] * LIMITS["max_text_bytes"] + 65536  # api._body_cap
    sent = 0

    def body():  # a generator: requests sends it chunked, with no Content-Length
        nonlocal sent
        yield b'{"texts": ["'
        while sent < 4 * limit:
            sent += 4096
            yield b"a" * 4096
        yield b'"]}'

    r = requests.post(url + "/sentiment", data=body(), timeout=60,
                      headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413, (r.status_code, r.text[:500])
    detail = r.json()["detail"]  # the shape the Content-Length 413 has (test_bad_request_gets_4xx)
    assert [(d["loc"], d["type"]) for d in detail] == [(["body"], "too_large")], detail
    said = re.fullmatch(rf"request body of at least (\d+) bytes exceeds the {limit}-byte limit",
                        detail[0]["msg"])
    assert said, detail
    # refused once past the cap, not once read whole (a proxy may hand the body over in large
    # pieces: how far past depends on them)
    assert limit < int(said[1]) < sent, (said[1], sent)
    # a chunked body under the cap is still read and answered
    ok = requests.post(url + "/sentiment", data=iter([b'{"texts": ', b'["fine"]}']),
                       timeout=60, headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text[:500]


def test_plain_errors_have_one_shape_and_say_what_failed(plain_url):
    """Routing and body parsing raise Starlette's HTTPException: their errors have the
    documented shape too, and a body that does not parse says why."""
    def shape(r, status):
        assert r.status_code == status, (r.status_code, r.text[:500])
        detail = r.json()["detail"]
        assert detail and all({"loc", "msg", "type"} <= set(d) for d in detail), detail
        return detail[0]

    shape(requests.get(plain_url + "/featurize", timeout=30), 405)
    shape(requests.get(plain_url + "/etc/passwd", timeout=30), 404)
    json_type = {"Content-Type": "application/json"}
    for body, says in [(b'{"texts": ["\xff"]}', "not UTF-8"),
                       (b'{"texts": [' + b"1" * 5000 + b"]}", "4300 digits"),
                       (b"[" * 50_000 + b"]" * 50_000, "nested too deeply")]:
        err = shape(requests.post(plain_url + "/sentiment", data=body, headers=json_type,
                                  timeout=30), 400)
        assert says in err["msg"] and err["loc"] == ["body"], err
    for headers in ({"Content-Type": "text/plain"}, {}):
        err = shape(requests.post(plain_url + "/sentiment", data=b'{"texts": ["fine"]}',
                                  headers=headers, timeout=30), 415)
        assert "send Content-Type: application/json" in err["msg"], err
    spec = requests.get(plain_url + "/openapi.json", timeout=30).json()
    assert "415" in spec["paths"]["/sentiment"]["post"]["responses"]


def test_plain_single_text_locs_have_no_index_and_nulls_are_not_given(plain_url):
    for path, body, loc in [("/heatmap", {"text": BIG, "format": "json"}, ["body", "text"]),
                            ("/generate", {"prompt": BIG, "length": 5}, ["body", "prompt"])]:
        r = post(plain_url, path, body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text[:500]
    # explicit nulls are not naming a neuron or a label
    r = post(plain_url, "/heatmap", {"text": "x", "neuron": None, "label": None,
                                     "format": "json"})
    assert r.status_code == 200, r.text[:500]
    r = post(plain_url, "/generate", {"length": 3, "neuron": None, "label": None})
    assert r.status_code == 200, r.text[:500]


def test_wrong_method_and_unknown_path(url):
    assert requests.get(url + "/featurize", timeout=30).status_code == 405
    assert requests.get(url + "/etc/passwd", timeout=30).status_code == 404


def test_burst_of_malformed_requests_leaves_service_healthy(url):
    def bad(i):
        kind = i % 4
        if kind == 0:
            return requests.post(url + "/sentiment", data=b"{oops", timeout=60,
                                 headers={"Content-Type": "application/json"}).status_code
        if kind == 1:
            return post(url, "/featurize", {"texts": [i]}).status_code
        if kind == 2:
            return post(url, "/heatmap", {"text": "   ", "format": "json"}).status_code
        return post(url, "/sentiment", {"texts": ["fine", "\ud800"]}).status_code

    good = [TEXTS[0]]
    with ThreadPoolExecutor(16) as pool:
        bad_codes = list(pool.map(bad, range(64)))
        good_futures = [pool.submit(post, url, "/sentiment", {"texts": good}) for _ in range(4)]
        good_codes = [f.result().status_code for f in good_futures]
    assert set(bad_codes) == {422}, bad_codes
    # valid requests that share batches with the malformed burst still succeed
    assert good_codes == [200] * 4
    assert requests.get(url + "/healthz", timeout=30).status_code == 200
    assert post(url, "/sentiment", {"texts": good}).status_code == 200


# --- startup errors ------------------------------------------------------------------------

def test_build_app_rejects_bad_arguments(tiny_checkpoint, tmp_path):
    from sentdisc.serving import AppArgsError, build_app

    with pytest.raises(AppArgsError, match="does not exist"):
        build_app({"checkpoint": str(tmp_path / "nope")})
    with pytest.raises(AppArgsError, match="max_batch_size"):
        build_app({"checkpoint": str(tiny_checkpoint), "max_batch_size": 0})
    with pytest.raises(AppArgsError, match="chekpoint"):
        build_app({"chekpoint": str(tiny_checkpoint)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(AppArgsError, match="config.json"):
        build_app({"checkpoint": str(tmp_path / "empty")})
    bad = tmp_path / "classifier.json"
    bad.write_text("{not json")
    with pytest.raises(AppArgsError, match="not valid JSON"):
        build_app({"checkpoint": str(tiny_checkpoint), "classifier": str(bad)})
    from sentdisc.classifier import fit_result_to_classifier

    wrong = fit_result_to_classifier(np.ones(16), 0.0, 1.0, [0], [1.0], 0.0, 1.0).save(
        tmp_path / "wrong_size.json")
    with pytest.raises(AppArgsError, match="rnn_size 16 features, checkpoint .* has 32"):
        build_app({"checkpoint": str(tiny_checkpoint), "classifier": str(wrong)})
    cell = fit_result_to_classifier(np.ones(32), 0.0, 1.0, [0], [1.0], 0.0, 1.0,
                                    feature_kind="cell").save(tmp_path / "cell.json")
    with pytest.raises(AppArgsError, match="fitted on 'cell' features"):
        build_app({"checkpoint": str(tiny_checkpoint), "classifier": str(cell),
                   "feature_kind": "mean"})
    with pytest.raises(AppArgsError, match="layer 3 out of range"):
        build_app({"checkpoint": str(tiny_checkpoint), "layer": 3})


def test_serve_run_missing_checkpoint_exits_with_one_clear_line(tmp_path):
    serve_cli = Path(sys.executable).with_name("serve")
    if not serve_cli.exists():
        pytest.skip("serve CLI not installed next to this python")
    missing = tmp_path / "no-such-checkpoint"
    out = subprocess.run([str(serve_cli), "run", "sentdisc.serving:build_app",
                          f"checkpoint={missing}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"checkpoint {missing} does not exist" in text
    assert "Traceback" not in text


def test_sentdisc_serve_usage_errors_exit_2_with_one_line_and_help_lists_the_args(tmp_path):
    from sentdisc.serving.args import AppArgs

    cli = Path(sys.executable).with_name("sentdisc")
    if not cli.exists():
        pytest.skip("the sentdisc command is not installed next to this python")
    run = lambda *a: subprocess.run([str(cli), "serve", *a], cwd=tmp_path, capture_output=True,
                                    text=True, timeout=120, check=False)
    out = run("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in AppArgs.model_fields:
        assert f"  {name}=" in out.stdout, (name, out.stdout)
    assert "serve run --help" in out.stdout
    out = run("nonexist.yaml")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip() == "sentdisc serve: no such config file: nonexist.yaml (KEY=VALUE " \
                                 "arguments, or a config file: sentdisc serve --help)"
    # a bad argument is a usage error (2, as click's own), caught before Ray starts
    missing = tmp_path / "no-such-checkpoint"
    out = run(f"checkpoint={missing}")
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert f"checkpoint {missing} does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,says", [
    (["{ckpt}", "port=8000"], "'{ckpt}' is not key=value"),
    (["checkpoint={ckpt}", "port=abc"], "port=abc: not an integer"),
    (["checkpoint={ckpt}", "port=70000"], "port=70000: expected 0..65535"),
    (["checkpoint={ckpt}", "threads=0"], "threads=0: expected at least 1"),
    (["checkpoint={ckpt}", "max_batch_size=lots"], "max_batch_size=lots: not an integer"),
    (["checkpoint={ckpt}", "max_batch_size=0"], "max_batch_size: Input should be greater"),
    (["checkpoint={ckpt}", "chekpoint=x"], "chekpoint: Extra inputs are not permitted. Known: "
                                           "checkpoint, classifier, "),
    (["checkpoint={ckpt}", "prot=8000"], "max_generate_length, port, host, threads, "
                                         "max_batch_size"),
    (["port=8001"], "checkpoint: Field required"),
    (["checkpoint={missing}"], "checkpoint {missing} does not exist"),
    (["checkpoint={ckpt}", "device=tpu"], "device: auto, cpu, cuda or cuda:N (got 'tpu')"),
])
def test_plain_bad_arguments_exit_2_with_one_line(tiny_checkpoint, tmp_path, args, says,
                                                  capsys):
    from sentdisc.serving.plain import main

    fill = {"ckpt": tiny_checkpoint, "missing": tmp_path / "no-such-checkpoint"}
    assert main([a.format(**fill) for a in args]) == 2  # (before any server starts)
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1, out.err[-2000:]
    assert out.err.startswith("python -m sentdisc.serving.plain: "), out.err
    assert says.format(**fill) in out.err, out.err
    known = out.err.strip().rsplit(". Known: ", 1)[1:]
    for keys in known:  # each key once
        assert len(keys.split(", ")) == len(set(keys.split(", "))), out.err


def test_config_yaml_is_a_valid_deploy_config(tiny_checkpoint):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from sentdisc.serving import AppArgs, BatchConfig, build_app

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    cfg = ServeDeploySchema.model_validate(raw)
    assert cfg.http_options.host == "127.0.0.1"
    app = cfg.applications[0]
    assert app.import_path == "sentdisc.serving:build_app"
    AppArgs.model_validate(app.args)  # every key is a known argument
    deployments = {d.name: d for d in app.deployments}
    model = deployments["SentdiscServer"]
    batching = BatchConfig.model_validate(model.user_config)  # every key a known setting
    assert model.autoscaling_config["max_replicas"] >= model.autoscaling_config["min_replicas"] >= 1
    assert model.max_ongoing_requests >= batching.max_batch_size
    assert model.ray_actor_options.num_cpus >= 1
    # the same args, pointed at a real checkpoint, build an application
    build_app({**app.args, "checkpoint": str(tiny_checkpoint), "classifier": None})


def test_the_python_proxy_is_named_with_its_fix():
    from sentdisc.serving.ingress import PROXY_WARNING, SERVE_ENV, apply_serve_env, in_effect

    assert not in_effect({}) and not in_effect({"RAY_SERVE_ENABLE_HA_PROXY": "0"})
    env: dict = {}
    assert apply_serve_env(env) == SERVE_ENV and in_effect(env)
    assert apply_serve_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"}) == {
        k: v for k, v in SERVE_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"}  # a choice kept
    assert "sentdisc serve" in PROXY_WARNING and "python -m sentdisc.serving.ingress" in PROXY_WARNING


def test_openai_weights_are_checked_against_the_classifier_before_deploy(tmp_path):
    from test_checkpoint import _write_openai

    from sentdisc.classifier import fit_result_to_classifier
    from sentdisc.serving.args import AppArgs, AppArgsError, check_args

    oa = tmp_path / "oa"
    _write_openai(oa, H=10)
    wrong = fit_result_to_classifier(np.ones(32), 0.0, 1.0, [0], [1.0], 0.0, 1.0).save(
        tmp_path / "clf.json")
    with pytest.raises(AppArgsError) as e:
        check_args(AppArgs(checkpoint=str(oa), classifier=str(wrong)))
    assert str(e.value) == (f"sentdisc serve: classifier {wrong} expects rnn_size 32 features, "
                            f"checkpoint {oa} has 10")
    with pytest.raises(AppArgsError, match=r"layer 3 out of range.* \(checkpoint "):
        check_args(AppArgs(checkpoint=str(oa), layer=3))
    fits = fit_result_to_classifier(np.ones(10), 0.0, 1.0, [0], [1.0], 0.0, 1.0).save(
        tmp_path / "fits.json")
    assert check_args(AppArgs(checkpoint=str(oa), classifier=str(fits))).layer == -1
