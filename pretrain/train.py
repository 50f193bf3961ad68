"""Stage `pretrain` (one per arm): Megatron-Core training of the LLaMA-shaped model under WSD.

Three parts, one per lifecycle step (attninf/lifecycle.py; the stage is a `ranks` shape):

- `shape(cfg)`: one job of `launch.nodes x launch.tasks_per_node` ranks; the executors start
  `python -m pretrain.launch <stage folder>` in each (srun on Slurm, local processes here).
  Megatron's CPU compatibility layer is process-global and dist_checkpointing spawns helper
  processes, so training never runs in the executor's own process.
- `train(...)`, the loop, inside each rank: Megatron's GPTModel, DDP, optimizer,
  OptimizerParamScheduler (WSD), forward-backward schedule (gradient accumulation and pipeline
  parallelism), blended GPT datasets, distributed checkpoints. On SIGUSR1 (Slurm's time-limit
  warning) or SIGTERM (preemption, requeue) every rank agrees on the step to stop at, saves a
  checkpoint there and exits for a requeue.
- `finish(ctx)`, once every rank exited 0: HF export of the final (and pre-decay) checkpoint,
  figures and the summary.

Data order is a pure function of (seed, step): global batch s is samples [s*GBS, (s+1)*GBS) of the
blended dataset, sliced by data-parallel rank. Together with no dropout this makes a resumed run
reproduce the uninterrupted one step for step.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from attninf.config import build, check
from pretrain.model import ModelShape
from pretrain.schedule import WSDConfig

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    lr: float = 4e-4  # paper: peak LR 4e-4 for the 7B
    weight_decay: float = 0.1  # unstated; LLaMA-2's value
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # GPU only: Megatron's distributed optimizer (ZeRO-1). Its resume is broken on CPU (OFFLINE.md).
    use_distributed_optimizer: bool = False

    def validate(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1",
              "betas must be in [0, 1)")
        check(self.adam_eps > 0, "adam_eps", "must be > 0")
        check(self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 = no clipping)")


@dataclass
class LaunchConfig:
    """The ranks' layout: one job of nodes x tasks_per_node processes (one per GPU on a GPU node).

    The executors start exactly these ranks (attninf/stages.py `ranks` shape): locally as
    processes on this machine, on Slurm as one srun step. Operational: not part of the stage key.
    """

    nodes: int = 1
    tasks_per_node: int = 1
    master_port: int | None = None  # local ranks: null = a free port (Slurm: 20000 + job id % 20000)

    def validate(self) -> None:
        check(self.nodes >= 1, "nodes", "must be >= 1")
        check(self.tasks_per_node >= 1, "tasks_per_node", "must be >= 1")

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class GPUConfig:
    """Megatron-Core's GPU performance settings (`pretrain.gpu`); the field's choices in the paper
    presets, off by default because the CPU path (gloo, local spec) has none of them.

    Each reaches Megatron's own config: TransformerConfig (sequence_parallel, fusions,
    attention_backend, recompute), DistributedDataParallelConfig (overlap_grad_reduce,
    overlap_param_gather) and OptimizerConfig (overlap_param_gather).
    """

    sequence_parallel: bool = False  # with TP > 1: layer norms and dropout split over the sequence
    overlap_grad_reduce: bool = False  # gradient all-reduce / reduce-scatter overlapped with backward
    overlap_param_gather: bool = False  # distributed optimizer: parameter all-gather overlapped with forward
    bias_activation_fusion: bool = False  # fused SwiGLU (bias_swiglu kernel)
    apply_rope_fusion: bool = False  # fused rotary embedding
    bias_dropout_fusion: bool = False
    masked_softmax_fusion: bool = False
    gradient_accumulation_fusion: bool = False  # needs TE or APEX's fused weight-gradient kernels
    attention_backend: str = "auto"  # auto | flash | fused | unfused | local (Megatron's AttnBackend)
    recompute: str = "none"  # none | selective (attention core) | full (every layer's activations)

    def validate(self) -> None:
        check(self.attention_backend in ("auto", "flash", "fused", "unfused", "local"), "attention_backend",
              f"'{self.attention_backend}' is not one of auto | flash | fused | unfused | local")
        check(self.recompute in ("none", "selective", "full"), "recompute",
              f"'{self.recompute}' is not one of none | selective | full")


@dataclass
class PretrainConfig:
    model: ModelShape = field(default_factory=ModelShape)
    schedule: WSDConfig = field(default_factory=WSDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    gpu: GPUConfig = field(default_factory=GPUConfig)
    # On a GPU the TransformerEngine layer spec is required (the local spec keeps the full
    # attention matrix: 11% MFU on one H100, out of memory at sequence 8192); true allows it.
    allow_local_spec: bool = False
    # Budget: train_iters, or train_tokens / (global_batch_size * seq_length) when iters is null.
    train_iters: int | None = 60
    train_tokens: int | None = None
    global_batch_size: int = 8  # sequences per optimizer step (paper: 1024 x 8192 tokens)
    micro_batch_size: int = 4  # sequences per forward; accumulation = GBS / (MBS * DP)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # null = world size / (TP x PP); set, nodes x tasks_per_node must equal TP x PP x DP exactly
    data_parallel: int | None = None
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 1234
    # Train every arm once per seed (arm `<arm>@seed<S>`, its own folders; attninf/arms.py).
    seeds: list[int] | None = None
    log_interval: int = 1
    eval_interval: int = 20  # steps between validation-loss passes (and at the end); 0 = never
    eval_samples: int = 8  # held-out sequences per domain per pass
    save_interval: int = 0  # steps between checkpoints; 0 = only pre-decay and final
    keep_last: int | None = 2  # periodic checkpoints kept (pre-decay and final always kept)
    save_pre_decay: bool = True  # checkpoint at the end of the WSD stable phase
    # Stop this process after N steps of this run (Slurm time limits; tests simulate a kill).
    exit_after_steps: int | None = None
    save_on_exit: bool = True
    export_hf: bool = True
    export_pre_decay: bool = True  # also export the pre-decay checkpoint (paper's "before decay")
    peak_tflops: float = 989.0  # per-GPU dense bf16 peak for MFU (H100 SXM); H200 same
    data_cache: str | None = None  # Megatron dataset index cache; null = <stage>/data_cache

    # How a run proceeds, never what it computes: left out of the stage key (attninf/typed.py), so
    # changing one mid-run resumes from the checkpoint instead of starting over.
    OPERATIONAL = ("launch", "save_interval", "keep_last", "log_interval", "eval_interval",
                   "exit_after_steps", "save_on_exit", "data_cache", "peak_tflops")

    def validate(self) -> None:  # model, schedule, optim, launch, gpu: build() validates them first
        check(self.train_iters is not None or self.train_tokens is not None, "train_iters",
              "set train_iters or train_tokens")
        check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
              f"{self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        check(self.precision in ("auto", "bf16", "fp32"), "precision", "auto | bf16 | fp32")
        check(self.tensor_parallel >= 1 and self.pipeline_parallel >= 1, "tensor_parallel",
              "parallel sizes must be >= 1")
        check(self.model.num_layers % self.pipeline_parallel == 0, "pipeline_parallel",
              f"model.num_layers={self.model.num_layers} is not divisible by it")
        tp, pp, world = self.tensor_parallel, self.pipeline_parallel, self.launch.world
        where = f"launch.nodes x launch.tasks_per_node = {self.launch.nodes} x {self.launch.tasks_per_node} = {world}"
        if self.data_parallel is not None:
            check(self.data_parallel >= 1, "data_parallel", "must be >= 1")
            check(world == tp * pp * self.data_parallel, "launch",
                  f"{where} ranks, but tensor_parallel x pipeline_parallel x data_parallel = "
                  f"{tp} x {pp} x {self.data_parallel} = {tp * pp * self.data_parallel}")
        else:
            check(world % (tp * pp) == 0, "launch", f"{where} ranks is not a multiple of "
                  f"tensor_parallel x pipeline_parallel = {tp * pp}")
        dp = self.dp()
        check(self.global_batch_size % (self.micro_batch_size * dp) == 0, "global_batch_size",
              f"{self.global_batch_size} is not a multiple of micro_batch_size x data-parallel size = "
              f"{self.micro_batch_size} x {dp}")
        check(not self.gpu.sequence_parallel or tp > 1, "gpu.sequence_parallel",
              "needs tensor_parallel > 1 (it splits the tensor-parallel region over the sequence)")
        check(not self.gpu.overlap_param_gather or self.optim.use_distributed_optimizer,
              "gpu.overlap_param_gather", "needs optim.use_distributed_optimizer=true")

    def dp(self) -> int:
        return self.data_parallel or max(self.launch.world // (self.tensor_parallel * self.pipeline_parallel), 1)

    def total_steps(self) -> int:
        if self.train_iters is not None:
            return int(self.train_iters)
        return max(1, int(self.train_tokens // (self.global_batch_size * self.model.seq_length)))


def load_config(node: Any) -> PretrainConfig:
    return build(PretrainConfig, node, "pretrain")


# ==================================================================================================
# The training loop (inside a training process).
# ==================================================================================================


class _Tok:
    """The minimum Megatron's GPT datasets need from a tokenizer."""

    def __init__(self, vocab_size: int, eod: int, name: str):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = eod
        self.unique_identifiers = {"class": "HFTokenizer", "name": name, "vocab": vocab_size}


def _datasets(cfg: PretrainConfig, blend: dict, mix_dir: Path, arm: str, total: int, cache: Path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    a = blend["arms"][arm]
    tok = _Tok(blend["tokenizer"]["vocab_size"], blend["tokenizer"]["eod"], blend["tokenizer"]["name"])
    absp = lambda p: str((mix_dir / p).resolve())  # noqa: E731

    def config(per_split):
        return GPTDatasetConfig(random_seed=cfg.seed, sequence_length=cfg.model.seq_length,
                                blend_per_split=per_split, tokenizer=tok, path_to_cache=str(cache),
                                reset_position_ids=False, reset_attention_mask=False,
                                eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True)

    train_blend = ([absp(p) for p in a["prefixes"]], [float(w) for w in a["weights"]])
    if len(train_blend[0]) == 1:
        train_blend = (train_blend[0], None)
    n_train = total * cfg.global_batch_size
    train = BlendedMegatronDatasetBuilder(GPTDataset, [n_train, 0, 0], lambda: True,
                                          config([train_blend, None, None])).build()[0]
    valid = {}
    if cfg.eval_interval and cfg.eval_samples:
        for dom, v in sorted(blend.get("valid", {}).items()):
            ds = BlendedMegatronDatasetBuilder(GPTDataset, [0, cfg.eval_samples, 0], lambda: True,
                                               config([None, ([absp(v["prefix"])], None), None])).build()[1]
            valid[dom] = ds
    return train, valid


def _batch(ds, indices, pad_to: int | None = None) -> dict:
    """Stack samples into one microbatch; `pad_to` fills it up with loss-masked copies.

    Why padding: Megatron's pipeline schedule posts every activation receive with the fixed shape
    (seq_length, micro_batch_size, hidden); a short last microbatch (a validation split whose
    length is not a multiple of micro_batch_size) makes the sent and the posted sizes differ,
    which over gloo (PP > 1) hung or failed in the loss. A padded row has loss_mask 0, so it
    changes no loss: validation is the token-weighted mean over real rows only.
    """
    import torch

    items = [ds[int(i)] for i in indices]
    b = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    short = (pad_to or 0) - len(items)
    if short > 0:
        b = {k: torch.cat([v, v[-1:].expand(short, *v.shape[1:])]) for k, v in b.items()}
        b["loss_mask"][len(items):] = 0
    return b


def _forward_step(data_iterator, model):
    from functools import partial

    import torch

    b = next(data_iterator)
    if torch.cuda.is_available():
        b = {k: v.cuda(non_blocking=True) for k, v in b.items()}
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    return out, partial(_loss_func, b["loss_mask"].float())


def _loss_func(mask, output):
    losses = output.float()
    total = (losses * mask).sum()
    loss = total / mask.sum().clamp(min=1)
    # clone: Megatron's schedule divides the returned loss by the number of microbatches in place
    return loss, {"lm loss": loss.detach().clone(), "lm sum": total.detach().clone(),
                  "lm tokens": mask.sum().detach().clone()}


def _reduce_last_stage(num: float, den: float) -> float:
    """sum(num) / sum(den) over the last-pipeline-stage ranks (float64), available on every rank.

    Training passes (sum of its microbatch losses, their count): the mean over every microbatch
    of the global batch, the same number whatever the data-parallel split (equal microbatches).
    TP ranks of the last stage hold identical values and count once each, so the ratio is unchanged.
    """
    import torch
    from megatron.core import parallel_state as ps

    last = ps.is_pipeline_last_stage()
    # NCCL reduces only CUDA tensors; gloo (CPU) only CPU ones.
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([num if last else 0.0, den if last else 0.0], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _reference_logits(model, shape, vocab: int, tp: int) -> "Any":
    """Logits of the trained model in its own parallel layout (TP shards gathered), for the export check.

    Collective over the model-parallel ranks (PP = 1 only). The export reloads the checkpoint into one
    process and compares its HF model against these, which checks the resharding end to end.
    """
    import torch
    from megatron.core import parallel_state as ps

    from pretrain.checkpoint import unwrap
    from pretrain.model import verify_tokens

    tokens = verify_tokens(vocab, shape.seq_length)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    gpt = unwrap(model)
    dev = next(gpt.parameters()).device
    with torch.no_grad():
        local = gpt(tokens.to(dev), pos.to(dev), None).float().contiguous()
        if tp > 1:
            parts = [torch.empty_like(local) for _ in range(tp)]
            torch.distributed.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
            local = torch.cat(parts, dim=-1)
    return {"tokens": tokens, "logits": local.cpu()}


@dataclass
class _Parallel:
    """This process's place in the parallel layout (fixed for the whole run)."""

    rank: int
    world: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    n_micro: int  # microbatches per global batch on this data-parallel rank (gradient accumulation)


def _init_parallel(cfg: PretrainConfig) -> _Parallel:
    """Split the world into TP x PP x DP and check the batch divides over it.

    Both checks fail before any model is built: a world size or batch that does not divide would
    otherwise surface as a hang in a collective or a silently different effective batch.
    """
    import torch
    from megatron.core import parallel_state as ps

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    if world % (tp * pp):
        raise ValueError(f"pretrain: world size {world} is not divisible by TP*PP = {tp * pp}")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    mbs, gbs = cfg.micro_batch_size, cfg.global_batch_size
    if gbs % (mbs * dp):
        raise ValueError(f"pretrain: global_batch_size {gbs} is not a multiple of micro_batch_size x "
                         f"data-parallel size = {mbs} x {dp}")
    return _Parallel(rank, world, tp, pp, dp, dp_rank, gbs // (mbs * dp))


def ddp_config(cfg: PretrainConfig, on_gpu: bool):
    """Megatron's DDP config: fp32 gradient reduction, overlap and the distributed optimizer as set
    (the distributed optimizer and its overlaps only on GPU: its resume is broken on CPU)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    dist = cfg.optim.use_distributed_optimizer and on_gpu
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.gpu.overlap_grad_reduce,
        overlap_param_gather=cfg.gpu.overlap_param_gather and dist, use_distributed_optimizer=dist)


def optimizer_config(cfg: PretrainConfig, bf16: bool, on_gpu: bool, min_lr: float):
    """Megatron's OptimizerConfig: Adam with this run's hyperparameters and layout settings."""
    import torch
    from megatron.core.optimizer import OptimizerConfig

    dist = cfg.optim.use_distributed_optimizer and on_gpu
    return OptimizerConfig(
        optimizer="adam", lr=cfg.optim.lr, min_lr=min_lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2, adam_eps=cfg.optim.adam_eps,
        clip_grad=cfg.optim.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=dist, overlap_param_gather=cfg.gpu.overlap_param_gather and dist)


def _build_model(cfg: PretrainConfig, blend: dict, par: _Parallel, bf16: bool, on_gpu: bool):
    """GPTModel (this rank's TP/PP shard) wrapped in DDP; returns (ddp, padded vocab size).

    Called right after seeding: the initial weights are the first random draws of the run. The
    vocabulary is padded so it splits evenly over TP ranks (and is a multiple of the configured
    divisor), as Megatron's own training does.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    from pretrain.model import build_gpt, padded_vocab_size

    vocab = cfg.model.vocab_size or blend["tokenizer"]["vocab_size"]
    vocab = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, par.tp)
    model = build_gpt(cfg.model, vocab, tp=par.tp, pp=par.pp, bf16=bf16,
                      pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                      gpu=cfg.gpu, allow_local_spec=cfg.allow_local_spec)
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    mcfg = model.config
    ddp = DistributedDataParallel(mcfg, ddp_config(cfg, on_gpu), model)
    mcfg.finalize_model_grads_func = finalize_model_grads
    mcfg.no_sync_func = ddp.no_sync
    if ddp.ddp_config.overlap_grad_reduce:  # as Megatron's training loop wires the overlap
        mcfg.grad_sync_func = ddp.start_grad_sync
    if ddp.ddp_config.overlap_param_gather:
        mcfg.param_sync_func = ddp.start_param_sync
    return ddp, vocab


def _build_optimizer(cfg: PretrainConfig, ddp, total: int, bf16: bool, on_gpu: bool):
    """Adam and Megatron's OptimizerParamScheduler driven by the WSD schedule; returns (opt, sched).

    The scheduler takes its shape from the config, never from a checkpoint, so a run resumed with
    a different decay branch (pre-decay export, then another decay) follows the config.
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from pretrain import schedule

    kw = schedule.megatron_kwargs(cfg.schedule, total, cfg.optim.lr)
    opt = get_megatron_optimizer(optimizer_config(cfg, bf16, on_gpu, kw["min_lr"]), [ddp])
    sched = OptimizerParamScheduler(opt, start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay,
                                    wd_incr_steps=total, wd_incr_style="constant",
                                    # the config, not the checkpoint, defines the schedule (decay branches)
                                    use_checkpoint_opt_param_scheduler=False,
                                    override_opt_param_scheduler=True, **kw)
    return opt, sched


def _resume(out: Path, ddp, opt, sched, rank: int) -> int:
    """Load the latest checkpoint under `out/ckpt` if any; return the step to start from.

    Rows of metrics.jsonl past that step are dropped (an interrupted run may have logged further
    than it saved), so a resumed run's log equals the uninterrupted one's. A fresh run also drops an
    earlier run's export reference, which would no longer match the weights.
    """
    from pretrain import checkpoint

    ckpt_root = out / "ckpt"
    start = 0
    resume = checkpoint.latest_step(ckpt_root)
    if resume is not None:
        st = checkpoint.load(checkpoint.step_dir(ckpt_root, resume), ddp, opt, sched)
        start = st["step"]
        if rank == 0:
            log.info("resumed from %s (step %d)", checkpoint.step_dir(ckpt_root, start), start)
    if rank == 0:
        _truncate_metrics(out / "metrics.jsonl", start)
        if resume is None:  # a fresh run: an earlier run's export reference is stale
            (out / "reference_logits.pt").unlink(missing_ok=True)
    return start


@dataclass
class _Loop:
    """What every step of the loop needs: the model, its optimizer, the layout and the log."""

    cfg: PretrainConfig
    ddp: Any
    opt: Any
    sched: Any
    par: _Parallel
    fwd_bwd: Callable
    metrics_path: Path
    log_fn: Callable[[dict, int], None] | None

    def log_row(self, row: dict) -> None:
        """Rank 0 appends the row to metrics.jsonl and hands it to the tracker (W&B)."""
        if self.par.rank != 0:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.log_fn is not None:
            self.log_fn({k: v for k, v in row.items() if k != "step"}, row["step"])


def _train_step(loop: _Loop, train_ds, step: int, on_gpu: bool) -> dict:
    """One optimizer step on global batch `step`; returns its loss, lr and timings (unlogged).

    The batch is a pure function of the step (samples [step*GBS, (step+1)*GBS), this DP rank's
    slice), which is what makes a resumed run equal the uninterrupted one. The lr reported is the
    one the step used (read before the scheduler advances).
    """
    import torch

    cfg, par = loop.cfg, loop.par
    mbs, gbs, seq = cfg.micro_batch_size, cfg.global_batch_size, cfg.model.seq_length
    t0 = time.perf_counter()
    base = step * gbs + par.dp_rank * mbs * par.n_micro
    mb = [_batch(train_ds, range(base + k * mbs, base + (k + 1) * mbs)) for k in range(par.n_micro)]
    t_data = time.perf_counter() - t0
    loop.ddp.zero_grad_buffer()
    loop.opt.zero_grad()
    lr = loop.opt.param_groups[0]["lr"]
    losses = loop.fwd_bwd(forward_step_func=_forward_step, data_iterator=iter(mb), model=[loop.ddp],
                          num_microbatches=par.n_micro, seq_length=seq, micro_batch_size=mbs, forward_only=False)
    t_fb = time.perf_counter() - t0 - t_data
    ok, grad_norm, _ = loop.opt.step()
    loop.sched.step(1)
    # the unscaled per-microbatch losses (the schedule divided only the returned tensor)
    loss = _reduce_last_stage(sum(float(x["lm loss"]) for x in losses), float(len(losses)))
    if on_gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "ok": ok, "dt": dt, "t_data": t_data, "t_fb": t_fb}


def _log_step(loop: _Loop, step: int, total: int, s: dict, fpt: float, on_gpu: bool) -> None:
    """Write the metrics row of a finished step (every log_interval steps and at the last)."""
    cfg, par = loop.cfg, loop.par
    gbs, seq = cfg.global_batch_size, cfg.model.seq_length
    tok_s = gbs * seq / s["dt"]
    grad_norm = s["grad_norm"]
    row = {"step": step, "loss": s["loss"], "lr": s["lr"],
           "grad_norm": float(grad_norm) if grad_norm is not None else None,
           "tokens_per_s": tok_s, "step_time_s": s["dt"], "data_s": s["t_data"], "fwd_bwd_s": s["t_fb"],
           "consumed_tokens": step * gbs * seq, "update_ok": bool(s["ok"])}
    if on_gpu:
        row["mfu"] = fpt * tok_s / (par.world * cfg.peak_tflops * 1e12)
    loop.log_row(row)
    if par.rank == 0:
        log.info("step %d/%d loss %.4f lr %.3e gnorm %.3f %.0f tok/s", step, total, s["loss"], s["lr"],
                 row["grad_norm"] or float("nan"), tok_s)


def _evaluate(loop: _Loop, valid_ds: dict, step: int) -> dict:
    """Validation loss per domain (token-weighted mean over eval_samples rows), logged as val/*.

    Every rank evaluates the same rows, so the mean is replicated over DP and TP; the last
    pipeline stage holds it and `_reduce_last_stage` hands it to every rank.
    """
    import torch

    cfg, ddp = loop.cfg, loop.ddp
    mbs, seq = cfg.micro_batch_size, cfg.model.seq_length
    ddp.eval()
    res = {}
    for dom, ds in valid_ds.items():
        n = min(len(ds), cfg.eval_samples)  # a GPTDataset holds whole epochs: >= eval_samples
        if n == 0:
            continue
        mb = [_batch(ds, range(i, min(i + mbs, n)), pad_to=mbs) for i in range(0, n, mbs)]
        with torch.no_grad():
            losses = loop.fwd_bwd(forward_step_func=_forward_step, data_iterator=iter(mb), model=[ddp],
                                  num_microbatches=len(mb), seq_length=seq, micro_batch_size=mbs,
                                  forward_only=True) if mb else []
        # every rank evaluates the same rows: the token-weighted mean, replicated over DP/TP
        v = (float(sum(float(x["lm sum"]) for x in losses) / sum(float(x["lm tokens"]) for x in losses))
             if losses else 0.0)
        res[f"val/{dom}"] = _reduce_last_stage(v, 1.0)
    ddp.train()
    if res:
        res["val/mean"] = sum(res.values()) / len(res)
        loop.log_row({"step": step, **res})
    return res


def _save_if_due(loop: _Loop, out: Path, step: int, total: int, steps_this_run: int, phases) -> bool:
    """Checkpoint where the run needs one; return True when this run should stop here.

    Saved: the last stable-phase step (the pre-decay checkpoint the paper's before-decay numbers
    come from), every save_interval steps, the final step, and, with save_on_exit, the step at
    which exit_after_steps stops the run (so a re-run resumes from it).
    """
    from pretrain import checkpoint

    cfg = loop.cfg
    is_pre_decay = cfg.save_pre_decay and step == phases.stable_end and phases.decay > 0
    periodic = cfg.save_interval and step % cfg.save_interval == 0
    stopping = cfg.exit_after_steps is not None and steps_this_run >= cfg.exit_after_steps and step < total
    if is_pre_decay or periodic or step == total or (stopping and cfg.save_on_exit):
        checkpoint.save(out / "ckpt", step, loop.ddp, loop.opt, loop.sched, step * cfg.global_batch_size,
                        pre_decay=is_pre_decay, keep_last=cfg.keep_last, protect=(total,))
    if stopping and loop.par.rank == 0:
        log.info("exit_after_steps=%d reached at step %d; a re-run resumes", cfg.exit_after_steps, step)
    return bool(stopping)


def _stop_agreed(on_gpu: bool) -> bool:
    """Did any rank get a stop signal? One all-reduce (MAX) per step, so every rank stops at the
    same step: the checkpoint save is collective and must be entered by all of them."""
    import torch

    from attninf.stop import requested as stop_requested

    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    t = torch.tensor([1 if stop_requested() else 0], dtype=torch.int32, device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _save_for_requeue(loop: _Loop, out: Path, step: int, phases) -> None:
    """Checkpoint at `step` unless this step was just saved; the requeued job resumes from it."""
    from pretrain import checkpoint

    cfg = loop.cfg
    if checkpoint.latest_step(out / "ckpt") != step:
        checkpoint.save(out / "ckpt", step, loop.ddp, loop.opt, loop.sched, step * cfg.global_batch_size,
                        keep_last=cfg.keep_last, protect=(cfg.total_steps(),))
    if loop.par.rank == 0:
        log.info("stop requested: checkpoint at step %d saved; exiting for a requeue", step)


def train(cfg: PretrainConfig, blend: dict, mix_dir: Path, arm: str, out: Path,
          log_fn: Callable[[dict, int], None] | None = None) -> dict:
    """Train (or resume) one arm. Called in every training process after init_process_group.

    Steps: parallel layout, seed, model, optimizer + WSD scheduler, datasets, resume, the loop
    (step, log, evaluate, checkpoint), then the export reference and the summary. The order of
    the first four fixes the random draws; it is the same on a fresh and a resumed run.
    """
    import torch
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    from pretrain import cpu_compat, schedule
    from pretrain.model import flops_per_token

    on_gpu = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    par = _init_parallel(cfg)
    cpu_compat.seed_all(cfg.seed)
    ddp, vocab = _build_model(cfg, blend, par, bf16, on_gpu)
    total = cfg.total_steps()
    opt, sched = _build_optimizer(cfg, ddp, total, bf16, on_gpu)
    phases = schedule.phases(cfg.schedule, total)

    cache = Path(cfg.data_cache) if cfg.data_cache else out / "data_cache"
    train_ds, valid_ds = _datasets(cfg, blend, mix_dir, arm, total, cache)
    start = _resume(out, ddp, opt, sched, par.rank)
    loop = _Loop(cfg, ddp, opt, sched, par, get_forward_backward_func(), out / "metrics.jsonl", log_fn)
    fpt = flops_per_token(cfg.model, vocab)

    ddp.train()
    steps_this_run = 0
    last_val: dict = {}
    t_run = time.perf_counter()
    tok_total = 0
    step = start
    while step < total:
        s = _train_step(loop, train_ds, step, on_gpu)
        step += 1
        steps_this_run += 1
        tok_total += cfg.global_batch_size * cfg.model.seq_length
        if step % cfg.log_interval == 0 or step == total:
            _log_step(loop, step, total, s, fpt, on_gpu)
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == total):
            last_val = _evaluate(loop, valid_ds, step)
        if _save_if_due(loop, out, step, total, steps_this_run, phases):
            break
        if step < total and _stop_agreed(on_gpu):
            _save_for_requeue(loop, out, step, phases)
            break
    wall = time.perf_counter() - t_run
    if step >= total and cfg.export_hf and par.world > 1 and par.pp == 1:
        ref = _reference_logits(ddp, cfg.model, cfg.model.vocab_size or blend["tokenizer"]["vocab_size"], par.tp)
        if par.rank == 0:
            torch.save({**ref, "step": step, "tp": par.tp, "dp": par.dp}, out / "reference_logits.pt")
    return _summary(ddp, par, phases, total, step, steps_this_run, wall, tok_total, last_val, bf16)


def _summary(ddp, par: _Parallel, phases, total: int, step: int, steps_this_run: int, wall: float,
             tok_total: int, last_val: dict, bf16: bool) -> dict:
    """What the process reports back (summary.json): progress, throughput, layout, WSD phases."""
    return {"steps": total, "finished": step >= total, "last_step": step,
            "steps_this_run": steps_this_run, "wall_s": wall,
            "tokens_per_s": tok_total / wall if wall > 0 else None,
            "val": last_val, "parameters": sum(p.numel() for p in ddp.parameters()) * par.tp * par.pp,
            "world": par.world, "dp": par.dp, "tp": par.tp, "pp": par.pp, "bf16": bf16,
            "n_microbatches": par.n_micro,
            "stable_end": phases.stable_end, "warmup_steps": phases.warmup, "decay_steps": phases.decay}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (an interrupted run may have gone further)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


# ==================================================================================================
# The stage edge (runner process).
# ==================================================================================================


def _env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def export_stage(stage_dir: Path) -> None:
    """The HF export in a process of its own. Slurm's time-limit warning reaches every process of
    the job step: the child starts with it blocked (attninf/stop.py) and finishes; the finish step
    it belongs to has no safe point left and runs to its end."""
    from attninf.stop import shielded

    log_path = stage_dir / "export.log"
    with open(log_path, "a") as fh:
        with shielded():
            proc = subprocess.Popen([sys.executable, "-m", "pretrain.export", str(stage_dir)], env=_env(),
                                    stdout=fh, stderr=subprocess.STDOUT)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"pretrain: export exited with code {rc}; see {log_path}")


def shape(cfg) -> "Any":
    """The stage's parallel shape: one job of launch.nodes x launch.tasks_per_node ranks.

    Building the config checks nodes x tasks = TP x PP x DP (PretrainConfig.validate), so a
    layout that cannot train is one config error before anything starts or is submitted.
    """
    from attninf.stages import Shape

    pc = load_config(cfg.get("pretrain"))
    return Shape("ranks", pc.launch.nodes, pc.launch.tasks_per_node)


def preflight(cfg, arm, resources) -> tuple[dict, list[str]]:
    """Memory per GPU of this layout against the GPU's, and the layer spec's library on a GPU job.

    `resources` is the job's request (attninf/submit.py Resources) or None on this machine: with
    no GPU requested nothing here applies (the CPU path uses the local spec by design).
    """
    import importlib.util

    from pretrain.model import memory_per_gpu

    pc = load_config(cfg.get("pretrain"))
    gpus = int(getattr(resources, "gpus_per_node", 0) or 0)
    facts: dict = {}
    problems: list[str] = []
    if not gpus:
        return facts, problems
    vocab = pc.model.vocab_size or int(((cfg.get("cost") or {}).get("train_vocab")) or 49152)
    gib = float(getattr(resources, "gpu_memory_gb", 0) or 0)
    te = importlib.util.find_spec("transformer_engine") is not None
    # flash/fused attention never holds the s x s matrix (TE's kernels; checked just below)
    mem = memory_per_gpu(pc, vocab, flash=pc.gpu.attention_backend in ("auto", "flash", "fused"))
    facts["memory_per_gpu"] = {**{k: round(v / 2**30, 2) for k, v in mem.items()}, "gpu_gib": gib}
    if gib and mem["total"] > gib * 2**30:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in mem.items() if k != "total")
        problems.append(f"pretrain: {mem['total'] / 2**30:.1f} GiB per GPU ({parts}) is over the GPU's "
                        f"{gib:g} GiB; raise tensor/pipeline parallelism, set pretrain.gpu.recompute, or "
                        "lower micro_batch_size")
    if not te and not pc.allow_local_spec:
        problems.append("pretrain: the TransformerEngine layer spec is required on GPUs and "
                        "transformer_engine is not importable here; install it "
                        "(pip install transformer-engine[pytorch]) or set pretrain.allow_local_spec=true")
    return facts, problems


def finish(ctx) -> dict[str, Any]:
    """After every rank exited 0: HF export of the final (and pre-decay) checkpoint, figure, summary."""
    from attninf.arms import base
    from attninf.context import Incomplete
    from attninf.manifest import write_json
    from pretrain import checkpoint, figures
    from pretrain.mix import effective_epochs

    cfg = ctx.config("pretrain") if ctx.typed is not None else load_config(ctx.section("pretrain"))
    arm = base(ctx.arm) or "baseline"  # a seeded arm trains on its arm's mixture
    mix_dir = ctx.upstream("mix")
    blend = json.loads((mix_dir / "blend.json").read_text())
    out: Path = ctx.out
    total = cfg.total_steps()
    ckpt_root = out / "ckpt"
    if checkpoint.latest_step(ckpt_root) != total:
        raise Incomplete(f"pretrain[{arm}]: the latest checkpoint is step {checkpoint.latest_step(ckpt_root)}, "
                         f"not {total}; re-run to resume from {ckpt_root}")
    if cfg.export_hf and not (out / "hf" / "config.json").exists():
        export_stage(out)
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val/mean" in r]
    figures.plot_run(out / "metrics.jsonl", out / "pretrain.png", cfg.schedule, total, cfg.optim.lr, title=arm)
    tokens = total * cfg.global_batch_size * cfg.model.seq_length
    a = blend["arms"][arm]
    epochs = effective_epochs(a["prefixes"], a["weights"], {k: v["tokens"] for k, v in blend["datasets"].items()},
                              tokens)
    steady = [r["tokens_per_s"] for r in train_rows[len(train_rows) // 4:]] or [0.0]
    summary = {"arm": arm, "steps": total, "tokens": tokens,
               "loss_first": train_rows[0]["loss"] if train_rows else None,
               "loss_last": train_rows[-1]["loss"] if train_rows else None,
               "val_last": {k: v for k, v in (val_rows[-1] if val_rows else {}).items() if k != "step"},
               "tokens_per_s_median": sorted(steady)[len(steady) // 2],
               "pre_decay_step": checkpoint.pre_decay_step(ckpt_root),
               "epochs_per_dataset": epochs,
               "hf": str(out / "hf") if cfg.export_hf else None, "figure": str(out / "pretrain.png")}
    # Per-step metrics went to W&B from the training process (one run per arm); not ctx.tracker,
    # which would open a second W&B run of the same name.
    write_json(out / "summary.json", summary)
    return summary
