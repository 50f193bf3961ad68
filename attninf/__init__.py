"""Runner for the AttentionInfluence harness: CLI, stage registry, run directories, manifests, tracking.

Kept thin on purpose: the method lives in `selection/`, training in `pretrain/`, evaluation in
`eval/`. Code here never touches tensors.
"""
