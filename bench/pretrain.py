"""Throughput benchmark: tokens/s and MFU of the real training path for a few steps.

    python -m bench.pretrain --model 1b --steps 12 --gbs 16 --mbs 2 [--out DIR]

Builds a synthetic mixture (random-token documents written as Megatron indexed datasets), a
stage folder with the chosen `conf/pretrain/model/<name>.yaml`, and runs `pretrain.launch` exactly
as the pipeline does (Megatron GPTModel, DDP, optimizer, WSD scheduler, forward-backward). Prints
the median step time, tokens/s and (on GPU) MFU over the steps after the first few (warm-up),
plus the per-step log. No checkpoints, no export. Numbers, never asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def synthetic_mix(out: Path, vocab: int, n_docs: int, doc_len: int, seed: int = 0) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from pretrain.indexed import token_dtype

    rng = np.random.default_rng(seed)
    prefix = out / "corpus" / "synthetic"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=token_dtype(vocab))
    for _ in range(n_docs):
        arr = rng.integers(1, vocab, size=doc_len).astype(np.int64)
        arr[-1] = 0
        b.add_document(torch.from_numpy(arr), [doc_len])
    b.finalize(str(prefix) + ".idx")
    blend = {"tokenizer": {"dir": "tokenizer", "name": "synthetic", "vocab_size": vocab, "eod": 0},
             "datasets": {"corpus/synthetic": {"kind": "corpus", "tokens": n_docs * doc_len}},
             "valid": {}, "arms": {"bench": {"selection": None, "prefixes": ["corpus/synthetic"],
                                             "weights": [1.0]}}}
    (out / "blend.json").write_text(json.dumps(blend))


def main(argv=None) -> int:
    from omegaconf import OmegaConf

    from pretrain.train import launch_local, read_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="override the model's seq_length")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--precision", default="auto")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    work = Path(a.out or tempfile.mkdtemp(prefix="pretrain-bench-"))
    mix, stage = work / "mix", work / "stage"
    stage.mkdir(parents=True, exist_ok=True)
    model = OmegaConf.load(ROOT / "conf" / "pretrain" / "model" / f"{a.model}.yaml")
    if a.seq:
        model.seq_length = a.seq
    need = (a.steps + 2) * a.gbs * (model.seq_length + 1)
    t0 = time.perf_counter()
    synthetic_mix(mix, a.vocab, n_docs=max(64, need // 4096 + 1), doc_len=4096)
    base = OmegaConf.load(ROOT / "conf" / "pretrain" / "default.yaml")
    base.pop("defaults")
    base.model = model
    over = {"train_iters": a.steps, "global_batch_size": a.gbs, "micro_batch_size": a.mbs,
            "precision": a.precision, "eval_interval": 0, "save_pre_decay": False, "export_hf": False,
            "save_interval": 0, "keep_last": 1}
    cfg = OmegaConf.create({"pretrain": OmegaConf.merge(base, over), "wandb": {"mode": "disabled"},
                            "experiment_name": "bench"})
    (stage / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (stage / "job.json").write_text(json.dumps({"arm": "bench", "mix_dir": str(mix)}))
    print(f"synthetic data in {time.perf_counter() - t0:.1f}s; training {a.model} for {a.steps} steps",
          flush=True)
    launch_local(stage, a.nproc)
    rows = [r for r in read_metrics(stage / "metrics.jsonl") if "loss" in r]
    warm = rows[min(3, len(rows) - 1):]
    med = lambda k: statistics.median(r[k] for r in warm) if all(k in r for r in warm) else None  # noqa: E731
    summary = json.loads((stage / "train_summary.json").read_text())
    res = {"model": a.model, "parameters": summary["parameters"], "seq_length": model.seq_length,
           "global_batch": a.gbs, "micro_batch": a.mbs, "bf16": summary["bf16"], "world": summary["world"],
           "step_time_s_median": med("step_time_s"), "tokens_per_s_median": med("tokens_per_s"),
           "mfu_median": med("mfu"), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}
    print(json.dumps(res, indent=2))
    (work / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
