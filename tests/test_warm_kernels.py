"""Warm kernels (`catchtag.book.warmkernel`): the book build forks each chapter's kernel from a
process that has imported the library and loaded the models; the chapter sees the same model a
fresh load gives, on one torch thread; a process that has run torch (this test session) never
forks kernels; `--cold` / $CATCHTAG_WARM=0 start kernels as new processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from catchtag.book import warmkernel

from _chapters import LOADING_STAND_IN, ROOT, model_free_chapter, tiny_chapter

# A chapter that reports, before importing anything itself, whether its kernel was forked warm,
# then compares the model `load_model` hands it first (the preloaded one) with a second, fresh
# load: the same weights and the same logits, bit for bit.
PROBE = """
import json, os, sys
from ipykernel.kernelapp import IPKernelApp
app = IPKernelApp.instance()
# the kernel polls the process that started it, and exits when that process is gone
watched = app.parent_handle == os.getppid() and app.poller is not None
transport = app.transport   # "ipc": the build's kernel manager asks for Unix sockets, not TCP
warm = "torch" in sys.modules and "transformers" in sys.modules
from catchtag import models
preloaded = models._default_preload_key(model) in models._PRELOADED
import torch
first = models.load_model(model)
handed_out = preloaded and models._default_preload_key(model) not in models._PRELOADED  # load_model took it
second = models.load_model(model)   # the preloaded one is handed out once: this one is loaded anew
a, b = first.hf.state_dict(), second.hf.state_dict()
same_weights = first is not second and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
ids = first.tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids
with torch.no_grad():
    same_logits = torch.equal(first.hf(ids).logits, second.hf(ids).logits)
out = dict(warm=warm, preloaded=preloaded, handed_out=handed_out, same_weights=same_weights, same_logits=same_logits,
           threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"),
           session=os.getsid(0) == os.getpid(), watched=watched, transport=transport)
open(os.path.join(REPORT, NAME + ".json"), "w").write(json.dumps(out))
"""

# The build's own entry point, on a book folder of tiny chapters (BOOK patched before anything is
# imported, as `python -m catchtag.book.bookbuild` would run it).
DRIVER = """
import sys
from pathlib import Path
from catchtag.book import bookbuild as b
b.BOOK = Path(sys.argv[1])
b.chapters_in_toc = lambda: ["a", "b"]
b.main(["--chapter", "a", "--chapter", "b", "--force", "--no-html", "--jobs", "2", *sys.argv[2:]])
"""


def _run_tiny_book(tmp_path, sockets, *extra, env_extra=None):
    book = tmp_path / "book"
    report = tmp_path / "report"
    report.mkdir()
    for name in ("a", "b"):
        tiny_chapter(book, name, f"REPORT, NAME = {str(report)!r}, {name!r}", PROBE)
    env = {**os.environ, "TMPDIR": str(sockets), "CATCHTAG_BUILD": str(tmp_path / "build"), "CATCHTAG_RESULTS": str(tmp_path / "results")}
    env.pop("OMP_NUM_THREADS", None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", DRIVER, str(book), *extra], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "To connect another client" not in out.stdout + out.stderr  # the `ipython kernel` banner
    assert "without encryption" not in out.stdout + out.stderr  # ipykernel's warning for TCP
    assert not list(sockets.glob("catchtag-kernel-*")), "a kernel's socket folder outlived the build"
    return {n: json.loads((report / f"{n}.json").read_text()) for n in ("a", "b")}


def test_the_build_forks_warm_kernels_that_see_what_a_fresh_load_gives(tmp_path, short_tmp):
    got = _run_tiny_book(tmp_path, short_tmp)
    for name, r in got.items():
        assert r["warm"] and r["preloaded"] and r["handed_out"], (name, r)
        assert r["same_weights"] and r["same_logits"], (name, r)
        assert r["threads"] == 1 and r["omp"] == "1" and r["session"] and r["watched"], (name, r)
        assert r["transport"] == "ipc", (name, r)


def test_cold_kernels_on_request(tmp_path, short_tmp):
    for extra, env in ((["--cold"], None), ([], {"CATCHTAG_WARM": "0"})):
        folder = tmp_path / ("flag" if extra else "env")
        folder.mkdir()
        got = _run_tiny_book(folder, short_tmp, *extra, env_extra=env)
        for name, r in got.items():
            assert not r["warm"] and not r["preloaded"], (name, r)
            assert r["same_weights"] and r["same_logits"] and r["threads"] == 1 and r["watched"], (name, r)
            assert r["transport"] == "ipc", (name, r)


def test_a_process_that_has_imported_torch_never_forks_kernels(monkeypatch):
    import torch  # noqa: F401  (this session has run torch: its OpenMP pool would not survive a fork)

    monkeypatch.setattr(warmkernel, "_READY", False)
    assert warmkernel.prepare(["smollm2-135m"]) == []
    assert not warmkernel.ready()
    monkeypatch.setenv("CATCHTAG_WARM", "0")
    assert not warmkernel.enabled()


def test_forked_process_handle_polls_waits_and_kills():
    pid = os.fork()
    if pid == 0:  # the child only sleeps (no torch: safe to fork this session)
        time.sleep(60)
        os._exit(0)
    p = warmkernel._ForkedProcess(pid)
    assert p.poll() is None
    p.kill()
    assert p.wait() == -signal.SIGKILL and p.poll() == -signal.SIGKILL
    p.send_signal(signal.SIGTERM)  # a finished process: nothing is sent, no error
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    assert warmkernel._ForkedProcess(pid).wait() == 3


def test_only_ipykernel_command_lines_are_forked():
    assert warmkernel._is_ipykernel([sys.executable, "-m", "ipykernel_launcher", "-f", "c.json"])
    assert not warmkernel._is_ipykernel([sys.executable, "-m", "other_kernel", "-f", "c.json"])


def test_warm_kernels_only_where_each_kernel_runs_one_thread(tmp_path, monkeypatch):
    from catchtag.book import bookbuild

    from _chapters import HEADER

    book = tmp_path / "book"
    book.mkdir()
    for name in ("a", "b"):
        (book / f"{name}.md").write_text(HEADER)
    monkeypatch.setattr(bookbuild, "BOOK", book)
    monkeypatch.setattr(bookbuild, "_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert bookbuild.kernel_threads(["a", "b"], 2) == 1       # the default build on 2 cores: warm
    assert bookbuild.kernel_threads(["a", "b"], 1) is None    # one at a time, every core: cold
    assert bookbuild.kernel_threads(["a"], 2) is None         # a single chapter runs in-process order
    monkeypatch.setattr(bookbuild, "_cores", lambda: 4)
    assert bookbuild.kernel_threads(["a", "b"], 2) == 2       # two threads each: cold
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bookbuild.kernel_threads(["a"], 1) == 1
    # the chapters' registry models, from their declared defaults and the overrides
    assert bookbuild._registry_models(["a", "b"], {"a": {}, "b": {"model": "gemma3-270m"}}) == [
        "smollm2-135m", "", "gemma3-270m"]


def test_kernel_sockets_fall_back_to_tcp_where_a_unix_socket_path_would_be_too_long(tmp_path, short_tmp,
                                                                                   monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", None)   # read $TMPDIR again
    monkeypatch.setenv("TMPDIR", str(short_tmp))
    prefix = warmkernel._ipc_prefix()
    assert prefix is not None and prefix.startswith(str(short_tmp)) and len(prefix.encode()) <= 90
    assert oct(os.stat(os.path.dirname(prefix)).st_mode & 0o777) == "0o700"
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv("TMPDIR", str(deep))
    assert warmkernel._ipc_prefix() is None   # the kernel manager then keeps TCP
    assert not list(deep.iterdir())           # and no folder is left behind


def test_a_kernels_socket_folder_survives_a_restart_and_goes_when_it_stops_or_dies():
    """Cold kernels (a new process; a test session may not fork, see above): the folder holds the
    sockets across a restart, and is removed both by a shutdown and by the cleanup nbclient runs
    after a kernel died (`cleanup_resources`, which AsyncKernelManager binds to its own function)."""
    import asyncio

    async def run():
        for died in (False, True):
            km = warmkernel.kernel_manager_class(warm=False)(kernel_name="python3")
            await km.start_kernel()
            folder = os.path.dirname(km.ip)
            try:
                assert km.transport == "ipc" and os.path.isdir(folder)
                if not died:
                    await km.restart_kernel()
                    client = km.client()
                    client.start_channels()
                    await client.wait_for_ready(timeout=60)   # the new kernel answers over the same sockets
                    client.stop_channels()
                    assert os.path.exists(f"{km.ip}-1")
                    await km.shutdown_kernel(now=True)
                else:
                    os.kill(km.provisioner.pid, signal.SIGKILL)
                    for _ in range(100):
                        if not await km.is_alive():
                            break
                        await asyncio.sleep(0.05)
                    await km.cleanup_resources()
                assert not os.path.exists(folder), ("dead" if died else "stopped", folder)
            finally:
                if await km.is_alive():
                    await km.shutdown_kernel(now=True)
                shutil.rmtree(folder, ignore_errors=True)

    if len(tempfile.gettempdir()) > 60:
        pytest.skip("this machine's temporary folder is too deep for a Unix socket path")
    asyncio.run(run())


def test_only_stale_kernel_socket_folders_are_removed(short_tmp, monkeypatch):
    import socket

    root = short_tmp
    monkeypatch.setattr("tempfile.tempdir", str(root))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()   # a pid that has just exited
    old = time.time() - 3600

    def folder(name, age=old):
        p = root / name
        p.mkdir()
        os.utime(p, (age, age))
        return p

    stale = folder(f"catchtag-kernel-{dead}-aaaa")
    young = folder(f"catchtag-kernel-{dead}-bbbb", age=time.time())           # may not hold its sockets yet
    alive = folder(f"catchtag-kernel-{os.getppid()}-cccc")                     # its manager runs
    listening = folder(f"catchtag-kernel-{dead}-dddd")                         # a kernel still answers here
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listening / "k-1"))
    server.listen()
    os.utime(listening, (old, old))
    odd = [folder("catchtag-kernel-99999999999-eeee"), folder("catchtag-kernel-0-ffff"), folder("other-1-x")]
    try:
        assert warmkernel.remove_stale_socket_folders() == [str(stale)]
        assert young.exists() and alive.exists() and listening.exists() and all(p.exists() for p in odd)
    finally:
        server.close()


# The build with its model loading replaced by a stand-in that takes 10 s (`LOADING_STAND_IN`): a
# chapter that names no model must start (and finish) meanwhile, in a kernel forked before any model
# was there; a chapter naming one starts after, with the stand-in "model" in its kernel.
REPORTER = """
import json, os, sys, time
from catchtag import models
out = dict(at=time.time(), preloaded=len(models._PRELOADED), warm="torch" in sys.modules)
open(os.path.join(REPORT, NAME + ".json"), "w").write(json.dumps(out))
"""


def test_a_chapter_that_names_no_model_starts_while_the_models_load(tmp_path, short_tmp):
    book, report, loaded = tmp_path / "book", tmp_path / "report", tmp_path / "loaded"
    report.mkdir()
    tiny_chapter(book, "named", f"REPORT, NAME = {str(report)!r}, 'named'", REPORTER)
    model_free_chapter(book, "free", f"REPORT, NAME = {str(report)!r}, 'free'", REPORTER)
    env = {**os.environ, "TMPDIR": str(short_tmp), "CATCHTAG_BUILD": str(tmp_path / "build"),
           "CATCHTAG_RESULTS": str(tmp_path / "results"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", LOADING_STAND_IN, str(book), "10", str(loaded)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[book] free: started while the models load" in out.stdout, out.stdout
    assert "named: started while" not in out.stdout, out.stdout
    done = float(loaded.read_text())
    got = {n: json.loads((report / f"{n}.json").read_text()) for n in ("free", "named")}
    assert got["free"]["warm"] and got["free"]["preloaded"] == 0 and got["free"]["at"] < done, got
    assert got["named"]["warm"] and got["named"]["preloaded"] == 1 and got["named"]["at"] > done, got
