"""Warm kernels: chapter kernels forked from a build process that has already imported the
library and loaded the offline models.

A cold chapter kernel spends ~15 s of CPU before its first computation: starting ipykernel,
importing torch, transformers, nnsight, scikit-learn and pandas (~6 s), and loading both offline
models (~5 s each, Gemma-3's 262k-word tokenizer ~3 s of it), for every chapter. The book build
instead does this once (`prepare`) and starts each chapter's kernel with `os.fork()` from that
process (the manager `kernel_manager_class(warm=True)` gives papermill): the kernel is
the same ipykernel, speaking the same protocol, and inherits the imported modules and the loaded
models (copy-on-write: a chapter that changes a model, e.g. fine-tunes it, changes its own copy).

The numbers do not change: `catchtag.models.load_model` hands a preloaded model to the first call
with the same arguments in each kernel (`models.preload`), and that model is the one a fresh load
would give (same file, same weights, never run before the fork); later calls load again, as
before. The build process keeps one thread for torch (OpenMP's thread pool does not survive a
fork: the child of a process that ran a parallel region on two threads hangs in its first one).
Only kernels of one torch thread are forked (OMP_NUM_THREADS=1: the parallel build on a machine
with as many cores as jobs, the default `make book` on 2 cores); a kernel of more threads starts
as a new process, because a forked kernel that raised its threads to 2 ran a SmolLM2 forward in
29.8 s, against 10.1 s for a new process on 2 threads and 8.1 s forked on 1 (measured here with the
other core busy; libgomp's pool created after the fork; not explained further). matplotlib
is not imported before the fork (ipykernel chooses its inline backend at start).

`$CATCHTAG_WARM=0` (or `bookbuild --cold`) starts every kernel as a new process instead.
Where `os.fork` does not exist (Windows) kernels are always cold. Warm or cold, a chapter's kernel
talks to the build over Unix sockets in a private folder, not over TCP (`kernel_manager_class`).
"""

from __future__ import annotations

import os
import signal
import sys
import time

# Imported before the fork: what most chapters import (matplotlib excluded, see above; scikit-learn,
# 2 s, only by the probing chapter, is left to it: the build process's imports run while the other
# core waits).
MODULES = ("torch", "numpy", "pandas", "transformers", "nnsight",
           "ipykernel.kernelapp", "catchtag.models", "catchtag.capture", "catchtag.sinks",
           "catchtag.census_views", "catchtag.census_attention", "catchtag.tags", "catchtag.release",
           "catchtag.probes", "catchtag.kvcache", "catchtag.qknorm", "catchtag.reasoning",
           "catchtag.book.report")


_READY = False  # set by `prepare` in this process (or the process it was forked from)


def enabled() -> bool:
    """Warm kernels are wanted unless $CATCHTAG_WARM is "0" (or the platform cannot fork)."""
    return hasattr(os, "fork") and os.environ.get("CATCHTAG_WARM", "1").strip() != "0"


def ready() -> bool:
    """Whether this process may fork warm kernels: `prepare` ran here (or before the fork that made
    this process), warm kernels are still wanted, and torch still runs on one thread."""
    return _READY and enabled() and sys.modules["torch"].get_num_threads() == 1


def prepare(model_names) -> list[str]:
    """In the build process, before any chapter runs: import `MODULES` and preload the registry
    models among `model_names` (`catchtag.models.preload`). Returns the names preloaded; a model
    that cannot be loaded is skipped (the chapter that needs it reports the error itself).

    Does nothing (kernels stay cold) when warm kernels are not wanted, or when torch was imported
    before: that process may have run OpenMP with several threads, and a forked child of such a
    process hangs in its first parallel region (libgomp's pool does not survive a fork)."""
    global _READY
    import importlib

    if _READY:
        from catchtag import models

        return models.preload(model_names)
    if not enabled() or "torch" in sys.modules:
        return []
    import torch

    torch.set_num_threads(1)  # no OpenMP thread pool before the fork (kernels set their own)
    for name in MODULES:
        importlib.import_module(name)
    from catchtag import models

    _READY = True
    return models.preload(model_names)


class _ForkedProcess:
    """The Popen methods jupyter_client's LocalProvisioner calls, for a child made by os.fork."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0
                return 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = 0
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _is_ipykernel(cmd) -> bool:
    return len(cmd) >= 3 and cmd[1] == "-m" and cmd[2] == "ipykernel_launcher"


def _run_kernel(argv: list[str], env: dict, cwd) -> None:
    """In the forked child: become the kernel `python -m ipykernel_launcher argv` would start, then
    exit without running the parent's finalisers (its event loop, its zmq context)."""
    code = 1
    try:
        os.setsid()  # a process group of its own, as jupyter_client's launcher gives a kernel
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        import asyncio

        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop(asyncio.new_event_loop())
        os.environ.clear()
        os.environ.update(env)
        if cwd:
            os.chdir(cwd)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)  # OMP_NUM_THREADS=1 (ForkingProvisioner)
        sys.argv = [sys.executable, *argv]
        if sys.path and sys.path[0] in ("", os.getcwd()):
            del sys.path[0]  # as ipykernel_launcher does (added back by the shell)
        from ipykernel import kernelapp

        # The trait's default reads $JPY_PARENT_PID when ipykernel is imported, which was in the
        # build process, before the variable was set: pass it, so that the kernel polls its
        # parent (and exits when it is gone) and prints no "ipython kernel" banner.
        if env.get("JPY_PARENT_PID"):
            argv = [*argv, f"--IPKernelApp.parent_handle={int(env['JPY_PARENT_PID'])}"]
        kernelapp.IPKernelApp.launch_instance(argv=argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, then leave without the parent's cleanup
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _provisioner_class():
    from jupyter_client.provisioning import LocalProvisioner

    class ForkingProvisioner(LocalProvisioner):
        """LocalProvisioner whose `launch_kernel` forks this process into the kernel (for the
        ipykernel command line; anything else is launched as usual)."""

        async def launch_kernel(self, cmd, **kwargs):
            env = dict(kwargs.get("env") or os.environ)
            if not _is_ipykernel(cmd) or env.get("OMP_NUM_THREADS", "").strip() != "1":
                return await super().launch_kernel(cmd, **kwargs)
            # as jupyter_client's launcher: the kernel polls its parent and exits when it is gone
            env["JPY_PARENT_PID"] = str(os.getpid())
            cwd = kwargs.get("cwd")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_kernel(list(cmd[3:]), env, cwd)
            self.process = _ForkedProcess(pid)
            self.pid = pid
            self.pgid = pid
            self.cwd = cwd
            return self.connection_info

    return ForkingProvisioner


# Unix socket paths are limited to 107 bytes (sun_path); a prefix this long leaves room for "-5"
_MAX_IPC_PREFIX = 90


_SOCKET_FOLDER = "catchtag-kernel-"  # + the managing process's pid + "-" + random letters


def _ipc_prefix() -> str | None:
    """A path prefix for one kernel's sockets (jupyter_client adds "-1" .. "-5") in a new private
    folder under the temporary directory (mode 0700), named after this process (the kernel's
    manager), which removes it when the kernel stops; None where Unix sockets do not exist (Windows)
    or that path would be too long for one (the kernel then stays on TCP). Folders left by managers
    that are gone (a build killed with SIGKILL) are removed first (`remove_stale_socket_folders`)."""
    import shutil
    import tempfile

    if os.name != "posix":
        return None
    remove_stale_socket_folders()
    folder = tempfile.mkdtemp(prefix=f"{_SOCKET_FOLDER}{os.getpid()}-")
    prefix = os.path.join(folder, "k")
    if len(prefix.encode()) > _MAX_IPC_PREFIX:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return prefix


def remove_stale_socket_folders(min_age: float = 60.0) -> list[str]:
    """Delete this user's kernel socket folders in the temporary directory that are stale: the
    process named in the folder's name is gone, the folder is older than `min_age` seconds (a new
    one may not hold its sockets yet), and no socket in it accepts a connection (a live kernel's
    does, also one whose manager runs in another pid namespace sharing this directory). Returns the
    folders removed."""
    import re
    import shutil
    import socket
    import tempfile

    from catchtag.book.report import _alive

    def live_socket(folder: str) -> bool:
        for name in os.listdir(folder):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(os.path.join(folder, name))
                    return True
                except OSError:
                    pass
        return False

    removed = []
    root = tempfile.gettempdir()
    for entry in os.scandir(root):
        m = re.fullmatch(re.escape(_SOCKET_FOLDER) + r"([1-9]\d{0,9})-\w+", entry.name)
        if m is None:
            continue
        try:
            pid = int(m.group(1))
            if (not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid()
                    or time.time() - entry.stat().st_mtime < min_age or pid == os.getpid() or _alive(pid)
                    or live_socket(entry.path)):
                continue
        except (OSError, ValueError, OverflowError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def kernel_manager_class(warm: bool = True):
    """The AsyncKernelManager of a chapter's kernel (passed to papermill as its
    `kernel_manager_class`): forked from this process when `warm` (`ForkingProvisioner`), else
    started as a new process. Either way the kernel's five channels (shell, iopub, stdin, control,
    heartbeat) are Unix sockets in a private folder (`_ipc_prefix`) rather than TCP ports on
    localhost, so ipykernel does not warn, once per chapter, that its TCP traffic is unencrypted.
    The manager removes the folder when it cleans up after the kernel (stopped or dead); a build
    killed outright (SIGKILL) leaves it (as it leaves jupyter_client's connection file) until the
    next chapter kernel starts (`remove_stale_socket_folders`)."""
    import shutil

    from jupyter_client import AsyncKernelManager

    provisioner = _provisioner_class() if warm else None

    class ChapterKernelManager(AsyncKernelManager):
        _socket_folder: str | None = None  # made by this manager, for this kernel

        async def _async_pre_start_kernel(self, **kw):
            if self.transport == "tcp" and (prefix := _ipc_prefix()) is not None:
                self.transport, self.ip = "ipc", prefix  # before the connection file is written
                self._socket_folder = os.path.dirname(prefix)
            cmd, kw = await super()._async_pre_start_kernel(**kw)
            if provisioner is not None and type(self.provisioner).__name__ == "LocalProvisioner":
                self.provisioner.__class__ = provisioner
            return cmd, kw

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)  # removes the socket files
            if not restart and self._socket_folder is not None:
                shutil.rmtree(self._socket_folder, ignore_errors=True)
                self._socket_folder = None

        # AsyncKernelManager binds `cleanup_resources` (what nbclient calls after a kernel died) to
        # the base class's function itself, not to a method looked up on the instance
        cleanup_resources = _async_cleanup_resources

    ChapterKernelManager.__name__ = "ForkingKernelManager" if warm else "ChapterKernelManager"
    return ChapterKernelManager
