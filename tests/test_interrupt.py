"""Stopping a book build, and a chapter whose kernel dies: Ctrl-C (SIGINT to the build's process group, as a terminal sends it) and
SIGTERM to the build process alone (`kill PID`, a CI runner, `timeout`) stop the running chapters
within seconds, with one line and the shell's status (130, 143), no kernel or chapter process left running,
no executed notebook and no kernel socket folder left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from catchtag.book.report import _alive  # a zombie counts as gone

from _chapters import LOADING_STAND_IN, ROOT, model_free_chapter, tiny_chapter

# Each chapter reports its kernel's pid and its parent's (the build, or a parallel build's chapter process),
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


def _stopped(proc, status: int, words: str, pids: list[dict]) -> tuple[str, str]:
    """The build's output after the signal, checked: its status, its last line, no traceback, and
    every kernel and chapter process in `pids` (their reports) gone soon after."""
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: {words}"), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    gone = [p for r in pids for p in (r["pid"], r["ppid"])]
    for _ in range(50):
        if not any(_alive(p) for p in gone):
            break
        time.sleep(0.2)
    assert not [p for p in gone if _alive(p)], "a chapter's kernel or chapter process outlived the build"
    return out, err


def _kill_left(proc, pids: list[dict]) -> None:
    """What a failing run may have left: the build's process group, the kernels and chapter processes."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for r in pids:
        for p in (r["pid"], r["ppid"]):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass



@pytest.mark.parametrize("jobs, sig, group, status, words, idle, twice", [
    (2, signal.SIGTERM, False, 143, "terminated", False, False),
    (2, signal.SIGINT, True, 130, "interrupted", False, False),
    (1, signal.SIGTERM, False, 143, "terminated", False, False),
    # one chapter has finished, the other still runs (the end of every parallel build)
    (2, signal.SIGTERM, False, 143, "terminated", True, False),
    (2, signal.SIGINT, True, 130, "interrupted", True, False),
    # the signal sent twice in quick succession (an impatient user, a supervisor's retry)
    (2, signal.SIGTERM, False, 143, "terminated", False, True),
    (2, signal.SIGINT, True, 130, "interrupted", False, True),
])
def test_a_stopped_build_stops_its_chapters_and_leaves_nothing(tmp_path, short_tmp, jobs, sig, group, status, words,
                                                               idle, twice):
    book, report = tmp_path / "book", tmp_path / "report"
    report.mkdir()
    for name in ("a", "b"):
        quick = idle and name == "a"
        tiny_chapter(book, name, f"REPORT, NAME = {str(report)!r}, {name!r}",
                     SLEEPER.replace("range(600)", "range(0)") if quick else SLEEPER)
    sockets = short_tmp
    env = {**os.environ, "TMPDIR": str(sockets), "CATCHTAG_BUILD": str(tmp_path / "build"),
           "CATCHTAG_RESULTS": str(tmp_path / "results")}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(book), str(jobs)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = []
    try:
        want = 2 if jobs == 2 else 1
        deadline = time.time() + 120
        while len(list(report.glob("*.json"))) < want:
            assert proc.poll() is None and time.time() < deadline, "the chapters did not start"
            time.sleep(0.2)
        while idle and not (tmp_path / "build" / "executed" / "a.ipynb").exists():  # "a" done, "b" runs
            assert proc.poll() is None and time.time() < deadline, "chapter a did not finish"
            time.sleep(0.2)
        time.sleep(0.5)
        pids = [json.loads(f.read_text()) for f in report.glob("*.json")]
        for _ in range(2 if twice else 1):
            os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
            time.sleep(0.02)
        out, err = _stopped(proc, status, words, pids)
        kept = sorted(p.name for p in (tmp_path / "build").glob("executed/*.ipynb"))
        assert kept == (["a.ipynb"] if idle else []), f"kept {kept}: a stopped chapter was kept, or a finished one lost"
        # (a second Ctrl-C reaches the chapter processes while papermill shuts their kernels down:
        # they ignore it, so that the cleanup is not cut short)
        assert not list(sockets.glob("catchtag-kernel-*")), "a kernel's socket folder outlived the build:\n" + err[-3000:]
    finally:
        _kill_left(proc, pids)


def test_a_chapter_whose_kernel_dies_is_one_line(tmp_path, short_tmp):
    book = tmp_path / "book"
    for name in ("a", "b"):
        tiny_chapter(book, name, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would")
    env = {**os.environ, "TMPDIR": str(short_tmp), "CATCHTAG_BUILD": str(tmp_path / "build"),
           "CATCHTAG_RESULTS": str(tmp_path / "results")}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", DRIVER, str(book), "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    left = list(short_tmp.glob("catchtag-kernel-*"))
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: chapter ") and "its kernel died" in last and "make chapter CH=" in last, last
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not list((tmp_path / "build").glob("executed/*.ipynb")) and not left


def test_an_abandoned_cell_tasks_error_is_not_printed(caplog):
    """After Ctrl-C, papermill's kernel cleanup runs the event loop again and the abandoned cell task
    may end with DeadKernelError (the race behind one Ctrl-C run in 13 printing a traceback):
    asyncio's report of it and nbclient's "Kernel died" line are dropped; other reports are not."""
    import asyncio
    import gc
    import logging

    from nbclient.exceptions import DeadKernelError

    from catchtag.book import bookbuild

    bookbuild._quiet_kernel_death()
    bookbuild._quiet_kernel_death()  # once per process, however often it executes a chapter
    assert sum(isinstance(f, bookbuild._KernelDeathNoise) for f in logging.getLogger("asyncio").filters) == 1

    async def fails(exc):
        raise exc

    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR):
            for exc in (DeadKernelError("Kernel died"), RuntimeError("a real bug")):
                task = loop.create_task(fails(exc))
                loop.run_until_complete(asyncio.sleep(0.01))
                del task
                gc.collect()
            logging.getLogger("papermill").error("Kernel died while waiting for execute reply.")
            logging.getLogger("papermill").error("Kernel didn't respond in 60 seconds")
    finally:
        loop.close()
    reported = [(r.name, r.getMessage().splitlines()[0], r.exc_info and type(r.exc_info[1]).__name__)
                for r in caplog.records]
    assert reported == [("asyncio", "Task exception was never retrieved", "RuntimeError"),
                        ("papermill", "Kernel didn't respond in 60 seconds", None)], reported


# The build with its model loading replaced by a stand-in that takes a minute (`LOADING_STAND_IN`),
# and a chapter that names no model: it starts while the "models" load, and the signal comes then.


@pytest.mark.parametrize("sig, group, status, words", [(signal.SIGTERM, False, 143, "terminated"),
                                                       (signal.SIGINT, True, 130, "interrupted")])
def test_a_build_stopped_while_the_models_load_stops_the_chapter_started_meanwhile(tmp_path, short_tmp, sig, group,
                                                                                   status, words):
    book, report = tmp_path / "book", tmp_path / "report"
    report.mkdir()
    tiny_chapter(book, "named", "x = 1")
    model_free_chapter(book, "free", f"REPORT, NAME = {str(report)!r}, 'free'\n{SLEEPER.strip()}")
    env = {**os.environ, "TMPDIR": str(short_tmp), "CATCHTAG_BUILD": str(tmp_path / "build"),
           "CATCHTAG_RESULTS": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LOADING_STAND_IN, str(book), "60", str(tmp_path / "loaded")],
                            cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = []
    try:
        deadline = time.time() + 50
        while not (report / "free.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the chapter did not start while loading"
            time.sleep(0.2)
        time.sleep(0.5)
        pids = [json.loads((report / "free.json").read_text())]
        os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
        out, err = _stopped(proc, status, words, pids)
        assert "free: started while the models load" in out, out
        assert not list((tmp_path / "build").glob("executed/*.ipynb"))
        assert not list(short_tmp.glob("catchtag-kernel-*")), err[-3000:]
    finally:
        _kill_left(proc, pids)
