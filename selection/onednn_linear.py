"""fp32 linear layers through oneDNN with prepacked weights, for CPUs where ATen's BLAS is slow.

PyTorch's x86 wheels run fp32 matmuls through MKL, which picks its kernels by CPU vendor: on AMD
processors its sgemm can take the SSE path (pytorch/builder#504), at about a third of what the
same cores reach through oneDNN, whose JIT kernels follow the ISA flags (AVX2 on Zen 1). The
gap shows on any x86 machine with MKL_ENABLE_INSTRUCTIONS=SSE4_2 (README, Measured). `dtype:
auto` (selection.precision) times both at the model's shape and routes the model's nn.Linear
layers here only where oneDNN clearly wins, so machines whose BLAS is fine keep ATen's path.

Inference only: each weight is packed once into oneDNN's blocked layout (a copy beside the
original, which stays for everything else that reads it, e.g. the masking code's device checks);
training the model or editing a weight afterwards is not seen by the packed copy.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def available() -> bool:
    """oneDNN's packed fp32 linear is in this torch build (x86/ARM wheels with mkldnn)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] in oneDNN's layout for `linear`."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., in] with the weight from `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self._attninf_onednn, self.bias)


def route(model: nn.Module) -> int:
    """Run every fp32 CPU nn.Linear of `model` through oneDNN; returns how many were routed.

    The forward is replaced on the instance, so hooks (which Module.__call__ runs) still fire.
    """
    n = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if (type(mod) is nn.Linear and w is not None and w.dtype == torch.float32
                and w.device.type == "cpu"):
            mod._attninf_onednn = pack(w)
            mod.forward = types.MethodType(_forward, mod)
            n += 1
    return n


def routed(mod: nn.Module) -> bool:
    return hasattr(mod, "_attninf_onednn")
