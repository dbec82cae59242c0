"""Which precision the matrix products run in: one decision for every job (training,
fine-tuning, featurize, transfer, Serve, scoring).

    auto  bf16 products where the hardware multiplies bf16 natively: a CUDA device, or a CPU
          with AVX-512 BF16 or AMX tiles, as torch reports them (``torch.cpu``); float32
          elsewhere. A CPU without them emulates bf16 at about 1% of its float32 rate (an
          AVX2-only EPYC here: 0.5-0.6 against 68-134 GFLOP/s at 64 x 512 x 2048), so there
          auto keeps float32.
    fp32  float32 products everywhere
    bf16  bf16 products (under autocast) even where emulated
    fp16  GPU training only (a GradScaler guards it)

Gates and the cell state stay float32 either way (``sentdisc.kernels``). ``SENTDISC_PRECISION``
(fp32 or bf16) in the environment fixes what ``auto`` means on every machine a job runs on, for
runs that must compare across machines (the test suite sets fp32: it checks against float32
references, and bf16 where it asks for it). ``choose`` is the pure decision, from what
``Hardware.detect`` read; each job says the choice and why once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from sentdisc.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENV = "SENTDISC_PRECISION"


@dataclass(frozen=True)
class Hardware:
    """What decides ``auto``: the device type and, for a CPU, its native bf16 units."""
    device: str = "cpu"          # cpu | cuda (| mps, ...: float32)
    avx512_bf16: bool = False
    amx: bool = False
    capability: str = ""         # torch's name for the CPU's vector unit, for the reason
    auto: str = ""               # what auto means here when SENTDISC_PRECISION fixes it

    @classmethod
    def detect(cls, device="cpu", environ=os.environ) -> Hardware:
        import torch

        fixed = environ.get(ENV, "").strip().lower()
        if fixed not in ("", "fp32", "bf16"):
            # an InputError: every command prints it as one line, not a traceback from featurize
            raise InputError(f"{ENV} must be fp32 or bf16 (or unset), got "
                             f"{environ.get(ENV)!r}")
        kind = getattr(device, "type", str(device).split(":")[0])
        if kind != "cpu":
            return cls(kind, auto=fixed)
        cpu = torch.cpu
        flag = lambda name: bool(getattr(cpu, name, lambda: False)())
        return cls("cpu", flag("_is_avx512_bf16_supported"), flag("_is_amx_tile_supported"),
                   torch.backends.cpu.get_cpu_capability(), fixed)

    @property
    def native_bf16(self) -> bool:
        return self.device == "cuda" or self.avx512_bf16 or self.amx


def choose(requested: str, hw: Hardware) -> tuple[str, str]:
    """(precision, why): ``requested`` (auto | fp32 | bf16 | fp16) on ``hw``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    units = [u for u, on in (("AVX-512 BF16", hw.avx512_bf16), ("AMX", hw.amx)) if on]
    where = "the CUDA device" if hw.device == "cuda" else f"this CPU ({', '.join(units)})"
    if requested == "auto":
        if hw.auto:
            return hw.auto, f"precision auto: {hw.auto}, as {ENV} says"
        if hw.native_bf16:
            return "bf16", (f"precision auto: bf16 products, because {where} multiplies bf16 "
                            f"natively (gates and cell state stay float32; --precision fp32 "
                            f"for float32)")
        if hw.device == "cpu":
            return "fp32", (f"precision auto: float32, because this CPU has no native bf16 "
                            f"(no AVX-512 BF16 or AMX; torch sees {hw.capability or 'neither'}), "
                            f"where bf16 products are emulated and slower")
        return "fp32", f"precision auto: float32 on {hw.device}"
    if requested == "fp16" and hw.device != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (on a CPU use bf16 or fp32)")
    if requested == "bf16" and not hw.native_bf16:
        return "bf16", ("precision bf16 as asked, though this CPU has no native bf16 "
                        "(no AVX-512 BF16 or AMX): its products are emulated, on AVX2 CPUs "
                        "about 100x slower than float32 (--precision auto picks float32 here)")
    return requested, f"precision {requested} as asked"

