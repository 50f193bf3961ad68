"""The cost model: GPU-hours for scoring and for pretraining, before a run runs.

The Slurm preflight (attninf/plan.py) reads it for every job's estimate; `python -m tools.cost`
prints it as a table:

    python -m tools.cost conf/experiment/paper_7b.yaml      # the `cost:` section of a preset
    python -m tools.cost runs/x/config.yaml                  # or of a run's frozen config
    python -m tools.cost --paper                             # PAPER.md's numbers, built in

Two estimates, both plain arithmetic on configured sizes (nothing is measured here; every input
carries its provenance, which is printed with the table):

- Scoring (AttentionInfluence): every document is read twice by the selector, once as is
  (L_base) and once with the retrieval heads masked (L_masked). Scored tokens per domain are
  capped by `score_max_tokens` per document when document counts are known. With
  `shared_prefix`, layers below the first layer holding a masked head compute the same hidden
  states in both passes, so the masked pass costs only the layers from there on. Time comes
  from a measured rate when given (document tokens/s through both passes, as
  `python -m bench.score` prints, or a one-pass forward rate), else from FLOPs:
  2*N per token for the weights plus 2*layers*ctx*hidden for causal attention (QK^T and AV,
  average visible length ctx/2), at `score_mfu` of the GPU's peak.
- Pretraining: 6*N*D FLOPs (forward + backward) plus the causal-attention term
  6*layers*seq*hidden*D, divided by peak*MFU, or D / stated tokens/s/GPU when given. Checked
  against a public figure: LLaMA-2-7B, 2T tokens, reported 184,320 A100-hours; this formula gives
  ~180k at MFU 0.4 (tests/tools/test_cost.py).

Pure functions in, dicts out; only `main` reads files and prints.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from attninf.config import build, check

HOUR = 3600.0

# Dense bf16 peak FLOP/s (no sparsity) from the vendors' datasheets.
PEAK_BF16 = {"H100-SXM": 989.4e12, "H200": 989.4e12, "A100": 312e12, "cpu-2core-amx": 1.97e12}


def llama_params(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                 tied: bool) -> int:
    """Exact parameter count of a Llama-architecture model (SwiGLU MLP, RMSNorm, no biases)."""
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q, o + k, v
    mlp = 3 * hidden * ffn  # gate, up, down
    per_layer = attn + mlp + 2 * hidden  # + two RMSNorm weights
    emb = vocab * hidden * (1 if tied else 2)
    return layers * per_layer + emb + hidden  # + final norm


def forward_flops_per_token(params: float, layers: int, hidden: int, ctx: int) -> float:
    """One forward pass: 2 FLOPs per weight + causal attention (QK^T and AV over ctx/2 keys)."""
    return 2.0 * params + 2.0 * layers * ctx * hidden


def train_flops_per_token(params: float, layers: int, hidden: int, seq: int) -> float:
    """Forward + backward = 3x forward: 6N + 6*layers*seq*hidden."""
    return 3.0 * forward_flops_per_token(params, layers, hidden, seq)


@dataclass
class CostConfig:
    """`cost` section of an experiment preset. Sizes are tokens/parameters (floats allow 241e9)."""

    # --- corpus -----------------------------------------------------------------------------
    corpus_tokens: dict[str, float] = field(default_factory=dict)  # domain -> tokens
    corpus_documents: dict[str, float] = field(default_factory=dict)  # domain -> docs (optional)
    # --- scoring ----------------------------------------------------------------------------
    selector_params: float = 0.0
    selector_layers: int = 0
    selector_hidden: int = 0
    score_max_tokens: int = 4096  # truncation per document (the selector's context)
    shared_prefix: bool = False  # masked pass re-uses hidden states below the first masked layer
    masked_first_layer: int = 0  # lowest layer holding a retrieval head (known after detection)
    score_tokens_per_gpu_s: float | None = None  # measured one-pass forward throughput per GPU
    # document tokens/s per GPU through both passes, as `python -m bench.score` and the
    # score stage's progress bar report (shared prefix already included); wins over the above
    score_doc_tokens_per_gpu_s: float | None = None
    score_mfu: float = 0.35  # forward-only, long sequences, batched: assumed
    score_gpus: int = 8  # for wall clock only
    # --- pretraining ------------------------------------------------------------------------
    train_params: float = 0.0
    train_layers: int = 0
    train_hidden: int = 0
    train_seq: int = 4096
    train_tokens: float = 0.0
    train_arms: int = 1  # pretraining runs (baseline + treated + controls)
    train_tokens_per_gpu_s: float | None = None  # measured training throughput per GPU
    train_mfu: float = 0.40  # Megatron-Core dense 7B on H100: typically 0.35-0.45; assumed
    train_gpus: int = 256  # for wall clock only (paper: 32 nodes x 8 H100)
    # --- hardware ---------------------------------------------------------------------------
    gpu: str = "H100-SXM"
    gpu_peak_flops: float | None = None  # None: PEAK_BF16[gpu]
    provenance: dict[str, str] = field(default_factory=dict)  # key -> where the number comes from

    def peak(self) -> float:
        return self.gpu_peak_flops if self.gpu_peak_flops else PEAK_BF16[self.gpu]

    def validate(self) -> None:
        check(self.gpu_peak_flops is not None or self.gpu in PEAK_BF16, "gpu",
              f"'{self.gpu}' has no known peak; set cost.gpu_peak_flops or use one of {sorted(PEAK_BF16)}")
        for k in ("score_mfu", "train_mfu"):
            check(0 < getattr(self, k) <= 1, k, "must be in (0, 1]")
        check(all(v >= 0 for v in self.corpus_tokens.values()), "corpus_tokens", "negative size")
        unknown = set(self.corpus_documents) - set(self.corpus_tokens)
        check(not unknown, "corpus_documents", f"domains without corpus_tokens: {sorted(unknown)}")
        check(0 <= self.masked_first_layer <= max(self.selector_layers, 0), "masked_first_layer",
              "must be within [0, selector_layers]")
        check(self.score_max_tokens > 0, "score_max_tokens", "must be positive")


def scored_tokens(cfg: CostConfig) -> dict[str, float]:
    """Tokens the selector reads per domain (one pass): documents are truncated at
    score_max_tokens, so with a document count the total is at most docs*max_tokens."""
    out = {}
    for dom, tok in cfg.corpus_tokens.items():
        docs = cfg.corpus_documents.get(dom)
        out[dom] = min(tok, docs * cfg.score_max_tokens) if docs else tok
    return out


def masked_pass_fraction(cfg: CostConfig) -> float:
    """Cost of the masked pass relative to a full forward (1.0 without prefix sharing)."""
    if not cfg.shared_prefix or cfg.selector_layers <= 0:
        return 1.0
    return (cfg.selector_layers - cfg.masked_first_layer) / cfg.selector_layers


def scoring_cost(cfg: CostConfig) -> dict:
    toks = scored_tokens(cfg)
    total = sum(toks.values())
    passes = 1.0 + masked_pass_fraction(cfg)
    if cfg.score_doc_tokens_per_gpu_s:
        gpu_s = total / cfg.score_doc_tokens_per_gpu_s
        how = f"{cfg.score_doc_tokens_per_gpu_s:,.0f} doc tok/s/GPU, both passes (measured)"
        flops = None
    elif cfg.score_tokens_per_gpu_s:
        gpu_s = total * passes / cfg.score_tokens_per_gpu_s
        how = f"{cfg.score_tokens_per_gpu_s:,.0f} tok/s/GPU (stated)"
        flops = None
    else:
        ctx = cfg.score_max_tokens
        if cfg.corpus_documents and total:  # mean document length, when known, bounds the context
            ctx = min(ctx, int(total / max(sum(cfg.corpus_documents.values()), 1)))
        per_tok = forward_flops_per_token(cfg.selector_params, cfg.selector_layers,
                                          cfg.selector_hidden, ctx)
        flops = total * passes * per_tok
        gpu_s = flops / (cfg.peak() * cfg.score_mfu)
        how = f"FLOPs at MFU {cfg.score_mfu:.2f} of {cfg.peak() / 1e12:,.0f} TFLOP/s"
    return {"what": "scoring (base + masked)", "tokens": total, "passes": passes, "flops": flops,
            "gpu_hours": gpu_s / HOUR, "gpus": cfg.score_gpus,
            "wall_hours": gpu_s / HOUR / max(cfg.score_gpus, 1), "how": how, "per_domain": toks}


def training_cost(cfg: CostConfig) -> dict:
    d = cfg.train_tokens
    if cfg.train_tokens_per_gpu_s:
        gpu_s = d / cfg.train_tokens_per_gpu_s
        flops = None
        how = f"{cfg.train_tokens_per_gpu_s:,.0f} tok/s/GPU (stated)"
    else:
        flops = d * train_flops_per_token(cfg.train_params, cfg.train_layers, cfg.train_hidden,
                                          cfg.train_seq)
        gpu_s = flops / (cfg.peak() * cfg.train_mfu)
        how = f"6ND+attn at MFU {cfg.train_mfu:.2f} of {cfg.peak() / 1e12:,.0f} TFLOP/s"
    arms = max(cfg.train_arms, 1)
    return {"what": f"pretraining x{arms} arm(s)", "tokens": d * arms, "passes": 1.0,
            "flops": flops * arms if flops is not None else None, "gpu_hours": gpu_s * arms / HOUR,
            "gpus": cfg.train_gpus, "wall_hours": gpu_s / HOUR / max(cfg.train_gpus, 1) * arms,
            "how": how}


def estimate(cfg: CostConfig) -> list[dict]:
    rows = []
    if cfg.corpus_tokens and cfg.selector_params:
        rows.append(scoring_cost(cfg))
    if cfg.train_tokens and cfg.train_params:
        rows.append(training_cost(cfg))
    return rows


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, f in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g}{unit}"
    return f"{x:.3g}"


def _flops(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_table(rows: list[dict], cfg: CostConfig | None = None) -> str:
    head = (f"{'item':<28} {'tokens':>8} {'passes':>6} {'FLOPs':>9} {'GPU-h':>10} {'GPUs':>5} "
            f"{'wall':>9}  basis")
    lines = [head, "-" * len(head)]
    for r in rows:
        wall = r["wall_hours"]
        wall_s = f"{wall:,.1f} h" if wall < 48 else f"{wall / 24:,.1f} d"
        lines.append(f"{r['what']:<28} {_si(r['tokens']):>8} {r['passes']:>6.2f} {_flops(r['flops']):>9} "
                     f"{r['gpu_hours']:>10,.1f} {r['gpus']:>5} {wall_s:>9}  {r['how']}")
    if rows:
        lines.append(f"{'total':<28} {'':>8} {'':>6} {'':>9} {sum(r['gpu_hours'] for r in rows):>10,.1f}")
    if cfg is not None and cfg.provenance:
        lines.append("")
        lines += [f"  {k}: {v}" for k, v in cfg.provenance.items()]
    return "\n".join(lines)


# PAPER.md's numbers (section 4-5), as a built-in preset and test fixture.
PAPER_7B = {
    "corpus_tokens": {"fineweb_edu": 193.3e9, "cosmopedia": 27.9e9, "python_edu": 3.8e9,
                      "openwebmath": 13.3e9},
    "selector_params": 1.3e9, "selector_layers": 16, "selector_hidden": 2560,
    "score_max_tokens": 4096,
    "train_params": float(llama_params(32, 4096, 11008, 32, 32, 49152, tied=False)),
    "train_layers": 32, "train_hidden": 4096, "train_seq": 8192, "train_tokens": 1e12,
    "train_arms": 2, "train_gpus": 256, "score_gpus": 64, "gpu": "H100-SXM",
    "provenance": {
        "corpus_tokens": "PAPER.md s4 per-domain sizes (cosmo2 tokens); they sum to 238.3B, "
                         "the paper says ~241B",
        "selector": "PAPER.md s5: 1.3B, 16 layers, hidden 2560",
        "train_params": "LLaMA-2-7B shape (FFN 11008, MHA assumed) with the 49,152 cosmo2 vocab",
        "train_tokens": "PAPER.md s5: 1T tokens per arm; 2 arms (baseline, AttentionInfluence)",
        "mfu": "assumed: scoring 0.35, training 0.40 (not measured)",
        "gpus": "paper: 32 nodes x 8 H100 for training; scoring GPU count is a choice"},
}


def from_mapping(node, where: str = "cost") -> CostConfig:
    return build(CostConfig, node, where)


def by_item(cfg: CostConfig) -> dict[str, dict]:
    """The estimate rows by item ("scoring", "training"): what a stage declares as its cost_item."""
    out = {}
    if cfg.corpus_tokens and cfg.selector_params:
        out["scoring"] = scoring_cost(cfg)
    if cfg.train_tokens and cfg.train_params:
        out["training"] = training_cost(cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("yaml", nargs="?", type=Path, help="a preset or run config with a `cost:` section")
    p.add_argument("--paper", action="store_true", help="PAPER.md's numbers (7B, 1T tokens)")
    a = p.parse_args(argv)
    if a.paper:
        cfg = from_mapping(PAPER_7B)
    elif a.yaml:
        from omegaconf import OmegaConf

        node = OmegaConf.load(a.yaml).get("cost")
        if node is None:
            p.error(f"{a.yaml}: no `cost:` section")
        cfg = from_mapping(node)
    else:
        p.error("give a YAML file with a `cost:` section, or --paper")
    print(format_table(estimate(cfg), cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
