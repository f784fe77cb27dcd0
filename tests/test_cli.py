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
    assert set(result) == {"model", "eps", "min_queries", "tokens", "min_row_sum", "heads"}
    assert result["model"] == name and result["eps"] == 0.2 and result["min_queries"] == 10
    assert result["min_row_sum"] == pytest.approx(1.0, abs=1e-4)  # no learned sink logits
    cfg = {"smollm2-135m": (30, 9), "gemma3-270m": (18, 4)}[name]
    assert len(result["heads"]) == cfg[0] * cfg[1]
    for head in result["heads"]:
        assert set(head) == {"layer", "head", "min_row_sum", "sinks"}
        for sink in head["sinks"]:
            assert set(sink) == {"position", "token", "received", "n_queries"}
            assert sink["received"] > 0.2
            assert result["tokens"][sink["position"]] == sink["token"]
            # the census rule: at least 10 later queries see every reported sink
            assert sink["n_queries"] - 1 >= 10
            assert len(result["tokens"]) - 1 - sink["position"] >= 10
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


LONG = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon " * 40


def test_sliding_window_alpha_on_gemma(tmp_path, capsys, gemma):
    """Issue 12 item 1: Gemma-3-270M (window 512) on the 922-token text, layer 2, head 1: <bos>
    receives 0.247 as the mean over the 512 queries that see it (0.137 when divided by T)."""
    path = tmp_path / "long.txt"
    path.write_text(LONG, encoding="utf-8")  # print(LONG, end=''): no newline
    assert main(["sinks", "--model", "gemma3-270m", "--file", str(path), "--layer", "2", "--eps", "0.2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["tokens"]) == 922
    head1 = [h for h in result["heads"] if h["head"] == 1][0]
    bos = [s for s in head1["sinks"] if s["position"] == 0]
    assert bos, "the <bos> sink of head 1 is missed at eps 0.2"
    assert bos[0]["received"] == pytest.approx(0.2466, abs=2e-3)
    assert bos[0]["n_queries"] == 512


def test_bos_in_the_text_is_not_doubled(capsys, gemma):
    """Issue 12 item 4: "<bos>The cat sat. The dog ran." gives one <bos>, as the plain text does."""
    assert main(["sinks", "--model", "gemma3-270m", "--text", "<bos>The cat sat. The dog ran.", "--min-queries", "2"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert main(["sinks", "--model", "gemma3-270m", "--text", "The cat sat. The dog ran.", "--min-queries", "2"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert given["tokens"][:2] == ["<bos>", "The"] and given["tokens"] == plain["tokens"]
    assert given["heads"] == plain["heads"]
    assert not any(s["position"] == 1 and s["token"] == "<bos>" for h in given["heads"] for s in h["sinks"])


def test_file_in_utf8_with_split_characters(tmp_path, capsys, smollm):
    path = tmp_path / "voila.txt"
    path.write_text("Voilà 猫. The dog ran.", encoding="utf-8")
    assert main(["sinks", "--file", str(path), "--layer", "3", "--min-queries", "0"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens[3:6] == [" <0xE7>", "<0x8C>", "<0xAB>"]  # 猫 = E7 8C AB, shown byte by byte
    assert not any("\ufffd" in t for t in tokens)
