"""Tiny random Llama models with a tiny trained-on-the-spot BPE tokenizer.

They make `experiment=smoke` and the tests run every stage (detection, masking, scoring,
pretraining with the selector's tokenizer family, lm-eval) in seconds, with nothing downloaded.
The tokenizer is byte-level BPE, so any text encodes; its small vocabulary (384) also keeps the
Megatron model that trains on it small. Random weights mean the *numbers* are meaningless; the
point is that the paths are the real ones.

`model.path=random:tiny` resolves to a cached directory built once, deterministically (same
seed, same weights, same tokenizer on every machine).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Enough variety for a byte-level BPE to learn merges for prose, code, maths and JSON.
_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Retrieval heads copy tokens from the context into the answer.",
    "Let x be a real number such that x^2 = 4; then x = 2 or x = -2.",
    '{"key": "value", "other": "sentence about the weather in Paris"}',
    "Photosynthesis converts light energy into chemical energy in plants.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 :,.;!?-_'\"{}[]()",
]

# name -> LlamaConfig shape. GQA (4 query heads over 2 KV heads) so head-group code is exercised.
RANDOM_MODELS = {
    "tiny": dict(layers=4, heads=4, kv_heads=2, hidden=64, vocab_size=384, seed=0),
}


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with BOS/EOS, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None)


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                    hidden: int = 64, max_pos: int = 4096, tie: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_pos, tie_word_embeddings=tie, bos_token_id=1,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def save_tiny(out: Path, **shape) -> Path:
    """Write model + tokenizer to `out` atomically (temp dir + rename): concurrent callers are safe."""
    shape = dict(shape)
    vocab = shape.pop("vocab_size", 384)
    tok = make_tokenizer(vocab)
    model = make_tiny_llama(len(tok), **shape)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"Random LlamaForCausalLM {shape}, BPE tokenizer (vocab {vocab}) "
                                    "trained on built-in sentences: for pipeline checks only.\n")
    (tmp / ".complete").touch()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def materialise_random_model(name: str, root: Path) -> Path:
    out = root / "models" / f"random-{name}"
    if (out / ".complete").exists():
        return out
    return save_tiny(out, **RANDOM_MODELS[name])
