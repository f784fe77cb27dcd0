"""Bad input, in one place: every case is answered with one line naming the problem and what to
do, exit status 2 (CLI and book build), no traceback, and nothing written.

Covered through the CLI (`catchtag.cli.main`, and `python -m catchtag` in a subprocess), through
chapter parameters (`catchtag.book.params.check_params`; the book build's check of `-p` values against
a chapter's parameters cell, in-process and as `python -m catchtag.book.bookbuild`; a papermill run of a
tiny chapter whose check cell refuses a value; a chapter that fails later with a CatchtagError),
and through the library where there is no CLI flag (head index, empty prompt list).

The cases asked for: unknown model name, hub id with no network, eps <= 0 or >= 1, empty text,
text longer than the model's context, layer or head index out of range, n_prompts of 0, a
parameter of the wrong type through papermill, a corrupt or truncated GGUF file, a missing model
package, a non-causal (encoder) model, remote=True without NDIF_API_KEY. See also
tests/test_cli.py, tests/test_models.py and tests/test_remote.py, which check some of them one by
one.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catchtag import models
from catchtag.book import bookbuild
from catchtag.cli import main
from catchtag.errors import CatchtagError
from catchtag.models import REGISTRY
from catchtag.book.params import check_params

from _chapters import ROOT, tiny_chapter

ORIGINAL_SMOLLM = REGISTRY["smollm2-135m"]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_line(err: str, needle: str) -> None:
    err = err.strip()
    assert err, "no error message"
    assert "\n" not in err, f"more than one line: {err!r}"
    assert "Traceback" not in err
    assert needle.lower() in err.lower(), f"{needle!r} not in {err!r}"


# --------------------------------------------------------------------------------------------------
# The CLI


@dataclasses.dataclass(frozen=True)
class _FileSpec(models.ModelSpec):
    """A registry entry whose GGUF file is at `path` (for a corrupt or truncated copy)."""

    path: str = ""

    def gguf_path(self) -> Path:
        return Path(self.path)


@pytest.fixture()
def sandbox(tmp_path, monkeypatch, smollm):
    """An empty working folder, results and model-cache folders (checked to stay empty), and
    load_model answering "smollm2-135m" with the session's model (the real loader otherwise)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("CATCHTAG_RESULTS", str(work / "results"))
    real = models.load_model

    def load(name=models.DEFAULT_MODEL, **kw):
        if name == "smollm2-135m" and REGISTRY["smollm2-135m"] is ORIGINAL_SMOLLM and not kw.get("remote"):
            return smollm
        return real(name, **kw)

    monkeypatch.setattr(models, "load_model", load)
    return work


def _truncated_gguf(tmp_path: Path, monkeypatch) -> None:
    src = ORIGINAL_SMOLLM.gguf_path()
    copy = tmp_path / "inputs" / "truncated.gguf"
    copy.parent.mkdir(exist_ok=True)
    with open(src, "rb") as fh:
        copy.write_bytes(fh.read(1 << 20))  # the first MiB of the real file
    spec = _FileSpec(**dataclasses.asdict(ORIGINAL_SMOLLM), path=str(copy))
    monkeypatch.setitem(REGISTRY, "smollm2-135m", spec)


def _garbage_gguf(tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "inputs" / "garbage.gguf"
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(b"GGUF" + bytes(4096))
    monkeypatch.setitem(REGISTRY, "smollm2-135m", _FileSpec(**dataclasses.asdict(ORIGINAL_SMOLLM), path=str(copy)))


def _missing_package(tmp_path, monkeypatch) -> None:
    spec = dataclasses.replace(ORIGINAL_SMOLLM, package="not-installed-model-pkg")
    monkeypatch.setitem(REGISTRY, "smollm2-135m", spec)


def _encoder(tmp_path: Path, monkeypatch) -> str:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path / "inputs" / "bert")
    return str(tmp_path / "inputs" / "bert")


def _binary_file(tmp_path: Path, monkeypatch) -> str:
    # The issue's `head -c 3000 /dev/urandom > bin.dat`, with a fixed seed.
    import random

    data = bytes(random.Random(0).randrange(256) for _ in range(3000))
    (tmp_path / "inputs").mkdir(exist_ok=True)
    (tmp_path / "inputs" / "bin.dat").write_bytes(data)
    return str(tmp_path / "inputs" / "bin.dat")


def _latin1_file(tmp_path: Path, monkeypatch) -> str:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    (tmp_path / "inputs" / "latin1.txt").write_bytes("Voilà le café.".encode("latin-1"))
    return str(tmp_path / "inputs" / "latin1.txt")


def _directory(tmp_path: Path, monkeypatch) -> str:
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return str(tmp_path / "inputs")


def _unknown_architecture(tmp_path: Path, monkeypatch) -> str:
    folder = tmp_path / "inputs" / "arch"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return str(folder)


def _offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _no_key(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("NDIF_API_KEY", raising=False)


LONG_TEXT = "word " * 9000  # more than SmolLM2's context of 8192 tokens

# (id, argv, what the message must say, setup(tmp_path, monkeypatch) -> None or a path for {path})
CLI_CASES = [
    ("unknown-model", ["--model", "smollm-9000", "--text", "hi"], "unknown model", None),
    ("hub-id-no-network", ["--model", "someone/not-a-cached-model", "--text", "hi"], "cannot be reached", _offline),
    ("eps-zero", ["--text", "hi", "--eps", "0"], "(0, 1)", None),
    ("eps-negative", ["--text", "hi", "--eps", "-0.5"], "(0, 1)", None),
    ("eps-one", ["--text", "hi", "--eps", "1"], "(0, 1)", None),
    ("eps-above-one", ["--text", "hi", "--eps", "1.5"], "(0, 1)", None),
    ("eps-not-a-number", ["--text", "hi", "--eps", "abc"], "(0, 1)", None),
    ("empty-text", ["--text", "   "], "empty", None),
    ("no-text", [], "empty", None),
    ("text-longer-than-context", ["--text", LONG_TEXT], "context of 8192", None),
    ("layer-out-of-range", ["--text", "hi", "--layer", "30"], "layers 0..29", None),
    ("layer-negative", ["--text", "hi", "--layer", "-1"], "out of range", None),
    ("layer-not-an-int", ["--text", "hi", "--layer", "five"], "invalid int", None),
    ("truncated-gguf", ["--text", "hi"], "corrupt or truncated", _truncated_gguf),
    ("garbage-gguf", ["--text", "hi"], "corrupt or truncated", _garbage_gguf),
    ("missing-model-package", ["--text", "hi"], "pip install", _missing_package),
    ("encoder-model", ["--model", "{path}", "--text", "hi"], "not a causal language model", _encoder),
    ("remote-true-no-key", ["--text", "hi", "--remote", "true"], "NDIF_API_KEY", _no_key),
    ("remote-bad-value", ["--text", "hi", "--remote", "maybe"], "invalid choice", None),
    ("unreadable-file", ["--file", "/nonexistent/prompt.txt"], "cannot read", None),
    ("binary-file", ["--file", "{path}"], "is not UTF-8 text", _binary_file),
    ("latin1-file", ["--file", "{path}"], "is not UTF-8 text (byte 0xE0 at offset 4", _latin1_file),
    ("directory-as-file", ["--file", "{path}"], "is a directory", _directory),
    ("unknown-architecture", ["--model", "{path}", "--text", "hi"], "no-such-architecture", _unknown_architecture),
    ("min-queries-negative", ["--text", "hi", "--min-queries", "-1"], "whole number >= 0", None),
    ("min-queries-not-a-number", ["--text", "hi", "--min-queries", "ten"], "whole number >= 0", None),
    ("bad-format", ["--text", "hi", "--format", "xml"], "invalid choice", None),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, sandbox, tmp_path, monkeypatch, capsys):
    _, argv, needle, setup = case
    path = setup(tmp_path, monkeypatch) if setup else None
    argv = ["sinks"] + [a.replace("{path}", path) if path else a for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line(captured.err, needle)
    assert captured.err.startswith("error: ")
    assert files_under(sandbox) == []  # nothing written


def test_cli_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert_one_line(capsys.readouterr().err, "invalid choice")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sinks", "--model", "smollm-9000", "--text", "hi", "--eps", "0.3"], "unknown model"),
    ],
)
def test_cli_subprocess_exit_status_2(argv, needle, tmp_path):
    """The real entry point: exit status 2, one line on stderr, nothing on stdout, nothing written."""
    env = {**os.environ, "CATCHTAG_RESULTS": str(tmp_path / "results")}
    out = subprocess.run([sys.executable, "-m", "catchtag", *argv], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 2
    assert out.stdout == ""
    assert_one_line(out.stderr, needle)
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# The library, where the CLI has no flag


def test_library_head_out_of_range(smollm):
    with pytest.raises(CatchtagError) as info:
        smollm.check_layer_head(3, 9)
    assert_one_line(str(info.value), "heads 0..8")


def test_library_no_prompts(smollm):
    from catchtag.capture import capture

    with pytest.raises(CatchtagError) as info:
        capture(smollm, [], progress=False)
    assert_one_line(str(info.value), "n_prompts >= 1")


# --------------------------------------------------------------------------------------------------
# Chapter parameters: check_params


PARAM_CASES = [
    (dict(model="nope"), "unknown model"),
    (dict(model=""), "model is empty"),
    (dict(model=7), "must be a string"),
    (dict(compare=3), "must be a string"),
    (dict(compare="smollm-9000"), "unknown model"),
    (dict(eps=0), "(0, 1)"),
    (dict(eps=-0.1), "(0, 1)"),
    (dict(eps=1), "(0, 1)"),
    (dict(eps=2.0), "(0, 1)"),
    (dict(eps="abc"), "finite number"),
    (dict(eps=True), "(0, 1)"),
    (dict(seed=-1), ">= 0"),
    (dict(seed=1.5), "whole number"),
    (dict(seed="x"), "whole number"),
    (dict(n_prompts=0), ">= 1"),
    (dict(n_prompts="abc"), "whole number"),
    (dict(n_prompts=None), "whole number"),
    (dict(remote="maybe"), "remote="),
    (dict(remote=1), "remote="),
    (dict(remote=True), "NDIF_API_KEY"),
]


@pytest.mark.parametrize("kw, needle", PARAM_CASES, ids=[f"{k}={v!r}" for kw, _ in PARAM_CASES for k, v in kw.items()])
def test_check_params_refuses(kw, needle, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(CatchtagError) as info:
        check_params(**kw)
    assert_one_line(str(info.value), needle)


@pytest.mark.parametrize(
    "kind, value, needle",
    [(bool, 1, "True or False"), (int, 2.5, "whole number"), (float, "x", "finite number"), (str, 3, "string")],
)
def test_check_params_declared_types(kind, value, needle):
    with pytest.raises(CatchtagError) as info:
        check_params(_types={"other": kind}, other=value)
    assert_one_line(str(info.value), needle)


def test_check_params_normalises(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    got = check_params(_types={"flag": bool, "ratio": float, "steps": int},
                       model=" smollm2-135m ", compare=None, eps=0.3, seed=0, n_prompts=2.0,
                       remote="local", flag="true", ratio=1, steps=4.0, anything=[1, 2])
    assert got == dict(model="smollm2-135m", compare="", eps=0.3, seed=0, n_prompts=2, remote="local",
                       flag=True, ratio=1.0, steps=4, anything=[1, 2])
    assert type(got["ratio"]) is float and type(got["n_prompts"]) is int


# --------------------------------------------------------------------------------------------------
# Chapter parameters through the book build: checked against the parameters cell, no kernel


@pytest.fixture()
def build_dir(tmp_path, monkeypatch):
    build = tmp_path / "build"
    monkeypatch.setattr(bookbuild, "BUILD", build)
    monkeypatch.setattr(bookbuild, "EXECUTED", build / "executed")
    monkeypatch.setattr(bookbuild, "STAGE", build / "stage")
    monkeypatch.setenv("CATCHTAG_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    return tmp_path


BUILD_CASES = [
    (["-p", "eps", "2"], "(0, 1)"),
    (["-p", "eps", "0"], "(0, 1)"),
    (["-p", "n_prompts", "0"], ">= 1"),
    (["-p", "n_prompts", "abc"], "whole number"),  # wrong type: papermill would pass the string
    (["-p", "n_prompts", "2.5"], "whole number"),
    (["-p", "seed", "-3"], ">= 0"),
    (["-p", "model", "smollm-9000"], "unknown model"),
    (["-p", "model", "12"], "must be a string"),
    (["-p", "remote", "True"], "NDIF_API_KEY"),
    (["-p", "remote", "maybe"], "remote="),
    (["-p", "n_promts", "2"], "has no parameter 'n_promts'"),
]


@pytest.mark.parametrize("argv, needle", BUILD_CASES, ids=[" ".join(a[1:]) for a, _ in BUILD_CASES])
def test_book_build_refuses_bad_parameters(argv, needle, build_dir, capsys):
    with pytest.raises(SystemExit) as info:
        bookbuild.main(["--chapter", "sinks", "--no-html", *argv])
    assert info.value.code == 2
    assert_one_line(capsys.readouterr().err, needle)
    assert files_under(build_dir) == []  # no kernel started, nothing written


def test_book_build_unknown_chapter(build_dir, capsys):
    with pytest.raises(SystemExit) as info:
        bookbuild.main(["--chapter", "nonexistent", "--no-html"])
    assert info.value.code == 2
    assert_one_line(capsys.readouterr().err, "unknown chapter")
    assert files_under(build_dir) == []


def test_make_chapter_eps_2_is_one_line_exit_2(tmp_path):
    """What `make chapter CH=sinks PARAMS="-p eps 2"` runs."""
    env = {**os.environ, "CATCHTAG_BUILD": str(tmp_path / "build"), "CATCHTAG_RESULTS": str(tmp_path / "results")}
    out = subprocess.run([sys.executable, "-m", "catchtag.book.bookbuild", "--chapter", "sinks", "--force", "-p", "eps", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2
    assert out.stdout == ""
    assert_one_line(out.stderr, "eps=2 is not valid")
    assert "sinks" in out.stderr
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Chapter parameters inside a kernel (papermill): the check cell, and a CatchtagError further on


def test_papermill_wrong_type_stops_in_the_check_cell(tmp_path, monkeypatch):
    """A chapter run by papermill directly (Jupyter users, `papermill` CLI) checks its parameters in
    its first cell after the parameters cell: a string where an int is expected stops there, as a
    one-line CatchtagError, not a traceback."""
    import jupytext
    import nbformat
    import papermill as pm

    md = tiny_chapter(tmp_path / "book", "tiny", 'raise RuntimeError("must not get here")')
    nb = jupytext.read(md)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    raw = tmp_path / "tiny.ipynb"
    nbformat.write(nb, raw)
    out = tmp_path / "out" / "tiny.ipynb"
    out.parent.mkdir()
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(raw), str(out), parameters={"n_prompts": "two"}, kernel_name="python3",
                            progress_bar=False, log_output=False, cwd=str(tmp_path))
    exc = info.value
    assert exc.ename == "CatchtagError"
    assert_one_line(exc.evalue, "n_prompts='two' is not valid")
    done = nbformat.read(out, as_version=4)
    errors = [o for c in done.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1
    assert errors[0].traceback == [f"CatchtagError: {exc.evalue}"]  # one line, no traceback


def test_book_build_reports_a_failing_cell_in_one_line(tmp_path, monkeypatch, capsys):
    """A CatchtagError raised after the parameters passed (here: a hub id with no network) stops
    the chapter with one line naming the chapter, the cell and the error; exit status 2; nothing
    kept: no executed notebook, no partial one."""
    book = tmp_path / "book"
    tiny_chapter(book, "tiny", "from catchtag.models import load_model\nload_model(model)")
    build = tmp_path / "build"
    monkeypatch.setattr(bookbuild, "BOOK", book)
    monkeypatch.setattr(bookbuild, "BUILD", build)
    monkeypatch.setattr(bookbuild, "EXECUTED", build / "executed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CATCHTAG_RESULTS", str(tmp_path / "results"))
    with pytest.raises(bookbuild.ChapterFailed) as info:
        bookbuild.execute("tiny", {"model": "someone/not-a-cached-model"}, force=True)
    exc = info.value
    assert exc.status == 2
    assert_one_line(exc.message, "CatchtagError: model 'someone/not-a-cached-model' is not in the local")
    assert "chapter 'tiny' failed in cell" in exc.message
    left = [p for p in files_under(build / "executed")]
    assert left in ([], [".partial"]), left
    assert not (tmp_path / "results").exists()


def test_read_text_utf8_or_one_line(tmp_path):
    from catchtag.textio import read_text

    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffVoilà 猫.\r\n".encode("utf-8"))
    assert read_text(good) == "Voilà 猫.\r\n"  # BOM dropped, line endings kept
    bad = tmp_path / "bad.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(CatchtagError) as err:
        read_text(bad, "prompt file")
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "UTF-8" in msg and "0xE9 at offset 3" in msg
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"ab\x00cd")
    with pytest.raises(CatchtagError, match="NUL"):
        read_text(nul)
    with pytest.raises(CatchtagError, match="cannot read"):
        read_text(tmp_path / "missing.txt")
