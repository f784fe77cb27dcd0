"""The minimal problem (§7): task, hand-set construction and its bound, deterministic training, classify."""

import math

import pytest
import torch

from catchtag.minimal import (
    CONTENT, EVAL_SEED, FIRST, SEP, MinimalConfig, MinimalTransformer, classify, construct_solution,
    construction_bound, construction_error, diagnostics, make_batch, no_marker_floor, tag_projections, train,
    zero_loss,
)


def test_make_batch_shapes_and_layout():
    x, y, sep = make_batch(32, 12, 7, seed=3, return_sep=True)
    assert x.shape == (32, 12, 7) and y.shape == (32, 5) and sep.shape == (32,)
    assert torch.all(x[:, 0, FIRST] == 1) and torch.all(x[:, 1:, FIRST] == 0)
    assert torch.all(x[:, 0, CONTENT:] == 0)
    assert torch.all(x[:, :, SEP].sum(1) == 1)
    assert torch.equal(x[:, :, SEP].argmax(1), sep)
    assert torch.all((sep >= 1) & (sep <= 10))  # at least one token after [SEP]
    assert torch.all(x[torch.arange(32), sep, CONTENT:] == 0)


def test_make_batch_target_is_mean_after_sep():
    x, y = make_batch(16, 10, 6, seed=11)
    for b in range(16):
        s = int(torch.nonzero(x[b, :, SEP])[0])            # found from x, not from make_batch
        expected = x[b, s + 1:, CONTENT:].double().mean(0)
        assert torch.allclose(y[b].double(), expected, atol=1e-6)


def test_make_batch_is_seeded_and_ablations():
    a, b = make_batch(8, 9, 5, seed=4), make_batch(8, 9, 5, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, y, sep = make_batch(64, 9, 5, seed=4, first_token=False, return_sep=True)
    assert torch.all(x[..., FIRST] == 0) and sep.min() >= 0
    x, y, sep = make_batch(64, 9, 5, seed=4, sep_marker=False, return_sep=True)
    assert torch.all(x[..., SEP] == 0)
    for i in range(64):  # the hidden boundary holds content, and the target is still the mean after it
        assert x[i, sep[i], CONTENT:].abs().sum() > 0
        assert torch.allclose(y[i], x[i, sep[i] + 1:, CONTENT:].mean(0), atol=1e-6)


@pytest.mark.parametrize("seq_len", [8, 32])
def test_construction_error_within_bound_and_shrinking(seq_len):
    x, y = make_batch(400, seq_len, 8, seed=seq_len, dtype=torch.float64)
    worst = []
    for scale in (4.0, 8.0, 12.0):
        err, cmax = construction_error(construct_solution(8, seq_len, scale), x, y)
        bound = construction_bound(scale, seq_len)
        assert torch.all(err <= bound * cmax), (scale, float((err / cmax).max()), bound)
        worst.append(float((err / cmax).max()))
    assert worst[0] > worst[1] > worst[2]
    assert construction_bound(8.0, seq_len) < construction_bound(4.0, seq_len)
    assert worst[2] < 1e-6


def test_model_shapes_and_causality():
    torch.manual_seed(0)
    model = MinimalTransformer(MinimalConfig(dim=6))
    x, _ = make_batch(5, 9, 6, seed=0)
    tr = model.trace(x)
    assert tr["pred"].shape == (5, 4) and model(x).shape == (5, 4)
    A1 = tr["attn"][0]
    assert torch.allclose(A1.sum(-1), torch.ones(5, 9))
    assert torch.all(A1.triu(1) == 0)


def test_classify_construction():
    model = construct_solution(8, 16, 10.0)
    assert classify(model, seq_len=16) == "catch-tag-release"
    x, y, sep = make_batch(256, 16, 8, EVAL_SEED, return_sep=True)
    d = diagnostics(model, x, y, sep)
    assert d["sep_caught"] == 1.0 and d["first_caught"] == 1.0
    assert d["tag_cos"] > 0.99 and d["release_uniformity"] > 0.99 and d["r2"] > 0.999


def test_tag_projections_of_construction():
    x, _, sep = make_batch(8, 12, 6, seed=2, return_sep=True)
    proj = tag_projections(construct_solution(6, 12, 12.0), x, sep)
    after = torch.arange(12)[None, :] > sep[:, None]
    content_before = (torch.arange(12)[None, :] < sep[:, None]) & (torch.arange(12)[None, :] > 0)
    assert torch.allclose(proj[after], torch.tensor([1.0, 0.0]).expand(int(after.sum()), 2), atol=1e-4)
    assert torch.allclose(proj[content_before], torch.tensor([0.0, 1.0]).expand(int(content_before.sum()), 2), atol=1e-4)


def test_classify_construction_without_first_token():
    assert classify(construct_solution(8, 16, 10.0), seq_len=16, first_token=False) == "catch-tag-release"


def test_classify_untrained_is_not_ctr():
    torch.manual_seed(0)
    assert classify(MinimalTransformer(MinimalConfig(dim=8))) != "catch-tag-release"


def test_train_is_deterministic():
    kw = dict(steps=40, seq_len=10, dim=6, batch=16, log_every=20, eval_n=64)
    m1, h1 = train(3, **kw)
    m2, h2 = train(3, **kw)
    assert h1["loss"] == h2["loss"]
    for (n1, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p1, p2), n1
    assert h1["log"]["step"] == [0, 20, 40]
    assert h1["log"]["sep_mass"] == h2["log"]["sep_mass"]
    _, h3 = train(4, **kw)
    assert h3["loss"] != h1["loss"]
    assert h1["loss"][-1] < h1["loss"][0]
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()


def test_loss_references():
    x, y = make_batch(20000, 12, 3, seed=1, sep_marker=False)
    assert abs(float(y.pow(2).mean()) - zero_loss(12)) < 0.02
    floor = no_marker_floor(12)
    assert 0 < floor < zero_loss(12)
    # the posterior-mean predictor reaches the floor on simulated data
    ps = torch.arange(1, 11)
    W = torch.zeros(10, 12, dtype=torch.float64)
    for r, p in enumerate(ps):
        W[r, p + 1:] = 1 / (11 - p)
    w = W.mean(0)
    pred = (x[..., CONTENT:].double() * w[None, :, None]).sum(1)
    assert math.isclose(float((pred - y.double()).pow(2).mean()), floor, rel_tol=0.05)


def test_fixed_dataset_training_is_deterministic_and_counts_steps():
    kw = dict(seq_len=8, dim=3, d_model=2, n_train=64, epochs=3, batch=16, optimizer="adamw", lr=5e-2,
              weight_decay=1e-3, log_every=4, eval_n=32)
    m1, h1 = train(1, **kw)
    m2, h2 = train(1, **kw)
    assert len(h1["loss"]) == 3 * 4 and h1["loss"] == h2["loss"]
    assert h1["log"]["step"][-1] == 12
    assert m1.embed.weight.shape == (2, 3)
    _, h3 = train(1, **{**kw, "weight_decay": 0.0})
    assert h3["loss"][:1] == h1["loss"][:1] and h3["loss"] != h1["loss"]  # same data and init, other decay
    with pytest.raises(ValueError):
        train(1, **{**kw, "optimizer": "sgd"})
    with pytest.raises(ValueError):
        train(1, **{**kw, "epochs": 0})


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_foreach_optimiser_gives_the_per_tensor_loops_weights(monkeypatch, optimizer):
    """`train` asks for torch's foreach optimiser (faster on these tiny tensors); the weights must be
    those of the per-tensor loop, bit for bit, or the chapter's counts would depend on it."""
    kw = dict(seq_len=8, dim=3, d_model=2, n_train=64, epochs=3, batch=16, optimizer=optimizer, lr=5e-2,
              weight_decay=1e-3, log_every=4, eval_n=32)
    asked = []
    for name in ("Adam", "AdamW"):
        cls = getattr(torch.optim, name)
        monkeypatch.setattr(torch.optim, name, lambda *a, _cls=cls, **k: asked.append(k.get("foreach")) or _cls(*a, **k))
    fast, _ = train(2, **kw)
    assert asked == [True]  # (torch's own default on the CPU is the per-tensor loop)
    for name in ("Adam", "AdamW"):
        cls = getattr(torch.optim, name)
        monkeypatch.setattr(torch.optim, name, lambda *a, _cls=cls, **k: _cls(*a, **{**k, "foreach": False}))
    loop, _ = train(2, **kw)
    a, b = fast.state_dict(), loop.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_settings_paper_and_reduced():
    from catchtag.minimal import SETTINGS, TrainConfig, settings, settings_table

    p = TrainConfig(**settings("paper"))
    assert (p.n_train, p.epochs, p.optimizer, p.lr, p.weight_decay, p.d_model) == (8192, 50, "adamw", 5e-2, 1e-3, 2)
    r = TrainConfig(**settings("reduced"))
    assert r.total_steps * r.batch < p.total_steps * p.batch  # the reduced recipe is cheaper
    assert settings("reduced", seq_len=9)["seq_len"] == 9
    with pytest.raises(ValueError):
        settings("huge")
    rows = settings_table(dict(SETTINGS["paper"], seq_len=16), "paper")
    byname = {row["setting"]: row for row in rows}
    assert byname["training data"]["this run (paper)"] == "8,192 fixed sequences"
    assert byname["epochs"]["this run (paper)"] == "50" and byname["optimiser steps"]["this run (paper)"] == "800"


def test_construction_sweep_and_verdict():
    from catchtag.minimal import construction_summary, construction_sweep, verdict_construction

    sweep = construction_sweep([1.0, 4.0, 12.0], [8, 16], dim=3, n=200)
    assert len(sweep) == 6 and (sweep.worst <= sweep.bound).all()
    for _, g in sweep.groupby("T"):
        assert g.worst.is_monotonic_decreasing and g.worst.iloc[-1] < 1e-6
    assert verdict_construction(sweep, "catch-tag-release") == "reproduced"
    assert verdict_construction(sweep, "fits without catch") == "not reproduced"
    coarse = construction_sweep([1.0, 2.0], [8], dim=3, n=200)  # never gets below 1e-6
    assert verdict_construction(coarse, "catch-tag-release") == "partly"
    assert "T = 16" in construction_summary(sweep, "catch-tag-release", 16)


def test_verdict_training():
    from catchtag.minimal import verdict_training

    assert verdict_training(0, 10) == "not reproduced"
    assert verdict_training(1, 10) == verdict_training(4, 10) == "reproduced"
    assert verdict_training(3, 10, settings="reduced") == "partly"  # not the paper's runs
    assert verdict_training(0, 10, settings="reduced") == "not reproduced"
    assert verdict_training(5, 10) == verdict_training(10, 10) == "partly"
    with pytest.raises(ValueError):
        verdict_training(0, 0)


def test_seed_table_transition_and_eps_counts():
    from catchtag.minimal import eps_counts, plateau_loss, seed_table, transition_step

    hist = {"log": {"step": [0, 100, 200, 300], "r2": [0.0, 0.5, 0.95, 0.99], "loss": [1.0, 0.4, 0.05, 0.01]}}
    assert transition_step(hist) == 200 and transition_step(hist, r2=0.999) is None
    assert plateau_loss(hist) == 0.4
    runs = {0: (construct_solution(3, 12, 10.0), hist)}
    t = seed_table(runs, 12)
    assert bool(t.loc[0, "ctr"]) and t.loc[0, "transition"] == 200
    assert eps_counts(runs, 12, [0.2, 0.5]) == {0.2: 1, 0.5: 1}


def _killed(job):
    import os
    import signal

    if job == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return job


def test_a_killed_worker_is_one_clear_error():
    import multiprocessing as mp

    from catchtag.errors import CatchtagError
    from catchtag.minimal import map_runs

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs fork (the test's job function lives in the test module)")
    assert map_runs(_killed, [0, 2], workers=2) == [0, 2]
    with pytest.raises(CatchtagError) as exc:
        map_runs(_killed, [0, 1, 2], workers=2)
    assert "\n" not in str(exc.value) and "workers=1" in str(exc.value)
