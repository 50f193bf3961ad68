"""Pretraining pieces that run in-process in seconds: WSD schedule, model arithmetic, mixture.

The training loop itself (Megatron in its own processes) is tested in test_pretrain_train.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attninf.config import ConfigError, build
from tests.helpers import make_docs

CONF = Path(__file__).resolve().parents[2] / "conf"


# --------------------------------------------------------------------------- WSD schedule


def reference_wsd(n: int, total: int, warm: int, decay: int, peak: float, lo: float, init: float,
                  shape: str) -> float:
    """The paper's WSD written out independently: warmup, flat, then decay to lo by the end."""
    if warm and n <= warm:
        return init + (peak - init) * n / warm
    start = total - decay
    if n <= start:
        return peak
    if n >= total:
        return lo
    x = (n - start) / decay
    f = {"linear": 1 - x, "cosine": (1 + math.cos(math.pi * x)) / 2,
         "minus_sqrt": 1 - x ** 0.5, "exponential": 2 * 0.5 ** x - 1}[shape]
    return lo + f * (peak - lo)


@pytest.mark.parametrize("total,warm_frac,stable,shape,ratio,warm,decay", [
    (1000, 0.001, 0.75, "linear", 0.1, 1, 250),   # the paper: 0.1% warmup, stable to 75%, decay 25%
    (200, 0.05, 0.75, "cosine", 0.0, 10, 50),
    (97, 0.02, 0.6, "minus_sqrt", 0.2, 2, 39),     # round(1.94) = 2; 97 - round(58.2) = 39
    (50, 0.0, 0.9, "exponential", 0.1, 0, 5),
])
def test_wsd_megatron_scheduler_matches_closed_form(total, warm_frac, stable, shape, ratio, warm, decay):
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from pretrain.schedule import WSDConfig, megatron_kwargs, phases, wsd_lr

    cfg = WSDConfig(warmup_fraction=warm_frac, stable_end_fraction=stable, decay_style=shape,
                    min_lr_ratio=ratio)
    peak = 4e-4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = OptimizerParamScheduler(opt, start_wd=0.1, end_wd=0.1, wd_incr_steps=total,
                                    wd_incr_style="constant", **megatron_kwargs(cfg, total, peak))
    ph = phases(cfg, total)
    assert (ph.warmup, ph.decay, ph.stable_end) == (warm, decay, total - decay)
    for n in range(total + 1):
        expect = reference_wsd(n, total, warm, decay, peak, peak * ratio, 0.0, shape)
        assert opt.param_groups[0]["lr"] == pytest.approx(expect, rel=1e-12, abs=1e-15), n
        assert wsd_lr(n, cfg, total, peak) == pytest.approx(expect, rel=1e-12, abs=1e-15), n
        sched.step(1)


def test_wsd_config_rejects_bad_values():
    from pretrain.schedule import WSDConfig

    with pytest.raises(ConfigError, match="decay_style"):
        build(WSDConfig, {"decay_style": "step"}, "pretrain.schedule")
    with pytest.raises(ConfigError, match="unknown config key"):
        build(WSDConfig, {"warmup": 3}, "pretrain.schedule")


# --------------------------------------------------------------------------- model arithmetic


def _independent_llama_count(L, h, ffn, q, kv, vocab, untied=True):
    d = h // q
    per_layer = (h * q * d) + 2 * (h * kv * d) + (q * d * h) + 3 * h * ffn + 2 * h
    return vocab * h * (2 if untied else 1) + L * per_layer + h


def test_paper_7b_config_reports_about_7b_without_allocating():
    from hydra import compose, initialize_config_dir

    from pretrain.model import count_parameters, padded_vocab_size, transformer_config
    from pretrain.train import load_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["pretrain/model=paper_7b"])
    pcfg = load_config(cfg.pretrain)
    shape = pcfg.model
    assert (shape.num_layers, shape.hidden_size, shape.num_attention_heads, shape.seq_length) == (32, 4096, 32, 8192)
    tc = transformer_config(shape)  # a real Megatron TransformerConfig; builds no weights
    assert tc.gated_linear_unit and tc.normalization == "RMSNorm" and not tc.add_bias_linear
    assert tc.num_query_groups == shape.num_query_groups and tc.ffn_hidden_size == 11008
    vocab = padded_vocab_size(49152, shape.make_vocab_size_divisible_by)
    n = count_parameters(shape, vocab)
    assert n["total"] == _independent_llama_count(32, 4096, 11008, 32, shape.num_query_groups, vocab)
    assert 5.9e9 < n["total"] < 7.1e9, n  # "~7B" class (6.07B with 8 KV heads; 6.88B with MHA)
    # The arithmetic is the one tested against a real instantiation (test_pretrain_train): 1B too.
    one_b = load_config({"model": dict(build_model_yaml("1b"))}).model
    assert count_parameters(one_b, vocab)["total"] == 1_170_302_976  # measured: GPTModel on H100


def build_model_yaml(name: str):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / "pretrain" / "model" / f"{name}.yaml"))


def test_pretrain_config_validates():
    from pretrain.train import load_config

    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config({"global_batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(ConfigError, match="num_query_groups"):
        load_config({"model": {"num_attention_heads": 4, "num_query_groups": 3}})
    # nested sections: validated by build, messages name the full key
    for section, message in [({"optim": {"lr": 0.0}}, r"^pretrain.optim.lr: must be > 0"),
                             ({"optim": {"adam_beta2": 1.0}}, r"^pretrain.optim.adam_beta1: betas must be in \[0, 1\)"),
                             ({"optim": {"momentum": 0.9}}, r"^unknown config key\(s\) pretrain.optim.momentum;"),
                             ({"launch": {"nodes": 0}}, r"^pretrain.launch.nodes: must be >= 1"),
                             ({"launch": {"nodes": 2, "tasks_per_node": 2}, "tensor_parallel": 2,
                               "data_parallel": 3, "global_batch_size": 12, "micro_batch_size": 2},
                              r"^pretrain.launch: launch.nodes x launch.tasks_per_node = 2 x 2 = 4 ranks, but "
                              r"tensor_parallel x pipeline_parallel x data_parallel = 2 x 1 x 3 = 6"),
                             ({"launch": {"nodes": 1, "tasks_per_node": 3}, "tensor_parallel": 2},
                              r"^pretrain.launch: .* = 3 ranks is not a multiple of tensor_parallel x pipeline_parallel = 2"),
                             ({"gpu": {"sequence_parallel": True}}, r"^pretrain.gpu.sequence_parallel: needs tensor_parallel > 1"),
                             ({"gpu": {"recompute": "some"}}, r"^pretrain.gpu.recompute: 'some' is not one of"),
                             ({"schedule": {"min_lr_ratio": 2.0}}, r"^pretrain.schedule.min_lr_ratio: must be in"),
                             ({"model": {"seq_length": 0}}, r"^pretrain.model.seq_length: must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(section)
    cfg = load_config({"train_iters": None, "train_tokens": 10_000, "global_batch_size": 4,
                       "micro_batch_size": 2, "model": {"seq_length": 100}})
    assert cfg.total_steps() == 25


# --------------------------------------------------------------------------- mixture


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory, tiny_tokenizer):
    from pretrain.mix import MixConfig, build_mix

    root = tmp_path_factory.mktemp("mix")
    tiny_tokenizer.save_pretrained(root / "tok")
    docs = make_docs()
    sel = [d for d in docs if d.text and int(d.doc_id.split(":")[1]) % 5 == 0]
    rnd = [d for d in docs if d.text and int(d.doc_id.split(":")[1]) % 7 == 1]  # select's random control
    pq.write_table(pa.table({"doc_id": [d.doc_id for d in sel + rnd], "domain": [d.domain for d in sel + rnd],
                             "score": [1.0] * len(sel + rnd),
                             "method": ["attention_influence"] * len(sel) + ["random"] * len(rnd)}),
                   root / "selected.parquet")
    arms = {"baseline": {"selection": None}, "attention_influence": {"selection": "attention_influence"},
            "random": {"selection": "random"}, "ai_quarter": {"selection": "attention_influence",
                                                              "subset_weight": 0.25}}
    summary = build_mix(iter(docs), root / "mix", root / "tok", tiny_tokenizer.eos_token_id,
                        len(tiny_tokenizer), "tiny", MixConfig(shard_docs=25, workers=1, valid_fraction=0.1,
                                                               planned_tokens=100_000),
                        arms, root / "selected.parquet")
    return root, summary, docs


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i], copy=True) for i in range(len(ds))]  # copies: the mmap closes with ds


def test_mix_tokenises_with_eod_and_holds_out_by_doc_id(mix_dir, tiny_tokenizer):
    import json

    from pretrain.indexed import is_validation, load_doc_tables

    root, summary, docs = mix_dir
    blend = json.loads((root / "mix" / "blend.json").read_text())
    assert summary["skipped"] == {"empty": 1}
    prefixes = sorted(str(p)[: -len(".docs.parquet")] for p in (root / "mix" / "corpus").glob("*/*.docs.parquet"))
    table = load_doc_tables(prefixes).to_pylist()
    assert len(table) == len([d for d in docs if d.text])
    by_id = {d.doc_id: d for d in docs}
    eod = tiny_tokenizer.eos_token_id
    cache = {}
    for row in table:
        assert row["split"] == ("valid" if is_validation(row["doc_id"], 0.1) else "train")
        p = row["prefix"] + (".valid" if row["split"] == "valid" else "")
        toks = cache.setdefault(p, _read(p))[row["index"]]
        expect = tiny_tokenizer(by_id[row["doc_id"]].text, add_special_tokens=False)["input_ids"] + [eod]
        assert toks.tolist() == expect
        assert row["n_tokens"] == len(expect)
    # validation datasets: one per domain, exactly the held-out documents
    for dom in ("web", "code", "math"):
        n_valid = sum(1 for r in table if r["split"] == "valid" and r["prefix"].split("/")[-2] == dom)
        assert blend["valid"][dom]["documents"] == n_valid > 0


def test_mix_subset_is_a_copy_of_corpus_token_ranges(mix_dir):
    import json

    from pretrain.indexed import load_doc_tables

    root, summary, docs = mix_dir
    blend = json.loads((root / "mix" / "blend.json").read_text())
    prefixes = sorted(str(p)[: -len(".docs.parquet")] for p in (root / "mix" / "corpus").glob("*/*.docs.parquet"))
    where = {r["doc_id"]: r for r in load_doc_tables(prefixes).to_pylist()}
    t = pq.read_table(root / "selected.parquet")
    selected = [d for d, m in zip(t.column("doc_id").to_pylist(), t.column("method").to_pylist())
                if m == "attention_influence"]
    train_sel = [d for d in selected if where[d]["split"] == "train"]
    sub = _read(root / "mix" / "subsets" / "attention_influence")
    assert len(sub) == len(train_sel) and blend["subsets"]["attention_influence"]["held_out"] == len(selected) - len(train_sel)
    cache = {}
    for got, d in zip(sub, train_sel):
        r = where[d]
        assert got.tolist() == cache.setdefault(r["prefix"], _read(r["prefix"]))[r["index"]].tolist()


def test_mix_blend_weights_and_epochs(mix_dir):
    import json

    root, summary, docs = mix_dir
    b = json.loads((root / "mix" / "blend.json").read_text())
    tok = {k: v["tokens"] for k, v in b["datasets"].items()}
    corpus = {k: v for k, v in tok.items() if b["datasets"][k]["kind"] == "corpus"}
    C, S = sum(corpus.values()), b["subsets"]["attention_influence"]["tokens"]
    base = b["arms"]["baseline"]
    assert sorted(base["prefixes"]) == sorted(corpus)
    for p, w in zip(base["prefixes"], base["weights"]):
        assert w == pytest.approx(corpus[p] / C)
    ai = b["arms"]["attention_influence"]
    w = dict(zip(ai["prefixes"], ai["weights"]))
    assert w["subsets/attention_influence"] == pytest.approx(S / (C + S))  # "add once more"
    assert sum(ai["weights"]) == pytest.approx(1.0)
    # every token of the corpus and of the subset is sampled at the same rate: equal epochs
    ep = ai["epochs"]
    assert ep["subsets/attention_influence"] == pytest.approx(100_000 / (C + S))
    assert all(v == pytest.approx(100_000 / (C + S)) for v in ep.values())
    q = b["arms"]["ai_quarter"]
    wq = dict(zip(q["prefixes"], q["weights"]))
    assert wq["subsets/attention_influence"] == pytest.approx(0.25)
    for p in corpus:  # corpus keeps its internal proportions
        assert wq[p] == pytest.approx(0.75 * corpus[p] / C)
    # the random control is select's rows, copied as they are (mix draws nothing of its own)
    t = pq.read_table(root / "selected.parquet")
    n_random = t.column("method").to_pylist().count("random")
    rnd = b["subsets"]["random"]
    assert rnd["selected"] == n_random and rnd["documents"] == n_random - rnd["held_out"] > 0
    assert "drawn_here" not in rnd


def test_mix_resume_skips_finished_shards(mix_dir, tiny_tokenizer):
    from pretrain.indexed import tokenize_corpus

    root, summary, docs = mix_dir
    marks = sorted((root / "mix" / "corpus").glob("*/*.done"))
    before = {p: p.stat().st_mtime_ns for p in marks}
    res = tokenize_corpus(iter([d for d in docs if d.text]), root / "mix" / "corpus", str(root / "tok"),
                          tiny_tokenizer.eos_token_id, len(tiny_tokenizer), shard_docs=25, valid_fraction=0.1)
    assert {p: p.stat().st_mtime_ns for p in marks} == before
    assert len(res) == len(marks) == summary["shards"]


def test_mix_unknown_method_names_file_and_methods(mix_dir, tiny_tokenizer, tmp_path):
    from pretrain.mix import MixConfig, build_mix

    root, _, docs = mix_dir
    with pytest.raises(ValueError, match=r"selected.parquet has no rows with method == 'perplexity'"):
        build_mix(iter(docs), tmp_path / "mix", root / "tok", tiny_tokenizer.eos_token_id, len(tiny_tokenizer),
                  "tiny", MixConfig(shard_docs=50, workers=1), {"p": {"selection": "perplexity"}},
                  root / "selected.parquet")


def test_tokenizer_config_validates():
    from pretrain.mix import TokenizerConfig

    with pytest.raises(ConfigError, match=r"^tokenizer.eod: must be a token id >= 0"):
        build(TokenizerConfig, {"eod": -1}, "tokenizer")
    with pytest.raises(ConfigError, match=r"^tokenizer.path: must name a tokenizer"):
        build(TokenizerConfig, {"path": ""}, "tokenizer")


def test_mix_random_arm_needs_select_random_rows(mix_dir, tiny_tokenizer, tmp_path):
    from pretrain.mix import MixConfig, build_mix

    root, _, docs = mix_dir
    t = pq.read_table(root / "selected.parquet")
    ai_only = t.filter(pa.array([m == "attention_influence" for m in t.column("method").to_pylist()]))
    pq.write_table(ai_only, tmp_path / "selected.parquet")
    with pytest.raises(ValueError, match=r"no rows with method == 'random'.*add 'random' to select.methods"):
        build_mix(iter(docs), tmp_path / "mix", root / "tok", tiny_tokenizer.eos_token_id, len(tiny_tokenizer),
                  "tiny", MixConfig(shard_docs=50, workers=1), {"r": {"selection": "random"}},
                  tmp_path / "selected.parquet")


def test_plot_loss_curves(tmp_path):
    import json

    from pretrain.figures import plot_loss_curves

    files = {}
    for arm, off in (("baseline", 0.0), ("attention_influence", -0.1)):
        p = tmp_path / f"{arm}.jsonl"
        p.write_text("".join(json.dumps({"step": s, "loss": 5 - s * 0.1 + off, "lr": 1e-3}) + "\n" for s in range(1, 6))
                     + json.dumps({"step": 5, "val/web": 4.0 + off, "val/mean": 4.0 + off}) + "\n")
        files[arm] = p
    out = plot_loss_curves(files, tmp_path / "loss.png")
    assert out.exists() and out.stat().st_size > 5000
    assert os.path.getsize(out) > 0


def test_gpu_settings_reach_megatrons_configs():
    """pretrain.gpu.* keys as the paper presets set them arrive in Megatron-Core's own
    TransformerConfig, DistributedDataParallelConfig and OptimizerConfig (built on CPU)."""
    from pretrain.model import transformer_config
    from pretrain.train import ddp_config, load_config, optimizer_config

    cfg = load_config({"tensor_parallel": 2, "launch": {"tasks_per_node": 2},
                       "optim": {"use_distributed_optimizer": True},
                       "gpu": {"sequence_parallel": True, "overlap_grad_reduce": True, "overlap_param_gather": True,
                               "bias_activation_fusion": True, "bias_dropout_fusion": True,
                               "masked_softmax_fusion": True, "gradient_accumulation_fusion": True,
                               "attention_backend": "flash", "recompute": "selective"}})
    tc = transformer_config(cfg.model, tp=2, gpu=cfg.gpu)
    assert (tc.sequence_parallel, tc.bias_activation_fusion, tc.bias_dropout_fusion, tc.masked_softmax_fusion,
            tc.gradient_accumulation_fusion, tc.attention_backend.name, tc.recompute_granularity) == \
        (True, True, True, True, True, "flash", "selective")
    full = transformer_config(cfg.model, gpu=load_config({"gpu": {"recompute": "full"}}).gpu)
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    off = transformer_config(cfg.model, tp=1, gpu=cfg.gpu)
    assert off.sequence_parallel is False  # sequence parallel only with TP > 1
    # rope fusion reaches TransformerConfig too, which refuses it without TransformerEngine here
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="apply_rope_fusion is not available"):
            transformer_config(cfg.model, gpu=load_config({"gpu": {"apply_rope_fusion": True}}).gpu)
    ddp = ddp_config(cfg, on_gpu=True)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.use_distributed_optimizer,
            ddp.grad_reduce_in_fp32) == (True, True, True, True)
    assert ddp_config(cfg, on_gpu=False).use_distributed_optimizer is False  # broken resume on CPU
    opt = optimizer_config(cfg, bf16=True, on_gpu=True, min_lr=4e-5)
    assert (opt.use_distributed_optimizer, opt.overlap_param_gather, opt.bf16, opt.min_lr) == (True, True, True, 4e-5)


def test_a_gpu_without_transformer_engine_needs_allow_local_spec(monkeypatch):
    """The layer spec's rule on a GPU, exercised on CPU by saying CUDA is there and TE is not."""
    import torch

    from pretrain import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model, "have_transformer_engine", lambda: False)
    with pytest.raises(model.SpecError, match="transformer_engine is not importable; install it .* or set "
                                              "pretrain.allow_local_spec=true"):
        model.layer_spec(allow_local=False)
    spec = model.layer_spec(allow_local=True)
    assert "TE" not in type(spec.submodules.self_attention.submodules.linear_qkv).__name__
