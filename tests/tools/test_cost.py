"""Cost estimate: parameter counts against published sizes, FLOPs against hand arithmetic and
against a public GPU-hour figure (LLaMA-2-7B)."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from attninf.config import ConfigError
from tools import cost


def test_llama_params_match_published_sizes():
    # LLaMA-2-7B: 6,738,415,616 parameters (HF model card / safetensors index)
    assert cost.llama_params(32, 4096, 11008, 32, 32, 32000, tied=False) == 6_738_415_616
    # SmolLM2-135M: 134,515,008 parameters (tied embeddings, 9 heads over 3 KV heads)
    assert cost.llama_params(30, 576, 1536, 9, 3, 49152, tied=True) == 134_515_008


def test_paper_scoring_by_hand():
    cfg = cost.from_mapping(cost.PAPER_7B)
    r = cost.scoring_cost(cfg)
    tokens = 193.3e9 + 27.9e9 + 3.8e9 + 13.3e9
    assert r["tokens"] == pytest.approx(tokens)
    # per token, one pass: 2 * 1.3e9 (weights) + 2 * 16 layers * 4096 ctx * 2560 hidden (attention)
    per_tok = 2 * 1.3e9 + 2 * 16 * 4096 * 2560
    flops = tokens * 2 * per_tok  # base + masked pass
    assert r["flops"] == pytest.approx(flops)
    hours = flops / (989.4e12 * 0.35) / 3600
    assert r["gpu_hours"] == pytest.approx(hours)
    assert 1000 < r["gpu_hours"] < 1300  # ~1.1k H100-hours: a day on 64 GPUs
    assert r["wall_hours"] == pytest.approx(hours / 64)


def test_shared_prefix_and_truncation_reduce_scoring():
    base = dict(cost.PAPER_7B, score_tokens_per_gpu_s=50_000.0)
    full = cost.scoring_cost(cost.from_mapping(base))
    assert full["gpu_hours"] == pytest.approx(238.3e9 * 2 / 50_000 / 3600)
    # masked heads start at layer 4 of 16: the masked pass recomputes 12/16 of the layers
    shared = cost.scoring_cost(cost.from_mapping({**base, "shared_prefix": True, "masked_first_layer": 4}))
    assert shared["passes"] == pytest.approx(1.75)
    assert shared["gpu_hours"] == pytest.approx(full["gpu_hours"] * 1.75 / 2)
    # a measured document rate (both passes, as bench_score reports) is used as is
    measured = cost.scoring_cost(cost.from_mapping({**base, "score_doc_tokens_per_gpu_s": 20_000.0}))
    assert measured["gpu_hours"] == pytest.approx(238.3e9 / 20_000 / 3600)
    # 1M documents of a 10B-token domain are read at most 4096 tokens each
    trunc = cost.from_mapping({**base, "corpus_tokens": {"a": 10e9, "b": 1e9},
                               "corpus_documents": {"a": 1e6}})
    assert cost.scored_tokens(trunc) == {"a": 4096e6, "b": 1e9}


def test_paper_pretraining_by_hand():
    cfg = cost.from_mapping(cost.PAPER_7B)
    r = cost.training_cost(cfg)
    n = 6_738_415_616 + (49152 - 32000) * 4096 * 2  # LLaMA-2-7B with the cosmo2 vocabulary
    assert cfg.train_params == n
    per_tok = 6 * n + 6 * 32 * 8192 * 4096
    assert r["flops"] == pytest.approx(2 * 1e12 * per_tok)  # two arms of 1T tokens
    per_arm_h = 1e12 * per_tok / (989.4e12 * 0.40) / 3600
    assert r["gpu_hours"] == pytest.approx(2 * per_arm_h)
    assert 30_000 < per_arm_h < 37_000
    # on the paper's 32 x 8 H100: ~5.5 days per arm
    assert 4.5 < per_arm_h / 256 / 24 < 6.5


def test_training_formula_reproduces_llama2_reported_gpu_hours():
    """LLaMA-2 paper, Table 2: 7B trained on 2T tokens at 4k context took 184,320 A100-80GB hours.
    6ND at a typical MFU of 0.4 on A100 (312 TFLOP/s bf16) should land within 15%."""
    cfg = cost.from_mapping({"train_params": 6.738e9, "train_layers": 32, "train_hidden": 4096,
                             "train_seq": 4096, "train_tokens": 2e12, "gpu": "A100",
                             "train_mfu": 0.40})
    r = cost.training_cost(cfg)
    assert math.isclose(r["gpu_hours"], 184_320, rel_tol=0.15), r["gpu_hours"]


def test_demo_scoring_on_two_cpu_cores():
    # ~390k tokens of demo corpus, 135M selector at ~2,000 tok/s bf16 (measured, OFFLINE.md)
    cfg = cost.from_mapping({"corpus_tokens": {"all": 390e3}, "selector_params": 134.5e6,
                             "selector_layers": 30, "selector_hidden": 576,
                             "score_tokens_per_gpu_s": 2000.0, "score_gpus": 1,
                             "gpu": "cpu-2core-amx"})
    (r,) = cost.estimate(cfg)
    assert r["gpu_hours"] * 3600 == pytest.approx(390.0)


def test_table_and_yaml_section(tmp_path, capsys):
    p = tmp_path / "preset.yaml"
    OmegaConf.save(OmegaConf.create({"cost": cost.PAPER_7B}), p)
    assert cost.main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "scoring (base + masked)" in out and "pretraining x2 arm(s)" in out and "total" in out
    with pytest.raises(ConfigError, match="cost.gpu"):
        cost.from_mapping({"gpu": "TPU-v9"})
    with pytest.raises(ConfigError, match="cost.train_mfu"):
        cost.from_mapping({"train_mfu": 1.5})
