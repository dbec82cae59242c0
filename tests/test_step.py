"""The train step's eager / CUDA-graph choice (sentdisc.train.step.TrainStep) and featurize's
(sentdisc.features): the decisions are pure functions, tested here on the CPU; the graph paths'
arithmetic runs on the CPU too (``simulate``: the captured body replayed eagerly); only the
capture itself needs a GPU (the tests at the end, skipped without one). No Ray."""
import numpy as np
import pytest
import torch

from sentdisc import features
from sentdisc.errors import InputError
from sentdisc.features import feature_plan, feature_precision, featurize
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.train.config import TrainConfig
from sentdisc.train.step import TrainStep, graph_plan, train_step

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: captures a real graph")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only cost here
    yield
    torch.set_num_threads(before)


def _model(seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    cfg = dict(embed_size=8, rnn_size=16) | kw
    return ByteLM(ModelConfig(**cfg)).to(device)


def _adam(model, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **kw)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 - it / 50)


def _windows(n=6, B=4, T=16, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (B, T + 1), generator=g).to(device),
             (torch.rand(B, T, generator=g) < 0.1).to(device)) for _ in range(n)]


def _run(step, scheduler, windows):
    hidden, losses = None, []
    for x, reset in windows:
        loss, hidden = step(x, reset, hidden)
        scheduler.step()
        losses.append(loss.item())
    return losses


def _direct(model, opt, clip=1.0, **kw):
    return lambda x, reset, hidden: train_step(model, opt, x, reset, hidden, clip=clip, **kw)


# --- the decision --------------------------------------------------------------------------

@pytest.mark.parametrize("args, use, reason", [
    (dict(mode="off", device="cuda"), False, "cuda_graph is off"),
    (dict(mode="auto", device="cpu"), False, "the device is cpu"),
    (dict(mode="on", device=torch.device("cpu")), False, "the device is cpu"),
    (dict(mode="auto", device="cuda:1", precision="fp16"), False, "GradScaler"),
    (dict(mode="auto", device="cuda", scaler=True), False, "GradScaler"),
    (dict(mode="auto", device="cuda", find_unused_parameters=True), False,
     "find_unused_parameters"),
    (dict(mode="auto", device="cuda", optimizer="SGD"), False, "optimizer SGD is not capturable"),
    (dict(mode="auto", device="cuda", precision="bf16"), True, "bf16 step captured"),
    (dict(mode="on", device="cuda", optimizer="AdamW"), True, "captured in a CUDA graph"),
])
def test_graph_plan_decides_with_a_reason(args, use, reason):
    got, why = graph_plan(**args)
    assert got is use and reason in why


def test_graph_plan_takes_an_optimizer_and_rejects_a_bad_mode():
    model = _model()
    assert graph_plan("auto", "cuda", "fp32", torch.optim.SGD(model.parameters(), lr=0.1))[0] \
        is False
    assert graph_plan("auto", "cuda", "fp32", torch.optim.Adam(model.parameters()))[0] is True
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        graph_plan("always", "cuda")


def test_cuda_graph_on_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="cuda_graph on: .* the device is cpu"):
        TrainConfig(cuda_graph="on")
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        TrainConfig(cuda_graph="yes")
    with pytest.raises(ValueError, match="optimizer SGD is not capturable"):
        TrainConfig(cuda_graph="on", use_gpu=True, optimizer_type="SGD")
    assert TrainConfig(cuda_graph="on", use_gpu=True, precision="bf16").cuda_graph == "on"
    model = _model()
    with pytest.raises(ValueError, match="cuda_graph on: the train step cannot be captured: "
                                         "the device is cpu"):
        TrainStep(model, _adam(model)[0], mode="on")


def test_auto_on_cpu_runs_eagerly_and_says_why_once(capsys):
    model = _model()
    opt, sched = _adam(model)
    step = TrainStep(model, opt, mode="auto", clip=1.0)
    _run(step, sched, _windows(4))
    out = capsys.readouterr().out
    assert out.count("cuda_graph auto: eager, because the device is cpu") == 1
    assert not step.graphed
    TrainStep(model, opt, mode="off")
    assert "cuda_graph" not in capsys.readouterr().out  # off was asked for: nothing to say


# --- the same numbers ----------------------------------------------------------------------

def _same(a, b):
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("mode, simulate", [("off", False), ("auto", False), ("on", True)])
def test_train_step_eager_and_graph_body_equal_train_step(mode, simulate):
    """Eager, and the graph's body replayed (warm-up undone, LR from a device tensor, hidden
    state carried in static buffers) give the very numbers train_step gives."""
    windows = _windows(6)
    ref = _model()
    ref_opt, ref_sched = _adam(ref)
    expected = _run(_direct(ref, ref_opt), ref_sched, windows)
    model = _model()
    opt, sched = _adam(model)
    step = TrainStep(model, opt, mode=mode, clip=1.0, simulate=simulate, log=None)
    assert _run(step, sched, windows) == expected
    _same(ref, model)
    assert step.graphed is simulate
    got, want = opt.state_dict(), ref_opt.state_dict()
    for p in want["state"]:
        for k, v in want["state"][p].items():
            assert torch.equal(got["state"][p][k], v), k
    # what checkpoints and metrics read is the usual: a float lr, capturable as constructed
    assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    assert isinstance(got["param_groups"][0]["lr"], float)
    assert got["param_groups"][0]["capturable"] is False


def test_graph_body_with_bf16_and_a_resumed_optimizer():
    windows = _windows(5)
    models = [_model(), _model()]
    opts = [_adam(m) for m in models]
    for (opt, sched), m in zip(opts, models):  # a state that exists before the capture
        _run(_direct(m, opt, autocast=torch.autocast("cpu", dtype=torch.bfloat16)), sched,
             windows[:2])
    ref = _run(_direct(models[0], opts[0][0], autocast=torch.autocast(
        "cpu", dtype=torch.bfloat16, cache_enabled=False)), opts[0][1], windows[2:])
    step = TrainStep(models[1], opts[1][0], mode="on", precision="bf16", clip=1.0,
                     simulate=True)
    assert _run(step, opts[1][1], windows[2:]) == ref
    _same(*models)


def test_another_shape_runs_eagerly_once_then_the_graph_again(capsys):
    model = _model()
    opt, _ = _adam(model)
    step = TrainStep(model, opt, mode="auto", clip=1.0, simulate=True)
    (x, r), (x2, r2) = _windows(1)[0], _windows(1, B=3)[0]
    step(x, r)
    assert step.graphed
    for _ in range(2):  # an uneven last window, twice: one message
        _, hidden = step(x2, r2)
        assert hidden[0][0].shape == (3, 16)
    assert capsys.readouterr().out.count("eager for this window, because its shape") == 1
    loss, hidden = step(x, r)
    assert hidden is step._static.hidden and torch.isfinite(loss)


def test_a_failed_capture_falls_back_or_fails_with_the_reason(monkeypatch, capsys):
    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(TrainStep, "_capture", broken)
    windows = _windows(3)
    ref = _model()
    ref_opt, ref_sched = _adam(ref)
    expected = _run(_direct(ref, ref_opt), ref_sched, windows)
    model = _model()
    opt, sched = _adam(model)
    step = TrainStep(model, opt, mode="auto", clip=1.0, simulate=True)
    assert _run(step, sched, windows) == expected
    out = capsys.readouterr().out
    assert out.count("cuda_graph auto: eager, because the capture failed: RuntimeError: "
                     "operation not permitted when stream is capturing\n") == 1
    strict = TrainStep(model, opt, mode="on", simulate=True)
    with pytest.raises(RuntimeError, match="cuda_graph on: the capture failed"):
        strict(*windows[0])


# --- featurize -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, use, reason", [
    (dict(mode="off", device="cuda"), False, "cuda_graph is off"),
    (dict(mode="auto", device="cpu"), False, "the device is cpu"),
    (dict(mode="auto", device="cuda", rnn_type="lstm"), False, "an lstm"),
    (dict(mode="auto", device="cuda", weight_dtype=torch.float16), False, "torch.float16"),
    (dict(mode="auto", device="cuda", steps=10), False, "10 time steps are too few"),
    (dict(mode="on", device="cuda:0", steps=10_000), True, "captured in a CUDA graph"),
])
def test_feature_plan_decides_with_a_reason(args, use, reason):
    got, why = feature_plan(**args)
    assert got is use and reason in why


def test_feature_precision_and_strict_mode_on_cpu():
    from sentdisc.precision import Hardware

    # a CPU without native bf16 keeps fp32 (one with it: tests/test_precision.py)
    assert feature_precision("auto", torch.device("cpu"), Hardware("cpu")) == "fp32"
    assert feature_precision("auto", torch.device("cuda"), Hardware("cuda")) == "bf16"
    assert feature_precision("fp32", "cuda") == "fp32"
    with pytest.raises(InputError, match="precision"):
        feature_precision("fp8", "cpu")
    with pytest.raises(InputError, match="cuda_graph on: the step cannot be captured: the device"):
        featurize(_model(), ["x"], cuda_graph="on")
    with pytest.raises(InputError, match="cuda_graph must be one of"):
        featurize(_model(), ["x"], cuda_graph="maybe")


TEXTS = ["great movie", "", "awful, just awful &amp; boring", "é ☃", "a" * 300, "short",
         "medium length review text", "mixed\nlines here"] * 2


def test_featurize_on_cpu_is_the_models_own_computation_exactly(capsys):
    from sentdisc.text import encode

    model = _model(layers=2, weight_norm="all").eval()
    text = "the final state of a text"
    x = torch.from_numpy(encode(text).astype(np.int64))[None]
    live = torch.ones_like(x, dtype=torch.bool)
    with torch.inference_mode():
        outputs, state = model.run_layers(x, mask=live)
        # the mean as featurize sums it: a [1,T] @ [T,H] product
        total = torch.bmm(live.unsqueeze(1).float(), outputs[-1][0]).squeeze(1)
    got = featurize(model, [text], kind=["cell", "mean"])
    assert np.array_equal(got["cell"][0], state[-1][1][0].numpy())
    assert np.array_equal(got["mean"][0], (total[0] / x.shape[1]).numpy())
    # the CPU path is not a fallback: nothing printed but (once) the precision decision
    printed = capsys.readouterr().out.splitlines()
    assert all(line.startswith("[featurize] precision auto:") for line in printed), printed


@pytest.mark.parametrize("layer", [0, -1])
def test_featurize_graph_step_equals_the_eager_path(monkeypatch, layer):
    """The captured step's arithmetic (time-major static buffers, a device-side step counter,
    masked rows for texts that ended, a draining pool) run eagerly on the CPU in float32."""
    model = _model(layers=2, weight_norm="all").eval()
    kinds = ["cell", "hidden", "mean", "max"]
    eager = featurize(model, TEXTS, batch_size=3, kind=kinds, layer=layer, chunk_size=40)
    runner = features._chunk_runner
    made = []

    def simulated(*args, **kw):
        made.append(runner(*args[:-1], "on", simulate=True))
        return made[-1]

    monkeypatch.setattr(features, "_chunk_runner", simulated)
    graph = featurize(model, TEXTS, batch_size=3, kind=kinds, layer=layer, chunk_size=40)
    assert isinstance(made[0], features._GraphStep)
    for k in kinds:
        np.testing.assert_allclose(graph[k], eager[k], atol=1e-5)


# --- on a GPU ------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replay_matches_eager(precision):
    windows = _windows(8, B=8, T=32, device="cuda")
    losses, models = [], []
    for mode in ("off", "on"):
        model = _model(device="cuda", rnn_size=64)
        opt, sched = _adam(model)
        step = TrainStep(model, opt, mode=mode, precision=precision, clip=1.0)
        losses.append(_run(step, sched, windows))
        models.append(model)
        assert step.graphed is (mode == "on")
    tol = 1e-4 if precision == "fp32" else 3e-2
    np.testing.assert_allclose(losses[1], losses[0], atol=tol, rtol=0)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, atol=10 * tol, rtol=0)


@needs_cuda
def test_featurize_cuda_graph_matches_eager_bf16():
    model = _model(device="cuda", rnn_size=64, layers=2).eval()
    texts = TEXTS * 20
    eager = featurize(model, texts, batch_size=16, kind=["cell", "mean"], cuda_graph="off")
    graph = featurize(model, texts, batch_size=16, kind=["cell", "mean"], cuda_graph="on")
    for k in eager:
        np.testing.assert_allclose(graph[k], eager[k], atol=3e-2)
