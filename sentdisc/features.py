"""Texts -> fixed-size features: the one implementation that transfer, heatmaps and serving use.

Texts run through a pool of ``batch_size`` rows, ``chunk_size`` bytes at a time, each row's
state carried between chunks (memory does not grow with text length) and masked so a text's
state stops at its own last byte. When a text ends its row is handed to the next text, so the
batch stays full even when lengths differ tenfold (reviews do); chunks end where a text ends,
so few steps are masked; texts go in longest first, so the pool drains with little tail. The
result is in input order and equals featurizing each text alone.

Where the device multiplies bf16 natively (CUDA; a CPU with AVX-512 BF16 or AMX) the products
run in bf16 by default, gates and state in float32, as the fused kernel does under autocast
(``sentdisc.precision`` decides and says why once). On a CUDA device the per-timestep step of
all layers is also captured once per call in a CUDA graph and replayed (at small batches the
step is a dozen tiny kernels: launch-bound). ``feature_plan`` decides, from plain values; when
the graph cannot run the chunks run eagerly and the reason is printed once per process.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch

from sentdisc.errors import InputError
from sentdisc.model import check_layer
from sentdisc.text import encode_list

KINDS = ("cell", "hidden", "mean", "max")
MIN_CHUNK = 32  # bytes: on IMDB reviews 8-32 run at the same speed, 64 is ~10% slower
GRAPH_MODES = ("auto", "on", "off")
# A capture costs a few warm-up steps and the recording: fewer replays than this do not repay it.
GRAPH_MIN_STEPS = 64
_said: set = set()  # fallback reasons already printed in this process


@torch.inference_mode()
def featurize(model, texts: Sequence[str], batch_size: int = 128, layer: int = -1,
              kind: str | Sequence[str] = "cell", chunk_size: int = 256,
              transliterate: bool = False,
              progress: Optional[Callable[[int, int], None]] = None,
              precision: str = "auto", cuda_graph: str = "auto"):
    """Features [N, rnn_size] (float32) of ``texts``.

    kind: ``cell`` final cell state (the paper's feature), ``hidden`` final hidden state,
    ``mean`` / ``max`` of the hidden states over the text's own bytes. A list of kinds returns
    {kind: features} from one pass over the texts. precision: ``auto`` (bf16 products where
    the device multiplies bf16 natively, float32 elsewhere: ``feature_precision``) | ``fp32``
    | ``bf16``. cuda_graph: ``auto`` (replay a captured step
    on CUDA when it can) | ``on`` (fail when it cannot) | ``off``; see ``feature_plan``.
    Every text must be a str UTF-8 can encode: a None, a number (a pandas NaN) or an unpaired
    surrogate is an error naming its index (``sentdisc.text.check_texts``), never a feature.
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in KINDS:
            raise InputError(f"featurize kind must be one of {KINDS}, got {k!r}")
    if isinstance(texts, str):
        raise TypeError("featurize takes a list of texts, not a single string")
    layer = check_layer(layer, len(model.layers))
    if batch_size < 1 or chunk_size < 1:
        raise InputError("batch_size and chunk_size must be >= 1")
    was_training = model.training
    model.eval()
    encoded = encode_list(list(texts), transliterate)
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    out = {k: np.zeros((len(encoded), model.config.rnn_size), dtype=np.float32) for k in kinds}
    run = _chunk_runner(model, layer, kinds, chunk_size, lengths, batch_size, precision,
                        cuda_graph)
    done = 0
    try:
        for idx, feats in featurize_pool(model, encoded, iter(order.tolist()), batch_size,
                                          layer, kinds, chunk_size, run):
            for k in kinds:
                out[k][idx] = feats[k]
            done += len(idx)
            if progress is not None:
                progress(done, len(order))
    finally:
        model.train(was_training)
    return out[kind] if isinstance(kind, str) else out


def featurize_pool(model, encoded, queue, pool_size, layer, kinds, chunk_size, run):
    """Yield (text indices, {kind: features}) as texts finish, refilling free rows from
    ``queue`` (indices into ``encoded``) after every chunk. The queue may be fed while the
    pool runs (serving.model_process): an index it yields later joins the running rows.

    ``pool_size``: the rows, or a callable asked before every admission, so a server can
    retune a running pool. Shrunk below the rows running, the pool admits nothing until they
    end under it: a running row is never dropped."""
    size = pool_size if callable(pool_size) else lambda: pool_size
    device, H, n_layers = model.device, model.config.rnn_size, layer + 1
    rows: list[int] = []                      # text index held by each row
    length = np.zeros(0, dtype=np.int64)      # that text's bytes
    offset = np.zeros(0, dtype=np.int64)      # bytes of it already read
    state = model.init_state(0)[:n_layers]
    total = torch.zeros(0, H, device=device)  # running sums / maxima of the hidden state
    peak = torch.zeros(0, H, device=device)

    def admit(n):
        nonlocal rows, length, offset, state, total, peak
        new = [i for _, i in zip(range(n), queue)]
        if not new:
            return
        rows += new
        length = np.concatenate([length, np.array([len(encoded[i]) for i in new], np.int64)])
        offset = np.concatenate([offset, np.zeros(len(new), dtype=np.int64)])
        fresh = model.init_state(len(new))[:n_layers]
        state = [(torch.cat([h, h0]), torch.cat([c, c0])) for (h, c), (h0, c0) in zip(state, fresh)]
        total = torch.cat([total, torch.zeros(len(new), H, device=device)])
        peak = torch.cat([peak, torch.full((len(new), H), -torch.inf, device=device)])
        # Longest remaining first: the rows still live at any step are then a prefix, which
        # the kernel computes alone (any other mask pays for every row plus a select).
        by_remaining = np.argsort(offset - length, kind="stable")
        keep_rows(torch.from_numpy(by_remaining).to(device), by_remaining)

    def keep_rows(index, index_np):
        nonlocal rows, length, offset, state, total, peak
        rows = [rows[r] for r in index_np.tolist()]
        length, offset = length[index_np], offset[index_np]
        state = [(h[index], c[index]) for h, c in state]
        total, peak = total[index], peak[index]

    admit(size())
    while rows:
        remaining = length - offset
        if remaining.max() <= chunk_size:  # every row ends in this chunk: one call does all
            T = int(remaining.max())
        else:
            # Step until the first row's text ends, so its row is refilled at once and the
            # GEMMs stay full height; MIN_CHUNK bounds the number of chunks.
            T = int(min(chunk_size, max(remaining.min(), MIN_CHUNK)))
        x = np.zeros((len(rows), T), dtype=np.uint8)
        for r, i in enumerate(rows):
            piece = encoded[i][offset[r]:offset[r] + T]
            x[r, :len(piece)] = piece
        m = torch.from_numpy(np.arange(T)[None, :] < remaining[:, None]).to(device)
        hs, state = run(torch.from_numpy(x).to(device), state, m)
        if "mean" in kinds:  # a batched [1,T] @ [T,H]: no [B,T,H] temporary to fault in
            total += torch.bmm(m.unsqueeze(1).to(hs.dtype), hs).squeeze(1)
        if "max" in kinds:
            peak = torch.maximum(peak, hs.masked_fill(~m.unsqueeze(-1), -torch.inf).amax(1))
        offset += T
        finished = offset >= length
        if not finished.any():
            admit(size() - len(rows))
            continue
        fin = torch.from_numpy(np.flatnonzero(finished)).to(device)
        h, c = state[layer]
        feats = {"cell": c[fin], "hidden": h[fin], "max": peak[fin]}
        if "mean" in kinds:
            n = torch.from_numpy(length[finished]).to(device)
            feats["mean"] = total[fin] / n.unsqueeze(1).float()
        yield ([rows[r] for r in fin.tolist()],
               {k: feats[k].float().cpu().numpy() for k in kinds})
        keep = np.flatnonzero(~finished)
        keep_rows(torch.from_numpy(keep).to(device), keep)
        admit(size() - len(rows))


# --- how a chunk runs: eagerly, or a captured step replayed -----------------------------------

def feature_plan(mode: str, device, rnn_type: str = "mlstm", weight_dtype=torch.float32,
                 steps: int = GRAPH_MIN_STEPS) -> tuple[bool, str]:
    """Whether featurize replays a captured per-timestep step: (use_graph, reason). Pure: plain
    values in, so every decision is testable without a GPU. ``steps``: about how many time
    steps the call runs (bytes over rows)."""
    if mode not in GRAPH_MODES:
        raise InputError(f"featurize cuda_graph must be one of {GRAPH_MODES}, got {mode!r}")
    device_type = getattr(device, "type", str(device).split(":")[0])
    if mode == "off":
        return False, "cuda_graph is off"
    if device_type != "cuda":
        return False, f"the device is {device_type} (a CUDA graph needs a CUDA device)"
    if rnn_type != "mlstm":
        return False, f"the captured step is the mLSTM's, this model is an {rnn_type}"
    if weight_dtype != torch.float32:
        return False, f"the weights are {weight_dtype} (the captured step takes float32 weights)"
    if steps < GRAPH_MIN_STEPS:
        return False, f"{steps} time steps are too few to repay a capture (< {GRAPH_MIN_STEPS})"
    return True, "the per-timestep step is captured in a CUDA graph"


def feature_precision(precision: str, device, hardware=None) -> str:
    """auto -> bf16 products where ``device`` multiplies bf16 natively (CUDA, a CPU with
    AVX-512 BF16 or AMX: ``sentdisc.precision``), float32 elsewhere; fp32 / bf16 as given.
    ``hardware`` (a ``precision.Hardware``): decide for it instead of this machine's."""
    from sentdisc.precision import Hardware, choose

    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"featurize precision must be auto, fp32 or bf16, got {precision!r}")
    chosen, why = choose(precision, hardware or Hardware.detect(device))
    if hardware is None and precision == "auto":
        _say(why)
    return chosen


def _say(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"[featurize] {message}", flush=True)


def _chunk_runner(model, layer, kinds, chunk_size, lengths, pool_size, precision, cuda_graph,
                  simulate: bool = False):
    """(x [B,T] bytes, state, mask [B,T]) -> (hidden states [B,T,H] of ``layer``, or None
    when no kind needs them; new state): a ``_GraphStep``, or the eager model.
    ``simulate`` (tests): the graph path's step runs eagerly, on any device."""
    device = model.device
    weights = [rnn.weights() for rnn in model.layers[:layer + 1]]
    cd = torch.bfloat16 if feature_precision(precision, device) == "bf16" else torch.float32
    rows = max(1, min(pool_size, len(lengths)))
    use_graph, reason = feature_plan(cuda_graph, "cuda" if simulate else device,
                                     model.config.rnn_type, model.head.weight.dtype,
                                     int(lengths.sum()) // rows)
    if use_graph:
        try:
            return _GraphStep(model, weights, layer, rows, chunk_size,
                              bool({"mean", "max"} & set(kinds)), cd, simulate)
        except Exception as e:  # any capture failure: say it, run eagerly
            reason = f"the capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if not simulate:
                torch.cuda.synchronize()
    if cuda_graph == "on":
        raise InputError(f"featurize cuda_graph on: the step cannot be captured: {reason}")
    if cuda_graph == "auto" and device.type == "cuda":
        _say(f"cuda_graph auto: eager, because {reason}")
    return _eager_runner(model, weights, layer, cd)


def _eager_runner(model, weights, layer, cd):
    """The model's own layers on a chunk (the fused kernel), under bf16 autocast when asked."""
    def run(x, state, m):
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if cd == torch.bfloat16 \
                else contextlib.nullcontext():
            outputs, state = model.run_layers(x, state, mask=m, weights=weights,
                                              num_layers=layer + 1)
        return outputs[layer][0].float(), state
    return run


class _GraphStep:
    """One time step of every layer up to ``layer``, for a fixed pool of ``rows`` rows, on
    static buffers: a chunk's bytes and mask are copied in time-major, a device-side counter
    says which step a replay reads, the state and (for mean/max) the hidden states stay in
    place. Fewer live rows than captured (the pool draining) run as masked rows. Products in
    ``cd`` (bf16 on CUDA), gates and state in float32, as the fused kernel under autocast."""

    def __init__(self, model, weights, layer, rows, max_steps, keep_hs, cd, simulate=False):
        dev, H = model.device, model.config.rnn_size
        self.layer, self.cd = layer, cd
        w0, emb = weights[0], model.embed.weight
        # layer 0 reads an embedding row: x Wx + b and x Wmx are per-byte tables (as the kernel)
        self.x_table = torch.addmm(w0["b"].to(cd), emb.to(cd), w0["wx"].to(cd)).float()
        self.xm_table = (emb.to(cd) @ w0["wmx"].to(cd)).float()
        self.w = [{k: v.to(cd) for k, v in w.items() if k != "_kernel_cache"} for w in weights]
        self.ids = torch.zeros(max_steps, rows, dtype=torch.long, device=dev)
        self.live = torch.zeros(max_steps, rows, 1, dtype=torch.bool, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.state = [(torch.zeros(rows, H, device=dev), torch.zeros(rows, H, device=dev))
                      for _ in weights]
        self.hs = torch.zeros(max_steps, rows, H, device=dev) if keep_hs else None
        self.replay = self._body if simulate else self._capture()

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as PyTorch's graph notes do
            for _ in range(3):
                self.t.zero_()
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        return graph.replay

    def _body(self):
        ids = self.ids.index_select(0, self.t)[0]
        live = self.live.index_select(0, self.t)[0]
        cd, inp = self.cd, None
        for i, ((h, c), w) in enumerate(zip(self.state, self.w)):
            if i == 0:
                xz, xm = self.x_table.index_select(0, ids), self.xm_table.index_select(0, ids)
            else:
                a = inp.to(cd)
                xz, xm = torch.addmm(w["b"], a, w["wx"]).float(), (a @ w["wmx"]).float()
            m = xm * (h.to(cd) @ w["wmh"]).float()
            gi, gf, go, gu = (xz + (m.to(cd) @ w["wh"]).float()).chunk(4, 1)
            c_new = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gu)
            h_new = torch.sigmoid(go) * torch.tanh(c_new)
            h.copy_(torch.where(live, h_new, h))  # a text that has ended holds its state
            c.copy_(torch.where(live, c_new, c))
            inp = h
        if self.hs is not None:
            self.hs.index_copy_(0, self.t, self.state[self.layer][0].unsqueeze(0))
        self.t += 1

    def __call__(self, x, state, m):
        n, T = x.shape
        self.ids[:T, :n].copy_(x.t())
        self.live[:T, n:] = False
        self.live[:T, :n, 0].copy_(m.t())
        for (h, c), (h0, c0) in zip(self.state, state):
            h[:n].copy_(h0)
            c[:n].copy_(c0)
            h[n:].zero_()
            c[n:].zero_()
        self.t.zero_()
        for _ in range(T):
            self.replay()
        hs = self.hs[:T, :n].transpose(0, 1) if self.hs is not None else None
        return hs, [(h[:n].clone(), c[:n].clone()) for h, c in self.state]
