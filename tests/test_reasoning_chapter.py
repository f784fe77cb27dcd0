"""catchtag.reasoning: the chapter's calls on planted runs (no real model)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag import reasoning as R
from catchtag.errors import CatchtagError

LABELS = [R.BASE, R.TUNED, R.CONTROL]


def planted_run(per_prompt=None, finetunes=None, held=None):
    summary = pd.DataFrame(dict(sinks_per_head=[1.0, 1.5, 1.1], first_share=[0.5, 0.6, 0.5],
                                other_per_head=[0.5, 0.9, 0.6], heads_high_ev=[2, 5, 3], n_heads=[4, 4, 4],
                                n_tokens=[150.0, 150.0, 150.0]), index=LABELS)
    heads = pd.DataFrame([dict(model=m, layer=l, head=h, n_sinks=1.0 + (m == R.TUNED) * (l == 1) * 2,
                               ev=0.6 if (l, h) == (0, 1) else 0.1)
                          for m in LABELS for l in (0, 1) for h in (0, 1)])
    tax = pd.DataFrame({c: [0.2, 0.2, 0.2] for c in R.TOKEN_CLASSES[1:]}, index=LABELS)
    return R.ReasoningRun(LABELS, ["p"] * 4, summary, heads, tax, pd.DataFrame(), finetunes or {}, held or {}, None,
                          per_prompt=per_prompt or {})


def test_chapter_models_and_problems():
    assert R.chapter_models("a", "b", "", "", False) == ["a", "b"]
    assert R.chapter_models("a", "", "", "", "local") == ["a"]
    assert R.chapter_models("a", "", "Qwen/x", "deepseek/y", True) == ["Qwen/x"]
    with pytest.raises(CatchtagError):
        R.chapter_models("a", "", "", "", True)
    train, held = R.chapter_problems(10, 3, seed=1)
    assert len(train) == 10 and len(held) == 12 and train + held == R.make_problems(22, seed=1)
    q = R.paper_ratios()
    assert q["paper_ratio"] == pytest.approx(2.196 / 1.125) and q["paper_ratio_llama"] == pytest.approx(2.025 / 1.993)


def test_per_prompt_sinks_averages_to_the_census():
    from catchtag.sinks import SinkStats, census

    def stats(extra):
        T = 14
        received = torch.full((2, 2, T), 0.01)
        received[:, :, 0] = 0.9
        for pos in extra:
            received[0, 0, pos] = 0.5
        return SinkStats("m", "", ["x"] * T, [0, 1], received, torch.ones(2, 2, T),
                         torch.zeros(2, 2, T, dtype=torch.long), torch.full((2, 2, T), 0.9))

    st = [stats([]), stats([2]), stats([2, 3])]
    pp = R.per_prompt_sinks(st, 0.2)
    assert list(pp) == [1.0, 1.25, 1.5]
    assert pp.mean() == pytest.approx(census(st, 0.2)["sinks_per_head"])


def test_change_intervals_by_hand():
    same = {R.BASE: [1.0, 2.0, 3.0, 4.0], R.TUNED: [1.5, 2.5, 3.5, 4.5], R.CONTROL: [1.0, 2.0, 3.0, 4.0]}
    q = planted_run(same).quantities()
    # a constant per-prompt change has a zero-width interval at that change
    assert (q["diff_reasoning_lo"], q["diff_reasoning_hi"]) == (0.5, 0.5)
    assert (q["diff_control_lo"], q["diff_control_hi"]) == (0.0, 0.0)
    assert q["diff_tuned_control"] == pytest.approx(0.4) and q["diff_tuned_control_lo"] == 0.5
    assert q["diff_reasoning_ci"] == "95% interval +0.500 to +0.500"
    noisy = dict(same, **{R.TUNED: [1.0, 3.0, 3.0, 5.0]})  # changes 0, 1, 0, 1
    lo, hi = planted_run(noisy).change_interval(R.TUNED, R.BASE)
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    none = planted_run().quantities()
    assert np.isnan(none["diff_reasoning_lo"]) and none["diff_reasoning_ci"] == "no interval"
    assert set(R.QUANTITY_SPECS) <= set(none)


def test_finetune_quantities():
    ft = SimpleNamespace(tokens=640, n_params=2_000_000, seconds=3.0)
    held = {R.BASE: 1.0, R.TUNED: 0.5, R.CONTROL: 0.9}
    runs = {"m": planted_run(finetunes={"reasoning": ft, "answer": ft}, held=held)}
    shared, first = R.finetune_quantities(runs)
    assert shared == dict(train_tokens=640, train_params=2.0, train_seconds=6.0)
    assert first == dict(loss_base=1.0, loss_reasoning=0.5, loss_control=0.9)
    shared, first = R.finetune_quantities({"m": planted_run()})
    assert set(shared.values()) == {None} and set(first.values()) == {None}


def test_head_grids_bars_and_summary():
    run = planted_run()
    panels, lim = R.head_grids(run)
    assert list(panels) == LABELS and not panels[R.BASE]["change"] and panels[R.TUNED]["change"]
    assert panels[R.TUNED]["sinks"].tolist() == [[0.0, 0.0], [2.0, 2.0]] and lim == 2.0
    assert panels[R.BASE]["sinks"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert R.high_ev_cells(panels[R.BASE]["ev"], 0.5) == [(0, 1)]
    assert R.high_ev_cells(np.array([[np.nan, 0.7]]), 0.5) == [(0, 1)]
    bars = R.sph_bars(run)
    assert len(bars) == 7 and bars[0] == ("paper: Qwen2.5-14B", 1.125, "0.75") and bars[-1] == (f"ours: {R.CONTROL}", 1.1, "tab:green")
    line = R.runs_summary({"m": run}, {"m": "Model M"})
    assert line.startswith("Model M: base 1.000 → reasoning-tuned 1.500")
