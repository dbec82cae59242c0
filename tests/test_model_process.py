"""The model's own process (sentdisc.serving.model_process): its running batch, which texts
join and leave at any chunk, gives the library's features for every kind and layer; calls run
between chunks. Through the plain uvicorn server over real HTTP: a dead model process makes the
server say so (503 with the reason, no 500, no hang); a dead server leaves no model process
behind."""
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_layer_lstm(tmp_path_factory):
    import torch

    from sentdisc import ByteLM, ModelConfig, save

    torch.manual_seed(1)
    model = ByteLM(ModelConfig(embed_size=8, rnn_size=16, layers=2, rnn_type="lstm"))
    return save(model, tmp_path_factory.mktemp("ckpt") / "lstm2")


TEXTS = ["a fine day", "not good at all", "x" * 300, "é ünïcode ok", "y" * 70, "z"]


def _stream(checkpoint, layer, kind, rows, calls):
    """Starts a ModelProcess and runs ``calls(process)`` in an event loop; closes it."""
    from sentdisc.serving.model_process import ModelProcess

    process = ModelProcess(str(checkpoint), "cpu", 1)
    try:
        process.configure(layer, kind, rows)
        return asyncio.run(calls(process))
    finally:
        process.close()


def test_texts_joining_a_running_batch_get_the_library_features(tiny_checkpoint):
    """A long text runs; short ones join it at later chunks, end first, and leave."""
    from sentdisc import featurize, load

    long_text = "the long one " * 300  # ~3,900 bytes: ~120 chunks

    async def calls(process):
        first = asyncio.ensure_future(process.featurize([long_text]))
        await asyncio.sleep(0.05)
        order, results = [], {}

        async def one(i, texts):
            results[i] = await process.featurize(texts)
            order.append(i)

        await asyncio.gather(*(one(i, [t]) for i, t in enumerate(TEXTS)),
                             one("pair", TEXTS[:2]))
        results["long"] = await first
        order.append("long")
        return order, results

    order, results = _stream(tiny_checkpoint, -1, "cell", 8, calls)
    assert order[-1] == "long"  # the short texts did not wait for it
    model = load(str(tiny_checkpoint))
    for i, t in enumerate(TEXTS):
        np.testing.assert_allclose(results[i][0], featurize(model, [t]), atol=1e-5)
    np.testing.assert_allclose(results["pair"][0], featurize(model, TEXTS[:2]), atol=1e-5)
    np.testing.assert_allclose(results["long"][0], featurize(model, [long_text]), atol=1e-5)
    assert all(1 <= held <= 8 for _, held in results.values())


def test_every_kind_and_layer_of_a_stacked_lstm(two_layer_lstm):
    """Reconfigured live, as a replica's reconfigure does; fewer rows than texts: they queue."""
    from sentdisc import featurize, load
    from sentdisc.serving.model_process import ModelProcess

    model = load(str(two_layer_lstm))
    process = ModelProcess(str(two_layer_lstm), "cpu", 1)
    try:
        for layer, kind in [(0, "mean"), (1, "max"), (-1, "hidden"), (0, "cell")]:
            process.configure(layer, kind, 3)

            async def all_texts():
                return await asyncio.gather(*(process.featurize([t]) for t in TEXTS))

            got = asyncio.run(all_texts())
            want = featurize(model, TEXTS, layer=layer, kind=kind)
            np.testing.assert_allclose(np.concatenate([f for f, _ in got]), want, atol=1e-5,
                                       err_msg=f"layer {layer} {kind}")
            assert max(held for _, held in got) == 3
    finally:
        process.close()


def _count_rows(model):
    """In the model process: record the rows of every chunk the model runs."""
    model.chunk_rows = []
    run_layers = model.run_layers

    def counted(x, *args, **kwargs):
        model.chunk_rows.append(len(x))
        return run_layers(x, *args, **kwargs)

    model.run_layers = counted


def _mark_retuned(model):
    model.chunk_rows.append("retuned")


def _chunk_rows(model):
    return model.chunk_rows


def test_a_retune_down_under_load_holds_new_texts_to_the_new_size(tiny_checkpoint):
    """What `serve deploy` with a smaller max_batch_size does to a busy replica: the rows
    running end, no text joins until they are under the new size, the batch stays there, and
    each request's batch size is the rows really held. Answers do not change."""
    from sentdisc import featurize, load
    from sentdisc.serving.model_process import MODEL, STREAM_CHUNK

    texts = [f"review {i}: " + "so so " * (10 + 7 * i % 60) for i in range(48)]
    deadline = time.time() + 240

    async def until(condition):
        while not condition():
            assert time.time() < deadline, "the model process fell behind"
            await asyncio.sleep(0.01)

    async def calls(process):
        await process.run(_count_rows, MODEL)
        answers, retuned, stop = [], False, False  # (sent after the retune, text, features, held)

        async def client(k):
            while not stop:
                sent_after = retuned
                feats, held = await process.featurize([texts[k % len(texts)]])
                answers.append((sent_after, k % len(texts), feats, held))
                k += 5

        # more clients than rows: the batch is full and texts queue, as under steady load
        clients = [asyncio.ensure_future(client(k)) for k in range(24)]
        await until(lambda: sum(held == 16 for *_, held in answers) >= 8)
        await asyncio.to_thread(process.configure, -1, "cell", 2)
        retuned = True
        await process.run(_mark_retuned, MODEL)
        await until(lambda: sum(after for after, *_ in answers) >= 64)
        stop = True
        await asyncio.gather(*clients)
        return answers, await process.run(_chunk_rows, MODEL)

    answers, rows = _stream(tiny_checkpoint, -1, "cell", 16, calls)
    mark = rows.index("retuned")
    assert max(rows[:mark]) == 16
    # Running rows are never dropped and none joins while they are over the size: a chunk
    # has no more rows than the one before it, or the new size. The rows running at the
    # retune end within the chunks their longest text takes; from then on it holds.
    after = rows[mark - 1:mark] + rows[mark + 1:]
    assert all(b <= max(a, 2) for a, b in zip(after, after[1:])), after
    longest = max(len(t.encode()) for t in texts) + 3  # the pads
    assert max(after[1 + -(-longest // STREAM_CHUNK):]) <= 2, after
    assert all(held <= 2 for sent_after, *_, held in answers if sent_after), answers
    want = featurize(load(str(tiny_checkpoint)), texts)
    for _, i, feats, _ in answers:
        np.testing.assert_allclose(feats, want[i:i + 1], atol=1e-5)


def test_calls_run_in_the_model_process_and_errors_come_back(tiny_checkpoint):
    from sentdisc import load, viz
    from sentdisc.errors import InputError
    from sentdisc.serving.model_process import MODEL

    async def calls(process):
        values = await process.run(viz.neuron_values, MODEL, "a fine day", 3)
        with pytest.raises(InputError, match="layer"):
            await process.run(viz.neuron_values, MODEL, "a fine day", 3, layer=5)
        return values

    chars, values = _stream(tiny_checkpoint, -1, "cell", 4, calls)
    want_chars, want = viz.neuron_values(load(str(tiny_checkpoint)), "a fine day", 3)
    assert list(chars) == list(want_chars)
    np.testing.assert_allclose(values, want, atol=1e-5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("zombie") < 0


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


@pytest.fixture
def plain_server(tiny_checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentdisc.serving.plain", f"checkpoint={tiny_checkpoint}",
         f"port={port}"], env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            return requests.get(url + "/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    _wait(healthy, 120, "the plain server answers /healthz")
    yield url, proc
    proc.kill()
    proc.wait(30)


def test_features_equal_the_library_and_come_from_another_process(plain_server,
                                                                  tiny_checkpoint):
    from sentdisc import featurize, load

    url, proc = plain_server
    health = requests.get(url + "/healthz", timeout=10).json()
    assert health["pid"] == proc.pid and health["model_pid"] not in (proc.pid, os.getpid())
    texts = ["a fine day", "not good at all", "x" * 300]
    got = requests.post(url + "/featurize", json={"texts": texts}, timeout=30).json()
    want = featurize(load(str(tiny_checkpoint)), texts, kind="cell")
    np.testing.assert_allclose(np.array(got["features"]), want, atol=1e-5)


def test_a_dead_model_process_is_a_503_with_the_reason(plain_server):
    url, proc = plain_server
    model_pid = requests.get(url + "/healthz", timeout=10).json()["model_pid"]
    os.kill(model_pid, signal.SIGKILL)
    r = requests.post(url + "/featurize", json={"texts": ["still there?"]}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"], (r.status_code, r.text)
    assert "model process exited" in r.json()["detail"][0]["msg"]
    health = requests.get(url + "/healthz", timeout=10)
    assert health.status_code == 503 and "model process exited" in health.json()["reason"]


def test_a_killed_server_leaves_no_model_process(plain_server):
    url, proc = plain_server
    model_pid = requests.get(url + "/healthz", timeout=10).json()["model_pid"]
    proc.kill()
    proc.wait(30)
    _wait(lambda: not _alive(model_pid), 10, f"model process {model_pid} exits with its parent")


def test_a_png_heatmap_drawing_holds_up_no_other_request(plain_server):
    """The PNG is drawn in the server's process off its event loop, not in the model's: a
    featurize request sent while a long text's PNG draws is answered long before it."""
    from concurrent.futures import ThreadPoolExecutor

    url, _ = plain_server
    text = "a fine day, not good at all. " * 280  # ~8 KB: seconds of drawing

    def timed(path, body):
        start = time.perf_counter()
        r = requests.post(url + path, json=body, timeout=120)
        return r, time.perf_counter() - start

    with ThreadPoolExecutor(2) as pool:
        png = pool.submit(timed, "/heatmap", {"text": text, "neuron": 0})
        time.sleep(0.5)  # the values are computed (fast) and the drawing under way
        small, small_s = timed("/featurize", {"texts": ["hi"]})
        (r, png_s) = png.result()
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG", r.text[:300]
    assert small.status_code == 200, small.text
    assert png_s > 2 and small_s < png_s / 5, (small_s, png_s)


def test_without_a_classifier_the_503_is_not_retryable_and_the_schema_says_neuron_is_needed(
        plain_server):
    url, _ = plain_server
    r = requests.post(url + "/sentiment", json={"texts": ["fine"]}, timeout=30)
    assert r.status_code == 503 and "no classifier loaded" in r.json()["detail"][0]["msg"]
    assert "retry-after" not in r.headers  # it never clears without a redeploy
    r = requests.post(url + "/heatmap", json={"text": "fine", "format": "json"}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "neuron"], r.text
    schemas = requests.get(url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    heat = schemas["HeatmapRequest"]
    assert "neuron" in heat["required"] and heat["properties"]["neuron"]["type"] == "integer"
    assert "sentiment neuron" not in heat["properties"]["neuron"].get("default", "")
    assert "no classifier is loaded" in heat["properties"]["neuron"]["description"]
    assert "no classifier is loaded" in heat["properties"]["label"]["description"]
    assert "this classifier" not in heat["properties"]["label"]["description"]
    gen = schemas["GenerateRequest"]["properties"]["neuron"]
    assert gen["description"].startswith("default: 0"), gen


def test_device_cuda_without_a_gpu_is_named_before_loading(tiny_checkpoint):
    import torch

    from sentdisc.serving.model_process import ModelProcess

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device={device} but no CUDA device is visible"):
            ModelProcess(str(tiny_checkpoint), device, 1)


def test_a_classifier_fitted_on_another_checkpoint_is_served_with_one_warning(
        tiny_checkpoint, tmp_path, monkeypatch):
    from sentdisc.classifier import fit_result_to_classifier
    from sentdisc.serving import server as server_module
    from sentdisc.serving.args import AppArgs, check_args, checkpoint_mismatch
    from sentdisc.serving.server import ModelServer

    def clf(fitted_on, name):
        return fit_result_to_classifier(np.ones(32), 0.0, 1.0, [0], [1.0], 0.0, 1.0,
                                        checkpoint=fitted_on).save(tmp_path / name)

    other = tmp_path / "other-ckpt"
    other.mkdir()
    (tmp_path / "link").symlink_to(tiny_checkpoint)
    # the same folder however spelled, or a classifier that does not say: no warning
    for fitted_on in (str(tiny_checkpoint), str(tmp_path / "link") + "/", "", "runs/ckpt"):
        from sentdisc.classifier import Classifier

        loaded = Classifier.load(clf(fitted_on, "same.json"))
        assert checkpoint_mismatch(loaded, str(tiny_checkpoint)) is None, fitted_on
    warned = []
    monkeypatch.setattr(server_module.logger, "warning", warned.append)
    server = ModelServer(check_args(AppArgs(checkpoint=str(tiny_checkpoint),
                                            classifier=str(clf(str(other), "other.json")))))
    try:
        assert not server.failure, server.failure
        assert len(warned) == 1 and str(other) in warned[0] and str(tiny_checkpoint) in \
            warned[0], warned
        assert server.info()["classifier_checkpoint"] == str(other)
    finally:
        server.close()
