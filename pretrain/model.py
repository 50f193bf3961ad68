"""The trained model: a Megatron-Core GPTModel in LLaMA shape.

LLaMA shape = RMSNorm (pre-norm), SwiGLU MLP (gated linear unit with SiLU), rotary position
embeddings (non-interleaved, as HF Llama), no biases anywhere, grouped-query attention and untied
input/output embeddings. That is exactly what HF `LlamaForCausalLM` computes, so `pretrain.export`
can map the weights 1:1 and evaluation loads an ordinary HF model.

Layer spec: Transformer Engine's fused modules when TE is installed (cluster images), Megatron's
local (pure torch) modules otherwise (CPU, tests). Both produce the same parameter names after
Megatron's own TE<->local mapping in checkpoints; export reads the local names and the TE names.

`ModelShape` is the `pretrain.model` config group (conf/pretrain/model/{tiny,1b,paper_7b}.yaml).
`count_parameters` is closed-form arithmetic so the 7B config can be checked on a laptop without
allocating it; a test compares it against a real (tiny) instantiation.
"""

from __future__ import annotations

from dataclasses import dataclass

from attninf.config import check


@dataclass
class ModelShape:
    """LLaMA-style decoder shape. Defaults = the tiny CPU model."""

    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    # Grouped-query attention: number of KV heads. PAPER.md says "grouped KV" without a number.
    num_query_groups: int = 2
    seq_length: int = 256
    # null = the tokenizer's vocabulary (padded to `make_vocab_size_divisible_by`).
    vocab_size: int | None = None
    # Megatron pads the embedding rows so TP shards are even and matmuls aligned (128 is its default).
    make_vocab_size_divisible_by: int = 128
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings: bool = True  # paper: untied embeddings for the trained 7B

    def validate(self) -> None:
        check(self.num_layers > 0, "num_layers", "must be > 0")
        check(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
              f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        check(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
              f"num_attention_heads={self.num_attention_heads} must be a multiple of it "
              f"({self.num_query_groups})")
        check(self.seq_length > 0, "seq_length", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def padded_vocab_size(vocab: int, divisible_by: int, tp: int = 1) -> int:
    """Megatron's rule: round the vocab up to a multiple of divisible_by * tp."""
    m = divisible_by * tp
    return ((vocab + m - 1) // m) * m


def count_parameters(shape: ModelShape, vocab_size: int) -> dict[str, int]:
    """Closed-form parameter count (no allocation). `vocab_size` = padded embedding rows."""
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads, shape.num_query_groups
    attn = h * (q * d + 2 * kv * d) + q * d * h  # fused qkv + output projection, no biases
    mlp = h * 2 * f + f * h  # SwiGLU: fc1 = [gate; up], fc2 = down
    norms = 2 * h  # input + pre-MLP RMSNorm weights
    per_layer = attn + mlp + norms
    embed = vocab_size * h
    output = vocab_size * h if shape.untie_embeddings else 0
    total = embed + output + shape.num_layers * per_layer + h  # + final RMSNorm
    return {"total": total, "embedding": embed, "output_layer": output,
            "per_layer": per_layer, "non_embedding": total - embed - output}


def flops_per_token(shape: ModelShape, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), incl. attention scores.

    6 * N_matmul + 12 * L * h * s (the causal attention QK^T and AV with full-square counting, as
    in the PaLM / Megatron MFU convention). Used for MFU.
    """
    n = count_parameters(shape, vocab_size)
    matmul_params = n["total"] - n["embedding"] - (shape.num_layers * 2 + 1) * shape.hidden_size
    if not shape.untie_embeddings:
        matmul_params += n["embedding"]  # the tied output projection is still a matmul
    return 6.0 * matmul_params + 12.0 * shape.num_layers * shape.hidden_size * shape.seq_length


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - a broken TE install must fall back, not crash
        return False


def layer_spec(use_te: bool | None = None):
    """TE spec when available (and on CUDA), the local spec otherwise; RMSNorm explicit."""
    import torch
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = have_transformer_engine() and torch.cuda.is_available()
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    # The local spec defaults to LayerNorm unless told: LLaMA needs RMSNorm.
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def transformer_config(shape: ModelShape, *, tp: int = 1, pp: int = 1, bf16: bool = False,
                       sequence_parallel: bool = False, perform_initialization: bool = True):
    """The Megatron TransformerConfig for this shape (pure; builds nothing big)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, kv_channels=shape.head_dim,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0,  # LLaMA: no dropout (also keeps runs exact)
        init_method_std=shape.init_method_std,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Apex/CUDA-extension fusions are off: they need kernels a plain install lacks (TE brings its own).
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        perform_initialization=perform_initialization,
        use_cpu_initialization=not on_gpu,
    )


def build_gpt(shape: ModelShape, vocab_size: int, *, tp: int = 1, pp: int = 1, bf16: bool = False,
              pre_process: bool = True, post_process: bool = True, use_te: bool | None = None):
    """A Megatron GPTModel (one pipeline stage; pre/post_process say which ends it holds)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    import torch

    cfg = transformer_config(shape, tp=tp, pp=pp, bf16=bf16)
    model = GPTModel(config=cfg, transformer_layer_spec=layer_spec(use_te), vocab_size=vocab_size,
                    max_sequence_length=shape.seq_length, pre_process=pre_process,
                    post_process=post_process,
                    share_embeddings_and_output_weights=not shape.untie_embeddings,
                    position_embedding_type="rope", rotary_percent=1.0,
                    rotary_base=int(shape.rotary_base))
    if torch.cuda.is_available():  # as Megatron's get_model: build, then move to this rank's GPU
        model.cuda(torch.cuda.current_device())
    return model


def verify_tokens(vocab: int, seq: int, n: int = 2, seed: int = 0):
    """The seeded token rows that training and export both feed the model to check an export."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, min(seq, 64)), generator=g)
