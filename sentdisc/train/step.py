"""One optimisation step of the byte LM, and the loss it takes: what the Ray Train job, the
benchmarks and the GPU script all run and time.

A window is [B, T+1] bytes: inputs ``x[:, :-1]``, next-byte targets ``x[:, 1:]``, and a reset
mask [B, T] that zeroes a row's state before the byte where a new record starts. The hidden
state comes in from the previous window and leaves detached (truncated BPTT over T bytes).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def autocast_for(precision: str, device: torch.device):
    """The forward pass's autocast context: none for fp32, bf16 / fp16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def window_loss(model, x: torch.Tensor, reset: torch.Tensor, hidden=None, autocast=None,
                reduction: str = "mean"):
    """Cross entropy of the next byte over one window (nats), and the state after it."""
    with autocast or contextlib.nullcontext():
        logits, hidden = model(x[:, :-1], hidden, reset)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               x[:, 1:].reshape(-1), reduction=reduction)
    return loss, hidden


def train_step(model, optimizer, x: torch.Tensor, reset: torch.Tensor, hidden=None, *,
               clip: float = 0.0, scaler: Optional[torch.amp.GradScaler] = None,
               autocast=None, loss_scale: float = 1.0):
    """Forward, loss, backward, gradient clip and optimizer (or GradScaler) step on one window.

    ``model`` may be DDP-wrapped (backward then all-reduces the gradients, averaging over
    ranks); ``loss_scale`` weights this rank's gradient when ranks hold different numbers of
    streams, so the average is the gradient of the mean over all of them. Returns the loss (the
    mean over this window, unscaled) as a 0-d tensor (reading it synchronises, so callers read
    it only when they need the number) and the new hidden state, detached.
    """
    loss, hidden = window_loss(model, x, reset, hidden, autocast)
    optimizer.zero_grad(set_to_none=True)
    objective = loss * loss_scale if loss_scale != 1.0 else loss
    if scaler is not None:
        scaler.scale(objective).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        objective.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                       clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), [(h.detach(), c.detach()) for h, c in hidden]


@torch.no_grad()
def evaluate_windows(model, windows, max_windows: int = 0, autocast=None,
                     device=None) -> tuple[float, int]:
    """(summed loss in nats, bytes predicted) over packed windows, state carried, no grad."""
    device = device or model.device
    was_training = model.training
    model.eval()
    hidden, loss_sum, n_pred = None, 0.0, 0
    try:
        for i, window in enumerate(windows):
            if max_windows and i >= max_windows:
                break
            x = window.x.to(device)
            loss, hidden = window_loss(model, x, window.reset.to(device), hidden, autocast,
                                       reduction="sum")
            loss_sum += loss.item()
            n_pred += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return loss_sum, n_pred


def evaluate_bpb(model, dataset, batch_size: int = 32, seq_length: int = 256,
                 persist_state: int = 0, max_windows: int = 0) -> float:
    """Bits per byte of ``model`` on a dataset (anything with ``iter_batches``), no grad: the
    same packing and loss as the training job's own validation, for use outside a Train run."""
    from sentdisc.data.packer import BytePacker

    packer = BytePacker(batch_size, seq_length, persist_state)
    windows = packer.windows(dataset.iter_batches(batch_format="numpy", prefetch_batches=2))
    loss_sum, n = evaluate_windows(model, windows, max_windows)
    return loss_sum / max(n, 1) / LN2
