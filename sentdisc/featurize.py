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
              kind: str = "cell", chunk_size: int = 256, transliterate: bool = False,
              progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Features [N, rnn_size] (float32) of ``texts``.

    kind: ``cell`` final cell state (the paper's feature), ``hidden`` final hidden state,
    ``mean`` / ``max`` of the hidden states over the text's own bytes.
    """
    if kind not in KINDS:
        raise ValueError(f"featurize kind must be one of {KINDS}, got {kind!r}")
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
    out = np.zeros((len(encoded), H), dtype=np.float32)
    done = 0
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = _featurize_batch(model, [encoded[i] for i in idx], lengths[idx],
                                        layer, kind, chunk_size, device)
            done += len(idx)
            if progress is not None:
                progress(done, len(order))
    finally:
        model.train(was_training)
    return out


def _featurize_batch(model, seqs, lengths, layer, kind, chunk_size, device) -> np.ndarray:
    B, T = len(seqs), int(lengths.max())
    padded = np.zeros((B, T), dtype=np.uint8)
    for r, s in enumerate(seqs):
        padded[r, :len(s)] = s
    x = torch.from_numpy(padded).to(device)
    valid = torch.arange(T, device=device)[None, :] < torch.from_numpy(lengths).to(device)[:, None]
    weights = [l.weights() for l in model.layers[:layer + 1]]
    state = model.init_state(B)[:layer + 1]
    H = model.config.rnn_size
    pool = None
    if kind == "mean":
        pool = torch.zeros(B, H, device=device)
    elif kind == "max":
        pool = torch.full((B, H), -torch.inf, device=device)
    for t0 in range(0, T, chunk_size):
        m = valid[:, t0:t0 + chunk_size]
        # Rows whose text ended before this chunk are fully masked; keep them anyway so the
        # batch shape (and so the GEMM) stays the same as for the longest text.
        outputs, state = model.run_layers(x[:, t0:t0 + chunk_size], state, mask=m,
                                          weights=weights, num_layers=layer + 1)
        if pool is not None:
            hs = outputs[layer][0].float()
            if kind == "mean":
                pool += (hs * m.unsqueeze(-1)).sum(1)
            else:
                pool = torch.maximum(pool, hs.masked_fill(~m.unsqueeze(-1), -torch.inf).amax(1))
    h, c = state[layer]
    if kind == "cell":
        feat = c
    elif kind == "hidden":
        feat = h
    elif kind == "mean":
        feat = pool / torch.from_numpy(lengths).to(device).unsqueeze(1).float()
    else:
        feat = pool
    return feat.float().cpu().numpy()
