"""The command line: the sinks command's JSON schema on both models, and bad input."""

import json
import subprocess
import sys

import pytest

from catchtag.cli import main

TEXT = "The capital of France is Paris. The capital of Germany is"


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_sinks_json_schema(name, capsys, any_model):
    assert main(["sinks", "--model", name, "--text", TEXT, "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"model", "eps", "tokens", "heads"}
    assert result["model"] == name and result["eps"] == 0.2
    cfg = {"smollm2-135m": (30, 9), "gemma3-270m": (18, 4)}[name]
    assert len(result["heads"]) == cfg[0] * cfg[1]
    for head in result["heads"]:
        assert set(head) == {"layer", "head", "sinks"}
        for sink in head["sinks"]:
            assert set(sink) == {"position", "token", "received"}
            assert sink["received"] > 0.2
            assert result["tokens"][sink["position"]] == sink["token"]
    # The first token is a sink in most heads.
    firsts = sum(any(s["position"] == 0 for s in h["sinks"]) for h in result["heads"])
    assert firsts > len(result["heads"]) / 2


def test_sinks_table_and_layer(capsys, smollm):
    assert main(["sinks", "--text", TEXT, "--format", "table", "--layer", "5", "--eps", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "eps 0.3" in out and "per head" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sinks", "--model", "nope", "--text", "hi"], "unknown model"),
        (["sinks", "--text", "hi", "--eps", "0"], "(0, 1)"),
        (["sinks", "--text", "hi", "--eps", "1"], "(0, 1)"),
        (["sinks", "--text", "hi", "--eps", "abc"], "(0, 1)"),
        (["sinks", "--text", "   "], "empty"),
        (["sinks"], "empty"),
        (["sinks", "--text", "hi", "--layer", "30"], "out of range"),
        (["sinks", "--text", "hi", "--format", "xml"], "invalid choice"),
        (["sinks", "--file", "/nonexistent/file.txt"], "cannot read"),
        (["sinks", "--text", "hi", "--remote", "maybe"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_one_line_exit_2(argv, needle, capsys, smollm):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_remote_true_without_key(capsys, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    assert main(["sinks", "--text", "hi", "--remote", "true"]) == 2
    assert "NDIF_API_KEY" in capsys.readouterr().err


def test_help_on_every_command():
    for argv in (["--help"], ["sinks", "--help"]):
        out = subprocess.run([sys.executable, "-m", "catchtag", *argv], capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout
