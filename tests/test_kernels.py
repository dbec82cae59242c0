"""The fused mLSTM path (sentdisc.kernels) against the plain per-timestep loop."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import OpLog

from sentdisc import kernels
from sentdisc.features import featurize
from sentdisc.model import ByteLM, ModelConfig

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["tanh", "sigmoid_tanh", "prepacked"])
def fast_path(request, monkeypatch):
    """Run a test through each variant of the fused path, whatever the tiny sizes would pick:
    tanh as tanh; tanh(z) = 2 sigmoid(2z) - 1 (faster on CPU above a batch size); and that
    with the loop's products on oneDNN-prepacked weights (CPU float32, enough rows)."""
    monkeypatch.setattr(kernels, "SIGMOID_TANH_MIN", 0 if request.param != "tanh" else 10**9)
    monkeypatch.setattr(kernels, "PREPACK_MIN_ROW_STEPS", 0 if request.param == "prepacked" else 10**9)
    return request.param


def make(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = dict(embed_size=8, rnn_size=24, layers=2, weight_norm="all")
    cfg.update(kw)
    model = ByteLM(ModelConfig(**cfg)).to(dtype)
    with torch.no_grad():  # gains and biases away from their defaults so they really matter
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("g") or name.endswith(".b"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def train_pass(model, x, reset, state):
    """Two carried calls (state passed on with its graph), a loss touching logits and the
    final states, backward. Returns logits, final states, parameter and input-state grads."""
    state = [(h.clone().requires_grad_(), c.clone().requires_grad_()) for h, c in state]
    model.zero_grad()
    half = x.shape[1] // 2
    a, s = model(x[:, :half], state, reset[:, :half])
    b, s = model(x[:, half:], s, reset[:, half:])
    logits = torch.cat([a, b], 1)
    target = torch.randint(0, 256, logits.shape[:2], generator=torch.Generator().manual_seed(3))
    loss = F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1))
    loss = loss + sum((h.sin().sum() + c.cos().sum()) for h, c in s) / x.shape[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state_grads = [t.grad.clone() for pair in state for t in pair]
    return logits.detach(), [t.detach() for pair in s for t in pair], grads, state_grads


def assert_same(fused, plain, tol):
    torch.testing.assert_close(fused[0], plain[0], **tol)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, **tol)
    assert fused[2].keys() == plain[2].keys()
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], **tol, msg=name)
    for a, b in zip(fused[3], plain[3]):
        torch.testing.assert_close(a, b, **tol)


def test_supports():
    x = torch.randn(2, 3, 4)
    assert kernels.supports(x)
    assert kernels.supports(x.double())
    assert not kernels.supports(x.half())
    assert not kernels.supports(x[:, :0])
    with kernels.disabled():
        assert not kernels.supports(x)
    assert kernels.supports(x)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert not kernels.supports(x, mask=mask)  # masks are inference only
    with torch.no_grad():
        assert kernels.supports(x, mask=mask)


def test_fused_path_is_the_one_used():
    model = make()
    x = torch.randint(0, 256, (2, 5))
    out, _ = model.run_layers(x, reset=torch.zeros(2, 5, dtype=torch.bool))
    assert "MLSTMSequence" in type(out[0][0].grad_fn).__name__
    with kernels.disabled():
        out, _ = model.run_layers(x)
    assert "MLSTMSequence" not in type(out[0][0].grad_fn).__name__


@pytest.mark.parametrize("B,T,embed,rnn,layers,weight_norm", [
    (3, 14, 8, 24, 2, "all"),
    (5, 9, 6, 16, 1, "recurrent"),
    (1, 21, 4, 8, 1, "none"),
    (8, 32, 16, 64, 1, "recurrent"),
])
def test_training_matches_plain_loop(B, T, embed, rnn, layers, weight_norm, fast_path):
    model = make(embed_size=embed, rnn_size=rnn, layers=layers, weight_norm=weight_norm)
    gen = torch.Generator().manual_seed(B * T)
    x = torch.randint(0, 256, (B, T), generator=gen)
    reset = torch.rand(B, T, generator=gen) < 0.1
    reset[0, 0] = True
    state = [(torch.randn(B, rnn, generator=gen), torch.randn(B, rnn, generator=gen))
             for _ in range(layers)]
    fused = train_pass(model, x, reset, state)
    with kernels.disabled():
        plain = train_pass(model, x, reset, state)
    assert_same(fused, plain, TOL)
    assert all(g.abs().sum() > 0 for g in fused[2].values())


def test_float64_matches_plain_loop(fast_path):
    model = make(dtype=torch.float64)
    x = torch.randint(0, 256, (4, 10))
    reset = torch.zeros(4, 10, dtype=torch.bool)
    reset[1, 3] = True
    state = [(torch.zeros(4, 24, dtype=torch.float64),) * 2 for _ in range(2)]
    fused = train_pass(model, x, reset, state)
    with kernels.disabled():
        plain = train_pass(model, x, reset, state)
    assert fused[0].dtype == torch.float64
    assert_same(fused, plain, dict(atol=1e-12, rtol=1e-10))


def test_gradcheck_float64(fast_path):
    gen = torch.Generator().manual_seed(0)
    B, T, E, H = 2, 4, 3, 4

    def rnd(*shape, scale=0.5):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    inputs = (rnd(B, T, E), rnd(B, H), rnd(B, H), rnd(E, 4 * H), rnd(H, 4 * H), rnd(E, H),
              rnd(H, H), rnd(4 * H))
    reset = torch.tensor([[False, False, True, False], [False, False, False, False]])

    def fn(x, h, c, wx, wh, wmx, wmh, b):
        w = dict(wx=wx, wh=wh, wmx=wmx, wmh=wmh, b=b)
        hs, _, (h, c) = kernels.mlstm_sequence(x, h, c, w, reset=reset)
        return hs, h, c

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_float64_lookup(fast_path):
    """Training on bytes: the first layer looks x's projections up, and its gradients reach
    the embedding (and Wx, Wmx, b) through the per-byte tables."""
    gen = torch.Generator().manual_seed(1)
    B, T, E, H, V = 2, 5, 3, 4, 6
    ids = torch.randint(0, V, (B, T), generator=gen)

    def rnd(*shape, scale=0.5):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    inputs = (rnd(V, E), rnd(B, H), rnd(B, H), rnd(E, 4 * H), rnd(H, 4 * H), rnd(E, H),
              rnd(H, H), rnd(4 * H))

    def fn(embedding, h, c, wx, wh, wmx, wmh, b):
        w = dict(wx=wx, wh=wh, wmx=wmx, wmh=wmh, b=b)
        # x detached: the embedding's gradient can only come through the tables
        hs, _, (h, c) = kernels.mlstm_sequence(embedding[ids].detach(), h, c, w,
                                               tokens=(ids, embedding))
        return hs, h, c

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def _layer_pair(model, x, state, lookup=False, **kw):
    """The first layer fused (x's projections multiplied, or with ``lookup`` looked up per
    byte value) and plain, on the same embedded bytes."""
    layer = model.layers[0]
    inp = model.embed(x)
    tokens = (x, model.embed.weight) if lookup else None
    with torch.no_grad():
        hs, _, st = layer(inp, state, tokens=tokens, **kw)
        with kernels.disabled():
            ref_hs, _, ref_st = layer(inp, state, **kw)
    return (hs, *st), (ref_hs, *ref_st)


@pytest.mark.parametrize("lookup", [False, True], ids=["matmul", "lookup"])
@pytest.mark.parametrize("kind", ["prefix", "general", "prefix+reset", "all_masked"])
def test_inference_with_mask_matches_plain_loop(kind, lookup, fast_path):
    model = make(layers=1)
    B, T = 6, 12
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (B, T), generator=gen)
    state = (torch.randn(B, 24, generator=gen), torch.randn(B, 24, generator=gen))
    lengths = torch.tensor([12, 12, 9, 5, 1, 0])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    reset = None
    if kind == "general":
        mask = torch.rand(B, T, generator=gen) < 0.6
    elif kind == "prefix+reset":
        reset = torch.rand(B, T, generator=gen) < 0.2
    elif kind == "all_masked":
        mask = torch.zeros(B, T, dtype=torch.bool)
    fused, plain = _layer_pair(model, x, state, lookup=lookup, mask=mask, reset=reset)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, **TOL)


def test_inference_lookup_reads_the_tokens_not_x():
    """With tokens, x's projections come from the per-byte tables: an x that disagrees with
    the tokens must not change the result (so the lookup path really is the one tested)."""
    model = make(layers=1)
    x = torch.randint(0, 256, (3, 10))
    state = model.init_state(3)[0]
    w = model.layers[0].weights()
    with torch.no_grad():
        looked_up, _, _ = kernels.mlstm_sequence(torch.zeros(3, 10, 8), *state, w,
                                                 tokens=(x, model.embed.weight))
        with kernels.disabled():
            ref, _, _ = model.layers[0](model.embed(x), state)
    torch.testing.assert_close(looked_up, ref, **TOL)


def test_inference_without_grad_matches_plain_loop(fast_path):
    model = make()
    x = torch.randint(0, 256, (3, 17))
    reset = torch.zeros(3, 17, dtype=torch.bool)
    reset[2, 8] = True
    with torch.inference_mode():
        logits, state = model(x, reset=reset)
        with kernels.disabled():
            ref, ref_state = model(x, reset=reset)
    torch.testing.assert_close(logits, ref, **TOL)
    for a, b in zip(state, ref_state):
        torch.testing.assert_close(a[0], b[0], **TOL)
        torch.testing.assert_close(a[1], b[1], **TOL)


@pytest.mark.parametrize("kind", ["cell", "mean", "max"])
def test_featurize_matches_plain_loop(kind, fast_path):
    model = make()
    texts = ["great movie!", "", "x", "a much longer review that spans several chunks " * 3,
             "bad.", "middling, really"]
    fused = featurize(model, texts, batch_size=4, chunk_size=16, kind=kind)
    with kernels.disabled():
        plain = featurize(model, texts, batch_size=4, chunk_size=16, kind=kind)
    np.testing.assert_allclose(fused, plain, atol=1e-5, rtol=1e-5)


def test_second_backward_after_reuse_is_a_clear_error():
    """Buffers go back to a pool after backward; a retained graph whose buffers another
    forward has reused since must fail loudly, not return wrong gradients."""
    model = make(layers=1, rnn_size=16)
    x = torch.randint(0, 256, (2, 6))
    logits, _ = model(x)
    loss = logits.square().mean()
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)  # nothing reused the buffers yet: still fine
    model(x)[0].square().mean().backward()  # another forward takes the pooled buffers
    with pytest.raises(RuntimeError, match="kernels.disabled"):
        loss.backward()


def test_bf16_autocast_close_to_float32():
    """Under autocast the products run in bf16; gates and cell state stay float32."""
    model = make(rnn_size=32)
    x = torch.randint(0, 256, (4, 16))
    reset = torch.zeros(4, 16, dtype=torch.bool)
    ref, _ = model(x, reset=reset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.supports(model.embed(x))
        logits, state = model(x, reset=reset)
        out, _ = model.run_layers(x)
        with torch.no_grad():  # inference: the first layer's input projections looked up
            inferred, _ = model(x, reset=reset)
    assert "MLSTMSequence" in type(out[0][0].grad_fn).__name__
    assert state[0][1].dtype == torch.float32
    torch.testing.assert_close(logits.float(), ref, atol=0.1, rtol=0.05)
    torch.testing.assert_close(inferred.float(), ref, atol=0.1, rtol=0.05)
    logits.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_prepacked_products_are_used_and_exact():
    """The products of an mLSTM-512 training step (64 rows x 128 steps) run prepacked, and a
    prepacked a @ w (+ add) equals torch.mm's to float rounding, at any row count."""
    w = torch.randn(512, 2048)
    assert kernels._prepacks(w, 64, 128)
    assert not kernels._prepacks(w, 1, 10**6)  # one row: MKL's matrix-vector product
    assert not kernels._prepacks(w.double(), 64, 128)
    packed = kernels._StepWeight(w, pack=True, rows=64)
    assert packed.packed is not None
    for rows in (2, 7, 64, 130):
        a, add = torch.randn(rows, 512), torch.randn(rows, 2048)
        torch.testing.assert_close(packed.mm(a), a @ w, atol=1e-4, rtol=1e-5)
        out = add.clone()
        packed.mm(a, add=out, out=out)
        torch.testing.assert_close(out, add + a @ w, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("via_sigmoid", [False, True])
def test_prepacked_step_products_are_not_copied(monkeypatch, via_sigmoid):
    """oneDNN's prepacked product returns a tensor of its own: a step's gates are activated
    straight from it and inference reads its h Wmh where it is, rather than copying either
    into a buffer first (at batch 128 that copy was 7-12% of featurizing). Training keeps
    h Wmh (backward needs it), so its one [B, H] copy per step is the only one left."""
    monkeypatch.setattr(kernels, "SIGMOID_TANH_MIN", 0 if via_sigmoid else 10**9)
    B, T, H = 4, 600, 32
    model = make(embed_size=8, rnn_size=H, layers=1)
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    assert kernels._prepacks(model.layers[0].weights()["wh"].detach(), B, T)
    with torch.no_grad(), OpLog() as inference:
        model(x)
    with OpLog() as training:
        model(x)

    def per_step(log):  # the destination shapes of the copies made at least once per step
        shapes = [s[0] for name, _, s, _ in log.ops if name == "copy_"]
        return {s: shapes.count(s) for s in set(shapes) if shapes.count(s) >= T}

    assert per_step(inference) == {}, per_step(inference)
    kept = per_step(training)  # h Wmh each step, and h0, c0 into the state buffers
    assert set(kept) == {(B, H)} and kept[(B, H)] <= T + 2, kept


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_prepares_its_weights_once_per_weights_dict(monkeypatch, precision):
    """Chunked inference (featurize, the serving batch) casts, rescales and reorders the
    weights once per weights dict, not once per chunk: a second chunk finds them all in each
    layer's cache (the looked-up first layer's and the concatenated second's) and makes
    nothing new, and computes what fresh weights compute."""
    monkeypatch.setattr(kernels, "PREPACK_MIN_ROW_STEPS", 0)
    monkeypatch.setattr(kernels, "SIGMOID_TANH_MIN", 0)  # the rescaled copies, at tiny sizes
    model = make(layers=2)
    x = torch.randint(0, 256, (4, 6))
    weights = [layer.weights() for layer in model.layers]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:
        first_out = [hs.clone() for hs, _ in model.run_layers(x, weights=weights)[0]]
        first = [dict(w["_kernel_cache"]) for w in weights]
        kept = {"infer_weights"} | ({"step_weights"} if precision == "fp32" else set())  # packed
        assert all(kept <= {k[0] for k in c} for c in first), first
        again = [hs for hs, _ in model.run_layers(x, weights=weights)[0]]
        for w, cache in zip(weights, first):
            assert w["_kernel_cache"].keys() == cache.keys()
            assert all(w["_kernel_cache"][k] is v for k, v in cache.items())
        fresh = [hs for hs, _ in model.run_layers(x)[0]]
    for a, b, c in zip(first_out, again, fresh):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_inference_buffers_are_recycled_only_once_released(mode):
    """Inference outputs come from recycled buffers (warm pages for featurize's chunks): an
    output the caller still holds is never handed out again, a released one is, and buffers
    made under inference mode never reach a training forward."""
    model = make(layers=1)
    gen = torch.Generator().manual_seed(4)
    x1, x2 = (torch.randint(0, 256, (4, 9), generator=gen) for _ in range(2))
    with mode():
        held, _ = model.run_layers(x1)
        snapshot = held[0][0].clone()
        second, _ = model.run_layers(x2)
        torch.testing.assert_close(held[0][0], snapshot, atol=0, rtol=0)  # not overwritten
        del held, second
        pooled = {buf.data_ptr() for buf in kernels._pool._lent}
        third, _ = model.run_layers(x2)
        assert third[0][0].data_ptr() in pooled  # a released buffer came back...
        assert {buf.data_ptr() for buf in kernels._pool._lent} == pooled  # ...none was new
    logits, _ = model(x1)  # training after inference: no inference tensor in its buffers
    logits.square().mean().backward()


def test_recycled_inference_buffers_are_capped(monkeypatch):
    """The pool holds at most LEND_MAX_BYTES for reuse (a 4096-wide model's chunks are
    hundreds of MB), always keeping the most recent buffer."""
    monkeypatch.setattr(kernels, "LEND_MAX_BYTES", 1)
    monkeypatch.setattr(kernels, "_pool", kernels._Pool())
    model = make(layers=1)
    with torch.inference_mode():
        for seed in range(3):
            model.run_layers(torch.randint(0, 256, (4, 9 + seed)))
    assert len(kernels._pool._lent) == 1
