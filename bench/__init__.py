"""Benchmarks: numbers about the method's code paths, never part of a run.

- score.py     the fast scorer against the naive two-pass reference: tokens/s, agreement, GFLOP/s
- pretrain.py  tokens/s and MFU of the real Megatron training path on a synthetic mixture

Each prints one JSON object; run as `python -m bench.score`, `python -m bench.pretrain`.
"""
