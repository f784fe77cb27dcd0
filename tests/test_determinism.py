"""Determinism: the same chapter with the same parameters gives byte-identical results files.

book/sinks.md (2 prompts, SmolLM2 only) is executed twice by the book build, in two subprocesses
with their own _build and results folders (tests/_chapters.py; about 2 minutes on 2 busy cores,
shared with test_security.py). The results file carries the parameters, the library version and
source hash and the model file's sha256, and no timestamp, so the two files must be equal byte for
byte. The prompts are drawn with `seed`, a parameter.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from catchtag import __version__
from catchtag.book.report import library_sha256, results_json, results_path, save_results

from _chapters import sinks_runs


@pytest.mark.slow
def test_sinks_chapter_twice_gives_identical_results():
    a, b = sinks_runs()
    for run in (a, b):
        assert run.returncode == 0, run.stderr[-2000:]
    fa, fb = a.results / "sinks-smollm2-135m.json", b.results / "sinks-smollm2-135m.json"
    ra, rb = json.loads(fa.read_text()), json.loads(fb.read_text())
    if ra["library"] != rb["library"]:  # someone edited the library between the two runs
        ra.pop("library"), rb.pop("library")
        assert ra == rb
    else:
        assert fa.read_bytes() == fb.read_bytes()
    assert ra["parameters"] == {"model": "smollm2-135m", "compare": "", "eps": 0.2, "seed": 0,
                                "n_prompts": 2, "min_queries": 10, "remote": "local"}
    assert ra["model_file_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    data = ra["data"]["quantities"]
    assert len(data["sinks_per_head_grid"]) == 30 and len(data["sinks_per_head_grid"][0]) == 9
    assert [row["eps"] for row in data["eps_sweep"]][:2] == [0.05, 0.1]
    assert [row["min_queries"] for row in data["cutoff_sweep"]] == [5, 10, 20, 40]
    assert 0 < data["first_share"] <= 1
    # the only files the run left in the results folder: the results files and the (empty) staging folder
    assert sorted(p.name for p in a.results.iterdir()) == [".partial", "sinks-smollm2-135m.json", "sinks.json"]
    assert list((a.results / ".partial").iterdir()) == []


def test_results_json_is_canonical(monkeypatch, tmp_path):
    """Same inputs, same bytes: keys sorted, floats rounded to 10 significant digits, NaN as null,
    numpy / pandas / torch turned into plain lists and dicts, secrets dropped, no timestamp."""
    import torch

    class M:
        file_sha256 = "ab" * 32

    monkeypatch.setenv("NDIF_API_KEY", "dummy-key-for-results")
    data = {"b": np.float32(0.1), "a": np.arange(3), "grid": np.array([[0.5, np.nan]]),
            "table": pd.DataFrame({"x": [1.0, 2.0]}), "t": torch.tensor([1.0 / 3]), "flag": np.bool_(True)}
    params = {"eps": 0.2, "seed": 0, "api_key": "x", "hf_token": "y", "my_secret": "z", "note": "dummy-key-for-results"}
    one = results_json("demo", "org/model", params, data, M())
    two = results_json("demo", "org/model", dict(reversed(params.items())), dict(reversed(data.items())), M())
    assert one == two
    record = json.loads(one)
    assert record["parameters"] == {"eps": 0.2, "seed": 0}
    assert record["library"] == {"version": __version__, "source_sha256": library_sha256()}
    assert record["model_file_sha256"] == "ab" * 32
    assert record["data"]["b"] == 0.1000000015 and record["data"]["grid"] == [[0.5, None]]
    assert record["data"]["t"] == [0.3333333433] and record["data"]["flag"] is True
    assert record["data"]["table"] == [{"x": 1.0}, {"x": 2.0}]
    assert "dummy-key-for-results" not in one
    monkeypatch.setenv("CATCHTAG_RESULTS", str(tmp_path))
    path = save_results("demo", "org/model", params, data, M())
    assert path == results_path("demo", "org/model") == tmp_path / "demo-org--model.json"
    assert path.read_text() == one
    # a secret passed as data is refused, and nothing is written
    from catchtag.errors import CatchtagError

    with pytest.raises(CatchtagError, match="NDIF API key"):
        save_results("demo", "leak", {}, {"k": "dummy-key-for-results"})
    assert not (tmp_path / "demo-leak.json").exists()
