"""CUDA checks (run with `pytest -m gpu` on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from selection import masking
from tests.conftest import make_tiny_llama
from tests.selection.test_masking import HEADS, _batch, reference_logits

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_masking_on_cuda_fp32_matches_reference(impl, mode):
    model = make_tiny_llama(vocab_size=97, layers=4, heads=4, kv_heads=2, hidden=32).float()
    ids, pad = _batch(97, "left")
    with torch.no_grad():
        ref = reference_logits(model, ids, pad, HEADS, mode)
        model.cuda().set_attn_implementation(masking.register(impl))
        with masking.mask_heads(model, HEADS, mode=mode):
            got = model(input_ids=ids.cuda(), attention_mask=pad.long().cuda()).logits.cpu()
    # TF32 may be on for cuda matmuls; allow for it
    assert (got - ref)[pad].abs().max() <= 2e-3


def test_masking_bf16_close_to_fp32():
    model = make_tiny_llama(vocab_size=97, layers=4, heads=4, kv_heads=2, hidden=64).float()
    ids, pad = _batch(97, "right")
    with torch.no_grad():
        ref = reference_logits(model, ids, pad, HEADS, "uniform")
        model = model.to("cuda", torch.bfloat16)
        model.set_attn_implementation(masking.register("sdpa"))
        with masking.mask_heads(model, HEADS):
            got = model(input_ids=ids.cuda(), attention_mask=pad.long().cuda()).logits.float().cpu()
    assert (got - ref)[pad].abs().max() <= 0.05
