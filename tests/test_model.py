"""The model against a plain per-timestep float64 implementation of the paper's equations."""
import numpy as np
import pytest
import torch

from sentdisc.errors import InputError
from sentdisc.model import ByteLM, ModelConfig


def _np_weights(layer):
    """Effective weights of one layer as float64 numpy, weight norm applied by hand."""
    out = {}
    for name in ("wx", "wh", "wmx", "wmh"):
        if not hasattr(layer, name):
            continue
        v = getattr(layer, name).detach().double().numpy()
        g = getattr(layer, "g" + name[1:], None)
        if g is not None:
            v = v / np.sqrt((v ** 2).sum(0, keepdims=True)) * g.detach().double().numpy()
        out[name] = v
    out["b"] = layer.b.detach().double().numpy()
    return out


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(model, x, state=None, reset=None):
    """Float64, one timestep at a time, straight from the equations."""
    cfg = model.config
    B, T = x.shape
    emb = model.embed.weight.detach().double().numpy()
    layers = [_np_weights(layer) for layer in model.layers]
    if state is None:
        state = [(np.zeros((B, cfg.rnn_size)), np.zeros((B, cfg.rnn_size))) for _ in layers]
    state = [(np.array(h, dtype=np.float64), np.array(c, dtype=np.float64)) for h, c in state]
    outs, cells = [], []
    for t in range(T):
        inp = emb[x[:, t]]
        step_cells = []
        for li, w in enumerate(layers):
            h, c = state[li]
            if reset is not None:
                keep = (~reset[:, t]).astype(np.float64)[:, None]
                h, c = h * keep, c * keep
            if cfg.rnn_type == "mlstm":
                m = (inp @ w["wmx"]) * (h @ w["wmh"])
                z = inp @ w["wx"] + m @ w["wh"] + w["b"]
            else:
                z = inp @ w["wx"] + h @ w["wh"] + w["b"]
            H = cfg.rnn_size
            i, f, o, u = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
            c = _sig(f) * c + _sig(i) * np.tanh(u)
            h = _sig(o) * np.tanh(c)
            state[li] = (h, c)
            step_cells.append(c)
            inp = h
        outs.append(inp)
        cells.append(step_cells)
    hw = model.head.weight.detach().double().numpy()
    hb = model.head.bias.detach().double().numpy()
    logits = np.stack(outs, 1) @ hw.T + hb
    return logits, state, cells


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(embed_size=8, rnn_size=16, layers=2, rnn_type="mlstm", weight_norm="all")
    cfg.update(kw)
    model = ByteLM(ModelConfig(**cfg))
    with torch.no_grad():  # non-trivial gains and biases so weight norm is really exercised
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("g") or name.endswith(".b"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def rand_bytes(B, T, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(B, T))


@pytest.mark.parametrize("rnn_type", ["mlstm", "lstm"])
@pytest.mark.parametrize("weight_norm", ["all", "recurrent", "none"])
def test_matches_reference(rnn_type, weight_norm):
    model = make(rnn_type=rnn_type, weight_norm=weight_norm)
    x = rand_bytes(3, 11)
    logits, state = model(torch.from_numpy(x))
    ref_logits, ref_state, _ = reference(model, x)
    np.testing.assert_allclose(logits.detach().numpy(), ref_logits, atol=1e-5)
    for (h, c), (rh, rc) in zip(state, ref_state):
        np.testing.assert_allclose(h.detach().numpy(), rh, atol=1e-5)
        np.testing.assert_allclose(c.detach().numpy(), rc, atol=1e-5)


def test_state_carry_equals_one_call():
    model = make()
    x = torch.from_numpy(rand_bytes(2, 20))
    full, s_full = model(x)
    a, s = model(x[:, :10])
    b, s2 = model(x[:, 10:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-6, rtol=0)
    for (h1, c1), (h2, c2) in zip(s_full, s2):
        torch.testing.assert_close(h1, h2, atol=1e-6, rtol=0)
        torch.testing.assert_close(c1, c2, atol=1e-6, rtol=0)


def test_reset_zeroes_state_before_byte():
    model = make()
    x = rand_bytes(3, 12)
    reset = np.zeros((3, 12), dtype=bool)
    reset[0, 5] = reset[2, 0] = reset[2, 9] = True
    # Start from a non-zero state so the reset at t=0 is observable.
    _, warm = model(torch.from_numpy(rand_bytes(3, 4, seed=7)))
    logits, _ = model(torch.from_numpy(x), warm, torch.from_numpy(reset))
    ref, _, _ = reference(model, x, [(h.detach().numpy(), c.detach().numpy()) for h, c in warm], reset)
    np.testing.assert_allclose(logits.detach().numpy(), ref, atol=1e-5)
    # After a reset the row equals a fresh run on the remaining bytes.
    fresh, _ = model(torch.from_numpy(x[:1, 5:]))
    np.testing.assert_allclose(logits[0, 5:].detach().numpy(), fresh[0].detach().numpy(), atol=1e-5)
    # Rows without a reset differ from a fresh start (the reset is row-local).
    fresh1, _ = model(torch.from_numpy(x[1:2]))
    assert not np.allclose(logits[1].detach().numpy(), fresh1[0].detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("rnn_type", ["mlstm", "lstm"])
def test_gradients_reach_every_parameter(rnn_type):
    model = make(rnn_type=rnn_type, dropout=0.1)
    model.train()
    x = torch.from_numpy(rand_bytes(4, 9))
    logits, _ = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradients_match_float64_autograd():
    """The production path's gradients equal a float64 run of the same module."""
    x = torch.from_numpy(rand_bytes(3, 16))
    grads = {}
    for dtype in (torch.float32, torch.float64):
        m = make(layers=1).to(dtype)
        logits, _ = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        m.zero_grad()
        loss.backward()
        grads[dtype] = {n: p.grad.double() for n, p in m.named_parameters()}
    for n in grads[torch.float32]:
        torch.testing.assert_close(grads[torch.float32][n], grads[torch.float64][n], atol=1e-5, rtol=1e-4)


def test_trace_matches_reference_cells():
    model = make()
    x = rand_bytes(2, 7)
    _, _, cells = reference(model, x)
    for layer in (0, 1):
        tr = model.trace(torch.from_numpy(x), layer=layer, kind="cell").numpy()
        np.testing.assert_allclose(tr, np.stack([c[layer] for c in cells], 1), atol=1e-5)


def test_generate_force_holds_neuron_and_changes_text():
    model = make(layers=1, rnn_size=32)
    prompt = b"\n this movie was"
    g = torch.Generator().manual_seed(3)
    free, free_trace = model.generate(prompt, 40, temperature=1.0, generator=g)
    g = torch.Generator().manual_seed(3)
    again, _ = model.generate(prompt, 40, temperature=1.0, generator=g)
    assert free == again  # reproducible with a seed
    g = torch.Generator().manual_seed(3)
    forced, trace = model.generate(prompt, 40, temperature=1.0, force={5: 1.0}, generator=g)
    assert len(forced) == len(prompt) + 40 and len(trace) == len(forced)
    assert all(v == 1.0 for v in trace[len(prompt) - 1:])
    assert forced != free
    assert forced[:len(prompt)] == prompt
    # the public call checks what it is given, as sentdisc.generate_text does
    for kwargs, said in ((dict(layer=1), "layer 1 out of range for a 1-layer model"),
                         (dict(temperature=float("nan")), "temperature must be a finite"),
                         (dict(force={32: 1.0}), r"forced neurons \[32\] out of range")):
        with pytest.raises(InputError, match=said):
            model.generate(prompt, 5, **kwargs)


def test_invalid_config_values():
    with pytest.raises(ValueError, match="rnn_type"):
        ModelConfig(rnn_type="gru")
    with pytest.raises(ValueError, match="weight_norm"):
        ModelConfig(weight_norm="some")
    with pytest.raises(ValueError, match="rnn_size"):
        ModelConfig(rnn_size=0)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"rnn_size": 8, "hidden": 3})


@pytest.mark.parametrize("prompt, said", [
    ("hello", "prompt must be bytes, not str"),
    ([104, 300], r"prompt\[1\] is 300: a prompt holds byte values 0..255"),
    ([-1], r"prompt\[0\] is -1"),
    (5, "prompt must be bytes or a sequence of byte values 0..255, got int"),
])
def test_generate_refuses_prompts_that_are_not_bytes(prompt, said):
    # a str used to fail in torch ("too many dimensions 'str'"), 300 in an IndexError
    model = make(layers=1)
    with pytest.raises(InputError, match=said):
        model.generate(prompt, 5)


def test_generate_takes_numpy_numbers_and_byte_sequences():
    model = make(layers=1)
    g = torch.Generator().manual_seed(0)
    a, _ = model.generate(b"\n hi", np.int64(4), temperature=np.float32(0.5), generator=g)
    g = torch.Generator().manual_seed(0)
    b, _ = model.generate(np.frombuffer(b"\n hi", np.uint8), 4, temperature=0.5, generator=g)
    g = torch.Generator().manual_seed(0)
    c, _ = model.generate(bytearray(b"\n hi"), 4, temperature=0.5, generator=g)
    assert a == b == c and len(a) == 8
    with pytest.raises(InputError, match="temperature"):
        model.generate(b"x", 2, temperature=True)
