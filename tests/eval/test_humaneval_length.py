"""HumanEval's "max length 1,024" in the BigCode harness's meaning: prompt + completion tokens."""

from __future__ import annotations

from attninf.config import build


def test_humaneval_budget_is_prompt_plus_completion(tiny_model_dir, one_torch_thread):
    from lm_eval.api.instance import Instance

    from eval import harness
    from eval.config import EvalConfig
    from eval.tasks import MAX_TOTAL_KEY, HumanEvalSettings, humaneval_config

    assert humaneval_config(HumanEvalSettings(), {})["generation_kwargs"][MAX_TOTAL_KEY] == 1024
    assert MAX_TOTAL_KEY not in humaneval_config(HumanEvalSettings(max_length=None), {})["generation_kwargs"]
    model, tok = harness.load_model(str(tiny_model_dir), "float32", "cpu")
    lm = harness.make_lm(model, tok, build(EvalConfig, {"max_length": 256}, "eval"))
    prompt = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
    n = len(lm.tok_encode(prompt))
    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(prompt, {"until": ["\nclass"], "max_gen_toks": mg, "do_sample": False,
                                         MAX_TOTAL_KEY: n + 5})) for mg in (50, 2)]
    lm.generate_until(reqs)
    # new tokens = budget - prompt tokens, never above max_gen_toks; the key never reaches generate()
    assert [r.args[1]["max_gen_toks"] for r in reqs] == [5, 2]
    assert all(MAX_TOTAL_KEY not in r.args[1] for r in reqs)
