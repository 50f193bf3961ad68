"""Evaluation and the reproduction report (PAPER.md section 6).

- run.py        stage `eval`: lm-evaluation-harness on an HF model (each arm's export, or any model)
- masked.py     stage `eval_masked`: the selector with retrieval / random heads masked (Table 6)
- report.py     stage `report`: ours beside the paper's Table 1 and Table 6, with provenance
- harness.py    one lm-eval run: plan tasks, load, evaluate, save (shared by the two eval stages)
- tasks/        task overrides: the paper's shots and HumanEval settings, offline data, sandbox
- benchmarks.py offline benchmark data: MMLU / GSM8K / HumanEval from PyPI-shipped data
- code_exec.py  sandboxed execution for HumanEval (the local `code_eval`)
- paper.py + paper_numbers.yaml: the paper's numbers (the only place they live)
"""
