"""Shared fixtures: tiny random Llama models with a real (tiny, trained-in-test) BPE tokenizer.

No network and no downloaded weights: the tokenizer is trained on a few sentences in
milliseconds, the model is LlamaForCausalLM with random weights and GQA (4 query heads over
2 KV heads) so every code path that cares about head groups is exercised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Retrieval heads copy tokens from the context into the answer.",
    "Let x be a real number such that x^2 = 4; then x = 2 or x = -2.",
    '{"key": "value", "other": "sentence about the weather in Paris"}',
    "Photosynthesis converts light energy into chemical energy in plants.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 :,.;!?-_'\"{}[]()",
]


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


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer directory, loadable with model.path=<dir>."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d
