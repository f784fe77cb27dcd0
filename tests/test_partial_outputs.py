"""No partial outputs: a writer killed mid-run leaves the previous complete output (or none) in
place, never a half-written one, and its leftover temporary file is removed by the next run.

Results files (`catchtag.book.report.save_results`) and executed notebooks (`catchtag.book.bookbuild.execute`)
are both written into a `.partial/` folder next to their destination and renamed into place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from catchtag.book import warmkernel
from catchtag.book.report import remove_stale_partials, save_results

from _chapters import ROOT, tiny_chapter


def _wait_for(predicate, timeout: float, proc) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the writer")


def test_results_file_survives_a_killed_writer(tmp_path, monkeypatch):
    monkeypatch.setenv("CATCHTAG_RESULTS", str(tmp_path))
    previous = save_results("demo", "m", {"eps": 0.2}, {"version": 1})
    before = previous.read_bytes()
    # The writer stops for good between writing its temporary file and renaming it: SIGKILL there.
    script = textwrap.dedent("""
        import os, sys, time
        real = os.replace
        def stalled(a, b):
            print("written", flush=True)
            time.sleep(120)
            real(a, b)
        os.replace = stalled
        from catchtag.book.report import save_results
        save_results("demo", "m", {"eps": 0.2}, {"version": 2, "big": list(range(100000))})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        partial = list((tmp_path / ".partial").iterdir())
        assert len(partial) == 1 and partial[0].stat().st_size > 100000
    finally:
        proc.kill()
        proc.wait()
    assert previous.read_bytes() == before  # the previous complete file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial", "demo-m.json"]
    # the next write removes the dead writer's temporary file
    save_results("demo", "m", {"eps": 0.2}, {"version": 3})
    assert list((tmp_path / ".partial").iterdir()) == []
    assert '"version": 3' in previous.read_text()


def test_executed_notebook_survives_a_killed_build(tmp_path, short_tmp):
    """A chapter killed (SIGKILL, kernel too) while papermill is writing it: the previous executed
    notebook stays as it was, nothing half-written is at its place, and the leftover partial copy
    goes at the next build."""
    import psutil

    book = tmp_path / "book"
    tiny_chapter(book, "tiny", 'print("started", flush=True)', "import time\ntime.sleep(300)")
    build = tmp_path / "build"
    executed = build / "executed"
    executed.mkdir(parents=True)
    previous = executed / "tiny.ipynb"
    previous.write_text('{"cells": [], "metadata": {"previous": "complete"}, "nbformat": 4, "nbformat_minor": 5}\n')
    before = previous.read_bytes()
    script = (f"from pathlib import Path\nfrom catchtag.book import bookbuild\nbookbuild.BOOK = Path({str(book)!r})\n"
              "bookbuild.execute('tiny', {}, force=True)\n")
    sockets = short_tmp  # the kernel's socket folder goes here
    env = {**os.environ, "CATCHTAG_BUILD": str(build), "CATCHTAG_RESULTS": str(tmp_path / "results"),
           "TMPDIR": str(sockets)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    partial_dir = executed / ".partial"
    kernels = []
    try:
        def writing():
            files = list(partial_dir.glob("tiny.*.ipynb")) if partial_dir.exists() else []
            return bool(files) and "started" in files[0].read_text(errors="replace")

        _wait_for(writing, 240, proc)
        kernels = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for child in kernels:  # the kernel runs in its own session: end it by its id
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    assert previous.read_bytes() == before
    assert sorted(p.name for p in executed.iterdir()) == [".partial", "tiny.ipynb"]
    assert [p.name for p in partial_dir.iterdir()] == [f"tiny.{proc.pid}.ipynb"]
    assert remove_stale_partials(partial_dir)  # what the next build does first
    assert list(partial_dir.iterdir()) == []
    # the killed build's kernel socket folder, named after it, goes when the next kernel starts
    left = [p.name for p in sockets.glob("catchtag-kernel-*")]
    assert len(left) == 1 and left[0].startswith(f"catchtag-kernel-{proc.pid}-"), left
    old = tempfile.tempdir
    try:
        tempfile.tempdir = str(sockets)
        assert warmkernel.remove_stale_socket_folders(min_age=0) == [str(sockets / left[0])]
    finally:
        tempfile.tempdir = old
