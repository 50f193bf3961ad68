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


class SpecError(RuntimeError):
    """The requested layer spec's library is missing (TransformerEngine on a GPU)."""


def layer_spec(use_te: bool | None = None, allow_local: bool = True):
    """TE spec on CUDA with TransformerEngine, the local spec otherwise; RMSNorm explicit.

    On a GPU without TE the local spec is an error unless `allow_local` (pretrain.allow_local_spec):
    it keeps the full attention matrix and runs no fused kernels (11% MFU measured on one H100,
    out of memory at sequence 8192), a silent fallback that costs a run days.
    """
    import torch
    from megatron.core.models.gpt import gpt_layer_specs as specs

    on_gpu = torch.cuda.is_available()
    if use_te is None:
        use_te = have_transformer_engine() and on_gpu
        if on_gpu and not use_te and not allow_local:
            raise SpecError("pretrain: a GPU is present but transformer_engine is not importable; install "
                            "it (pip install transformer-engine[pytorch]) or set pretrain.allow_local_spec=true")
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec()
    # The local spec defaults to LayerNorm unless told: LLaMA needs RMSNorm.
    return specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def transformer_config(shape: ModelShape, *, tp: int = 1, pp: int = 1, bf16: bool = False,
                       gpu=None, perform_initialization: bool = True):
    """The Megatron TransformerConfig for this shape (pure; builds nothing big).

    `gpu` (pretrain.train.GPUConfig) carries the GPU settings: sequence parallel (with TP > 1),
    the fusions, the attention backend and activation recompute. None = all off (the CPU path).
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    g = gpu
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "recompute_num_layers": 1}}[getattr(g, "recompute", "none")]
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
        sequence_parallel=bool(getattr(g, "sequence_parallel", False)) and tp > 1,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Off by default: APEX/CUDA-extension kernels a plain install lacks (TE brings its own).
        bias_activation_fusion=bool(getattr(g, "bias_activation_fusion", False)),
        masked_softmax_fusion=bool(getattr(g, "masked_softmax_fusion", False)),
        bias_dropout_fusion=bool(getattr(g, "bias_dropout_fusion", False)),
        apply_rope_fusion=bool(getattr(g, "apply_rope_fusion", False)), persist_layer_norm=False,
        gradient_accumulation_fusion=bool(getattr(g, "gradient_accumulation_fusion", False)),
        attention_backend=AttnBackend[getattr(g, "attention_backend", "auto")],
        perform_initialization=perform_initialization,
        use_cpu_initialization=not on_gpu,
        **recompute,
    )


def build_gpt(shape: ModelShape, vocab_size: int, *, tp: int = 1, pp: int = 1, bf16: bool = False,
              pre_process: bool = True, post_process: bool = True, use_te: bool | None = None,
              gpu=None, allow_local_spec: bool = True):
    """A Megatron GPTModel (one pipeline stage; pre/post_process say which ends it holds)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    import torch

    cfg = transformer_config(shape, tp=tp, pp=pp, bf16=bf16, gpu=gpu)
    model = GPTModel(config=cfg, transformer_layer_spec=layer_spec(use_te, allow_local_spec), vocab_size=vocab_size,
                    max_sequence_length=shape.seq_length, pre_process=pre_process,
                    post_process=post_process,
                    share_embeddings_and_output_weights=not shape.untie_embeddings,
                    position_embedding_type="rope", rotary_percent=1.0,
                    rotary_base=int(shape.rotary_base))
    if torch.cuda.is_available():  # as Megatron's get_model: build, then move to this rank's GPU
        model.cuda(torch.cuda.current_device())
    return model


def memory_per_gpu(cfg, vocab_size: int, flash: bool = True) -> dict[str, float]:
    """Bytes per GPU of one training rank (pretrain.train.PretrainConfig), the preflight's estimate.

    - weights: bf16 (2 B/param) or fp32 (4), this rank's 1/(TP x PP) of the parameters;
    - gradients: fp32 buffers (grad_reduce_in_fp32, 4 B/param);
    - optimizer: fp32 main weights + Adam's two moments (12 B/param under bf16, 8 under fp32),
      divided over the data-parallel ranks with the distributed optimizer (ZeRO-1);
    - activations (Korthikanti et al. 2022, per layer per microbatch, bytes): s*b*h*(34 + 5*a*s/h)
      with TP splitting the 24 tensor-parallel bytes (and, with sequence parallel, the other 10
      too); flash attention or selective recompute drop the 5*a*s/h attention-matrix term; full
      recompute keeps 2*s*b*h per layer. The first pipeline stage holds PP microbatches in flight
      (1F1B), so L/PP layers x PP = L layers' worth; plus fp32 logits for the loss (2 copies of
      s*b*V/TP).
    Estimates for a plan, not a measurement: allocator fragmentation and NCCL buffers add a few GB.
    """
    from pretrain.model import count_parameters as _count

    m = cfg.model
    tp, pp, dp = cfg.tensor_parallel, cfg.pipeline_parallel, cfg.dp()
    bf16 = cfg.precision != "fp32"
    n = _count(m, padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp))["total"] / (tp * pp)
    weights = n * (2 if bf16 else 4)
    grads = n * 4
    opt = n * (12 if bf16 else 8) / (dp if cfg.optim.use_distributed_optimizer else 1)
    s, b, h, a, L = m.seq_length, cfg.micro_batch_size, m.hidden_size, m.num_attention_heads, m.num_layers
    g = cfg.gpu
    sp = g.sequence_parallel and tp > 1
    attn_matrix = 0.0 if (flash or g.recompute == "selective") else 5.0 * a * s / h / tp
    per_layer = s * b * h * ((10.0 / tp if sp else 10.0) + 24.0 / tp + attn_matrix)
    if g.recompute == "full":
        per_layer = 2.0 * s * b * h / (tp if sp else 1)
    acts = per_layer * L  # (L / PP) layers x PP microbatches in flight on the first stage
    logits = 2.0 * s * b * padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp) / tp * 4
    total = weights + grads + opt + acts + logits
    return {"weights": weights, "gradients": grads, "optimizer": opt, "activations": acts,
            "logits": logits, "total": total}


def verify_tokens(vocab: int, seq: int, n: int = 2, seed: int = 0):
    """The seeded token rows that training and export both feed the model to check an export."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, min(seq, 64)), generator=g)
