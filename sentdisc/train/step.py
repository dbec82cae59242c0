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
                reduction: str = "mean", valid: Optional[torch.Tensor] = None):
    """Cross entropy of the next byte over one window (nats), and the state after it.
    ``valid`` [B, T] (an epoch's last windows, partly padded): only those targets count; the
    mean is over them (0, with gradients of 0, when there are none)."""
    with autocast or contextlib.nullcontext():
        logits, hidden = model(x[:, :-1], hidden, reset)
        targets = x[:, 1:] if valid is None else x[:, 1:].masked_fill(~valid, -100)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               targets.reshape(-1), reduction="sum" if valid is not None
                               and reduction == "mean" else reduction)
        if valid is not None and reduction == "mean":
            loss = loss / valid.sum().clamp_min(1)
    return loss, hidden


def train_step(model, optimizer, *inputs, objective=window_loss, clip: float = 0.0,
               scaler: Optional[torch.amp.GradScaler] = None, autocast=None,
               loss_scale: float = 1.0):
    """Forward, loss, backward, gradient clip and optimizer (or GradScaler) step on one batch.

    ``objective(model, *inputs, autocast=...) -> (loss, carry)`` is what is minimised:
    ``window_loss`` by default, so ``train_step(model, opt, x, reset, hidden)`` is a
    pretraining step on one window (carry: the hidden state); fine-tuning passes its own
    (``sentdisc.finetune``). ``model`` may be DDP-wrapped (backward then all-reduces the
    gradients, averaging over ranks); ``loss_scale`` weights this rank's gradient when ranks
    hold different shares of the batch, so the average is the gradient of the mean over all of
    them. Returns the loss (this rank's mean, unscaled) as a 0-d tensor (reading it
    synchronises, so callers read it only when they need the number) and the carry, detached.
    """
    loss, carry = objective(model, *inputs, autocast=autocast)
    optimizer.zero_grad(set_to_none=True)
    scaled = loss * loss_scale if loss_scale != 1.0 else loss
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        scaled.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                       clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), _detached(carry)


def _detached(carry):
    """A carry with every tensor detached (a hidden state: a list of (h, c) pairs)."""
    if torch.is_tensor(carry):
        return carry.detach()
    if isinstance(carry, (list, tuple)):
        return type(carry)(_detached(c) for c in carry)
    if isinstance(carry, dict):
        return {k: _detached(v) for k, v in carry.items()}
    return carry


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
            valid = window.valid.to(device) if window.valid is not None else None
            loss, hidden = window_loss(model, x, window.reset.to(device), hidden, autocast,
                                       reduction="sum", valid=valid)
            loss_sum += loss.item()
            n_pred += window.n_bytes
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


# --- the step as a CUDA graph ----------------------------------------------------------------

GRAPH_MODES = ("auto", "on", "off")
# Optimizers the graph path runs: capturable=True exists for them, and their fresh state is all
# zeros, so the warm-up steps that must precede a capture can be undone exactly (see _restore).
GRAPH_OPTIMIZERS = ("Adam", "AdamW")
DDP_WARMUP, WARMUP = 11, 3  # eager steps before capture (DDP needs 11, PyTorch's graph notes)


def graph_plan(mode: str, device, precision: str = "fp32", optimizer="Adam",
               scaler: bool = False, find_unused_parameters: bool = False,
               windows: bool = True) -> tuple[bool, str]:
    """Whether the train step can run from a CUDA graph: (use_graph, reason). Pure: it looks
    at the names and flags it is given, so every decision is testable without a GPU.
    ``optimizer`` is an optimizer or its class name; ``device`` a device or its type."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"cuda_graph must be one of {GRAPH_MODES}, got {mode!r}")
    device_type = getattr(device, "type", str(device).split(":")[0])
    name = optimizer if isinstance(optimizer, str) else type(optimizer).__name__
    if mode == "off":
        return False, "cuda_graph is off"
    if not windows:
        return False, ("the batches are texts of varying lengths (a graph replays the static "
                       "shapes of pretraining's windows)")
    if device_type != "cuda":
        return False, f"the device is {device_type} (a CUDA graph needs a CUDA device)"
    if precision == "fp16" or scaler:
        return False, ("fp16 trains with a GradScaler, whose inf/NaN check decides on the host "
                       "whether to step")
    if find_unused_parameters:
        return False, ("DDP with find_unused_parameters walks the autograd graph on the host "
                       "every step")
    if name not in GRAPH_OPTIMIZERS:
        return False, (f"optimizer {name} is not capturable here (the graph path runs "
                       f"{'/'.join(GRAPH_OPTIMIZERS)} with capturable=True)")
    return True, f"{precision} step captured in a CUDA graph"


class TrainStep:
    """The library's train step, run eagerly (``train_step``) or replayed from a CUDA graph.
    ``windows``: the objective is pretraining's, on [B, T+1] windows (only those are captured).

    ``step(x, reset, hidden) -> (loss, hidden)`` as ``train_step``. The graph holds forward,
    loss, backward, clip and the optimizer step on static buffers: each window is copied into
    them, and the hidden state stays in them from window to window (the hidden returned in
    graph mode *is* those buffers, overwritten by the next step: pass it back as it is). The
    learning rate lives in a device tensor refreshed from the param group before each replay,
    so LR schedulers work as usual. The first graph step warms up (eager steps on a side
    stream) and captures, then restores the weights and optimizer state the warm-up changed:
    graph and eager runs see the same updates. Whenever the graph cannot run (see
    ``graph_plan``, a window of another shape, a failed capture) the step runs eagerly and
    says why once. ``simulate`` (tests): replay calls the captured body eagerly, on any device.
    """

    def __init__(self, model, optimizer, *, mode: str = "auto", precision: str = "fp32",
                 clip: float = 0.0, scaler=None, autocast=None, loss_scale: float = 1.0,
                 log=print, simulate: bool = False, objective=window_loss,
                 windows: bool = True):
        self.model, self.optimizer, self.mode, self.precision = model, optimizer, mode, precision
        self.objective = objective
        self.clip, self.scaler, self.loss_scale = clip, scaler, loss_scale
        self.autocast = autocast if autocast is not None else autocast_for(precision, _device(model))
        self.log, self.simulate, self._said = log, simulate, set()
        device = "cuda" if simulate else _device(model)
        self.use_graph, self.reason = graph_plan(
            mode, device, precision, optimizer, scaler is not None,
            bool(getattr(model, "find_unused_parameters", False)), windows)
        if mode == "on" and not self.use_graph:
            raise ValueError(f"cuda_graph on: the train step cannot be captured: {self.reason}")
        if not self.use_graph and mode == "auto":
            self._say(f"cuda_graph auto: eager, because {self.reason}")
        self._replay = self._static = None

    def __call__(self, *inputs, loss_scale: Optional[float] = None):
        """One step on ``inputs`` (a window: x, reset, hidden[, valid]; else the objective's).
        ``loss_scale`` overrides this rank's weight for this step."""
        if self.use_graph:
            x, reset, hidden, valid = (*inputs, None, None)[:4]
            why = "it is an epoch's last, partly padded" if valid is not None or \
                loss_scale is not None else self._static_mismatch(x, reset, hidden)
            if why is None:
                return self._graph_step(x, reset, hidden)
            self._say(f"cuda_graph {self.mode}: eager for this window, because {why}")
        return self.eager(*inputs, loss_scale=loss_scale)

    def eager(self, *inputs, loss_scale: Optional[float] = None):
        return train_step(self.model, self.optimizer, *inputs, objective=self.objective,
                          clip=self.clip, scaler=self.scaler, autocast=self.autocast,
                          loss_scale=self.loss_scale if loss_scale is None else loss_scale)

    @property
    def graphed(self) -> bool:
        """True once the step has been captured and replays from the graph."""
        return self._replay is not None

    def _say(self, message: str):
        if message not in self._said and self.log is not None:
            self._said.add(message)
            self.log(message)

    def _static_mismatch(self, x, reset, hidden):
        """Why this window cannot use the captured buffers, or None."""
        if self._static is None:
            return None
        s = self._static
        if x.shape != s.x.shape or reset.shape != s.reset.shape:
            return (f"its shape {list(x.shape)} differs from the captured {list(s.x.shape)} "
                    f"(a graph replays static shapes)")
        if hidden is not None and hidden is not s.hidden and any(
                h.shape != sh.shape for (h, _), (sh, _) in zip(hidden, s.hidden)):
            return "the hidden state's shape differs from the captured one"
        return None

    def _graph_step(self, x, reset, hidden):
        if self._static is None:
            self._static = _StaticWindow(self.model, x, reset)
            try:
                self._capture()
            except Exception as e:  # any capture failure: say it, run eagerly
                return self._capture_failed(e, x, reset, hidden)
            self._say(f"cuda_graph {self.mode}: {self.reason} at the first window, replayed")
        self._static.load(x, reset, hidden)
        for lr, group in zip(self._lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])  # a device-side fill: the schedule's value, no host sync
        self._replay()
        return self._loss.clone(), self._static.hidden

    def _capture_failed(self, error, x, reset, hidden):
        reason = f"the capture failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if self.mode == "on":
            raise RuntimeError(f"cuda_graph on: {reason}") from error
        self.use_graph, self.reason, self._static = False, reason, None
        if not self.simulate:
            torch.cuda.synchronize()
        self._say(f"cuda_graph auto: eager, because {reason}")
        return self.eager(x, reset, hidden)

    def _body(self):
        """What the graph holds: one train_step on the static window, the state kept."""
        s = self._static
        loss, hidden = train_step(self.model, self.optimizer, s.x, s.reset, s.hidden,
                                  clip=self.clip, autocast=self._graph_autocast(),
                                  loss_scale=self.loss_scale)
        for (h, c), (h_new, c_new) in zip(s.hidden, hidden):
            h.copy_(h_new)
            c.copy_(c_new)
        self._loss = loss

    def _graph_autocast(self):
        if self.precision != "bf16":
            return None
        # the autocast weight cache must be off while capturing (PyTorch's graph notes)
        return torch.autocast(_device(self.model).type, dtype=torch.bfloat16, cache_enabled=False)

    def _capture(self):
        """Warm up, capture, and put back what the warm-up changed."""
        saved = _snapshot(self.model, self.optimizer)
        undo = _make_capturable(self.optimizer, self.simulate)
        self._lrs = [g["lr"] for g in self.optimizer.param_groups]  # device tensors now
        warmup = DDP_WARMUP if hasattr(self.model, "find_unused_parameters") else WARMUP
        try:
            if self.simulate:
                for _ in range(warmup):
                    self._body()
                self._replay = self._body
                return
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self._replay = graph.replay
        finally:
            undo()
            _restore(self.model, self.optimizer, saved)


class _StaticWindow:
    """The graph's inputs: one window's bytes and reset mask, and the carried hidden state."""

    def __init__(self, model, x, reset):
        self.x, self.reset = torch.zeros_like(x), torch.zeros_like(reset)
        net = getattr(model, "module", model)  # DDP wraps the ByteLM
        self.hidden = [(h.clone(), c.clone()) for h, c in net.init_state(x.shape[0])]

    def load(self, x, reset, hidden):
        self.x.copy_(x)
        self.reset.copy_(reset)
        if hidden is self.hidden:  # carried from the last replay: already in place
            return
        for (h, c), given in zip(self.hidden, hidden or [None] * len(self.hidden)):
            if given is None:
                h.zero_()
                c.zero_()
            else:
                h.copy_(given[0])
                c.copy_(given[1])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _snapshot(model, optimizer):
    """Copies of the weights and optimizer state (None where there is none yet)."""
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: ({k: v.clone() for k, v in optimizer.state[p].items()}
                 if p in optimizer.state else None)
             for g in optimizer.param_groups for p in g["params"]}
    return params, state


@torch.no_grad()
def _restore(model, optimizer, saved):
    """Back to the snapshot, in place: the graph keeps pointing at these very tensors. A state
    the warm-up created goes back to Adam's fresh state, zeros (step 0 included)."""
    params, state = saved
    for p, before in zip(model.parameters(), params):
        p.copy_(before)
    for p, before in state.items():
        for k, v in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(v):
                continue
            if before is None:
                v.zero_()
            else:
                v.copy_(before[k])


def _make_capturable(optimizer, simulate: bool):
    """capturable=True and device-tensor learning rates for the warm-up and capture; returns
    what puts the param groups back (floats, capturable as it was), so checkpoints, metrics
    and schedulers see the usual values. The captured kernels keep the tensors."""
    groups = optimizer.param_groups
    before = [(g["lr"], g.get("capturable", False)) for g in groups]
    for g in groups:
        device = g["params"][0].device
        if not simulate:  # capturable Adam refuses CPU tensors
            g["capturable"] = True
            for p in g["params"]:  # a resumed state's step counts sit on the CPU
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")) and st["step"].device != device:
                    st["step"] = st["step"].to(device, torch.float32)
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)

    def undo():
        for g, (lr, capturable) in zip(groups, before):
            g["lr"], g["capturable"] = lr, capturable
    return undo
