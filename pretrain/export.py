"""Megatron checkpoint -> HF `LlamaForCausalLM` directory (+ tokenizer): what evaluation loads.

`python -m pretrain.export <pretrain stage folder>` loads the final checkpoint (and the pre-decay
one when configured) into a single-process model (dist_checkpointing reshards any TP/PP layout),
maps the weights and writes `hf/` (and `hf_pre_decay/`). It then checks its own work: the same
token batch goes through the Megatron model and through the saved HF model reloaded from disk;
the max abs logit difference goes into `hf/export.json` (a test repeats the HF half independently).

Weight mapping (local and Transformer-Engine layer specs):
- linear_qkv is fused and grouped per KV head: for each of the G groups, [q rows of its Q/G
  heads, k rows, v rows]; HF wants q_proj/k_proj/v_proj with query head i on KV head i // (Q/G).
- linear_fc1 = cat(gate_proj, up_proj) (SwiGLU); linear_fc2 = down_proj.
- RMSNorm weights: input_layernorm / pre_mlp_layernorm (local) or the layer_norm_weight fused into
  linear_qkv / linear_fc1 (TE); final_layernorm = model.norm.
- Both sides use non-interleaved RoPE (rotate-half) with the same base, so no permutation is needed.
Padded vocabulary rows (Megatron pads to a multiple of 128) are kept: the HF config's vocab_size
is the padded size, and the padding rows are never produced by the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from pretrain.model import ModelShape


def megatron_to_hf(sd: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Pure mapping of a (TP=1, PP=1) GPTModel state dict to LlamaForCausalLM names."""
    q, g, d, h = shape.num_attention_heads, shape.num_query_groups, shape.head_dim, shape.hidden_size
    per = q // g
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    out["lm_head.weight"] = sd["output_layer.weight"] if shape.untie_embeddings else sd["embedding.word_embeddings.weight"]
    for i in range(shape.num_layers):
        p = f"decoder.layers.{i}."
        o = f"model.layers.{i}."
        qkv = sd[p + "self_attention.linear_qkv.weight"].reshape(g, (per + 2) * d, h)
        out[o + "self_attn.q_proj.weight"] = qkv[:, : per * d].reshape(q * d, h)
        out[o + "self_attn.k_proj.weight"] = qkv[:, per * d: (per + 1) * d].reshape(g * d, h)
        out[o + "self_attn.v_proj.weight"] = qkv[:, (per + 1) * d:].reshape(g * d, h)
        out[o + "self_attn.o_proj.weight"] = sd[p + "self_attention.linear_proj.weight"]
        fc1 = sd[p + "mlp.linear_fc1.weight"]
        out[o + "mlp.gate_proj.weight"], out[o + "mlp.up_proj.weight"] = fc1.chunk(2, dim=0)
        out[o + "mlp.down_proj.weight"] = sd[p + "mlp.linear_fc2.weight"]
        ln1 = sd.get(p + "input_layernorm.weight", sd.get(p + "self_attention.linear_qkv.layer_norm_weight"))
        ln2 = sd.get(p + "pre_mlp_layernorm.weight", sd.get(p + "mlp.linear_fc1.layer_norm_weight"))
        if ln1 is None or ln2 is None:
            raise KeyError(f"export: layer {i} has no RMSNorm weights (neither local nor TE names)")
        out[o + "input_layernorm.weight"] = ln1
        out[o + "post_attention_layernorm.weight"] = ln2
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_config(shape: ModelShape, vocab_size: int, tokenizer=None, dtype: str = "float32"):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups, head_dim=shape.head_dim,
        max_position_embeddings=shape.seq_length, rms_norm_eps=shape.norm_epsilon,
        rope_theta=float(shape.rotary_base), tie_word_embeddings=not shape.untie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None), torch_dtype=dtype)


def save_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer; make tokenizer_class loadable by transformers 4.x too (OFFLINE.md)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out_dir)
    from selection.models import make_tokenizer_portable

    make_tokenizer_portable(out_dir)


def export_checkpoint(ckpt_dir: Path, shape: ModelShape, vocab_size: int, tokenizer_dir: Path,
                      out_dir: Path, real_vocab: int | None = None, reference: Path | None = None) -> dict:
    """Load `ckpt_dir` into a TP=1/PP=1 model (process group must exist), write `out_dir`.

    `reference`: logits the multi-rank training computed in its own layout (TP shards gathered) at
    the same step. The check against the TP=1 reload alone cannot see a resharding error (both
    sides would share it); this one can, so a mismatch fails the export before `out_dir` appears.
    """
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pretrain import checkpoint
    from pretrain.model import build_gpt, verify_tokens

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    gpt = build_gpt(shape, vocab_size)  # same layer spec as training (TE names differ)
    checkpoint.load(ckpt_dir, gpt)
    gpt.eval()
    sd = {k: v.float().cpu() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    hf_sd = megatron_to_hf(sd, shape)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = hf_config(shape, vocab_size, tok)
    hf = LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"export: HF weights missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(tmp)
    save_tokenizer(tokenizer_dir, tmp)

    # Verify: Megatron logits vs the HF model reloaded from disk, same tokens.
    tokens = verify_tokens(real_vocab or vocab_size, shape.seq_length)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    dev = next(gpt.parameters()).device
    with torch.no_grad():
        ref = gpt(tokens.to(dev), pos.to(dev), None).float().cpu()
    torch.save({"tokens": tokens, "logits": ref}, tmp / "megatron_logits.pt")
    reloaded = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(tokens).logits.float()
    diff = float((got - ref).abs().max())
    info = {"checkpoint": str(ckpt_dir), "max_abs_logit_diff": diff, "verify_tokens": list(tokens.shape),
            "parameters": sum(p.numel() for p in reloaded.parameters())}
    if reference is not None:
        r = torch.load(reference)
        if int(r["step"]) != int(Path(ckpt_dir).name[5:]):
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"export: {reference} is from step {r['step']}, not from {ckpt_dir}")
        with torch.no_grad():
            d2 = float((reloaded(r["tokens"]).logits.float() - r["logits"]).abs().max())
        info.update(training_layout={"tp": int(r["tp"]), "dp": int(r["dp"])},
                    max_abs_logit_diff_training_layout=d2)
        if not d2 < 1e-3:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"export: HF logits differ from the training layout's ({reference}) by "
                               f"{d2:.3g} (> 1e-3): the checkpoint was resharded wrongly")
    (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return info


def export_all(stage: Path, cfg, blend: dict, mix_dir: Path) -> list[dict]:
    """hf/ from the final checkpoint (+ hf_pre_decay/). Needs a process group and TP=PP=1 state."""
    import logging

    from pretrain import checkpoint
    from pretrain.model import padded_vocab_size

    real_vocab = cfg.model.vocab_size or blend["tokenizer"]["vocab_size"]
    vocab = padded_vocab_size(real_vocab, cfg.model.make_vocab_size_divisible_by, cfg.tensor_parallel)
    root = stage / "ckpt"
    todo = [(checkpoint.latest_step(root), stage / "hf")]
    if cfg.export_pre_decay and checkpoint.pre_decay_step(root) is not None:
        todo.append((checkpoint.pre_decay_step(root), stage / "hf_pre_decay"))
    infos = []
    for step, out in todo:
        if step is None:
            raise FileNotFoundError(f"export: no checkpoint under {root}")
        ref = stage / "reference_logits.pt"  # written by a multi-rank training run at its end
        info = export_checkpoint(checkpoint.step_dir(root, step), cfg.model, vocab,
                                 mix_dir / blend["tokenizer"]["dir"], out, real_vocab,
                                 reference=ref if out.name == "hf" and ref.exists() else None)
        infos.append(info)
        logging.getLogger("pretrain.export").info("exported step %d -> %s (max abs logit diff %.3g)",
                                                  step, out, info["max_abs_logit_diff"])
    return infos


def main(argv: list[str] | None = None) -> int:
    """Export a pretrain stage folder: hf/ from the final checkpoint, hf_pre_decay/ if configured."""
    import logging

    from omegaconf import OmegaConf

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m pretrain.export <pretrain stage folder>")
    stage = Path(args[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from pretrain import cpu_compat
    from pretrain.train import load_config

    cfg = load_config(OmegaConf.load(stage / "config.yaml").get("pretrain"))
    from pretrain.launch import stage_job

    job = stage_job(stage)  # arm + mixture from the stage manifest (or a hand-made job.json)
    mix_dir = Path(job["mix_dir"])
    blend = json.loads((mix_dir / "blend.json").read_text())

    on_cpu = cpu_compat.enable()
    if "MASTER_PORT" not in os.environ:
        from attninf.dist import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    torch.distributed.init_process_group("gloo" if on_cpu else "nccl")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    cpu_compat.seed_all(cfg.seed)  # Megatron's RNG tracker must exist to build the model
    try:
        export_all(stage, cfg, blend, mix_dir)
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
