"""Run Megatron-Core's GPU training loop on a CPU, for tests and the offline demo.

Megatron-Core has no CPU path: it allocates buffers on `torch.cuda.current_device()`, calls
`torch.cuda.synchronize()`, moves tensors with `.cuda()`, and the gradient clipper asserts that
every grad reports `type() == "torch.cuda.FloatTensor"`. Everything else (the GPT model with the
local layer spec, DDP over gloo, the optimizer, the forward-backward schedule, the param
scheduler, dist_checkpointing) is plain torch and runs unchanged. So instead of forking Megatron,
`enable()` installs a thin layer that tells those few call sites that the CPU is "the GPU":

- `torch.cuda.current_device()` returns the cpu device; `torch.cuda.synchronize()` is a no-op;
- a `TorchFunctionMode` rewrites `device="cuda"` / `device=<int>` arguments of tensor factories
  to cpu, makes `Tensor.cuda()` the identity and reports `Tensor.type()` as `torch.cuda.*`.

The layer is **inert when CUDA exists**: `enable()` returns False and changes nothing, so the same
training code runs on a GPU cluster with the real kernels. The trade-off: the mode intercepts
every torch call (a few microseconds each), irrelevant next to a training step but a reason to
never enable it in a process that does not train.

Import cost: Megatron wraps its fused kernels (bias-GeLU, SwiGLU, rope) in `torch.compile` when
its modules are imported, which imports TorchDynamo into every rank whether or not a fusion is
ever used; on CPU the fusions are off (pretrain.*_fusion keys), so `enable()` imports
megatron.core with Megatron's own no-op fuser instead (`megatron.core.jit.noop_decorator`, what
Megatron itself uses where torch is too old). A fused function that does run executes eagerly.

Random numbers: Megatron forks a CUDA RNG for tensor-parallel init; on CPU call
`model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)` (see `seed_all`), whose
tracker never touches CUDA generators.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CpuAsCuda | None" = None

# dtype -> legacy type name reported by Tensor.type() on CUDA (clip_grads / optimizers assert it)
_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor",
}


def _to_cpu_device(dev):
    if isinstance(dev, int):
        return torch.device("cpu")
    if isinstance(dev, str) and dev.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


class _CpuAsCuda(TorchFunctionMode):
    """Rewrites cuda device arguments to cpu; `.cuda()` is identity; `.type()` says cuda."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def enable() -> bool:
    """Install the CPU layer unless CUDA exists. Returns True when it is active. Idempotent."""
    global _ENABLED, _MODE
    if cuda_available():
        return False
    if _ENABLED:
        return True
    _import_megatron_without_compile()
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    _MODE = _CpuAsCuda()
    _MODE.__enter__()
    _ENABLED = True
    return True


def _import_megatron_without_compile() -> None:
    """Import megatron.core while `torch.compile` is the identity, so `megatron.core.jit.jit_fuser`
    (bound to torch.compile when megatron.core.jit is first imported) is a no-op and TorchDynamo
    is never imported; then make that explicit with Megatron's `disable_jit_fuser`. Nothing to do
    once megatron.core is imported (its fusers are bound already)."""
    import sys

    if "megatron.core" in sys.modules:
        return
    real = torch.compile

    def identity(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = identity  # type: ignore[assignment]
    try:
        from megatron.core import jit
    finally:
        torch.compile = real  # type: ignore[assignment]
    jit.disable_jit_fuser()


def active() -> bool:
    return _ENABLED


def seed_all(seed: int) -> None:
    """Seed python/numpy/torch and Megatron's model-parallel RNG tracker (CPU-safe)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cuda_available():
        model_parallel_cuda_manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
