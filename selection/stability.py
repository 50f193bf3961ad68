"""Head-set stability: does the detected head set depend on the probe seed or the prompt template?

The public review of the paper asks whether the probe template biases which heads come out as
retrieval heads. This command answers with numbers: it detects heads K times per template
(probe seeds), for at least two templates that differ in instruction wording and JSON layout,
and reports for every pair of runs
  - the Jaccard overlap of the top sets (top `fraction` of heads, the set that gets masked),
  - the Spearman rank correlation of all head scores (does the whole ranking agree, not only
    its head?),
plus the heads that are in the top set of every run, and a figure (pairwise Jaccard and
Spearman matrices, and how often each head is in the top set). Both copy matches
(selection.detect `match`) come out of the same pass, so the token-id criterion's stability is
reported beside the default one's.

  python -m selection.stability --out runs/stability            # demo settings, 3 seeds x 2 templates

Defaults are the demo's detection (conf/experiment/demo.yaml over conf/detect/quick.yaml:
48 teacher-forced probes of <= 1,024 tokens, SmolLM2-135M-Instruct). Each run is saved as it
finishes (runs/<template>-seed<k>.json), so a killed command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from attninf.config import ConfigError, check
from selection.probes import DEFAULT_INSTRUCTION

log = logging.getLogger(__name__)

# name -> (instruction, JSON layout). "paper" is the detection default; "alt" rewords the
# instruction and puts one pair per line, so both the wording and the layout change.
TEMPLATES = {
    "paper": (DEFAULT_INSTRUCTION, "inline"),
    "alt": ("Below is a JSON dictionary. When given one of its keys, reply with the text stored "
            "under that key, exactly and with nothing else.", "lines"),
}


@dataclass
class StabilityConfig:
    out: str = "runs/stability"
    model: str = "pypi:smollm2-135m-instruct"
    dtype: str = "auto"
    device: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    templates: list[str] = field(default_factory=lambda: ["paper", "alt"])
    num_probes: int = 48
    max_tokens: int = 1024
    mode: str = "teacher_forced"
    fraction: float = 0.05
    threads: int | None = None

    def validate(self) -> None:
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
              f"{self.seeds}: need distinct seeds")
        bad = [t for t in self.templates if t not in TEMPLATES]
        check(not bad, "templates", f"unknown {bad}; known {sorted(TEMPLATES)}")
        check(len(self.seeds) * len(self.templates) >= 2, "seeds", "need at least two runs to compare")
        check(0.0 < self.fraction <= 1.0, "fraction", f"{self.fraction} is outside (0, 1]")


# --------------------------------------------------------------------------------------------
# Statistics (pure)
# --------------------------------------------------------------------------------------------

def average_ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (what Spearman's rho needs with ties)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = r
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); None when either side is constant
    or there are fewer than 2 points."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def jaccard(a, b) -> float:
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def compare_runs(runs: Sequence[dict], fraction: float, key: str = "scores") -> dict:
    """Pairwise Jaccard of the top sets and Spearman of all scores, and the always-top heads.

    runs: dicts with `name` and `key` ([n_layers][n_heads] scores)."""
    from selection.heads import n_selected, rank_heads

    tops = {}
    flat = {}
    for r in runs:
        sc = r[key]
        n = n_selected(fraction, len(sc) * len(sc[0]))
        tops[r["name"]] = [list(h) for h in rank_heads(sc)[:n]]
        flat[r["name"]] = [float(v) for row in sc for v in row]
    pairs = []
    for a, b in itertools.combinations([r["name"] for r in runs], 2):
        pairs.append({"a": a, "b": b, "jaccard": jaccard(tops[a], tops[b]),
                      "spearman": spearman(flat[a], flat[b])})
    stable = set(map(tuple, next(iter(tops.values()))))
    for t in tops.values():
        stable &= set(map(tuple, t))
    counts: dict[tuple[int, int], int] = {}
    for t in tops.values():
        for h in t:
            counts[tuple(h)] = counts.get(tuple(h), 0) + 1
    js = [p["jaccard"] for p in pairs]
    rs = [p["spearman"] for p in pairs if p["spearman"] is not None]

    def grouped(same: bool) -> dict:
        sel = [p for p in pairs if (p["a"].split("-seed")[0] == p["b"].split("-seed")[0]) == same]
        j = [p["jaccard"] for p in sel]
        r = [p["spearman"] for p in sel if p["spearman"] is not None]
        return {"pairs": len(sel), "jaccard_mean": sum(j) / len(j) if j else None,
                "spearman_mean": sum(r) / len(r) if r else None}

    return {
        "top": tops, "pairs": pairs,
        "jaccard_mean": sum(js) / len(js) if js else None, "jaccard_min": min(js) if js else None,
        "spearman_mean": sum(rs) / len(rs) if rs else None, "spearman_min": min(rs) if rs else None,
        "same_template": grouped(True), "across_templates": grouped(False),
        "stable_heads": sorted([list(h) for h in stable]),
        "top_counts": sorted([[l, h, c] for (l, h), c in counts.items()], key=lambda x: (-x[2], x[0], x[1])),
    }


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------

def plot_stability(names: Sequence[str], cmp: dict, n_layers: int, n_heads: int, path: str | Path,
                   title: str = "") -> Path:
    """Pairwise Jaccard and Spearman matrices, and each head's count of top-set memberships."""
    import numpy as np

    from attninf import plots

    plt = plots.pyplot()
    k = len(names)
    idx = {n: i for i, n in enumerate(names)}
    jm, sm = np.eye(k), np.eye(k)
    for p in cmp["pairs"]:
        i, j = idx[p["a"]], idx[p["b"]]
        jm[i, j] = jm[j, i] = p["jaccard"]
        sm[i, j] = sm[j, i] = p["spearman"] if p["spearman"] is not None else np.nan
    counts = np.zeros((n_layers, n_heads))
    for l, h, c in cmp["top_counts"]:
        counts[l, h] = c
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, m, lab in ((axes[0], jm, "top-set Jaccard"), (axes[1], sm, "Spearman (all heads)")):
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma")
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
        for i in range(k):
            for j in range(k):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] < 0.6 else "black")
        ax.set_title(lab)
        fig.colorbar(im, ax=ax, fraction=0.046)
    im = axes[2].imshow(counts, aspect="auto", cmap="viridis", vmin=0, vmax=k, interpolation="nearest")
    axes[2].set_xlabel("head")
    axes[2].set_ylabel("layer")
    axes[2].set_title(f"runs with the head in the top set (of {k})")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plots.save(fig, path)


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------

def run_one(model, tokenizer, cfg: StabilityConfig, template: str, seed: int, n_layers: int, n_heads: int) -> dict:
    from selection.detect import detect_retrieval_heads
    from selection.probes import generate_probes

    instruction, layout = TEMPLATES[template]
    probes = generate_probes(tokenizer, cfg.num_probes, cfg.max_tokens, seed, None,
                             instruction=instruction, layout=layout)
    det = detect_retrieval_heads(model, tokenizer, probes, n_layers, n_heads, cfg.mode)
    return {"name": f"{template}-seed{seed}", "template": template, "seed": seed,
            "instruction": instruction, "layout": layout, "match": det.match,
            "scores": det.scores_all, "scores_token_id": det.scores_other,
            "recall_ceiling": det.recall_ceiling, "recall_ceiling_token_id": det.recall_ceiling_other,
            "probe_accuracy": det.probe_accuracy, "mean_answer_loss": det.mean_answer_loss,
            "mean_probe_tokens": sum(p.n_tokens for p in probes) / len(probes), "wall_s": det.wall_s}


def stability(cfg: StabilityConfig) -> dict:
    import torch

    from attninf.manifest import write_json
    from selection.heads import head_geometry
    from selection.models import ModelConfig, check_context, load_selector

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    model, tok = load_selector(ModelConfig(path=cfg.model, dtype=cfg.dtype, device=cfg.device))
    check_context(cfg.max_tokens, model, "stability.max_tokens")
    n_layers, n_heads, _ = head_geometry(model)
    runs = []
    for template in cfg.templates:
        for seed in cfg.seeds:
            path = out / "runs" / f"{template}-seed{seed}.json"
            if path.exists():
                r = json.loads(path.read_text())
                if (r.get("num_probes"), r.get("max_tokens"), r.get("mode"), r.get("model")) == \
                        (cfg.num_probes, cfg.max_tokens, cfg.mode, cfg.model):
                    runs.append(r)
                    log.info("stability: %s already done (%s)", r["name"], path)
                    continue
            t0 = time.perf_counter()
            r = run_one(model, tok, cfg, template, seed, n_layers, n_heads)
            r.update(num_probes=cfg.num_probes, max_tokens=cfg.max_tokens, mode=cfg.mode, model=cfg.model)
            write_json(path, r)
            runs.append(r)
            log.info("stability: %s in %.0fs (recall ceiling %.3f)", r["name"], time.perf_counter() - t0,
                     r["recall_ceiling"])
    cmp = compare_runs(runs, cfg.fraction)
    cmp_tid = compare_runs(runs, cfg.fraction, key="scores_token_id")
    names = [r["name"] for r in runs]
    doc = {"config": asdict(cfg), "runs": [{k: v for k, v in r.items() if not k.startswith("scores")} for r in runs],
           "offsets": cmp, "token_id": {k: cmp_tid[k] for k in
                                        ("jaccard_mean", "jaccard_min", "spearman_mean", "spearman_min",
                                         "same_template", "across_templates", "stable_heads", "pairs")}}
    write_json(out / "stability.json", doc)
    plot_stability(names, cmp, n_layers, n_heads, out / "stability.png",
                   title=f"{cfg.model}: {len(cfg.seeds)} seeds x {len(cfg.templates)} templates, "
                         f"{cfg.num_probes} {cfg.mode} probes of <= {cfg.max_tokens} tokens, top {cfg.fraction:.0%}")
    (out / "stability.md").write_text(markdown(doc))
    return doc


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(doc: dict) -> str:
    c = doc["offsets"]
    lines = ["### Head-set stability", "",
             "| run a | run b | top-set Jaccard | Spearman (all heads) |", "|---|---|---:|---:|"]
    for p in c["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['jaccard']:.3f} | {_f(p['spearman'])} |")
    lines += ["", "| match | Jaccard mean (min) | same template | across templates | "
                  "Spearman mean (min) | same template | across templates | heads in every top set |",
              "|---|---|---:|---:|---|---:|---:|---|"]
    for name in ("offsets", "token_id"):
        d = doc[name]
        lines.append(f"| {name} | {_f(d['jaccard_mean'])} ({_f(d['jaccard_min'])}) | "
                     f"{_f(d['same_template']['jaccard_mean'])} | {_f(d['across_templates']['jaccard_mean'])} | "
                     f"{_f(d['spearman_mean'])} ({_f(d['spearman_min'])}) | "
                     f"{_f(d['same_template']['spearman_mean'])} | {_f(d['across_templates']['spearman_mean'])} | "
                     f"{len(d['stable_heads'])}: {d['stable_heads']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selection.stability", description=__doc__.split("\n\n")[0])
    d = StabilityConfig()
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--dtype", default=d.dtype)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    ap.add_argument("--templates", nargs="+", default=d.templates, help=f"of {sorted(TEMPLATES)}")
    ap.add_argument("--num-probes", type=int, default=d.num_probes)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--mode", default=d.mode, choices=["teacher_forced", "generate"])
    ap.add_argument("--fraction", type=float, default=d.fraction)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = StabilityConfig(out=a.out, model=a.model, dtype=a.dtype, device=a.device, seeds=a.seeds,
                          templates=a.templates, num_probes=a.num_probes, max_tokens=a.max_tokens,
                          mode=a.mode, fraction=a.fraction, threads=a.threads)
    try:
        cfg.validate()
        doc = stability(cfg)
    except ConfigError as e:
        print(f"error: stability {e}", file=sys.stderr)
        return 2
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
