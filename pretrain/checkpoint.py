"""Megatron distributed checkpoints (dist_checkpointing, torch_dist format) and resume.

Layout: `<ckpt>/iter_0000100/` one folder per saved step, `<ckpt>/latest` (text: the step of the
newest complete checkpoint) and `<ckpt>/pre_decay` (the step that ended the WSD stable phase;
a decay branch or a "before decay" evaluation starts from it, as the paper reports both).

What is saved: the model's sharded state dict, the optimizer's (Adam moments, fp32 master weights
under bf16), the LR scheduler state, the step and the consumed samples. Not saved: RNG states,
because the model has no dropout and the data order is a pure function of (seed, step), so
nothing after initialisation draws random numbers; that is also why a resumed run reproduces the
uninterrupted loss curve exactly (tested on CPU).

Being a sharded format, a checkpoint written with one TP/PP/DP layout loads under another
(the HF export loads it into a single process). The distributed optimizer's own format is
not used on CPU (its resume is broken there, see OFFLINE.md); `use_distributed_optimizer` is a
GPU-only option of pretrain.train.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def _write_marker(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_step(root: Path) -> int | None:
    p = Path(root) / "latest"
    if not p.exists():
        return None
    step = int(p.read_text().strip())
    return step if step_dir(root, step).exists() else None


def pre_decay_step(root: Path) -> int | None:
    p = Path(root) / "pre_decay"
    return int(p.read_text().strip()) if p.exists() else None


def _state_dict(model, optimizer, scheduler, step: int, consumed: int, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict(prefix="")
    sd = {"model": model_sd, "step": step, "consumed_samples": consumed}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    return sd


def unwrap(model):
    """DDP / Float16Module -> the GPTModel inside."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save(root: Path, step: int, model, optimizer, scheduler, consumed: int, *,
         pre_decay: bool = False, keep_last: int | None = None, protect: tuple[int, ...] = ()) -> Path:
    """Collective: every rank calls it. Writes iter_<step>/ then updates `latest` on rank 0."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    d = step_dir(root, step)
    rank = torch.distributed.get_rank()
    if rank == 0:
        if d.exists():  # a previous attempt died mid-save: redo it
            shutil.rmtree(d)
        d.mkdir(parents=True)
    torch.distributed.barrier()
    sd = _state_dict(unwrap(model), optimizer, scheduler, step, consumed, is_loading=False)
    dist_checkpointing.save(sd, str(d))
    torch.distributed.barrier()
    if rank == 0:
        _write_marker(root / "latest", f"{step}\n")
        if pre_decay:
            _write_marker(root / "pre_decay", f"{step}\n")
        if keep_last:
            keep = {step, *protect}
            pd = pre_decay_step(root)
            if pd is not None:
                keep.add(pd)
            olds = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
            for s in olds[:-keep_last]:
                if s not in keep:
                    shutil.rmtree(step_dir(root, s), ignore_errors=True)
    torch.distributed.barrier()
    return d


def load(path: Path, model, optimizer=None, scheduler=None) -> dict:
    """Collective. Loads model (+ optimizer, scheduler when given). Returns {step, consumed_samples}."""
    from megatron.core import dist_checkpointing

    gpt = unwrap(model)
    template = _state_dict(gpt, optimizer, None, 0, 0, is_loading=True)
    state = dist_checkpointing.load(template, str(path))
    gpt.load_state_dict(state["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        common = dist_checkpointing.load_common_state_dict(str(path))
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return {"step": int(state["step"]), "consumed_samples": int(state["consumed_samples"])}
