"""The `eval` config group as typed dataclasses (conf/eval/{paper,core,smoke}.yaml).

Defaults are the paper's (PAPER.md section 6): lm-evaluation-harness, 8,192-token window,
5-shot unless stated, HumanEval 0-shot pass@1 from n=20 samples at temperature 0.2, top-p 0.95,
1,024 new tokens. Choices the paper leaves open are keys here with their reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attninf.config import check
from eval.tasks import HumanEvalSettings

HEAD_SETS = ("none", "retrieval", "random")
BACKENDS = ("hf", "vllm", "auto")


@dataclass
class VLLMSettings:
    """lm-eval's `vllm` model for the generation tasks (eval.backend=vllm | auto on a GPU).

    Why generation only: a generation request decodes up to hundreds of tokens one at a time
    (GSM8K 256, HumanEval 1,024 x n=20 samples per problem); HF `generate` decodes a padded batch
    in lockstep, so short answers wait for the longest and the KV cache is sized for the worst
    case, while vLLM's continuous batching and paged KV cache keep the GPU full, the bulk of an
    eval's wall time at 7B. Loglikelihood tasks (MMLU, the *_bpb twins) are one forward pass per
    request, where vLLM gains little, and stay on HF, lm-eval's reference implementation (its
    README treats HF as the reference and vLLM output as possibly differing slightly).
    """

    # requested eval.tasks that go through vLLM (the paper's generation tasks lm-eval has)
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "humaneval", "minerva_math",
                                                      "bbh_fewshot", "drop", "triviaqa"])
    dtype: str = "auto"                 # auto = eval.dtype's GPU choice (bfloat16) | bfloat16 | float16 | float32
    tensor_parallel_size: int = 1       # GPUs per model copy (a 7B model fits one 80 GB GPU)
    gpu_memory_utilization: float = 0.9 # share of the GPU vLLM may take (weights + paged KV cache)
    max_model_len: int | None = None    # null = eval.max_length, capped at the model's positions
    max_num_seqs: int = 256             # sequences decoded at once (vLLM's default)
    enforce_eager: bool = False         # true = no CUDA graphs (less memory, slower decode)

    def validate(self) -> None:
        check(bool(self.tasks), "tasks", "must name at least one generation task")
        check(self.dtype in ("auto", "bfloat16", "float16", "float32"), "dtype",
              "must be auto, bfloat16, float16 or float32")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        check(self.max_model_len is None or self.max_model_len >= 128, "max_model_len",
              "must be >= 128 (or null for eval.max_length)")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")


@dataclass
class OfflineFewshotSettings:
    """How the offline benchmark data carves few-shot pools out of test files (eval/benchmarks.py)."""

    mmlu_dev_per_subject: int = 5
    gsm8k_fewshot_pool: int = 100

    def validate(self) -> None:
        check(self.mmlu_dev_per_subject >= 1, "mmlu_dev_per_subject", "must be >= 1")
        check(self.gsm8k_fewshot_pool >= 1, "gsm8k_fewshot_pool", "must be >= 1")


@dataclass
class MaskedEvalSettings:
    """Table 6 through lm-eval: the selector itself with head sets masked."""

    # none = unmasked; retrieval = the `heads` group's set (detected retrieval heads by
    # default); random = as many random non-retrieval heads (seed heads.seed). The masking mode
    # (uniform, the paper's; or zero) is heads.mode, shared with scoring.
    head_sets: list[str] = field(default_factory=lambda: list(HEAD_SETS))
    # Table 6 reports GSM8K, BBH, MMLU, MMLU-Pro and HellaSwag, not Table 1's suite; null = eval.tasks.
    tasks: list[str] | None = None
    limit: float | None = None          # items per subtask for the masked runs; null = eval.limit

    def validate(self) -> None:
        check(bool(self.head_sets), "head_sets", "must not be empty")
        check(self.tasks is None or bool(self.tasks), "tasks", "must be null or name a task")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 (or null)")
        bad = [h for h in self.head_sets if h not in HEAD_SETS]
        check(not bad, "head_sets", f"unknown {bad}; known: {list(HEAD_SETS)}")


@dataclass
class EvalConfig:
    # How vLLM runs, not what it computes: changing them keeps the stage's key.
    OPERATIONAL = ("vllm.gpu_memory_utilization", "vllm.max_num_seqs", "vllm.enforce_eager")
    # HF model dir or hub id; when set, eval runs once on it (into run_dir/eval/); otherwise once
    # per arm on that arm's pretraining export (pretrain/<arm>/hf).
    model: str | None = None
    # Also evaluate each arm's pre-decay export (pretrain/<arm>/hf_pre_decay, the paper's
    # "before decay" table) into eval/<arm>/pre_decay/; needs pretrain.export_pre_decay=true.
    pre_decay: bool = False
    suite: str = "core"                 # label only (paper | core | smoke)
    # *_bpb: the gold answer's bits per byte (eval/tasks/bpb.py), the metrics that move at small scale
    tasks: list[str] = field(default_factory=lambda: ["mmlu", "gsm8k", "humaneval",
                                                      "mmlu_bpb", "gsm8k_bpb", "humaneval_bpb"])
    # Shots by task or group name (applies to every subtask); the rest get default_fewshot
    # (null = the lm-eval task's own default). Paper: 5-shot, MATH 4, DROP and BBH 3, HumanEval 0.
    num_fewshot: dict[str, int] = field(default_factory=lambda: {"humaneval": 0})
    default_fewshot: int | None = 5
    limit: float | None = None          # items per subtask (<1: fraction); null = all
    # Per-task limits by requested task name, e.g. {gsm8k_bpb: 20}: cheap loglikelihood tasks can
    # score more items than the generation tasks beside them; the rest get `limit`.
    task_limit: dict[str, float] = field(default_factory=dict)
    batch_size: int = 8
    max_batch_size: int = 64
    device: str = "auto"                # auto = cuda when available, else cpu
    dtype: str = "auto"                 # auto (bf16 on GPU, on CPU the faster here: selection.precision) | float32 | bfloat16 | float16
    max_length: int = 8192              # the paper's evaluation window; capped at the model's
    # Offline benchmark data (eval/benchmarks.py): auto = use it when the Hub is unreachable or
    # HF_HUB_OFFLINE=1; off = always the Hub; always = always the offline data; any other value =
    # the offline data at that path.
    offline_data: str = "auto"
    offline_data_dir: str | None = None  # where it lives (default: ~/.cache/attninf/benchmarks)
    offline_fewshot: OfflineFewshotSettings = field(default_factory=OfflineFewshotSettings)
    strict_offline: bool = False        # offline: error (instead of skip) for tasks without data
    allow_code_eval: bool = False       # explicit confirmation that HumanEval may execute code
    humaneval: HumanEvalSettings = field(default_factory=HumanEvalSettings)
    use_cache: bool = True              # lm-eval request cache: an interrupted run resumes
    log_samples: bool = True
    bootstrap_iters: int = 100000       # stderr of non-mean metrics; mean metrics are analytic
    apply_chat_template: bool = False   # base models, as in the paper
    seed: int = 1234                    # lm-eval's seeds (python/numpy/torch/few-shot sampler)
    masked: MaskedEvalSettings = field(default_factory=MaskedEvalSettings)
    # Who runs the generation tasks (eval.vllm.tasks): hf (transformers, everywhere) | vllm
    # (lm-eval's vLLM model: needs CUDA and the vllm package; refused in one line otherwise) |
    # auto (vllm when both are present, else hf). Loglikelihood tasks always run on HF.
    backend: str = "hf"
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def validate(self) -> None:
        check(self.backend in BACKENDS, "backend", f"'{self.backend}' is not one of hf | vllm | auto")
        check(not (self.pre_decay and self.model), "pre_decay",
              "evaluates the arms' pre-decay exports; unset eval.model (or set eval.pre_decay=false)")
        check(bool(self.tasks), "tasks", "must name at least one lm-eval task or group")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 (or null for all)")
        check(all(v is None or v > 0 for v in self.task_limit.values()), "task_limit",
              "limits must be > 0 (or null for all)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
              "must be auto, float32, bfloat16 or float16")
        check(self.max_length >= 128, "max_length", "must be >= 128")
        check(all(v >= 0 for v in self.num_fewshot.values()), "num_fewshot", "shots must be >= 0")
        check(self.default_fewshot is None or self.default_fewshot >= 0, "default_fewshot",
              "must be >= 0 or null")
        check(bool(self.offline_data), "offline_data", "auto | off | always | a directory")

    @property
    def lm_limit(self) -> int | float | None:
        return self.limit_for(None)

    def limit_for(self, task: str | None) -> int | float | None:
        """lm-eval's `limit` for a requested task: eval.task_limit[task], else eval.limit."""
        lim = self.task_limit.get(task, self.limit) if task is not None else self.limit
        if lim is None:
            return None
        return int(lim) if lim >= 1 else float(lim)
