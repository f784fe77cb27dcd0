"""catchtag.minimal: what the chapter reports (small synthetic inputs, numbers checked by hand)."""

import pandas as pd
import pytest
import torch

from catchtag import minimal as M


def test_wilson_interval_by_hand():
    from catchtag.probes import wilson_interval

    lo, hi = wilson_interval(3, 10)  # the chapter's "3 of 10" interval
    assert lo == pytest.approx(0.1078, abs=1e-4) and hi == pytest.approx(0.6032, abs=1e-4)


def planted_table():
    return pd.DataFrame(dict(
        r2=[0.99, 0.95, 0.5], sep_mass=[0.9, 0.3, 0.1], sep_caught=[0.95, 0.2, 0.0], first_caught=[0.95, 0.95, 0.1],
        tag_distinct=[1.0, 1.8, 0.2], release_mass=[0.9, 0.85, 0.2], release_uniformity=[0.95, 0.92, 0.5],
        loss=[1e-3, 2e-3, 0.1], plateau=[0.2, 0.3, 0.4], transition=[100.0, 200.0, None],
        post_first_mass=[0.05, 0.6, 0.8], tag_contrast=[0.9, 0.9, 0.1],
        **{"class": ["catch-tag-release", "fits without catch", "failed to fit"]}, ctr=[True, False, False],
    ), index=pd.Index([4, 5, 6], name="seed"))


def test_run_quantities_and_display():
    q = M.run_quantities(planted_table(), 3, "reduced")
    assert q["n_ctr"] == 1 and q["ctr_seeds"] == "4" and q["verdict_training"] == "partly"
    assert (q["ctr_share_lo"], q["ctr_share_hi"]) == pytest.approx((0.0615, 0.7923), abs=1e-4)  # Wilson, 1 of 3
    assert q["ctr_ci"] == f"95% interval {q['ctr_share_lo']:.0%}–{q['ctr_share_hi']:.0%}"
    assert q["r2_min"] == 0.5 and q["n_release"] == 2 and q["n_sep_catch"] == 1 and q["n_first_catch"] == 2
    assert q["n_opposite"] == 1 and q["tag_cos_median"] == pytest.approx(0.0) and q["sep_mass_range"] == "10% to 90%"
    shown = M.seed_display(planted_table())
    assert list(shown.columns) == list(M.SEED_COLUMNS.values())
    assert M.example_seeds(planted_table()) == [4, 5] and M.emergence_seed(planted_table()) == 4
    none = planted_table().assign(ctr=False)
    assert M.example_seeds(none) == [4] and M.emergence_seed(none) == 4


def test_training_quantities():
    runs = M.Runs({0: (None, dict(loss=[1.0] * 7, cpu_seconds=2.0)), 1: (None, dict(loss=[1.0] * 7, cpu_seconds=4.0))})
    runs.wall, runs.workers = 5.0, 2
    q = M.training_quantities(runs, planted_table(), 12)
    assert q["train_wall"] == 5.0 and q["train_workers"] == 2 and q["train_cpu_per_seed"] == 3.0 and q["steps"] == 7
    assert q["n_fit"] == 2 and (q["trans_min"], q["trans_max"]) == (100, 200)
    assert q["zero_loss"] == M.zero_loss(12) and q["floor"] == M.no_marker_floor(12)
    assert q["plateau_median"] == 0.3 and q["final_loss_max"] == 0.1


def test_construction_quantities():
    sweep = pd.DataFrame(dict(T=[8, 8, 16, 16, 16], scale=[1.0, 8.0, 1.0, 7.0, 20.0],
                              worst=[0.5, 1e-7, 0.6, 1e-5, 1e-12], bound=[1.0, 1e-5, 1.0, 1e-4, 1e-11], rms=0.0))
    q = M.construction_quantities(sweep, "catch-tag-release", 16)
    assert q["cons_scale8"] == 7.0 and q["cons_worst8"] == 1e-5 and q["cons_bound8"] == 1e-4  # nearest 8 at T = 16
    assert q["cons_holds"] == "holds" and q["cons_worst_max_scale"] == 1e-12 and q["cons_worst_min_scale"] == 0.6
    assert q["cons_max_scale"] == 20.0 and q["verdict_construction"] == "reproduced"
    assert M.construction_quantities(sweep.assign(bound=0.0), "catch-tag-release", 16)["cons_holds"] == "FAILS"
    assert M.construction_lengths(16) == [8, 16, 64] and M.construction_lengths(8) == [8, 64]


def test_ablation_quantities():
    t = pd.DataFrame(dict(task=["no first token"] * 2 + ["no [SEP] marker"] * 2, r2=[0.9, 0.8, 0.1, 0.3],
                          sep_caught=[0.5, 0.7, 0, 0], tag_cos=[0.8, 1.0, 0, 0], loss=[0, 0, 0.2, 0.4],
                          release_mass=[0, 0, 0.4, 0.6], **{"class": ["catch-tag-release", "x", "(no marker)"] + ["(no marker)"]}))
    q = M.ablation_quantities(t, 12, 3)
    assert q["nf_r2_min"] == 0.8 and q["nf_ctr"] == 1 and q["nf_sep_caught"] == pytest.approx(0.6)
    assert q["nf_tag_cos"] == pytest.approx(0.9) and q["nm_loss"] == pytest.approx(0.3) and q["nm_r2"] == pytest.approx(0.2)
    assert q["nm_release"] == pytest.approx(0.5) and q["nm_chance"] == M.hidden_boundary_share(12, 3)


def test_chapter_setup_and_example():
    from catchtag.errors import CatchtagError

    cfg, seeds, ex = M.chapter_setup("reduced", 3, 4, 16)
    assert cfg == M.settings("reduced") and seeds == [3, 4, 5, 6]
    assert ex.x.shape == (1, 16, cfg["dim"]) and abs(ex.p - 8) <= 1
    assert ex.labels[0] == "first" and ex.labels[ex.p] == "[SEP]" and ex.labels.count("") == 14
    assert float(ex.x[0, ex.p, M.SEP]) == 1.0
    with pytest.raises(CatchtagError):
        M.chapter_setup("huge", 0, 1, 16)


def test_map_runs_same_numbers_in_processes():
    jobs = [dict(seed=s, steps=15, seq_len=8, dim=3, log_every=5) for s in (0, 1, 2)]
    one = M.train_many(jobs, workers=1)
    two = M.train_many(jobs, workers=2)
    for (m1, h1), (m2, h2) in zip(one, two):
        assert h1["loss"] == h2["loss"] and h1["log"] == h2["log"]
        assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    runs = M.train_seeds([0, 1], workers=2, steps=15, seq_len=8, dim=3, log_every=5)
    assert list(runs) == [0, 1] and runs.workers == 2 and runs.wall > 0
    assert runs[1][1]["loss"] == one[1][1]["loss"]
    sweep1 = M.construction_sweep([1.0, 4.0], [8, 12], dim=3, n=50, workers=1)
    sweep2 = M.construction_sweep([1.0, 4.0], [8, 12], dim=3, n=50, workers=2)
    pd.testing.assert_frame_equal(sweep1, sweep2)


def test_workers_available_honours_omp(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert M.workers_available(10) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert 1 <= M.workers_available(3) <= 3


def test_panels_draw():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = M.example_sequence(12, 3, 0)
    ctr = M.construct_solution(3, 12, 8.0)
    tr = ctr.trace(ex.x)
    fig, axes = plt.subplots(1, 3)
    assert M.plot_attention(axes[0], tr["attn"][0][0], ex.labels, "a") is not None
    M.plot_tags(axes[1], ctr, ex, "b")
    M.plot_release(axes[2], tr["attn"][1][0], ex, "c")
    assert len(axes[2].patches) == 12 and len(axes[1].patches) == 24
    plt.close(fig)
