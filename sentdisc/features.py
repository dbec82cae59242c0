"""Texts -> fixed-size features: the one implementation that transfer, heatmaps and serving use.

Texts run through a pool of ``batch_size`` rows, ``chunk_size`` bytes at a time, each row's
state carried between chunks (memory does not grow with text length) and masked so a text's
state stops at its own last byte. When a text ends its row is handed to the next text, so the
batch stays full even when lengths differ tenfold (reviews do); chunks end where a text ends,
so few steps are masked; texts go in longest first, so the pool drains with little tail. The
result is in input order and equals featurizing each text alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch

from sentdisc.errors import InputError
from sentdisc.model import check_layer
from sentdisc.text import encode_list

KINDS = ("cell", "hidden", "mean", "max")
MIN_CHUNK = 32  # bytes: on IMDB reviews 8-32 run at the same speed, 64 is ~10% slower


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
    done = 0
    try:
        for idx, feats in _featurize_pool(model, encoded, lengths, order, batch_size, layer,
                                          kinds, chunk_size):
            for k in kinds:
                out[k][idx] = feats[k]
            done += len(idx)
            if progress is not None:
                progress(done, len(order))
    finally:
        model.train(was_training)
    return out[kind] if isinstance(kind, str) else out


def _featurize_pool(model, encoded, lengths, order, pool_size, layer, kinds, chunk_size):
    """Yield (text indices, {kind: features}) as texts finish, refilling finished rows."""
    device, H, n_layers = model.device, model.config.rnn_size, layer + 1
    weights = [rnn.weights() for rnn in model.layers[:n_layers]]
    queue = iter(order.tolist())
    rows: list[int] = []                      # text index held by each row
    offset = np.zeros(0, dtype=np.int64)      # bytes of that text already read
    state = model.init_state(0)[:n_layers]
    total = torch.zeros(0, H, device=device)  # running sums / maxima of the hidden state
    peak = torch.zeros(0, H, device=device)

    def admit(n):
        nonlocal rows, offset, state, total, peak
        new = [i for _, i in zip(range(n), queue)]
        if not new:
            return
        rows += new
        offset = np.concatenate([offset, np.zeros(len(new), dtype=np.int64)])
        fresh = model.init_state(len(new))[:n_layers]
        state = [(torch.cat([h, h0]), torch.cat([c, c0])) for (h, c), (h0, c0) in zip(state, fresh)]
        total = torch.cat([total, torch.zeros(len(new), H, device=device)])
        peak = torch.cat([peak, torch.full((len(new), H), -torch.inf, device=device)])
        # Longest remaining first: the rows still live at any step are then a prefix, which
        # the kernel computes alone (any other mask pays for every row plus a select).
        by_remaining = np.argsort(offset - lengths[rows], kind="stable")
        keep_rows(torch.from_numpy(by_remaining).to(device), by_remaining)

    def keep_rows(index, index_np):
        nonlocal rows, offset, state, total, peak
        rows = [rows[r] for r in index_np.tolist()]
        offset = offset[index_np]
        state = [(h[index], c[index]) for h, c in state]
        total, peak = total[index], peak[index]

    admit(pool_size)
    while rows:
        remaining = lengths[rows] - offset
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
        outputs, state = model.run_layers(torch.from_numpy(x).to(device), state, mask=m,
                                          weights=weights, num_layers=n_layers)
        hs = outputs[layer][0].float()
        if "mean" in kinds:  # a batched [1,T] @ [T,H]: no [B,T,H] temporary to fault in
            total += torch.bmm(m.unsqueeze(1).to(hs.dtype), hs).squeeze(1)
        if "max" in kinds:
            peak = torch.maximum(peak, hs.masked_fill(~m.unsqueeze(-1), -torch.inf).amax(1))
        offset += T
        finished = offset >= lengths[rows]
        if not finished.any():
            continue
        fin = torch.from_numpy(np.flatnonzero(finished)).to(device)
        h, c = state[layer]
        feats = {"cell": c[fin], "hidden": h[fin], "max": peak[fin]}
        if "mean" in kinds:
            n = torch.from_numpy(lengths[[rows[r] for r in fin.tolist()]]).to(device)
            feats["mean"] = total[fin] / n.unsqueeze(1).float()
        yield ([rows[r] for r in fin.tolist()],
               {k: feats[k].float().cpu().numpy() for k in kinds})
        keep = np.flatnonzero(~finished)
        keep_rows(torch.from_numpy(keep).to(device), keep)
        admit(len(fin))
