"""Mirror-effect check (the paper's Table 6, on the detection probes): does masking the detected
heads break retrieval, while masking as many random non-retrieval heads barely matters?

On held-out probes (same generator and settings as the detection, read from its heads.json
`probe_settings`; another seed) the selector is run three ways:
no heads masked, the head set of `heads` masked (the detected retrieval heads by default), and
`random_draws` seeded sets of equally many random heads that avoid that set and the retrieval
heads. For each: exact-match accuracy and the mean teacher-forced loss of the answer tokens.

Exact match is read off the teacher-forced forward: greedy decoding reproduces the value iff every
answer token is the argmax prediction of the row before it, so one forward per probe and condition
gives both numbers (decoding would cost ~30 forwards per probe for the same answer).
Writes mirror/mirror.json and mirror/mirror.md (the table, also printed).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from attninf.config import check
from selection.probes import Probe

log = logging.getLogger(__name__)


@dataclass
class MirrorConfig:
    """The `mirror` config group (conf/mirror/default.yaml)."""

    num_probes: int = 100
    max_tokens: int | None = None  # null = the detection's (heads.json probe_settings)
    seed: int = 1  # probe seed; differs from detect.seed (0) so the probes are held out
    random_draws: int = 3  # random head sets averaged for the control row
    random_seed: int = 0  # first random set's seed (draw i uses random_seed + i)

    def validate(self) -> None:
        check(self.num_probes >= 1, "num_probes", "must be >= 1")
        check(self.max_tokens is None or self.max_tokens >= 64, "max_tokens", "must be >= 64 (or null)")
        check(self.random_draws >= 0, "random_draws", "must be >= 0")


@torch.no_grad()
def answer_metrics(model, tokenizer, probes: Sequence[Probe], progress=None) -> dict:
    """Exact-match rate and mean answer-token loss over `probes` (under whatever is masked now)."""
    from selection.detect import run_teacher_forced

    ems, losses = [], []
    for p in probes:
        r = run_teacher_forced(model, tokenizer, p, observer=None)
        ems.append(r.exact_match)
        losses.append(r.answer_loss)
        if progress is not None:
            progress.update(1, r.n_tokens)
    return {"exact_match": sum(ems) / len(ems), "answer_loss": sum(losses) / len(losses),
            "per_probe_loss": losses, "per_probe_em": ems}


def random_control(n: int, avoid: set[tuple[int, int]], n_layers: int, n_heads: int, seed: int) -> list[tuple[int, int]]:
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in avoid]
    if n > len(pool):
        raise ValueError(f"mirror: {n} random heads requested but only {len(pool)} heads are outside the masked set")
    return random.Random(seed).sample(pool, n)


def mirror_effect(model, tokenizer, probes: Sequence[Probe], heads: Sequence[tuple[int, int]],
                  avoid: set[tuple[int, int]], n_layers: int, n_heads: int, mode: str = "uniform",
                  random_draws: int = 3, random_seed: int = 0, label: str = "retrieval",
                  progress=None) -> dict:
    """Rows of the mirror table (dicts with condition, heads, exact_match, answer_loss)."""
    from selection.masking import mask_heads

    rows = []
    t0 = time.perf_counter()
    base = answer_metrics(model, tokenizer, probes, progress)
    rows.append({"condition": "none", "n_heads": 0, "heads": [], **base})
    with mask_heads(model, list(heads), mode=mode):
        m = answer_metrics(model, tokenizer, probes, progress)
    rows.append({"condition": label, "n_heads": len(heads), "heads": [list(h) for h in heads], **m})
    draws = []
    for i in range(random_draws):
        rh = random_control(len(heads), set(avoid) | set(heads), n_layers, n_heads, random_seed + i)
        with mask_heads(model, rh, mode=mode):
            m = answer_metrics(model, tokenizer, probes, progress)
        draws.append({"condition": f"random#{i}", "n_heads": len(rh), "heads": [list(h) for h in rh],
                      "seed": random_seed + i, **m})
    if draws:
        rows.append({"condition": f"random (mean of {len(draws)})", "n_heads": len(heads),
                     "exact_match": sum(d["exact_match"] for d in draws) / len(draws),
                     "answer_loss": sum(d["answer_loss"] for d in draws) / len(draws), "draws": draws})
    for r in rows + draws:
        r["delta_loss"] = r["answer_loss"] - base["answer_loss"]
    return {"rows": rows, "wall_s": time.perf_counter() - t0}


def table_markdown(rows: Sequence[dict], title: str) -> str:
    lines = [f"### {title}", "", "| heads masked | n | exact match | answer loss | Δ loss |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['condition']} | {r['n_heads']} | {r['exact_match']:.3f} | "
                     f"{r['answer_loss']:.3f} | {r['delta_loss']:+.3f} |")
        for d in r.get("draws", []):
            lines.append(f"| &nbsp;&nbsp;{d['condition']} (seed {d['seed']}) | {d['n_heads']} | "
                         f"{d['exact_match']:.3f} | {d['answer_loss']:.3f} | {d['delta_loss']:+.3f} |")
    return "\n".join(lines) + "\n"


def probe_settings(ctx, heads_json: dict | None) -> dict:
    """How the held-out probes are built: the `probe_settings` the detection behind the head set
    wrote into heads.json, so the probes match the ones the heads were detected on even when the
    detect config has changed since. A head set with no detection behind it (heads.list, a plain
    list file, unconstrained random heads) has none; its probes follow the `detect` config."""
    settings = (heads_json or {}).get("probe_settings")
    if settings is not None:
        return dict(settings)
    from dataclasses import asdict

    from attninf.config import build
    from selection.detect import DetectConfig

    log.info("mirror: the head set has no detection's probe settings; probes follow the detect config")
    return asdict(build(DetectConfig, ctx.cfg.get("detect"), "detect"))


def run(ctx) -> dict:
    """Stage `mirror`: the mirror-effect table on held-out probes."""
    from attninf.config import build
    from attninf.manifest import write_atomic, write_json
    from selection.heads import HeadsConfig, describe, heads_json_for_stage, resolve_heads, retrieval_set
    from selection.heads import head_geometry
    from selection.models import ModelConfig, check_context, load_selector, precision_of
    from selection.probes import load_sentences, probes_from_settings, save_probes

    cfg = build(MirrorConfig, ctx.cfg.get("mirror"), "mirror")
    hcfg = build(HeadsConfig, ctx.cfg.get("heads"), "heads")
    mcfg = build(ModelConfig, ctx.cfg.get("model"), "model")
    heads_json, source = heads_json_for_stage(ctx, hcfg)
    settings = probe_settings(ctx, heads_json)
    if cfg.seed == settings["seed"]:
        log.warning("mirror.seed == detect.seed (%d): the mirror probes are the detection probes", cfg.seed)
    max_tokens = cfg.max_tokens or settings["max_tokens"]
    sentences = load_sentences(settings.get("text_source"), settings.get("text_field", "text"),
                               ctx.cfg.get("corpus"), settings.get("text_docs", 2000))
    model, tokenizer = load_selector(mcfg)
    check_context(max_tokens, model, "mirror.max_tokens" if cfg.max_tokens else "detect.max_tokens")
    n_layers, n_heads, _ = head_geometry(model)
    heads = resolve_heads(hcfg, heads_json, n_layers, n_heads)  # validated before any compute
    if not heads:
        raise ValueError("mirror: heads.set=none masks nothing; pick a head set to compare")
    avoid = set(retrieval_set(hcfg, heads_json, n_layers, n_heads))  # random rows also avoid `heads`

    probes = probes_from_settings(tokenizer, settings, cfg.num_probes, max_tokens, cfg.seed, sentences)
    save_probes(ctx.out / "probes.jsonl", probes)
    from attninf.progress import Progress

    with Progress(len(probes) * (2 + cfg.random_draws), "mirror", tracker=ctx.tracker, unit="probe",
                  prefix="mirror") as prog:
        res = mirror_effect(model, tokenizer, probes, heads, avoid, n_layers, n_heads, hcfg.mode,
                            cfg.random_draws, cfg.random_seed, label=hcfg.set, progress=prog)
    title = (f"Mirror effect: {mcfg.path}, {len(probes)} held-out probes of <= {max_tokens} tokens "
             f"(seed {cfg.seed}), heads masked with mode={hcfg.mode}")
    md = table_markdown(res["rows"], title)
    doc = {"model": str(mcfg.path), "heads_source": source, "heads_set": hcfg.set,
           "heads_label": describe(hcfg, heads), "mask_mode": hcfg.mode,
           "num_probes": len(probes), "max_tokens": max_tokens, "seed": cfg.seed,
           "mean_probe_tokens": sum(p.n_tokens for p in probes) / len(probes),
           "rows": res["rows"], "wall_s": res["wall_s"]}
    write_json(ctx.out / "mirror.json", doc)
    write_atomic(ctx.out / "mirror.md", md)
    print(md)
    summary = {r["condition"]: {"exact_match": r["exact_match"], "answer_loss": r["answer_loss"]}
               for r in res["rows"]}
    ctx.tracker.summary({f"mirror/{k}/{m}": v for k, d in summary.items() for m, v in d.items()})
    return {"table": "mirror.md", "rows": summary, "wall_s": res["wall_s"], "precision": precision_of(model)}
