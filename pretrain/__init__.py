"""Pretraining half of the experiment (PAPER.md section 5) on Megatron-Core.

    mix       corpus -> Megatron indexed datasets, selected subsets by copying token ranges,
              blend.json with prefixes/weights per arm              (pretrain.mix, .indexed)
    pretrain  per arm: LLaMA-shaped GPTModel, WSD schedule, distributed checkpoints, HF export,
              metrics and figures                                    (pretrain.train, .model,
              .schedule, .checkpoint, .export, .figures; processes: pretrain.launch)

The same code trains a tiny model on a CPU (through `cpu_compat`, inert when CUDA exists) and a
7B model across Slurm nodes (slurm/pretrain.sbatch). `python -m bench.pretrain` measures
tokens/s and MFU of the real training path.
"""
