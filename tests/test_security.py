"""Security: no trust_remote_code unless asked, GGUF files checked before use, and the NDIF API key
never in an executed notebook, a log, a results file or an nnsight config file.

The GGUF sha256 check is also tested in tests/test_models.py::test_corrupt_gguf_is_refused and, for
a truncated copy of the real file, in tests/test_bad_input.py (truncated-gguf, garbage-gguf).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from catchtag import models
from catchtag.cli import build_parser, main
from catchtag.errors import CatchtagError

from _chapters import DUMMY_KEY, sinks_runs

SRC = Path(models.__file__).resolve().parent


class _Stop(Exception):
    pass


@pytest.fixture()
def recorded(monkeypatch):
    """Hub loading with every loader replaced by one that records its keyword arguments."""
    import transformers
    from transformers import LlamaConfig

    calls = {}

    def record(name, result=None):
        def fn(*args, **kwargs):
            calls[name] = kwargs
            if isinstance(result, Exception):
                raise result
            return result
        return fn

    cfg = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      vocab_size=32, architectures=["LlamaForCausalLM"])
    monkeypatch.setattr(models, "_cached_on_disk", lambda name: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config", cfg))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer", object()))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model", _Stop()))
    import nnsight

    monkeypatch.setattr(nnsight, "TransformersModel", record("nnsight", _Stop()))
    return calls


def test_hub_model_loads_without_remote_code_by_default(recorded):
    with pytest.raises(_Stop):
        models.load_model("someone/some-model")
    assert set(recorded) == {"config", "tokenizer", "model"}
    for kwargs in recorded.values():
        assert kwargs["trust_remote_code"] is False


def test_remote_code_only_when_asked(recorded):
    with pytest.raises(_Stop):
        models.load_model("someone/some-model", trust_remote_code=True)
    for kwargs in recorded.values():
        assert kwargs["trust_remote_code"] is True


def test_ndif_model_built_without_remote_code(recorded, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", DUMMY_KEY)
    with pytest.raises(_Stop):
        models.load_model("someone/some-model", remote=True)
    assert "trust_remote_code" not in recorded["nnsight"]  # nnsight's default: False
    assert recorded["config"]["trust_remote_code"] is False


def test_cli_passes_trust_remote_code_only_with_the_flag(monkeypatch, capsys):
    assert build_parser().parse_args(["sinks", "--text", "x"]).trust_remote_code is False
    seen = []

    def load(name, **kw):
        seen.append(kw["trust_remote_code"])
        raise CatchtagError("stop here")

    monkeypatch.setattr(models, "load_model", load)
    assert main(["sinks", "--model", "a/b", "--text", "x"]) == 2
    assert main(["sinks", "--model", "a/b", "--text", "x", "--trust-remote-code"]) == 2
    assert seen == [False, True]
    capsys.readouterr()


def test_source_never_enables_remote_code_or_saves_the_key():
    """No hard-coded trust_remote_code=True, and no call that persists nnsight's config (its
    set_default_api_key / CONFIG.save write the key to ~/.config/nnsight/config.yaml)."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert "set_default_api_key" not in text and "CONFIG.save" not in text, path
    import nnsight

    shipped = Path(nnsight.__file__).parent / "config.yaml"
    assert DUMMY_KEY not in shipped.read_text()


def test_gguf_checked_before_use(monkeypatch):
    """A file whose sha256 does not match is refused before transformers reads a byte of it."""
    import dataclasses

    def never(*a, **k):
        raise AssertionError("the GGUF file was read before its sha256 was checked")

    monkeypatch.setattr(models, "_load_hf", never)
    spec = dataclasses.replace(models.REGISTRY["smollm2-135m"], sha256="1" * 64)
    monkeypatch.setitem(models.REGISTRY, "smollm2-135m", spec)
    with pytest.raises(CatchtagError, match="corrupt or truncated"):
        models.load_model("smollm2-135m")


@pytest.mark.slow
def test_key_never_in_notebook_logs_results_or_config():
    """book/sinks.md run by the book build with NDIF_API_KEY set (remote="local"): the key is in no
    file the run wrote (executed and raw notebooks, results, nnsight's config folder) and not in
    its stdout or stderr (the kernel's included)."""
    run = sinks_runs()[0]
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.executed.exists() and (run.results / "sinks-smollm2-135m.json").exists()
    key = DUMMY_KEY.encode()
    files = [p for p in run.folder.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        assert key not in path.read_bytes(), path
    assert DUMMY_KEY not in run.stdout and DUMMY_KEY not in run.stderr
    assert not (run.folder / "config" / "nnsight").exists()  # nnsight wrote no config file
