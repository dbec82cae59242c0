"""The byte-level language model: embedding -> stacked mLSTM (or LSTM) -> linear head.

mLSTM (Krause et al. 2016), written as in OpenAI's sentiment-neuron encoder:

    m = (x Wmx) * (h Wmh)
    z = x Wx + m Wh + b            gates in the order i, f, o, u
    c = sigmoid(f) * c + sigmoid(i) * tanh(u)
    h = sigmoid(o) * tanh(c)

Weight norm is per output column: W = g * V / ||V||, the norm taken over the input dimension.
Weights are stored [in, out] like OpenAI's so their files map one to one.

Only the h-dependent work sits in the time loop: the x-projections for all T steps are one
matmul (in the fused path, sentdisc.kernels, a per-byte table lookup for the first layer), and
weight norm is computed once per forward.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sentdisc.errors import InputError

# Below this temperature sampling is the argmax: dividing logits by it overflows float32.
GREEDY_BELOW = 1e-4

VOCAB = 256
RNN_TYPES = ("mlstm", "lstm")
WEIGHT_NORMS = ("recurrent", "all", "none")

State = list  # per layer: (h [B,H], c [B,H])


@dataclass
class ModelConfig:
    embed_size: int = 64
    rnn_size: int = 512
    layers: int = 1
    rnn_type: str = "mlstm"
    dropout: float = 0.0
    # Which weights get weight norm: the recurrent ones (Wh, Wmh), all, or none.
    weight_norm: str = "recurrent"

    def __post_init__(self):
        for name in ("embed_size", "rnn_size", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"ModelConfig.rnn_type must be one of {RNN_TYPES}, got {self.rnn_type!r}")
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(
                f"ModelConfig.weight_norm must be one of {WEIGHT_NORMS}, got {self.weight_norm!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}; expected {sorted(known)}")
        return cls(**d)


def check_layer(layer: int, n_layers: int) -> int:
    """A layer index in [-n_layers, n_layers) -> its index from 0; else a ValueError."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) \
            or not -n_layers <= layer < n_layers:
        raise InputError(f"layer {layer!r} out of range for a {n_layers}-layer model")
    return int(layer) % n_layers


def _prompt_bytes(prompt) -> list[int]:
    """A generation prompt as a list of byte values, or an InputError saying what it is."""
    if isinstance(prompt, str):
        raise InputError("prompt must be bytes, not str: pass prompt.encode('utf-8'), or use "
                         "sentdisc.viz.generate_text (it preprocesses a str as featurize does)")
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        return list(bytes(prompt))
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    try:
        values = list(prompt)
    except TypeError:
        raise InputError(f"prompt must be bytes or a sequence of byte values 0..255, "
                         f"got {type(prompt).__name__}") from None
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= 255:
            raise InputError(f"prompt[{i}] is {v!r}: a prompt holds byte values 0..255")
    return [int(v) for v in values]


def _weight_normed(v: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    if g is None:
        return v
    return v * (g / v.norm(dim=0).clamp_min(1e-12))


class RecurrentLayer(nn.Module):
    """One mLSTM or LSTM layer over a whole [B, T, in] sequence."""

    def __init__(self, input_size: int, hidden_size: int, rnn_type: str, weight_norm: str):
        super().__init__()
        H = hidden_size
        self.hidden_size, self.rnn_type = H, rnn_type
        mult = rnn_type == "mlstm"
        self.wx = nn.Parameter(torch.empty(input_size, 4 * H))
        self.wh = nn.Parameter(torch.empty(H, 4 * H))
        self.b = nn.Parameter(torch.zeros(4 * H))
        if mult:
            self.wmx = nn.Parameter(torch.empty(input_size, H))
            self.wmh = nn.Parameter(torch.empty(H, H))
        normed = {"none": [], "recurrent": ["wh", "wmh"], "all": ["wx", "wh", "wmx", "wmh"]}[weight_norm]
        self.normed = [n for n in normed if hasattr(self, n)]
        for name in self.normed:
            out = getattr(self, name).shape[1]
            self.register_parameter("g" + name[1:], nn.Parameter(torch.ones(out)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in ("wx", "wh", "wmx", "wmh"):
            if hasattr(self, name):
                w = getattr(self, name)
                w.uniform_(-bound, bound)
                if name in self.normed:  # start with W == V
                    getattr(self, "g" + name[1:]).copy_(w.norm(dim=0))
        self.b.zero_()
        H = self.hidden_size
        self.b[H:2 * H] = 1.0  # forget-gate bias: remember by default

    def weights(self) -> dict:
        """Effective (weight-normed) weights, computed once per forward. Callers that reuse the
        dict across calls (featurize's chunks) let the fused path keep derived forms in it."""
        out = {}
        for name in ("wx", "wh", "wmx", "wmh"):
            if hasattr(self, name):
                out[name] = _weight_normed(getattr(self, name), getattr(self, "g" + name[1:], None))
        out["b"] = self.b
        return out

    def forward(self, x: torch.Tensor, state: tuple, reset: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, keep_cells: bool = False,
                force: Optional[tuple] = None, weights: Optional[dict] = None,
                tokens: Optional[tuple] = None):
        """x [B,T,in]; state (h, c). Returns (hs [B,T,H], cs [B,T,H] or None, (h, c)).

        reset[B,T]: zero the row's state before step t. mask[B,T]: where False the state is
        held (padding after a text's end). force: (neuron indices, values) written into c at
        every step before h is computed (sentiment-controlled generation). tokens: (ids,
        embedding) when x is embedding[ids]: the fused path then looks x's projections up per
        byte value instead of multiplying, and trains the embedding through those tables.
        """
        w = self.weights() if weights is None else weights
        h, c = state
        if (not keep_cells and force is None and self.rnn_type == "mlstm"
                and _fused_available(x, reset, mask)):
            from sentdisc import kernels
            return kernels.mlstm_sequence(x, h, c, w, reset=reset, mask=mask, tokens=tokens)
        xz = torch.addmm(w["b"], x.reshape(-1, x.shape[-1]), w["wx"]).view(*x.shape[:2], -1)
        xm = (x @ w["wmx"]) if self.rnn_type == "mlstm" else None
        keeps = (~reset).unsqueeze(-1).to(x.dtype).unbind(1) if reset is not None else None
        masks = mask.unsqueeze(-1).unbind(1) if mask is not None else None
        xms = xm.unbind(1) if xm is not None else None
        hs, cs = [], []
        # unbind, not xz[:, t]: slicing a grad-requiring tensor makes backward quadratic in T.
        for t, xz_t in enumerate(xz.unbind(1)):
            if keeps is not None:
                h, c = h * keeps[t], c * keeps[t]
            if xms is not None:
                z = xz_t + (xms[t] * (h @ w["wmh"])) @ w["wh"]
            else:
                z = xz_t + h @ w["wh"]
            i, f, o, u = z.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            if force is not None:
                c_new = c_new.index_copy(1, force[0], force[1].to(c_new.dtype).expand(c_new.shape[0], -1))
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if masks is not None:
                h_new = torch.where(masks[t], h_new, h)
                c_new = torch.where(masks[t], c_new, c)
            h, c = h_new, c_new
            hs.append(h)
            if keep_cells:
                cs.append(c)
        return torch.stack(hs, 1), (torch.stack(cs, 1) if keep_cells else None), (h, c)


def _fused_available(x: torch.Tensor, reset=None, mask=None) -> bool:
    """Whether sentdisc.kernels provides a fused whole-sequence mLSTM for this input."""
    from sentdisc import kernels

    return kernels.supports(x, reset=reset, mask=mask)


class ByteLM(nn.Module):
    """Byte embedding (256) -> stacked recurrent layers -> linear head (256)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E, H = config.embed_size, config.rnn_size
        self.embed = nn.Embedding(VOCAB, E)
        self.layers = nn.ModuleList(
            RecurrentLayer(E if i == 0 else H, H, config.rnn_type, config.weight_norm)
            for i in range(config.layers))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(H, VOCAB)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def init_state(self, batch_size: int) -> State:
        z = torch.zeros(batch_size, self.config.rnn_size, device=self.device,
                        dtype=self.head.weight.dtype)
        return [(z, z) for _ in self.layers]

    def run_layers(self, x: torch.Tensor, state: Optional[State] = None,
                   reset: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                   keep_cells: bool = False, force: Optional[dict] = None,
                   weights: Optional[list] = None, num_layers: Optional[int] = None):
        """Bytes [B,T] -> ([(hs, cs) per layer], new state). The shared core of every path.

        num_layers: run only the first n layers (featurizing a lower layer skips the rest).
        """
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        if state is None:
            state = self.init_state(x.shape[0])[:len(layers)]
        ids = x.long()
        inp = self.embed(ids)
        outputs, new_state = [], []
        for i, layer in enumerate(layers):
            if i > 0:
                inp = self.drop(inp)
            hs, cs, st = layer(inp, state[i], reset=reset, mask=mask, keep_cells=keep_cells,
                               force=(force or {}).get(i),
                               weights=weights[i] if weights is not None else None,
                               tokens=(ids, self.embed.weight) if i == 0 else None)
            outputs.append((hs, cs))
            new_state.append(st)
            inp = hs
        return outputs, new_state

    def forward(self, x: torch.Tensor, state: Optional[State] = None,
                reset: Optional[torch.Tensor] = None):
        """x [B,T] bytes -> (logits [B,T,256], new state)."""
        outputs, state = self.run_layers(x, state, reset)
        return self.head(self.drop(outputs[-1][0])), state

    @torch.no_grad()
    def trace(self, x: torch.Tensor, layer: int = -1, kind: str = "cell",
              state: Optional[State] = None) -> torch.Tensor:
        """Per-timestep values [B,T,H] of one layer's cell or hidden state."""
        if kind not in ("cell", "hidden"):
            raise InputError(f"trace kind must be 'cell' or 'hidden', got {kind!r}")
        outputs, _ = self.run_layers(x, state, keep_cells=kind == "cell")
        hs, cs = outputs[layer]
        return cs if kind == "cell" else hs

    @torch.no_grad()
    def generate(self, prompt: bytes | list, length: int, temperature: float = 1.0,
                 force: Optional[dict] = None, layer: int = -1,
                 generator: Optional[torch.Generator] = None):
        """Continue ``prompt`` (bytes, or a sequence of byte values 0..255; a str is refused:
        encode it first, or use ``sentdisc.viz.generate_text``, which preprocesses it as
        featurize does) by ``length`` sampled bytes.

        force: {neuron: value} held in the chosen layer's cell state for every generated byte.
        Returns (prompt + generated bytes, and per byte the chosen layer's cell value of the
        first forced neuron, or of neuron 0 when nothing is forced, after reading that byte).
        """
        prompt = _prompt_bytes(prompt)
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise InputError(f"length must be an integer >= 0, got {length!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(temperature) or temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
        length, temperature = int(length), float(temperature)
        layer = check_layer(layer, len(self.layers))
        H = self.config.rnn_size
        if force and not all(0 <= n < H for n in force):
            raise InputError(f"forced neurons {sorted(force)} out of range for rnn_size {H}")
        prompt = prompt or [ord("\n")]
        weights = [rnn.weights() for rnn in self.layers]
        watch = next(iter(force)) if force else 0
        forced = None
        if force:
            idx = torch.tensor(list(force), device=self.device, dtype=torch.long)
            val = torch.tensor([list(force.values())], device=self.device, dtype=torch.float32)
            forced = {layer: (idx, val)}
        # Every generated byte is sampled from a state whose forced neurons hold their value,
        # so the last prompt byte is read with the force on, as are all generated bytes.
        state, trace = None, []
        if len(prompt) > 1:
            x = torch.tensor([prompt[:-1]], device=self.device)
            outputs, state = self.run_layers(x, keep_cells=True, weights=weights)
            trace = outputs[layer][1][0, :, watch].tolist()
        out, cur = list(prompt), prompt[-1]
        for step in range(length + 1):
            x = torch.tensor([[cur]], device=self.device)
            outputs, state = self.run_layers(x, state, keep_cells=True, force=forced,
                                             weights=weights)
            trace.append(float(outputs[layer][1][0, -1, watch]))
            if step == length:  # that last read only completes the trace
                break
            logits = self.head(outputs[-1][0][:, -1]).float()
            if temperature < GREEDY_BELOW:  # logits / 1e-300 overflow to inf, softmax to nan
                cur = int(logits.argmax(-1))
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                cur = int(torch.multinomial(probs, 1, generator=generator))
            out.append(cur)
        return bytes(out), trace
