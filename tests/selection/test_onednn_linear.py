"""fp32 linear layers through oneDNN (selection.onednn_linear): the same numbers as ATen's path on
a real tiny Llama, hooks still fire, and only fp32 CPU nn.Linear layers are routed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selection import onednn_linear

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not onednn_linear.available(), reason="torch built without oneDNN")]


def test_linear_matches_f_linear_on_any_leading_shape():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    packed = onednn_linear.pack(w)
    for shape in [(5, 32), (2, 7, 32), (1, 1, 32)]:
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(onednn_linear.linear(x, packed, b), nn.functional.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)
    x = torch.randn(32, 6, generator=g).t()  # non-contiguous input
    torch.testing.assert_close(onednn_linear.linear(x, packed), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_routed_tiny_llama_gives_atens_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(1, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids).logits
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    seen = []
    model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    assert onednn_linear.route(model) == n_linear > 0
    assert onednn_linear.routed(model.lm_head)
    with torch.inference_mode():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert seen == [want.shape]


def test_only_fp32_cpu_linears_are_routed():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Embedding(5, 4))
    assert onednn_linear.route(m) == 1
    assert onednn_linear.routed(m[0]) and not onednn_linear.routed(m[1])
