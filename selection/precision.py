"""Which floating-point type a model runs in: `dtype: auto` decides by measuring, not by name.

Machines of one kind can differ in their processors. bf16 GEMMs are fast only where the CPU has
native bf16 instructions (AVX512_BF16, AMX) and oneDNN uses them; without them PyTorch emulates
bf16 and a GEMM runs an order of magnitude slower than in fp32 (README, Measured). A list of CPU
names would go stale and miss the cases that matter (a VM that hides a flag, oneDNN capped by
ONEDNN_MAX_CPU_ISA, a torch build without oneDNN's bf16 kernels), so `auto` times one linear
layer of the model's own shape in both types and keeps the answer:

- on CUDA, bf16 (fp16 on GPUs without bf16); on other accelerators, fp32;
- on CPU, fp32 is timed twice, through ATen (MKL on x86 wheels) and through oneDNN with a
  prepacked weight (selection.onednn_linear): MKL takes a slow SSE path on some processors (AMD),
  oneDNN follows the ISA flags. The model's linear layers go through oneDNN only when it is at
  least ONEDNN_MIN_SPEEDUP x ATen (`linear: onednn`); then bf16 only when it is at least
  BF16_MIN_SPEEDUP x the faster fp32: bf16 costs precision (selection.scoring states the
  tolerance), so a tie or a small win goes to fp32;
- the measurement (a fraction of a second; two bf16 calls when bf16 is hopeless) is cached per
  machine (CPU model and ISA flags, oneDNN's, ATen's and MKL's caps), torch version and shape, so every
  stage of a run and every later run on that machine choose alike without measuring again. The
  thread count is recorded but not part of the key: a Slurm task with one CPU and a local run
  with two must run one run's models in one dtype, or their artifacts differ;
- layers narrower than MIN_SHAPE are timed at MIN_SHAPE: a tiny test model's GEMMs are call
  overhead, their timing noise, and their precision choice should be the machine's.

An explicit dtype (`float32`, `bfloat16`, `float16`) always wins. The choice with its measured
rates is recorded next to each stage's outputs (`Precision.record`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)

BF16_MIN_SPEEDUP = 1.25   # bf16 must beat fp32 by this factor to be worth its rounding
ONEDNN_MIN_SPEEDUP = 1.2  # oneDNN's fp32 must beat ATen's by this factor to replace the usual path
_KEY_VERSION = "2"        # 2: fp32 timed through ATen and oneDNN
ROWS = 256                # rows of the timed GEMM: a scorer batch's order of magnitude
MIN_SHAPE = (ROWS, 512, 1024)  # the smallest (rows, in, out) timed (SmolLM2-135M: 576 x 1536)
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Precision:
    """A resolved dtype and why: `explicit`, `accelerator` or `measured` (rates in GFLOP/s)."""

    dtype: str
    source: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None
    shape: tuple[int, int, int] | None = None   # (rows, in, out) of the timed linear layer
    threads: int | None = None
    cached: bool = False
    onednn_gflops: float | None = None   # fp32 through oneDNN's packed linear (None: not timed)
    linear: str | None = None            # aten | onednn: who runs the fp32 linear layers (measured)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def record(self) -> dict:
        """What a stage's outputs carry: the choice and the rates behind it."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def onednn(self) -> bool:
        """The model's fp32 linear layers run through oneDNN (selection.onednn_linear.route)."""
        return self.dtype == "float32" and self.linear == "onednn"

    def describe(self) -> str:
        if self.source != "measured":
            return f"{self.dtype} ({self.source})"
        via = " via oneDNN" if self.onednn else ""
        dnn = f", oneDNN fp32 {self.onednn_gflops:,.1f}" if self.onednn_gflops is not None else ""
        return (f"{self.dtype}{via} (auto: bf16 {self.bf16_gflops:,.1f} vs fp32 {self.fp32_gflops:,.1f}{dnn} "
                f"GFLOP/s on a {self.shape[0]}x{self.shape[1]}x{self.shape[2]} linear layer, {self.threads} "
                f"threads{', cached' if self.cached else ''})")


def linear_shape(config) -> tuple[int, int, int]:
    """(rows, in, out) of the model's widest linear layer (the MLP's up projection)."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 512)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return ROWS, max(hidden, MIN_SHAPE[1]), max(inter, MIN_SHAPE[2])


def resolve(dtype: str, device: torch.device, shape: tuple[int, int, int],
            cache: Path | None = None) -> Precision:
    """The dtype to run in on `device` for linear layers of `shape` (see the module docstring)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' not in {CHOICES}")
        return Precision(dtype, "explicit")
    if device.type == "cuda":
        return Precision("bfloat16" if torch.cuda.is_bf16_supported() else "float16", "accelerator")
    if device.type != "cpu":
        return Precision("float32", "accelerator")
    key = _machine_key(shape)
    hit = _cache_read(cache, key)
    if hit is not None:
        return hit
    choice = measure(shape)
    _cache_write(cache, key, choice)
    return choice


def measure(shape: tuple[int, int, int]) -> Precision:
    """Time F.linear at `shape` in fp32 (ATen and oneDNN) and bf16 on all torch threads; pick.

    fp32 first (best of a few calls), then oneDNN's packed fp32 linear the same way. bf16 is
    warmed up at the full shape (oneDNN builds its kernel for the shape and thread count on the
    first call, which can take longer than the GEMM) and timed once: where it is hopeless
    (emulated) that call decides, so the slowest machines pay about a second once; otherwise
    both are timed interleaved, best of five.
    """
    from selection import onednn_linear

    rows, k, n = shape
    flop = 2.0 * rows * k * n
    g = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    x16, w16 = x32.to(torch.bfloat16), w32.to(torch.bfloat16)

    def best(x, w, reps: int, fn=torch.nn.functional.linear) -> float:
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x, w)
            t = min(t, time.perf_counter() - t0)
        return t

    with torch.inference_mode():
        best(x32, w32, 2)                       # warm-up
        t32 = best(x32, w32, 5)
        tdnn = None
        if onednn_linear.available():
            packed = onednn_linear.pack(w32)
            best(x32, packed, 2, onednn_linear.linear)
            tdnn = best(x32, packed, 5, onednn_linear.linear)
        torch.nn.functional.linear(x16, w16)      # warm-up: oneDNN's kernel for this shape
        t16 = best(x16, w16, 1)
        if t16 < 4 * t32:                         # close enough to matter: time it properly
            for _ in range(5):
                t32 = min(t32, best(x32, w32, 1))
                t16 = min(t16, best(x16, w16, 1))
    fp32, bf16 = round(flop / t32 / 1e9, 2), round(flop / t16 / 1e9, 2)
    dnn = round(flop / tdnn / 1e9, 2) if tdnn else None
    linear = choose_linear(fp32, dnn)
    best32 = dnn if linear == "onednn" else fp32
    return Precision(choose(best32, bf16), "measured", fp32, bf16, tuple(shape), torch.get_num_threads(),
                     onednn_gflops=dnn, linear=linear)


def choose(fp32_gflops: float, bf16_gflops: float) -> str:
    """bf16 only when it clearly earns its rounding: at least BF16_MIN_SPEEDUP x fp32's rate."""
    return "bfloat16" if bf16_gflops >= BF16_MIN_SPEEDUP * fp32_gflops else "float32"


def choose_linear(aten_gflops: float, onednn_gflops: float | None) -> str:
    """oneDNN for the fp32 linear layers only when it clearly beats ATen's usual path."""
    return "onednn" if onednn_gflops is not None and onednn_gflops >= ONEDNN_MIN_SPEEDUP * aten_gflops else "aten"


def _machine_key(shape: tuple[int, int, int]) -> str:
    """What makes a measurement reusable: CPU model and ISA flags, caps, torch, shape (not threads)."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model.strip():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    parts = [model, ",".join(f for f in _FLAGS if f in flags), torch.__version__,
             torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
             os.environ.get("ATEN_CPU_CAPABILITY", ""), os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
             "x".join(map(str, shape)), _KEY_VERSION]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cache_read(cache: Path | None, key: str) -> Precision | None:
    if cache is None:
        return None
    try:
        rec = json.loads(cache.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if not rec:
        return None
    try:
        return Precision(rec["dtype"], "measured", rec["fp32_gflops"], rec["bf16_gflops"],
                         tuple(rec["shape"]), rec["threads"], cached=True,
                         onednn_gflops=rec.get("onednn_gflops"), linear=rec["linear"])
    except (KeyError, TypeError):
        return None


def _cache_write(cache: Path | None, key: str, choice: Precision) -> None:
    """Merge one entry into the cache file atomically; a read-only cache only costs a re-measure."""
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(cache.read_text())
        except (OSError, ValueError):
            data = {}
        rec = choice.record()
        rec.pop("cached", None)
        data[key] = rec
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, cache)
    except OSError as e:
        log.warning("dtype auto: cannot cache the measurement in %s (%s)", cache, e)
