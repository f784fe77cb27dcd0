"""Stopping a book build, and a chapter whose kernel dies: Ctrl-C (SIGINT to the build's process group, as a terminal sends it) and
SIGTERM to the build process alone (`kill PID`, a CI runner, `timeout`) stop the running chapters
within seconds, with one line and the shell's status (130, 143), no kernel or worker left running,
no executed notebook and no kernel socket folder left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _chapters import ROOT, tiny_chapter

# Each chapter reports its kernel's pid and its parent's (the build, or a parallel build's worker),
# then sleeps far longer than the test waits.
SLEEPER = """
import json, os, time
open(os.path.join(REPORT, NAME + ".json"), "w").write(json.dumps(dict(pid=os.getpid(), ppid=os.getppid())))
for _ in range(600):
    time.sleep(0.1)
"""

DRIVER = """
import sys
from pathlib import Path
from catchtag.book import bookbuild as b
b.BOOK = Path(sys.argv[1])
b.chapters_in_toc = lambda: ["a", "b"]
b.main(["--chapter", "a", "--chapter", "b", "--force", "--no-html", "--jobs", sys.argv[2]])
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.parametrize("jobs, sig, group, status, words", [
    (2, signal.SIGTERM, False, 143, "terminated"),
    (2, signal.SIGINT, True, 130, "interrupted"),
    (1, signal.SIGTERM, False, 143, "terminated"),
])
def test_a_stopped_build_stops_its_chapters_and_leaves_nothing(tmp_path, jobs, sig, group, status, words):
    book, report = tmp_path / "book", tmp_path / "report"
    report.mkdir()
    for name in ("a", "b"):
        tiny_chapter(book, name, f"REPORT, NAME = {str(report)!r}, {name!r}", SLEEPER)
    sockets = Path(tempfile.mkdtemp(prefix="ck"))  # short: a Unix socket path must fit in 107 bytes
    env = {**os.environ, "TMPDIR": str(sockets), "CATCHTAG_BUILD": str(tmp_path / "build"),
           "CATCHTAG_RESULTS": str(tmp_path / "results")}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(book), str(jobs)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        want = 2 if jobs == 2 else 1
        deadline = time.time() + 120
        while len(list(report.glob("*.json"))) < want:
            assert proc.poll() is None and time.time() < deadline, "the chapters did not start"
            time.sleep(0.2)
        time.sleep(0.5)
        pids = [json.loads(f.read_text()) for f in report.glob("*.json")]
        os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == status, err[-2000:]
        assert err.strip().splitlines()[-1].startswith(f"error: {words}"), err[-2000:]
        assert "Traceback" not in err, err[-3000:]
        gone = [p for r in pids for p in (r["pid"], r["ppid"])]
        for _ in range(50):
            if not any(_alive(p) for p in gone):
                break
            time.sleep(0.2)
        assert not [p for p in gone if _alive(p)], "a chapter's kernel or worker outlived the build"
        assert not list((tmp_path / "build").glob("executed/*.ipynb")), "a stopped chapter was kept"
        assert not list(sockets.glob("catchtag-kernel-*")), "a kernel's socket folder outlived the build"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(sockets, ignore_errors=True)


def test_a_chapter_whose_kernel_dies_is_one_line(tmp_path):
    book = tmp_path / "book"
    for name in ("a", "b"):
        tiny_chapter(book, name, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would")
    sockets = Path(tempfile.mkdtemp(prefix="ck"))
    env = {**os.environ, "TMPDIR": str(sockets), "CATCHTAG_BUILD": str(tmp_path / "build"),
           "CATCHTAG_RESULTS": str(tmp_path / "results")}
    env.pop("OMP_NUM_THREADS", None)
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER, str(book), "2"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        left = list(sockets.glob("catchtag-kernel-*"))
        shutil.rmtree(sockets, ignore_errors=True)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: chapter ") and "its kernel died" in last and "make chapter CH=" in last, last
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not list((tmp_path / "build").glob("executed/*.ipynb")) and not left
