"""Fused whole-sequence mLSTM: the fast path behind ``RecurrentLayer.forward``.

The plain layer loop is exact but pays for autograd bookkeeping and ~20 small elementwise
ops per byte, as much as the matrix products at batch 64. Here one autograd Function covers
the whole sequence:

* forward: the x-projections of all T steps are one GEMM written straight into the gate
  buffer, or, for the first layer (x an embedding row, so x Wx + b takes only 256 values),
  a gather from a per-byte table; each step does two recurrent GEMMs (on oneDNN-prepacked
  weights on CPU) and a handful of in-place gate ops into preallocated [T, B, ...] buffers,
  keeping only what backward needs (gate activations, c, tanh(c), m, h Wmh, h);
* backward: every factor that does not depend on the recurrence (sigmoid/tanh derivatives,
  o * (1 - tanh(c)^2), ...) is computed for all T at once, so a reverse step is two GEMMs
  and five elementwise ops; the weight and input gradients are then a few big GEMMs over
  all T*B rows (a per-byte-value sum and V-row products for a looked-up first layer).

Inference (no grad: featurization, serving) runs the same step without saving anything,
and with a featurization mask whose live rows are a prefix (rows sorted by what remains) it
only computes the live rows, so padding costs nothing.

Numbers equal the plain loop to float rounding (tests/test_kernels.py). Under autocast
(bf16) the matrix products run in bf16 while gates and cell state stay in float32.
``disabled()`` switches the fast path off, e.g. to compare against the plain loop.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import torch

_enabled = True


@contextlib.contextmanager
def disabled():
    """Run the plain per-timestep loop instead of the fused path inside this block."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def supports(x: torch.Tensor, reset: Optional[torch.Tensor] = None,
             mask: Optional[torch.Tensor] = None) -> bool:
    """Whether ``mlstm_sequence`` handles this input (else the plain loop runs)."""
    if not _enabled or x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        return False
    device = x.device.type
    if device not in ("cpu", "cuda"):
        return False
    if torch.is_autocast_enabled(device):
        if x.dtype != torch.float32 or torch.get_autocast_dtype(device) != torch.bfloat16:
            return False
    elif x.dtype not in (torch.float32, torch.float64):
        return False
    # Masks (featurization) are an inference-only feature of the fast path.
    return mask is None or not torch.is_grad_enabled()


def mlstm_sequence(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w: dict,
                   reset: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                   tokens: Optional[tuple] = None):
    """One mLSTM layer over x [B,T,E] from state (h, c) [B,H] with effective weights ``w``
    (wx [E,4H], wh [H,4H], wmx [E,H], wmh [H,H], b [4H]; weight norm already applied).

    reset [B,T]: zero the row's state before step t. mask [B,T] (no grad only): where False
    the state is held. tokens: (ids [B,T], embedding [V,E]) when x is embedding[ids], which
    lets both paths look x's projections up per byte value instead of multiplying for them
    (training then returns the embedding's gradient through those tables, none for x).
    Returns (hs [B,T,H], None, (h, c)), like the plain loop.
    """
    sd = x.dtype  # state / gate dtype
    device = x.device.type
    cd = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else sd
    h, c = h.to(sd), c.to(sd)
    keep = None
    if reset is not None:  # [T,B,1] multipliers, as in the plain loop
        keep = (~reset.bool()).t().unsqueeze(-1).to(sd)
    weights = (w["wx"], w["wh"], w["wmx"], w["wmh"], w["b"])
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, h, c) + weights)
    with torch.autocast(device, enabled=False):
        if needs_grad:
            if mask is not None:
                raise ValueError("mlstm_sequence: mask is only supported without gradients")
            ids, embedding = tokens if tokens is not None else (None, None)
            hs, h, c = _MLSTMSequence.apply(x, h, c, *weights, keep, cd, ids, embedding)
        else:
            hs, h, c = _infer(x, h, c, weights, keep, mask, cd, tokens,
                              cache=w.setdefault("_kernel_cache", {}))
    return hs, None, (h, c)


def _reset_steps(keep: Optional[torch.Tensor], T: int) -> list:
    """Per step: does any row reset? One host sync on CPU; on GPU assume yes (no sync, so
    the loop stays capturable in a CUDA graph)."""
    if keep is None:
        return [False] * T
    if keep.device.type != "cpu":
        return [True] * T
    return (keep.view(T, -1) == 0).any(1).tolist()


class _Lease:
    """A forward's saved buffers; back in the pool once its backward has run."""

    def __init__(self, tensors):
        self.tensors, self.released, self.reused = tensors, False, False


class _Pool:
    """Big CPU buffers kept between calls. A fresh 64 MB tensor is ~16k page faults (the OS
    zeroes every page): ~20% of an mLSTM-512 training step. Buffers are flat and handed out
    as views, so a batch of another length reuses them too. CUDA's caching allocator does
    this already, so on GPUs (and inside CUDA graphs) buffers are plain allocations."""

    def __init__(self, max_buffers: int = 32):
        self._free, self._max, self._lock = [], max_buffers, threading.Lock()
        self._lent = []  # flat bases of buffers given out by lend()

    def take(self, shape, dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        if device.type == "cpu":
            with self._lock:
                # the smallest free buffer that fits, unless it would waste over half of it
                fits = [i for i, (buf, _) in enumerate(self._free)
                        if buf.dtype == dtype and n <= buf.numel() <= 2 * n]
                if fits:
                    i = min(fits, key=lambda i: self._free[i][0].numel())
                    buf, owner = self._free.pop(i)
                    if owner is not None:
                        owner.reused = True
                    return buf[:n].view(shape)
        return torch.empty(n, dtype=dtype, device=device).view(shape)

    def give(self, tensors, owner: Optional[_Lease] = None):
        with self._lock:
            for t in tensors:
                base = t if t._base is None else t._base
                if base.device.type == "cpu" and base.dim() == 1:
                    self._free.append((base, owner))
            del self._free[:-self._max]  # keep the most recent

    def reclaim(self, owner: _Lease) -> bool:
        """Take a released lease's buffers back (a second backward, e.g. gradcheck) unless
        another forward has already overwritten them."""
        with self._lock:
            if owner.reused:
                return False
            self._free = [(t, o) for t, o in self._free if o is not owner]
            return True

    def lend(self, shape, dtype, device) -> torch.Tensor:
        """A buffer with no give(): an inference output handed to the caller, or a scratch
        buffer simply dropped. The pool keeps the last few and hands one out again once
        nothing references its memory any more, so chunked inference (featurize) writes
        into warm pages rather than ~10k fresh ones per chunk (~5% of featurizing short
        texts). Kept apart from take()'s buffers: these may be inference tensors."""
        n = math.prod(shape)
        if device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return torch.empty(shape, dtype=dtype, device=device)
        inference = torch.is_inference_mode_enabled()
        with self._lock:
            # idle: no view of it alive, only our tensor and the transient storage object
            idle = [i for i, buf in enumerate(self._lent)
                    if buf.dtype == dtype and buf.numel() >= n and buf.is_inference() == inference
                    and torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2]
            if idle:  # the smallest that fits (chunks shrink as texts get shorter)
                i = min(idle, key=lambda i: self._lent[i].numel())
                buf = self._lent.pop(i)
                self._lent.append(buf)
                return buf[:n].view(shape)
            buf = torch.empty(n, dtype=dtype, device=device)
            self._lent.append(buf)
            # keep the most recent few, and no more than LEND_MAX_BYTES held for reuse
            while len(self._lent) > 1 and (
                    len(self._lent) > 8
                    or sum(b.numel() * b.element_size() for b in self._lent) > LEND_MAX_BYTES):
                self._lent.pop(0)
            return buf.view(shape)


LEND_MAX_BYTES = 1 << 30  # an mLSTM-512's featurize holds ~256 MB; a 4096-wide one more
_pool = _Pool()


def _mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, add: bool = False,
        bias: Optional[torch.Tensor] = None):
    """out (+)= a @ b (+ bias); b is already in the compute dtype, a is cast to it."""
    if a.dtype == b.dtype == out.dtype:
        if add:
            out.addmm_(a, b)
        elif bias is not None:
            torch.addmm(bias, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
        return out
    r = a.to(b.dtype) @ b
    if add:
        out.add_(r)
    elif bias is not None:
        torch.add(bias, r, out=out)
    else:
        out.copy_(r)
    return out


# Prepacked products need rows to pay off (at 1 row MKL's matrix-vector product is faster)
# and enough of them to repay the reorder (a few ms for an mLSTM-512's weights).
PREPACK_MIN_ROWS = 2
PREPACK_MIN_ROW_STEPS = 2048


def _prepacks(w: torch.Tensor, rows: int, steps: int = 0, cached: bool = False) -> bool:
    """Whether a loop of ``steps`` products a [rows, K] @ w runs on prepacked weights."""
    return (w.device.type == "cpu" and w.dtype == torch.float32 and rows >= PREPACK_MIN_ROWS
            and (cached or rows * steps >= PREPACK_MIN_ROW_STEPS)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class _StepWeight:
    """The right-hand side w [K,N] of a time loop's many small products a @ w.

    On CPU in float32 it is reordered once into oneDNN's blocked layout: at a step's shapes
    (2-128 rows, 512-2048 wide) those prepacked products ran 20-30% faster than torch.mm
    (MKL) on the machine we measured (an AMD EPYC; benchmarks/_common.gemm_rate times both),
    and up to 2x at a few rows. Otherwise (one row, short loops, GPU, bf16, float64) it is
    torch.mm."""

    def __init__(self, w: torch.Tensor, pack: bool, rows: int = 1):
        self.w = w
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), rows) \
            if pack else None

    def mm(self, a: torch.Tensor, add: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, copy: bool = True) -> torch.Tensor:
        """a @ w (+ add), into ``out`` when given (``add`` may be ``out``: accumulate).

        copy=False: ``out`` is only where the product may go. oneDNN's prepacked product has
        no out= form, so it returns its own tensor, and the caller reads that instead of
        paying a pass over memory to copy it (a step's [B, 4H] gates: ~1 MB at batch 128)."""
        if self.packed is None:
            if out is None:
                out = a.new_empty(a.shape[0], self.w.shape[1])
            if add is out:
                return _mm(out, a, self.w, add=True)
            return _mm(out, a, self.w, bias=add)
        # the overloads themselves: the packet's __call__ resolves one per call, in Python
        r = (_LINEAR(a, self.packed, None, "none", [], "") if add is None
             else _LINEAR_ADD(a, add, self.packed, None, "add"))
        return r if out is None or not copy else out.copy_(r)


_mkldnn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_LINEAR = _mkldnn_linear.default if _mkldnn_linear is not None else None
_LINEAR_ADD = _mkldnn_linear.binary if _mkldnn_linear is not None else None


# On CPU tanh is ~5x slower than sigmoid (not vectorised in ATen), so there we use
# tanh(z) = 2 sigmoid(2z) - 1: for the u gate the 2 is folded into (copies of) the weights,
# exactly, being a power of two, and one sigmoid covers all four gates.
SIGMOID_TANH_MIN = 8192  # elements per step below which per-op overhead makes it a loss


def _sigmoid_tanh(device: torch.device, step_elems: int) -> bool:
    return device.type == "cpu" and step_elems >= SIGMOID_TANH_MIN


def _double_u(w: torch.Tensor, H: int) -> torch.Tensor:
    w = w.clone()
    w[..., 3 * H:].mul_(2)
    return w


def _activate(g: torch.Tensor, u: torch.Tensor, H: int, via_sigmoid: bool,
              pre: Optional[torch.Tensor] = None):
    """Gate activations into g: sigmoid for i, f, o; tanh for u (a view of g). ``pre``: the
    pre-activations when they are not in g already (a prepacked product's own tensor), read
    once by the activation itself rather than copied into g first."""
    pre = g if pre is None else pre
    if via_sigmoid:  # u's pre-activation is already doubled
        torch.sigmoid(pre, out=g)
        u.mul_(2).sub_(1)
    else:
        torch.sigmoid(pre[:, :3 * H], out=g[:, :3 * H])
        torch.tanh(pre[:, 3 * H:], out=g[:, 3 * H:])


def _cell_output(c, s, o, out, via_sigmoid: bool):
    """out = o * tanh(c). With via_sigmoid, s = sigmoid(-2c) so tanh(c) = 1 - 2s and the
    product is one addcmul; otherwise s = tanh(c). Either way s is what backward gets."""
    if via_sigmoid:
        torch.mul(c, -2, out=s).sigmoid_()
        return torch.addcmul(o, o, s, value=-2, out=out)
    torch.tanh(c, out=s)
    return torch.mul(o, s, out=out)


def _time_major(x: torch.Tensor, cd, extra: int = 0) -> torch.Tensor:
    """x [B,T,E] -> [T*B, E + extra] in the compute dtype: column E is 1 (the bias rides in
    the matmul, no separate pass over the output), the rest of the extra columns 0."""
    B, T, E = x.shape
    X = torch.empty(T, B, E + extra, dtype=cd, device=x.device)
    X[..., :E] = x.transpose(0, 1)
    if extra:
        X[..., E:] = 0
        X[..., E] = 1
    return X.view(T * B, E + extra)


def _byte_tables(embedding, wx, wmx, b, cd, sd):
    """Per byte value v: embedding[v] Wx + b [V,4H] and embedding[v] Wmx [V,H] (state dtype,
    products in the compute dtype, as the per-row products they replace)."""
    V, E = embedding.shape
    E1 = torch.cat([embedding.to(sd), embedding.new_ones(V, 1, dtype=sd)], 1)
    new = lambda n: torch.empty(V, n, dtype=sd, device=embedding.device)
    x_table = _mm(new(wx.shape[1]), E1, torch.cat([wx.to(cd), b.to(cd)[None]]))
    xm_table = _mm(new(wmx.shape[1]), E1[:, :E], wmx.to(cd))
    return x_table, xm_table


def _project_lookup(ids, embedding, wx, wmx, b, cd, sd, G, XM):
    """Bytes ids [B,T] -> x Wx + b into G [T,B,4H] and x Wmx into XM [T,B,H], x being
    embedding[ids]: both are V-row tables, gathered. A [T*B, E+1] @ [E+1, 4H] product runs
    far below the GEMM rate (K=65 is too thin to block well); the gather is a copy."""
    T, B = G.shape[:2]
    x_table, xm_table = _byte_tables(embedding, wx, wmx, b, cd, sd)
    ids_tm = ids.t().reshape(-1)  # time-major, as G's rows
    torch.index_select(x_table, 0, ids_tm, out=G.view(T * B, -1))
    torch.index_select(xm_table, 0, ids_tm, out=XM.view(T * B, -1))
    return ids_tm


def _project(x, wx, wmx, b, cd, sd, G=None, XM=None):
    """x [B,T,E] -> time-major X [T*B,E] (compute dtype), X Wx + b [T,B,4H], X Wmx [T,B,H]
    (into G and XM when given)."""
    B, T, E = x.shape
    X1 = _time_major(x, cd, 1)
    X = X1[:, :E]
    W1 = torch.cat([wx.to(cd), b.to(cd)[None]])
    wmx = wmx.to(cd)
    if G is not None and cd == sd:
        torch.mm(X1, W1, out=G.view(T * B, -1))
        torch.mm(X, wmx, out=XM.view(T * B, -1))
        return X, G, XM
    G = (X1 @ W1).to(sd).view(T, B, -1)
    XM = (X @ wmx).to(sd).view(T, B, -1)
    return X, G, XM


class _MLSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, wx, wh, wmx, wmh, b, keep, cd, ids, embedding):
        B, T, _ = x.shape
        H, sd, dev = h0.shape[1], x.dtype, x.device
        fast = _sigmoid_tanh(dev, B * H)
        wx_, wh_, wmh_, b_ = wx, wh.to(cd), wmh.to(cd), b
        if fast:
            wx_, wh_, b_ = _double_u(wx, H), _double_u(wh_, H), _double_u(b, H)
        take = lambda *s: _pool.take(s, sd, dev)
        # G starts as X Wx + b; each step adds m Wh in place, then holds the activations.
        G, XM, HM, M, TC = take(T, B, 4 * H), take(T, B, H), take(T, B, H), take(T, B, H), take(T, B, H)
        Hs, C = take(T + 1, B, H), take(T + 1, B, H)
        if ids is not None:  # x is embedding[ids]: look its projections up (backward too)
            ctx.ids = _project_lookup(ids.long(), embedding, wx_, wmx, b_, cd, sd, G, XM)
            X = None
        else:
            ctx.ids = None
            X, G, XM = _project(x, wx_, wmx, b_, cd, sd, G, XM)
        Hs[0], C[0] = h0, c0
        resets = _reset_steps(keep, T)
        # Per-step views made once (unbind is one call; indexing in the loop costs ~us each).
        Hs_, C_, TC_, HM_, M_, XM_, G_ = (b.unbind(0) for b in (Hs, C, TC, HM, M, XM, G))
        I_, F_, O_, U_ = (G[..., k * H:(k + 1) * H].unbind(0) for k in range(4))
        keep_ = keep.unbind(0) if keep is not None else None
        pack = _prepacks(wh_, B, T)
        Wmh, Wh = _StepWeight(wmh_, pack, B), _StepWeight(wh_, pack, B)
        for t in range(T):
            hp, cp = Hs_[t], C_[t]
            if resets[t]:
                hp, cp = hp * keep_[t], cp * keep_[t]
            Wmh.mm(hp, out=HM_[t])
            torch.mul(XM_[t], HM_[t], out=M_[t])
            _activate(G_[t], U_[t], H, fast, pre=Wh.mm(M_[t], add=G_[t], out=G_[t], copy=False))
            torch.mul(F_[t], cp, out=C_[t + 1])
            C_[t + 1].addcmul_(I_[t], U_[t])
            _cell_output(C_[t + 1], TC_[t], O_[t], Hs_[t + 1], fast)
        ctx.save_for_backward(wx, wh, wmx, wmh, embedding)
        ctx.lease = _Lease((G, XM, HM, M, TC, Hs, C))
        ctx.X, ctx.keep, ctx.cd, ctx.resets, ctx.fast = X, keep, cd, resets, fast
        hs = Hs[1:].transpose(0, 1).contiguous()
        return hs, Hs[T].clone(), C[T].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dhs, dhT, dcT):
        wx, wh, wmx, wmh, embedding = ctx.saved_tensors
        lease = ctx.lease
        if lease.released:
            if not _pool.reclaim(lease):
                raise RuntimeError(
                    "sentdisc.kernels: backward ran twice through a fused mLSTM whose buffers "
                    "another forward has reused since; for retain_graph use, run the model "
                    "inside sentdisc.kernels.disabled()")
            lease.released = False
        G, XM, HM, M, TC, Hs, C = lease.tensors
        X, keep, cd, resets = ctx.X, ctx.keep, ctx.cd, ctx.resets
        T, B, H4 = G.shape
        H, sd, dev = H4 // 4, G.dtype, G.device
        take = lambda *s: _pool.take(s, sd, dev)
        whT, wmhT = wh.to(cd).t(), wmh.to(cd).t()
        F = G[..., H:2 * H]
        if ctx.fast:  # TC holds sigmoid(-2c): tanh(c) = 1 - 2 TC
            TC = torch.mul(TC, -2, out=take(T, B, H)).add_(1)

        P, A = _step_factors(G, C, TC, keep, take)
        dZ, dM, dHM = take(T, B, 4 * H), take(T, B, H), take(T, B, H)
        dhsT = None
        if dhs is not None:  # time-major once, not a strided read per step
            dhsT = take(T, B, H)
            dhsT.copy_(dhs.transpose(0, 1))
        dh = torch.zeros(B, H, dtype=sd, device=dev)
        dc = torch.zeros(B, H, dtype=sd, device=dev)
        if dhT is not None:
            dh += dhT
        if dcT is not None:
            dc += dcT
        if dhsT is not None:
            dh += dhsT[T - 1]
        A_, F_, XM_, P4_, dZ_, dM_, dHM_ = (b.unbind(0) for b in (
            A, F, XM, P.view(T, B, 4, H), dZ, dM, dHM))
        Po_, dZ4_, dZo_ = P[..., 2 * H:3 * H].unbind(0), dZ.view(T, B, 4, H).unbind(0), \
            dZ[..., 2 * H:3 * H].unbind(0)
        dhs_ = dhsT.unbind(0) if dhsT is not None else None
        keep_ = keep.unbind(0) if keep is not None else None
        dc1 = dc.unsqueeze(1)
        pack = _prepacks(whT, B, T)
        WhT, WmhT = _StepWeight(whT, pack, B), _StepWeight(wmhT, pack, B)
        for t in range(T - 1, -1, -1):
            # dh: gradient of h_t; dc: of c_t, from later steps.
            dc.addcmul_(dh, A_[t])
            torch.mul(P4_[t], dc1, out=dZ4_[t])  # i, f, u parts (o is overwritten next)
            torch.mul(Po_[t], dh, out=dZo_[t])
            dc.mul_(F_[t])
            WhT.mm(dZ_[t], out=dM_[t])
            torch.mul(dM_[t], XM_[t], out=dHM_[t])
            if resets[t]:
                dHM_[t].mul_(keep_[t])
                dc.mul_(keep_[t])
            dh = WmhT.mm(dHM_[t], add=dhs_[t - 1] if (dhs_ is not None and t > 0) else None)

        dZ2, dHM2 = dZ.view(T * B, H4), dHM.view(T * B, H)
        dXM = dM.mul_(HM).view(T * B, H)  # d(x Wmx) = dm * (h Wmh)
        dwh = (M.view(T * B, H).to(cd).t() @ dZ2.to(cd)).to(wh.dtype)
        dwmh = (Hs[:-1].reshape(T * B, H).to(cd).t() @ dHM2.to(cd)).to(wmh.dtype)
        dx, dwx, dwmx, db, demb = _input_grads(ctx, X, dZ2, dXM, wx, wmx, embedding, cd, T)
        _pool.give([P, A, dZ, dM, dHM] + ([dhsT] if dhsT is not None else [])
                   + ([TC] if ctx.fast else []))
        _pool.give(lease.tensors, lease)
        lease.released = True
        return dx, dh, dc, dwx, dwh, dwmx, dwmh, db, None, None, None, demb
def _step_factors(G, C, TC, keep, take):
    """What the reverse loop needs that does not depend on the recurrence, for all T at
    once: dz = P * [dc, dc, dh, dc] and dc += dh * A."""
    T, B, H4 = G.shape
    H = H4 // 4
    I, O, U = G[..., :H], G[..., 2 * H:3 * H], G[..., 3 * H:]
    P, A = take(T, B, 4 * H), take(T, B, H)
    torch.addcmul(G, G, G, value=-1, out=P)  # g (1 - g): sigmoid derivative
    P[..., :H].mul_(U)
    P[..., H:2 * H].mul_(C[:-1])
    if keep is not None:
        P[..., H:2 * H].mul_(keep)
    P[..., 2 * H:3 * H].mul_(TC)
    Pu = P[..., 3 * H:]
    torch.addcmul(I, torch.mul(I, U, out=Pu), U, value=-1, out=Pu)  # i (1 - u^2)
    torch.addcmul(O, torch.mul(O, TC, out=A), TC, value=-1, out=A)  # o (1 - tanh(c)^2)
    return P, A


def _input_grads(ctx, X, dZ2, dXM, wx, wmx, embedding, cd, T):
    """Gradients of the input projections (and of x, or of the embedding through the
    per-byte tables) from dz and d(x Wmx) of all T*B rows."""
    TB, H4 = dZ2.shape
    H, sd, dev = H4 // 4, dZ2.dtype, dZ2.device
    dx = demb = None
    if ctx.ids is None:
        dwx = (X.t() @ dZ2.to(cd)).to(wx.dtype)
        dwmx = (X.t() @ dXM.to(cd)).to(wmx.dtype)
        db = dZ2.sum(0).to(wmx.dtype)
        if ctx.needs_input_grad[0]:
            dx = dZ2.to(cd) @ wx.to(cd).t()
            dx = dx.addmm_(dXM.to(cd), wmx.to(cd).t()).to(sd)
            dx = dx.view(T, TB // T, -1).transpose(0, 1)
        return dx, dwx, dwmx, db, demb
    # Sum the rows of each byte value: the products are then V rows, not T*B.
    V = embedding.shape[0]
    dTz = torch.zeros(V, H4, dtype=sd, device=dev).index_add_(0, ctx.ids, dZ2)
    dTm = torch.zeros(V, H, dtype=sd, device=dev).index_add_(0, ctx.ids, dXM)
    emb = embedding.to(sd)
    dwx = (emb.t() @ dTz).to(wx.dtype)
    dwmx = (emb.t() @ dTm).to(wmx.dtype)
    db = dTz.sum(0).to(wmx.dtype)
    if ctx.needs_input_grad[11]:
        demb = (dTz @ wx.to(sd).t()).addmm_(dTm, wmx.to(sd).t()).to(embedding.dtype)
    return dx, dwx, dwmx, db, demb


@torch.no_grad()
def _infer(x, h0, c0, weights, keep, mask, cd, tokens=None, cache=None):
    """The forward step without saving anything; masked rows hold their state.

    No [T,B,4H] x-projection is materialised (8 KB per byte written, then read back): each
    step's gates are one matmul of [x_t, 1, 0.., m_t] with [Wx; b; 0..; Wh]. When x is an
    embedding lookup (``tokens``), x Wx + b and x Wmx take only V distinct values: they are
    tabulated once and each step gathers its rows, so a step's matmuls are the recurrent
    ones alone (on an mLSTM-512 that is 11% fewer FLOPs and an aligned K=H)."""
    B, T, E = x.shape
    H, sd, dev = h0.shape[1], x.dtype, x.device
    fast = _sigmoid_tanh(dev, B * H)
    wx, wh, b, wmx, wmh, W = _infer_weights(weights, cd, fast, tokens is None, cache)
    XM, XA_, M_, x_table, ids_ = _infer_inputs(x, wx, wmx, b, tokens, cd)
    m_buf = torch.empty(B, H, dtype=sd, device=dev)
    hs = _pool.lend((B, T, H), sd, dev)  # written in place, step by step
    c = c0.clone()
    new = lambda *s: torch.empty(*s, dtype=sd, device=dev)
    g, hm, tc = new(B, 4 * H), new(B, H), new(B, H)
    rows, general = _live_rows(mask, B, T)
    resets = _reset_steps(keep, T)
    keep_ = keep.unbind(0) if keep is not None else None
    XM_ = XM.unbind(0)
    Hs_ = (h0,) + hs.unbind(1)  # Hs_[t]: the state before step t
    full = (g, g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:], hm, c, tc, m_buf)
    part = {}  # n -> the same views of the first n rows
    Wmh, Wh = _infer_step_weights(wmh, wh, B, T, fast, cd, tokens is not None, cache)
    for t in range(T):
        n, hp = rows[t], Hs_[t]
        if resets[t]:
            hp = hp * keep_[t]
            c.mul_(keep_[t])
        if n == 0:
            Hs_[t + 1].copy_(hp)
            continue
        c_old = c.clone() if general is not None else None
        if n == B:  # (slicing costs microseconds per call: only when rows are dropped)
            gn, i, f, o, u, hmn, cn, tcn, mn = full
            hpn, xm, out = hp, XM_[t], Hs_[t + 1]
        else:  # n changes only where a text ends: the step buffers' views are made once per n
            if n not in part:
                gn = g[:n]
                part[n] = (gn, gn[:, :H], gn[:, H:2 * H], gn[:, 2 * H:3 * H], gn[:, 3 * H:],
                           hm[:n], c[:n], tc[:n], m_buf[:n])
            gn, i, f, o, u, hmn, cn, tcn, mn = part[n]
            hpn, xm, out = hp[:n], XM_[t][:n], Hs_[t + 1][:n]
        hmn = Wmh.mm(hpn, out=hmn, copy=False)
        if tokens is not None:
            m = torch.mul(hmn, xm, out=mn)
            torch.index_select(x_table, 0, ids_[t][:n], out=gn)
            pre = Wh.mm(m, add=gn, out=gn, copy=False)
        else:
            torch.mul(hmn, xm, out=M_[t][:n])
            pre = _mm(gn, XA_[t][:n], W)
        _activate(gn, u, H, fast, pre=pre)
        cn.mul_(f).addcmul_(i, u)
        _cell_output(cn, tcn, o, out, fast)
        if n < B:
            Hs_[t + 1][n:] = hp[n:]
        if general is not None:
            Hs_[t + 1].copy_(torch.where(general[t], Hs_[t + 1], hp))
            c.copy_(torch.where(general[t], c, c_old))
    return hs, hs[:, -1].clone(), c


_W_PAD = 8  # W's ones column + zeros, so m_t starts on an aligned column


def _infer_weights(weights, cd, fast: bool, concat: bool, cache):
    """wx, wh, b, wmx, wmh in the products' dtype, u's columns doubled for the sigmoid form of
    tanh, and (``concat``: x is not a looked-up embedding) the gate product's concatenated
    weight W = [Wx; b; 0..; Wh]. Chunked callers (featurize's pool, the serving batch) pass the
    same weights dict every chunk: made once and kept in its cache, not once per chunk (a
    copy of the model: 0.2 ms for an mLSTM-512, 70-120 ms for an mLSTM-4096 on 2 cores)."""
    key = ("infer_weights", cd, fast, concat)
    if cache is not None and key in cache:
        return cache[key]
    wx, wh, wmx, wmh, b = (w.to(cd) for w in weights)
    H = wmh.shape[0]
    if fast:
        wx, wh, b = _double_u(wx, H), _double_u(wh, H), _double_u(b, H)
    W = None
    if concat:
        W = torch.cat([wx, b[None], wx.new_zeros(_W_PAD - 1, 4 * H), wh])
    out = wx, wh, b, wmx, wmh, W
    if cache is not None:
        cache[key] = out
    return out


def _infer_inputs(x, wx, wmx, b, tokens, cd):
    """The input side of every step, prepared once: x Wmx for all steps (XM), and either the
    per-byte gate table with each step's byte ids (tokens), or each step's [x_t, 1, 0.., m_t]
    rows (XA_, with m_t written into M_; the gate product is then the concatenated W)."""
    B, T, E = x.shape
    H, sd, dev = wmx.shape[1], x.dtype, x.device
    XM = _pool.lend((T, B, H), sd, dev)
    if tokens is not None:
        ids, embedding = tokens
        # only the byte values present: a short text uses a few dozen of the 256
        values, ids = torch.unique(ids, return_inverse=True)
        x_table, xm_table = _byte_tables(embedding[values], wx, wmx, b, cd, sd)
        ids_tm = ids.t().contiguous()  # [T,B]
        torch.index_select(xm_table, 0, ids_tm.view(-1), out=XM.view(T * B, H))
        return XM, None, None, x_table, ids_tm.unbind(0)
    XA = _time_major(x, sd, _W_PAD + H)  # m_t is written into the last H columns each step
    _mm(XM.view(T * B, H), XA[:, :E], wmx)
    XA3 = XA.view(T, B, -1)
    return XM, XA3.unbind(0), XA3[..., E + _W_PAD:].unbind(0), None, None


def _live_rows(mask, B: int, T: int):
    """Rows to compute per step: all B, or (when the live rows are a prefix, as featurize
    arranges) only the first n; otherwise a [B,1] mask per step for the general path."""
    if mask is None:
        return [B] * T, None
    mask = mask.bool()
    live = mask.sum(0)
    prefix = torch.arange(B, device=mask.device)[:, None] < live[None, :]
    if bool((prefix == mask).all()):
        return live.tolist(), None
    return [B] * T, mask.t().unsqueeze(-1).unbind(0)


def _infer_step_weights(wmh, wh, B, T, fast, cd, lookup: bool, cache):
    """The step's products. Chunked callers (featurize) pass the same weights dict every
    call: the packed products are kept in it, so the reorder is paid once per featurize, not
    once per chunk. Without the lookup the gate product is the concatenated W, so Wh is not
    packed."""
    key = ("step_weights", fast, cd, lookup)
    if cache is not None and key in cache and _prepacks(wh, B, cached=True):
        return cache[key]
    pack = _prepacks(wh, B, T)
    weights = _StepWeight(wmh, pack, B), _StepWeight(wh, pack and lookup, B)
    if pack and cache is not None:
        cache[key] = weights
    return weights
