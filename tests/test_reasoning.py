"""catchtag.reasoning: generated problems, equal token budgets, deterministic fine-tuning, comparison."""

import numpy as np
import pytest
import torch

from catchtag import reasoning as R
from catchtag.errors import CatchtagError


def test_problems_are_deterministic_and_correct():
    a, b = R.make_problems(20, seed=3), R.make_problems(20, seed=3)
    assert a == b
    assert a != R.make_problems(20, seed=4)
    for p in a:
        assert 2 <= len(p.ops) <= 4
        x = p.start
        for sym, n in p.ops:
            x = {"+": x + n, "-": x - n, "*": x * n}[sym]
        assert p.answer == x == p.values()[-1]


def test_render_styles():
    p = R.Problem(7, (("+", 5), ("*", 3), ("-", 4)))
    reasoning, answer = R.render(p, "reasoning"), R.render(p, "answer")
    assert "7 + 5 = 12" in reasoning and "12 * 3 = 36" in reasoning and "36 - 4 = 32" in reasoning
    assert reasoning.rstrip().endswith("Answer: 32.") and answer.rstrip().endswith("Answer: 32.")
    assert "Step" not in answer and "=" not in answer
    assert reasoning.startswith(answer.split("Answer")[0])  # the same question
    with pytest.raises(CatchtagError):
        R.render(p, "chain")


@pytest.mark.slow
def test_same_token_budget_for_both_styles(smollm):
    probs = R.make_problems(10, seed=0)
    r = R.token_blocks(smollm.tokenizer, probs, "reasoning", 6, 32, seed=1)
    a = R.token_blocks(smollm.tokenizer, probs, "answer", 6, 32, seed=1)
    assert r.shape == a.shape == (6, 32)
    assert not torch.equal(r, a)
    assert torch.equal(r, R.token_blocks(smollm.tokenizer, probs, "reasoning", 6, 32, seed=1))


@pytest.mark.slow
def test_finetune_is_deterministic_and_leaves_the_base_alone(smollm):
    probs = R.make_problems(8, seed=0)
    before = smollm.hf.model.layers[0].self_attn.q_proj.weight.detach().clone()
    kw = dict(steps=2, batch_size=1, block_len=16, lr=1e-3, seed=5, progress=False)
    a = R.finetune(smollm, probs, "reasoning", **kw)
    b = R.finetune(smollm, probs, "reasoning", **kw)
    assert a.losses == b.losses and len(a.losses) == 2
    assert R.weights_equal(a.model, b.model)
    assert not R.weights_equal(a.model, smollm)
    assert torch.equal(smollm.hf.model.layers[0].self_attn.q_proj.weight, before)
    # only attention weights move by default
    pa, pb = dict(a.model.hf.named_parameters()), dict(smollm.hf.named_parameters())
    assert torch.equal(pa["model.layers.0.mlp.up_proj.weight"], pb["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(pa["model.layers.0.self_attn.o_proj.weight"], pb["model.layers.0.self_attn.o_proj.weight"])
    assert a.tokens == 2 * 16 and a.n_params > 0
    c = R.finetune(smollm, probs, "reasoning", **{**kw, "seed": 6, "steps": 1})
    assert c.losses[0] != a.losses[0]  # another seed, another data order


@pytest.mark.slow
def test_finetune_rejects_bad_arguments(smollm):
    probs = R.make_problems(2)
    with pytest.raises(CatchtagError):
        R.finetune(smollm, probs, "poem", steps=1, progress=False)
    with pytest.raises(CatchtagError):
        R.finetune(smollm, probs, steps=0, progress=False)
    with pytest.raises(CatchtagError):
        R.finetune(smollm, probs, train="mlp", steps=1, progress=False)


@pytest.mark.slow
def test_head_ev_matches_tags(smollm):
    from catchtag.capture import capture
    from catchtag.sinks import sink_stats
    from catchtag.tags import head_explained_variance

    caps = capture(smollm, R.eval_prompts(R.make_problems(2, seed=1)), resid=False, progress=False)
    stats = [sink_stats(c) for c in caps]
    ours = R.head_ev(smollm, caps, stats)
    layers = [2, 10, 25]
    ref = head_explained_variance(smollm, caps, stats=stats, layers=layers, progress=False)
    ours = ours[ours["layer"].isin(layers)].reset_index(drop=True)
    np.testing.assert_allclose(ours["ev"], ref["ev"], rtol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(ours["n_caught"], ref["n_caught"])
    np.testing.assert_allclose(ours["n_tags"], ref["n_tags"])


@pytest.mark.slow
def test_compare_shapes(smollm):
    summary, heads = R.compare({"a": smollm}, ["Question: Start with 3. Add 4. What is the result?"], progress=False)
    assert list(summary["model"]) == ["a"]
    row = summary.iloc[0]
    assert row["n_heads"] == smollm.n_layers * smollm.n_heads == len(heads)
    assert 0 <= row["heads_high_ev"] <= row["heads_with_ev"] <= row["n_heads"]
    assert row["sinks_per_head"] > 0
    assert R.grid(heads, "a", "n_sinks").shape == (smollm.n_layers, smollm.n_heads)


def test_load_pair_needs_both():
    with pytest.raises(CatchtagError, match="both"):
        R.load_pair("Qwen/Qwen2.5-14B", "")


def test_paper_pairs_are_the_papers():
    # (paper, via note) §5: the 1.125 -> 2.196 pair is the 14B Qwen one; Llama-3.1-8B 1.993 -> 2.025
    assert R.PAPER_PAIRS["qwen"] == ("Qwen/Qwen2.5-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")
    assert R.PAPER_PAIRS["llama"] == ("meta-llama/Llama-3.1-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
    assert R.PAPER_SINKS_PER_HEAD == {"qwen": (1.125, 2.196), "llama": (1.993, 2.025)}
    assert R.paper_pair_key(*R.PAPER_PAIRS["llama"]) == "llama"
    assert R.paper_pair_key("Qwen/Qwen2.5-Math-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") is None


def test_verdict():
    assert R.verdict(1.0, 2.0, None) == "not testable offline"  # offline proxy: never the paper's pair
    assert R.verdict(1.0, 2.0, "qwen") == "reproduced"
    assert R.verdict(1.0, 0.9, "llama") == "not reproduced"
    assert R.verdict(1.0, 1.01, "llama", min_rise=0.05) == "not reproduced"
    assert R.verdict(float("nan"), 1.0, "qwen") == "not testable offline"
    assert R.proxy_reading(0.2, 0.1, 5, 3).startswith("larger than the control's on both")
    assert R.proxy_reading(0.0, 0.1, 3, 5).startswith("no larger")
    assert R.proxy_reading(0.2, 0.1, 3, 5).startswith("larger than the control's on one")
    # with the paired interval of (tuned - control): an interval across 0 is not a larger change
    assert R.proxy_reading(0.2, 0.1, 5, 3, (-0.01, 0.2)).startswith("not distinguishable from the control's")
    assert R.proxy_reading(0.2, 0.1, 5, 3, (0.02, 0.2)).startswith("larger than the control's on both")
    assert R.proxy_reading(0.0, 0.1, 3, 5, (-0.2, -0.05)).startswith("no larger")
    assert R.proxy_reading(0.2, 0.1, 5, 3, (float("nan"), float("nan"))).startswith("larger than the control's on both")
    line = R.summary("base", 1.0, "tuned", 1.25, 1.1)
    assert "1.000 → tuned 1.250" in line and "control 1.100" in line and "offline proxy" in line


def test_check_hosted_reads_nnsight_status():
    status = {"Qwen/Qwen2.5-14B": {"repo_id": "Qwen/Qwen2.5-14B", "state": "RUNNING"},
              "x (text, main)": {"repo_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "state": "DEPLOYING"}}
    assert R.ndif_hosted(R.PAPER_PAIRS["qwen"], status) == {
        "Qwen/Qwen2.5-14B": True, "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": False}
    R.check_hosted(["Qwen/Qwen2.5-14B"], status)
    with pytest.raises(CatchtagError, match="DeepSeek-R1-Distill-Qwen-14B") as e:
        R.check_hosted(R.PAPER_PAIRS["qwen"], status)
    assert "\n" not in str(e.value) and "Qwen/Qwen2.5-14B," not in str(e.value)
    with pytest.raises(CatchtagError):
        R.check_hosted(R.PAPER_PAIRS["llama"], {})  # NDIF unreachable: nnsight returns an empty status


def test_token_class():
    assert R.token_class("<|im_start|>", 0) == "first"
    assert [R.token_class(t, 3) for t in (".", "\n", " 42", " the", " Answer", "=", " ")] == [
        "punctuation", "newline", "number", "function word", "word", "punctuation", "space"]


def test_sink_taxonomy_on_planted_stats():
    from catchtag.sinks import SinkStats

    T = 12
    received = torch.full((1, 1, T), 0.01)
    received[0, 0, 0] = 0.9   # first-token sink: not counted
    received[0, 0, 3] = 0.5   # "." sink
    received[0, 0, 6] = 0.4   # " 7" sink
    received[..., T - 4:] = float("nan")
    tokens = ["<s>", " Start", " with", ".", " Add", " the", " 7", " then", " x", " y", " z", " w"]
    st = SinkStats("m", "", tokens, [0], received, torch.ones(1, 1, T), torch.zeros(1, 1, T, dtype=torch.long),
                   torch.full((1, 1, T), 0.9))
    tax = R.sink_taxonomy({"a": [st, st]}, eps=0.2)
    assert tax.loc["a", "n_sinks"] == 4
    assert tax.loc["a", "punctuation"] == 0.5 and tax.loc["a", "number"] == 0.5 and tax.loc["a", "word"] == 0.0
    top = R.top_sink_tokens({"a": [st]}, eps=0.2, k=5)
    assert set(top.token) == {"'.'", "' 7'"} and top.share.sum() == 1.0


@pytest.mark.slow
def test_paper_prompts_are_150_tokens(smollm, gemma):
    probs = R.make_problems(30, seed=2)
    for m in (smollm, gemma):
        ps = R.paper_prompts(m, probs, 3)
        assert len(ps) == 3 and len(set(ps)) == 3
        lengths = [len(m.tokenize(p)) for p in ps]
        assert all(145 <= n <= 150 for n in lengths), lengths
        assert ps[0].startswith("Question: Start with")
    with pytest.raises(CatchtagError):
        R.paper_prompts(smollm, probs, 0)
    with pytest.raises(CatchtagError):
        R.paper_prompts(smollm, [], 2)


def test_run_quantities_from_planted_tables():
    import pandas as pd

    labels = [R.BASE, R.TUNED, R.CONTROL]
    summary = pd.DataFrame(dict(sinks_per_head=[1.0, 1.5, 1.1], first_share=[0.5, 0.6, 0.5],
                                other_per_head=[0.5, 0.9, 0.6], heads_high_ev=[2, 5, 3], n_heads=[4, 4, 4],
                                n_tokens=[150.0, 150.0, 150.0]), index=labels)
    heads = pd.DataFrame([dict(model=m, layer=l, head=h, n_sinks=1.0 + (m == R.TUNED) * (l == 1), ev=0.1)
                          for m in labels for l in (0, 1) for h in (0, 1)])
    tax = pd.DataFrame({c: [0.2, 0.2, 0.2] for c in R.TOKEN_CLASSES[1:]}, index=labels)
    run = R.ReasoningRun(labels, ["p"] * 3, summary, heads, tax, pd.DataFrame(), {}, {}, None)
    q = run.quantities()
    assert q["sph_ratio"] == 1.5 and q["diff_reasoning"] == 0.5 and abs(q["diff_control"] - 0.1) < 1e-12
    assert q["top_layer"] == 1 and q["top_layer_change"] == 1.0
    assert q["reading"].startswith("larger than the control's on both")
    assert q["verdict_reasoning"] == "not testable offline" and "offline proxy" in q["summary"]
    assert q["n_prompts"] == 3 and q["word_share_tuned"] == 0.2
    pair = R.ReasoningRun(labels[:2], ["p"], summary.iloc[:2], heads[heads.model != R.CONTROL], tax.iloc[:2],
                          pd.DataFrame(), {}, {}, "qwen")
    q = pair.quantities()
    assert q["verdict_reasoning"] == "reproduced" and q["reading"] == "not compared with a control"
