"""Texts -> fixed-size features: the one implementation that transfer, heatmaps and serving use.

Texts are sorted by length so a batch wastes little padding, run in chunks of ``chunk_size``
bytes with the state carried between chunks (memory does not grow with text length), and
masked so a text's state stops at its own last byte. The result is in input order and equals
featurizing each text alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from sentdisc.text import encode_list

KINDS = ("cell", "hidden", "mean", "max")


@torch.inference_mode()
def featurize(model, texts: Sequence[str], batch_size: int = 128, layer: int = -1,
              kind: str | Sequence[str] = "cell", chunk_size: int = 256,
              transliterate: bool = False,
              progress: Optional[Callable[[int, int], None]] = None):
    """Features [N, rnn_size] (float32) of ``texts``.

    kind: ``cell`` final cell state (the paper's feature), ``hidden`` final hidden state,
    ``mean`` / ``max`` of the hidden states over the text's own bytes. A list of kinds returns
    {kind: features} from one pass over the texts.
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"featurize kind must be one of {KINDS}, got {k!r}")
    if isinstance(texts, str):
        raise TypeError("featurize takes a list of texts, not a single string")
    n_layers = len(model.layers)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model")
    layer %= n_layers
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    was_training = model.training
    model.eval()
    encoded = encode_list(list(texts), transliterate)
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    H, device = model.config.rnn_size, model.device
    out = {k: np.zeros((len(encoded), H), dtype=np.float32) for k in kinds}
    done = 0
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            feats = _featurize_batch(model, [encoded[i] for i in idx], lengths[idx],
                                     layer, kinds, chunk_size, device)
            for k in kinds:
                out[k][idx] = feats[k]
            done += len(idx)
            if progress is not None:
                progress(done, len(order))
    finally:
        model.train(was_training)
    return out[kind] if isinstance(kind, str) else out


def _featurize_batch(model, seqs, lengths, layer, kinds, chunk_size, device) -> dict:
    B, T = len(seqs), int(lengths.max())
    padded = np.zeros((B, T), dtype=np.uint8)
    for r, s in enumerate(seqs):
        padded[r, :len(s)] = s
    x = torch.from_numpy(padded).to(device)
    valid = torch.arange(T, device=device)[None, :] < torch.from_numpy(lengths).to(device)[:, None]
    weights = [rnn.weights() for rnn in model.layers[:layer + 1]]
    state = model.init_state(B)[:layer + 1]
    H = model.config.rnn_size
    total = torch.zeros(B, H, device=device) if "mean" in kinds else None
    peak = torch.full((B, H), -torch.inf, device=device) if "max" in kinds else None
    for t0 in range(0, T, chunk_size):
        m = valid[:, t0:t0 + chunk_size]
        # Rows whose text ended before this chunk are fully masked; keep them anyway so the
        # batch shape (and so the GEMM) stays the same as for the longest text.
        outputs, state = model.run_layers(x[:, t0:t0 + chunk_size], state, mask=m,
                                          weights=weights, num_layers=layer + 1)
        hs = outputs[layer][0].float()
        if total is not None:
            total += (hs * m.unsqueeze(-1)).sum(1)
        if peak is not None:
            peak = torch.maximum(peak, hs.masked_fill(~m.unsqueeze(-1), -torch.inf).amax(1))
    h, c = state[layer]
    feats = {"cell": c, "hidden": h, "max": peak}
    if total is not None:
        feats["mean"] = total / torch.from_numpy(lengths).to(device).unsqueeze(1).float()
    return {k: feats[k].float().cpu().numpy() for k in kinds}
