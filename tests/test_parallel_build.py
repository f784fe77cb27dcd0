"""The book build runs several chapters at once (`bookbuild --jobs N`, default 2 on 2 cores): each
chapter in its own process and kernel, with the cores shared out as torch threads, summary pages
after every other chapter, timings recorded under a lock, and a failing chapter stops the build
with its one-line message and exit status."""

from __future__ import annotations

import json
import os
import pickle
import signal

import pytest

from catchtag.book import bookbuild
from catchtag.book.report import _alive

from _chapters import model_free_chapter, tiny_chapter

# Each chapter writes that it started, then waits (up to a minute) for the other to have started:
# they finish only when both ran at the same time (with one job the first would time out).
RENDEZVOUS = """
import os, time
from pathlib import Path
here = Path({folder!r})
(here / "{me}.started").write_text(os.environ.get("OMP_NUM_THREADS", ""))
for _ in range(600):
    if (here / "{other}.started").exists():
        break
    time.sleep(0.1)
else:
    raise RuntimeError("{other} never ran at the same time as {me}")
"""


@pytest.fixture
def book(tmp_path, monkeypatch):
    book = tmp_path / "book"
    build = tmp_path / "build"
    monkeypatch.setattr(bookbuild, "BOOK", book)
    monkeypatch.setattr(bookbuild, "BUILD", build)
    monkeypatch.setattr(bookbuild, "EXECUTED", build / "executed")
    monkeypatch.setattr(bookbuild, "TIMINGS", build / "executed" / "timings.json")
    monkeypatch.setenv("CATCHTAG_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(bookbuild, "_cores", lambda: 2)
    return book


def test_two_chapters_run_at_once_with_one_thread_each(book, tmp_path):
    meet = tmp_path / "meet"
    meet.mkdir()
    tiny_chapter(book, "a", RENDEZVOUS.format(folder=str(meet), me="a", other="b"))
    tiny_chapter(book, "b", RENDEZVOUS.format(folder=str(meet), me="b", other="a"))
    # a summary page runs after both (it would fail if it ran before them)
    tiny_chapter(book, "summary", f"from pathlib import Path\nassert len(list(Path({str(meet)!r}).glob('*.started'))) == 2")
    md = book / "summary.md"
    md.write_text(md.read_text().replace("---\n", "---\ncatchtag: {summary: true}\n", 1))
    assert bookbuild.is_summary(md)
    times = bookbuild.execute_all(["a", "b", "summary"], {"a": {}, "b": {}, "summary": {}}, force=True, jobs=2)
    assert sorted(t[0] for t in times[:2]) == ["a", "b"] and times[2][0] == "summary"
    assert (meet / "a.started").read_text() == "1" and (meet / "b.started").read_text() == "1"
    table = json.loads(bookbuild.TIMINGS.read_text())
    assert set(table) == {"a", "b", "summary"}  # both writers kept (the file is updated under a lock)
    assert table["a"]["omp_num_threads"] == "1"
    for name in ("a", "b", "summary"):
        assert (bookbuild.EXECUTED / f"{name}.ipynb").exists()


def test_a_failing_chapter_stops_the_parallel_build_with_its_status(book):
    tiny_chapter(book, "good", "x = 1")
    tiny_chapter(book, "bad", "from catchtag.errors import CatchtagError\nraise CatchtagError('bad input here')")
    with pytest.raises(bookbuild.ChapterFailed) as info:
        bookbuild.execute_all(["good", "bad"], {"good": {}, "bad": {}}, force=True, jobs=2)
    assert info.value.status == 2
    assert "chapter 'bad' failed" in info.value.message and "bad input here" in info.value.message
    assert not (bookbuild.EXECUTED / "bad.ipynb").exists()


def _fake_chapter(name, params, force):
    import time

    (bookbuild.BOOK / f"{name}.ran").touch()
    if name == "bad":
        raise bookbuild.ChapterFailed("chapter 'bad' failed in cell 3 (CatchtagError: no)", 2)
    time.sleep(0.5)  # the first chapters are still running when "bad" fails
    return name, 0.5, False


def test_chapters_not_started_are_not_started_and_the_failure_is_raised(book, monkeypatch):
    """More chapters than places: the ones still queued when a chapter fails never run, and the
    build ends with the failure's one line and status."""
    monkeypatch.setattr(bookbuild, "_run_chapter", _fake_chapter)
    monkeypatch.setattr(bookbuild, "_last_seconds", lambda name: {"bad": 2.0}.get(name, 1.0))  # "bad" first
    names = ["bad"] + [f"c{i}" for i in range(8)]
    for n in names:
        tiny_chapter(book, n, "x = 1")
    with pytest.raises(bookbuild.ChapterFailed) as info:
        bookbuild.execute_all(names, {n: {} for n in names}, force=True, jobs=2)
    assert info.value.status == 2 and "chapter 'bad' failed" in info.value.message
    ran = sorted(f.stem for f in book.glob("*.ran"))
    assert ran == ["bad", "c0"], ran  # c0 started beside "bad" and finished; c1..c7 never started


def test_chapter_failed_keeps_its_status_through_pickling():
    exc = pickle.loads(pickle.dumps(bookbuild.ChapterFailed("one line", 2)))
    assert (exc.message, exc.status) == ("one line", 2)


def test_jobs_and_threads(monkeypatch):
    monkeypatch.setattr(bookbuild, "_cores", lambda: 8)
    monkeypatch.delenv("CATCHTAG_JOBS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert bookbuild.default_jobs() == bookbuild.DEFAULT_JOBS
    assert bookbuild.threads_per_chapter(2) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
    assert bookbuild.threads_per_chapter(2) == 1
    monkeypatch.setattr(bookbuild, "_cores", lambda: 1)
    assert bookbuild.default_jobs() == 1
    monkeypatch.setenv("CATCHTAG_JOBS", "3")
    assert bookbuild.default_jobs() == 3
    monkeypatch.setenv("CATCHTAG_JOBS", "many")
    with pytest.raises(bookbuild.ChapterFailed, match="CATCHTAG_JOBS='many' is not valid"):
        bookbuild.default_jobs()


def test_longest_chapter_first(tmp_path, monkeypatch):
    timings = tmp_path / "timings.json"
    monkeypatch.setattr(bookbuild, "TIMINGS", timings)
    assert bookbuild._last_seconds("kvcache") == bookbuild.TYPICAL_SECONDS["kvcache"]  # no file yet
    bookbuild.record_timing("kvcache", 3.0, {}, "now", path=timings)
    bookbuild.record_book_wall(9.0, 2, ["kvcache"], path=timings)
    assert bookbuild._last_seconds("kvcache") == 3.0
    assert json.loads(timings.read_text())["_book"]["jobs"] == 2


def test_jobs_flag_refuses_zero(capsys):
    with pytest.raises(SystemExit) as info:
        bookbuild.main(["--jobs", "0", "--no-html"])
    assert info.value.code == 2
    assert "not a number of chapters >= 1" in capsys.readouterr().err


def _dies(name, params, force):
    import time

    if name == "forks":  # a process forked by the chapter's (as its warm kernel is) outlives it
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        (bookbuild.BOOK / "grandchild").write_text(str(child))
        name = "gone"
    if name == "gone":
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    if name == "bug":
        raise RuntimeError("not a chapter failure")
    if name == "odd":
        raise TwoArguments("a", "b")
    return name, 0.0, False


class TwoArguments(Exception):
    """Pickles, but does not unpickle (its __init__ wants two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


@pytest.mark.parametrize("name, words", [("gone", "the process executing it died (exit status -9"),
                                         ("forks", "the process executing it died (exit status -9"),
                                         ("bug", "RuntimeError: not a chapter failure"),
                                         ("odd", "TwoArguments: a/b")])
def test_a_chapter_process_that_dies_or_raises_is_one_line(book, monkeypatch, name, words):
    monkeypatch.setattr(bookbuild, "_run_chapter", _dies)
    names = [name, "fine"]
    for n in names:
        tiny_chapter(book, n, "x = 1")
    with pytest.raises(bookbuild.ChapterFailed) as info:
        bookbuild.execute_all(names, {n: {} for n in names}, force=True, jobs=2)
    assert info.value.status == 1 and info.value.message.startswith(f"chapter {name!r}: ")
    assert words in info.value.message, info.value.message
    if name == "forks":  # the build did not wait for it: the pipe it reports on is not inherited
        grandchild = int((book / "grandchild").read_text())
        try:
            assert _alive(grandchild)
        finally:
            os.kill(grandchild, signal.SIGKILL)


def test_which_chapters_need_no_model(book):
    tiny_chapter(book, "named", "x = 1")  # the common parameters cell names smollm2-135m
    model_free_chapter(book, "free", "x = 1")
    chosen = {"named": {}, "free": {}}
    assert not bookbuild.needs_no_model("named", chosen) and bookbuild.needs_no_model("free", chosen)
    assert not bookbuild.needs_no_model("free", {"free": {"model": "gemma3-270m"}})  # -p model names one


def test_a_chapter_that_failed_while_the_models_loaded_starts_nothing(book, monkeypatch):
    """`warm_up` starts a chapter early; if it has failed by the time `run` takes over, no other
    chapter is started (they would only delay the failure)."""
    from multiprocessing.connection import wait

    monkeypatch.setattr(bookbuild, "_run_chapter", _fake_chapter)
    book.mkdir()
    runner = bookbuild.ChapterProcesses({"bad": {}, "c1": {}}, force=True, jobs=2)
    runner.start("bad")
    assert wait(list(runner.running), timeout=60), "the early chapter did not finish"
    with pytest.raises(bookbuild.ChapterFailed, match="chapter 'bad' failed"):
        runner.run(["c1"])
    assert runner.started == ["bad"]


def _marks(name, params, force):
    (bookbuild.BOOK / f"{name}.ran").touch()
    return name, 0.0, False


def test_a_signal_that_came_while_the_build_held_it_is_reported_not_printed(book, monkeypatch, capfd):
    """A Ctrl-C that reaches a chapter process between its fork and its own handlers is held (the
    build blocks it across the fork) and delivered when the child restores the mask: the chapter
    is reported interrupted, not started, and nothing is printed."""
    import multiprocessing as mp

    monkeypatch.setattr(bookbuild, "_run_chapter", _marks)
    book.mkdir()
    receive, send = mp.get_context("fork").Pipe(duplex=False)

    def child():
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGINT)  # pending: it came during the hold
        bookbuild._chapter_process(send, "a", {}, False, 1, before)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    send.close()
    status, value = receive.recv()
    proc.join()
    assert status == "failed" and isinstance(value, KeyboardInterrupt) and proc.exitcode == 0
    assert not (book / "a.ran").exists()
    assert "Traceback" not in capfd.readouterr().err


def test_chapter_processes_without_register_at_fork(book, monkeypatch):
    """Where os.register_at_fork does not exist (Windows, whose chapter processes are spawned and
    fork nothing), the chapters still run."""
    monkeypatch.setattr(bookbuild, "_run_chapter", _marks)
    monkeypatch.delattr(os, "register_at_fork")
    for n in ("a", "b"):
        tiny_chapter(book, n, "x = 1")
    times = bookbuild.execute_all(["a", "b"], {"a": {}, "b": {}}, force=True, jobs=2)
    assert sorted(t[0] for t in times) == ["a", "b"]


def test_main_stops_only_its_own_chapter_processes(monkeypatch):
    """An exception in one `main` call stops the chapter processes it made, not those of an
    earlier build (or of another thread's: the list is per thread)."""
    earlier = bookbuild.ChapterProcesses({}, force=False, jobs=2)
    stopped = []
    monkeypatch.setattr(bookbuild.ChapterProcesses, "stop", lambda self, grace=30.0: stopped.append(self))
    earlier.running = {"a pipe": ("a process", "a")}

    def fails(argv):
        mine = bookbuild.ChapterProcesses({}, force=False, jobs=2)
        mine.running = {"another pipe": ("another process", "b")}
        raise bookbuild.ChapterFailed("chapter 'b' failed", 1)

    monkeypatch.setattr(bookbuild, "_main", fails)
    with pytest.raises(SystemExit):
        bookbuild.main([])
    assert len(stopped) == 1 and stopped[0] is not earlier
