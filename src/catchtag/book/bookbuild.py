"""Build the book: MyST chapters -> jupytext -> papermill -> jupyter-book (execution off).

    python -m catchtag.book.bookbuild                 # every chapter in _toc.yml, default parameters
    python -m catchtag.book.bookbuild --chapter sinks -p model gemma3-270m -p eps 0.3

Each chapter under book/ is a MyST notebook (a .md file with a jupytext header). It is converted
to .ipynb, executed by papermill with its `parameters` cell overridden by -p NAME VALUE, and the
executed notebook is staged with the plain pages for jupyter-book, which renders it without
executing anything again. An executed notebook is reused when the chapter source, the parameters
and the library's source are all unchanged (its cache key is stored in its metadata). A failing
cell stops the build with the chapter's name, the cell's number and the error.

Bad input (an unknown chapter or parameter, a parameter of the wrong type or out of range, checked
against the chapter's parameters cell by `catchtag.book.params.check_params` before a kernel starts, or
a CatchtagError raised in a cell) is one line on stderr and exit status 2; any other failing cell
is one line and exit status 1. Nothing partial is left in place: papermill writes the executed
notebook into `_build/executed/.partial/`, and it is renamed into place only when complete, so a
build killed mid-run leaves the previous executed notebook or none. Ctrl-C (exit status 130) and
SIGTERM to the build process (143) stop the running chapters within seconds: their kernels are shut
down (a parallel build's chapter processes get SIGTERM as SIGINT), chapters not started are not
started, finished ones are kept; a second signal during that cleanup is ignored (chapter processes
that do not exit within 30 s are killed). `$CATCHTAG_BUILD` moves the
executed notebooks and staging out of `_build` (tests use it).

Three additions for the published book. Each chapter's notebook gets a first cell (tagged
`remove-cell`, so it is not shown) that installs the library when the notebook runs on Google
Colab and does nothing elsewhere. The staged copy of each executed notebook ends with a line giving
its run time, date and parameters. A *summary page* (front matter `catchtag: {summary: true}`, e.g.
book/reproduction.md) reads the other chapters' executed notebooks: it is executed after them, and
its cache key includes theirs, so it is rerun whenever one of them changes.

The built book reads offline: MathJax (from the pinned PyPI package django-static-mathjax) is
staged in `_mathjax/` and served from `_static/mathjax/` (`mathjax_path` in _config.yml), so no
page fetches anything from outside. The repository the Colab cell installs from and the launch
buttons open is `repository.url` of _config.yml, or $CATCHTAG_REPO_URL when set (`make book
REPO_URL=...`); the staged _config.yml and every staged install cell carry that one URL.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BOOK = ROOT / "book"
BUILD = Path(os.environ["CATCHTAG_BUILD"]).resolve() if os.environ.get("CATCHTAG_BUILD") else ROOT / "_build"
EXECUTED = BUILD / "executed"
# {chapter: {seconds, executed_at, parameters, omp_num_threads, cpus}}: each chapter's last execution,
# read by `catchtag bench` (its book table)
TIMINGS = EXECUTED / "timings.json"
STAGE = BUILD / "stage"


class ChapterFailed(SystemExit):
    """A chapter could not be executed: `message` is one line, `status` the exit status (2: bad
    input, a CatchtagError; 1: anything else). A SystemExit, so an uncaught one ends the build."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self):  # keeps the status when a parallel build's chapter process sends it
        return (type(self), (self.message, self.status))

# The repository the Colab cell installs from and the launch/download buttons point at: `repository.url`
# in _config.yml, overridden by $CATCHTAG_REPO_URL (`make book REPO_URL=...` sets it).
REPO_URL_ENV = "CATCHTAG_REPO_URL"
DEFAULT_REPOSITORY = "https://github.com/catchtag/catchtag"

# MathJax is served from the book itself (no CDN): MathJax 3.2.2 as packaged, unmodified, on PyPI by
# django-static-mathjax (pinned in requirements.lock). The SVG output component needs no font files.
MATHJAX_DIST = "django-static-mathjax"
MATHJAX_COMPONENT = "tex-svg.js"
MATHJAX_STATIC = "_mathjax"  # staged folder, listed in _config.yml's html_static_path; copied to _static/


def chapters_in_toc() -> list[str]:
    """Names (paths under book/, no extension) of every file in _toc.yml, in order."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [f.removeprefix("book/") for f in files]


def is_notebook(md: Path) -> bool:
    head = md.read_text().split("\n---", 1)[0]
    return md.suffix == ".md" and "kernelspec" in head


def front_matter(md: Path) -> dict:
    """The YAML header of a MyST page ({} when there is none)."""
    import yaml

    text = md.read_text()
    if not text.startswith("---"):
        return {}
    try:
        return yaml.safe_load(text[3:].split("\n---", 1)[0]) or {}
    except yaml.YAMLError:
        return {}


def is_summary(md: Path) -> bool:
    """A page that reads the other chapters' executed notebooks (front matter catchtag: {summary: true})."""
    meta = front_matter(md).get("catchtag") or {}
    return bool(isinstance(meta, dict) and meta.get("summary"))


def _config() -> dict:
    import yaml

    try:
        return yaml.safe_load((ROOT / "_config.yml").read_text()) or {}
    except OSError:
        return {}


def repository_url() -> str:
    """The book's repository: $CATCHTAG_REPO_URL if set, else `repository.url` of _config.yml."""
    override = os.environ.get(REPO_URL_ENV, "").strip()
    if override:
        return override.rstrip("/")
    return ((_config().get("repository") or {}).get("url") or DEFAULT_REPOSITORY).rstrip("/")


def staged_config() -> bytes:
    """_config.yml as staged: unchanged, except `repository.url` when $CATCHTAG_REPO_URL overrides it."""
    raw = (ROOT / "_config.yml").read_bytes()
    if not os.environ.get(REPO_URL_ENV, "").strip():
        return raw
    import yaml

    config = yaml.safe_load(raw) or {}
    config.setdefault("repository", {})["url"] = repository_url()
    return yaml.safe_dump(config, sort_keys=False).encode()


def mathjax_files() -> dict[str, Path]:
    """{path under _static/mathjax/: installed file} for the offline MathJax: the component
    MATHJAX_COMPONENT plus everything it loads on demand (TeX extensions, menu, accessibility,
    speech rules), none of the other combined components, and the licence.

    Raises ChapterFailed when the package is not installed (run `make install`)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(MATHJAX_DIST)
    except metadata.PackageNotFoundError:
        raise ChapterFailed(
            f"MathJax for the offline book is not installed: run `make install` (or "
            f"`pip install {MATHJAX_DIST}`, the version pinned in requirements.lock)") from None
    root = Path(dist.locate_file("mathjax/static/mathjax"))
    es5 = root / "es5"
    if not (es5 / MATHJAX_COMPONENT).is_file():
        raise ChapterFailed(f"{es5 / MATHJAX_COMPONENT} is missing: reinstall {MATHJAX_DIST} (`make install`)")
    files = {MATHJAX_COMPONENT: es5 / MATHJAX_COMPONENT, "LICENSE": root / "LICENSE"}
    for path in es5.rglob("*"):
        rel = path.relative_to(es5)
        if path.is_file() and len(rel.parts) > 1 and not rel.parts[0].startswith("."):
            files[rel.as_posix()] = path
    return files


def colab_cell():
    """First cell of every executed chapter: installs catchtag on Colab, does nothing elsewhere."""
    import nbformat

    from catchtag.model_packages import ALL_PACKAGES

    url = repository_url()
    source = (
        "# On Google Colab only: install the catchtag library, the notebook tools, the two offline models and the sentiment data.\n"
        "import subprocess, sys\n"
        "if \"google.colab\" in sys.modules:\n"
        f"    subprocess.check_call([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"catchtag @ git+{url}\", \"myst-nb\"])\n"
        f"    subprocess.check_call([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"--no-deps\", {', '.join(json.dumps(p) for p in ALL_PACKAGES)}])"
    )
    return nbformat.v4.new_code_cell(source, metadata={"tags": ["remove-cell"], "catchtag": "colab-install"})


# Modules no chapter runs: editing them does not make an executed chapter stale.
NOT_IN_CHAPTERS = {"bookbuild.py", "cli.py", "bench.py", "__main__.py"}


def library_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "catchtag").rglob("*.py")):
        if path.name in NOT_IN_CHAPTERS:
            continue
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(md: Path, params: dict) -> str:
    digest = hashlib.sha256()
    digest.update(md.read_bytes())
    digest.update(json.dumps(params, sort_keys=True).encode())
    digest.update(library_hash().encode())
    if is_summary(md):  # a summary page changes whenever a chapter it reads changes
        for ipynb in sorted(EXECUTED.glob("*.ipynb")):
            if ipynb.stem != md.stem and not ipynb.name.endswith(".partial.ipynb"):
                digest.update(f"{ipynb.stem}:{_stored_key(ipynb)}".encode())
    return digest.hexdigest()[:16]


def _stored_key(ipynb: Path) -> str | None:
    try:
        return json.loads(ipynb.read_text())["metadata"].get("catchtag", {}).get("cache_key")
    except (OSError, ValueError, KeyError):
        return None


def parse_value(text: str):
    """A -p value as papermill's CLI would read it: int, float, bool, None, else the string."""
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def declared_parameters(nb) -> dict:
    """{name: default} of the assignments in the notebook's `parameters` cell (literals only; a
    default that is not a literal is None, which accepts any value)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            declared = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        declared[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        declared[node.targets[0].id] = None
            return declared
    return {}


def check_chapter_params(name: str, nb, params: dict) -> None:
    """Raise ChapterFailed (status 2) for a parameter the chapter does not declare or a value that
    `catchtag.book.params.check_params` refuses (types from the declared defaults), before a kernel starts."""
    from catchtag.errors import CatchtagError
    from catchtag.book.params import check_params

    declared = declared_parameters(nb)
    unknown = [p for p in params if p not in declared]
    if unknown:
        raise ChapterFailed(
            f"chapter {name!r} has no parameter {unknown[0]!r}: its parameters are "
            f"{', '.join(declared) or '(none)'}", 2)
    types = {k: type(v) for k, v in declared.items() if v is not None}
    try:
        check_params(_types=types, **{**declared, **params})
    except CatchtagError as exc:
        raise ChapterFailed(f"chapter {name!r}, parameters: {exc}", 2) from None


def partial_dir() -> Path:
    """Where papermill writes a chapter while it runs; renamed into EXECUTED when complete."""
    return EXECUTED / ".partial"


class _KernelDeathNoise:
    """A logging filter for the two reports of a chapter kernel that died or was stopped, which
    `execute` replaces by one line (`ChapterFailed`, or the build's "error: interrupted"):
    nbclient's "Kernel died while waiting for execute reply." (papermill's logger), and asyncio's
    "Task exception was never retrieved" for a cell's task that nobody awaits any more. Ctrl-C
    raises in the build (or its chapter process) while papermill waits for a cell; papermill's kernel
    cleanup then runs the event loop again, the abandoned cell task may see the kernel gone
    (DeadKernelError) or its interrupted reply (CellExecutionError) and end with an error that
    asyncio prints, traceback and all, when the task is collected: whether it does is a race
    between the cleanup and nbclient's one-second liveness poll (one run of the Ctrl-C test in 13).
    Other records pass."""

    def filter(self, record) -> bool:
        from nbclient.exceptions import CellExecutionError, DeadKernelError

        message = record.getMessage()
        if record.name == "papermill":
            return not message.startswith("Kernel died while waiting for execute reply")
        exc = record.exc_info[1] if record.exc_info else None
        return not (message.startswith("Task exception was never retrieved")
                    and isinstance(exc, (DeadKernelError, CellExecutionError)))


def _quiet_kernel_death() -> None:
    """Add `_KernelDeathNoise` to the papermill and asyncio loggers, once per process."""
    import logging

    for logger in (logging.getLogger("papermill"), logging.getLogger("asyncio")):
        if not any(isinstance(f, _KernelDeathNoise) for f in logger.filters):
            logger.addFilter(_KernelDeathNoise())


def execute(name: str, params: dict, force: bool = False) -> tuple[Path, float, bool]:
    """Execute one chapter; returns (executed notebook, seconds, reused from cache).

    Raises ChapterFailed (one line; status 2 for bad input) when the parameters are refused or a
    cell fails; the previous executed notebook, if any, is left as it was."""
    import jupytext
    import nbformat
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    md = BOOK / f"{name}.md"
    out = EXECUTED / f"{name}.ipynb"
    check_chapter_params(name, jupytext.read(md), params)
    key = cache_key(md, params)
    if not force and _is_current(out, key):
        return out, 0.0, True
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = BUILD / "notebooks" / f"{name}.ipynb"
    raw.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(md)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.insert(0, colab_cell())
    from catchtag.book.report import remove_stale_partials, write_bytes_atomic

    write_bytes_atomic(raw, nbformat.writes(nb).encode())  # papermill never reads a half-written input
    partial_dir().mkdir(parents=True, exist_ok=True)
    remove_stale_partials(partial_dir())  # left by a build that was killed
    tmp = partial_dir() / f"{name}.{os.getpid()}.ipynb"
    # Progress bars are for readers who rerun a chapter; in the rendered book they are noise.
    os.environ["TQDM_DISABLE"] = "1"
    start = time.time()
    from catchtag.book import warmkernel

    # warm: a kernel forked from this process, which has imported the library and loaded the models
    manager = warmkernel.kernel_manager_class(warm=warmkernel.ready())
    _quiet_kernel_death()
    try:
        pm.execute_notebook(
            str(raw), str(tmp), parameters=params, kernel_name="python3", cwd=str(BOOK),
            progress_bar=False, log_output=False, kernel_manager_class=manager, shutdown_kernel="immediate",
        )
    except pm.PapermillExecutionError as exc:
        tmp.unlink(missing_ok=True)
        line = (exc.evalue or "").strip().splitlines()
        bad_input = exc.ename == "CatchtagError"
        raise ChapterFailed(
            f"chapter {name!r} failed in cell {exc.cell_index} ({exc.ename}: {line[0] if line else ''}); "
            "the executed copy is not kept; "
            + ("fix the input and rerun" if bad_input else f"rerun it with `make chapter CH={name}`"),
            2 if bad_input else 1,
        ) from None
    except DeadKernelError:
        tmp.unlink(missing_ok=True)
        raise ChapterFailed(
            f"chapter {name!r}: its kernel died (killed, or out of memory; a build stopped by Ctrl-C or "
            f"SIGTERM stops its kernels too); the executed copy is not kept; rerun it with "
            f"`make chapter CH={name}`", 1,
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.time() - start
    done = nbformat.read(tmp, as_version=4)
    executed_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    done.metadata["catchtag"] = {"cache_key": key, "parameters": params, "seconds": round(seconds, 1),
                                 "executed_at": executed_at}
    nbformat.write(done, tmp)
    os.replace(tmp, out)  # never leave a half-written executed notebook in place
    record_timing(name, seconds, params, executed_at)
    return out, seconds, False


def record_timing(name: str, seconds: float, params: dict, executed_at: str, path: Path | None = None) -> None:
    """Write the chapter's last execution time into `TIMINGS` (one JSON object for all chapters:
    {name: {seconds, executed_at, parameters, omp_num_threads, cpus}}), replacing its previous entry.
    A timings file that cannot be read is started afresh; the write is atomic."""
    _update_timings(name, {
        "seconds": round(float(seconds), 1), "executed_at": executed_at, "parameters": params,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
    }, path)


def record_book_wall(seconds: float, jobs: int, chapters: list[str], path: Path | None = None) -> None:
    """Record the last build's wall-clock execution time under the key "_book" of `TIMINGS`
    ({seconds, jobs, chapters, cpus, executed_at}); `catchtag bench --book` prints it."""
    _update_timings("_book", {
        "seconds": round(float(seconds), 1), "jobs": int(jobs), "chapters": list(chapters),
        "cpus": os.cpu_count(), "executed_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }, path)


def _update_timings(key: str, entry: dict, path: Path | None = None) -> None:
    """Replace `key`'s entry of the timings file, under a lock (the chapters of a parallel build
    finish at once) and atomically; a file that cannot be read is started afresh."""
    path = TIMINGS if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(f".{path.name}.lock")):
        try:
            table = json.loads(path.read_text())
            if not isinstance(table, dict):
                table = {}
        except (OSError, ValueError):
            table = {}
        table[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock on the file `lock` (fcntl where available; no lock elsewhere)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds there run one chapter at a time by default
        yield
        return
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Executing many chapters: one at a time, or several at once in separate processes

JOBS_ENV = "CATCHTAG_JOBS"
DEFAULT_JOBS = 2
# Only orders a build that has no timings.json yet (longest first, so that the longest chapter does
# not start last): seconds per chapter, one thread each, two at once, warm kernels, in the
# fresh-clone CI run of 2026-11-29 on commit 1aa502d (2 cores). A build then orders by its own
# recorded times.
TYPICAL_SECONDS = {"kvcache": 211, "probing": 133, "reasoning": 70, "minimal": 47, "tag": 40,
                   "sinks": 24, "qknorm": 23, "catch": 18, "release": 11}


def _jobs_arg(text: str) -> int:
    from catchtag.cli import whole_number_arg

    return whole_number_arg(1, "{text} is not a number of chapters >= 1")(text)


def default_jobs() -> int:
    """Chapters executed at once when --jobs is not given: $CATCHTAG_JOBS when set (a whole number
    >= 1, else a one-line error), else DEFAULT_JOBS capped by the cores this process may use."""
    text = os.environ.get(JOBS_ENV, "").strip()
    if text:
        try:
            return _jobs_arg(text)
        except argparse.ArgumentTypeError:
            raise ChapterFailed(f"${JOBS_ENV}={text!r} is not valid: set a whole number of chapters >= 1", 2) from None
    return max(1, min(DEFAULT_JOBS, _cores()))


def _cores() -> int:
    from catchtag import cores

    return cores.available()


def threads_per_chapter(jobs: int) -> int:
    """Torch threads of each chapter's kernel when `jobs` chapters run at once: $OMP_NUM_THREADS
    when the user set it, else the cores shared out (at least 1). Chapters of small models gain
    little from a second thread (kvcache ran 1.33x faster with two, probing 1.2x, on 2 cores), so
    two chapters with one thread each finish the book sooner than one chapter with two."""
    from catchtag import cores

    return cores.omp_threads() or max(1, _cores() // max(1, jobs))


def _last_seconds(name: str) -> float:
    try:
        entry = json.loads(TIMINGS.read_text()).get(name, {})
        return float(entry["seconds"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return float(TYPICAL_SECONDS.get(name, 0))


def _execute_logged(name: str, params: dict, force: bool) -> tuple[str, float, bool]:
    print(f"[book] {name} ...", flush=True)
    _, seconds, reused = execute(name, params, force=force)
    print(f"[book] {name}: {'cached' if reused else f'{seconds:.0f} s'}", flush=True)
    return name, seconds, reused


def _stop_once(signum, frame):
    """SIGINT in a chapter's process: stop the chapter (papermill then shuts its kernel down). Later
    ones are ignored, so that a second Ctrl-C cannot cut that cleanup short."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _hold_signals():
    """Hold (block) SIGINT and SIGTERM in this thread while a chapter process is forked and
    registered: one arriving then is delivered after, when the build knows the process and can
    stop it. Yields the mask from before (None where signals cannot be held, e.g. Windows), which
    the child, inheriting the blocked mask, restores once its own handlers are set
    (`_chapter_process`), so that no signal finds it with the build's handlers."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):
        yield None
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield previous
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _chapter_process(conn, name: str, params: dict, force: bool, threads: int, mask=None) -> None:
    """A parallel build's chapter process (forked from the build when the chapter starts, so it has
    whatever the build had loaded then): execute the chapter and send ("done", (name, seconds,
    reused)) or ("failed", ChapterFailed or KeyboardInterrupt) to the build. `mask`: the signal
    mask to restore (the build held SIGINT and SIGTERM across the fork: `_hold_signals`)."""
    import signal

    try:
        try:
            if hasattr(os, "register_at_fork"):  # (not on Windows, where nothing is forked)
                # a process forked from this one (the chapter's warm kernel) must not hold the
                # build's pipe open: the build learns that this process died from its end of file
                os.register_at_fork(after_in_child=conn.close)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the build's handler, inherited through fork
            signal.signal(signal.SIGINT, _stop_once)
            if mask is not None:  # a signal that came during the hold is delivered here, to _stop_once
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch in the chapter's kernel
            message = ("done", _run_chapter(name, params, force))
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the chapter is over: only its report is left
    except (ChapterFailed, KeyboardInterrupt) as exc:
        message = ("failed", exc)
    except BaseException as exc:  # noqa: BLE001 - one line, which any build can unpickle
        message = ("failed", ChapterFailed(f"chapter {name!r}: {type(exc).__name__}: {exc}"))
    with contextlib.suppress(OSError):  # the build is gone: nobody to tell
        conn.send(message)
    conn.close()


def _run_chapter(name: str, params: dict, force: bool) -> tuple[str, float, bool]:
    """What a chapter's process runs (a seam for tests)."""
    return _execute_logged(name, params, force)


def execute_all(names: list[str], chosen: dict, force: bool, jobs: int = 1,
                started: "ChapterProcesses | None" = None) -> list[tuple[str, float, bool]]:
    """Execute `names` (chapter -> parameters in `chosen`); returns [(name, seconds, reused)] in the
    order they finished. Summary pages run last, after every other chapter has finished. With
    jobs > 1 the other chapters run up to `jobs` at once, each in its own process (its own kernel,
    `threads_per_chapter(jobs)` torch threads), longest first by their last recorded time
    (`ChapterProcesses`; `started`: one that `warm_up` started with the chapters that need no
    model). A chapter that fails stops the build: the chapters not started are not started, those
    running finish (their executed notebooks are kept), then the first failure is raised (one line,
    its exit status)."""
    regular = _regular(names)
    summaries = [n for n in names if n not in regular]
    times: list[tuple[str, float, bool]] = []
    if started is not None or _in_parallel(regular, jobs):
        runner = started or ChapterProcesses(chosen, force, jobs)
        times += runner.run([n for n in sorted(regular, key=_last_seconds, reverse=True) if n not in runner.started])
    else:
        times += [_execute_logged(n, chosen[n], force) for n in regular]
    times += [_execute_logged(n, chosen[n], force) for n in summaries]
    return times


def _regular(names: list[str]) -> list[str]:
    """The chapters among `names` that are not summary pages (summaries run last, one at a time)."""
    return [n for n in names if not is_summary(BOOK / f"{n}.md")]


def _in_parallel(regular: list[str], jobs: int) -> bool:
    """Whether `execute_all` runs these (non-summary) chapters in processes of their own, `jobs` at once."""
    return jobs > 1 and len(regular) > 1


def kernel_threads(names: list[str], jobs: int) -> int | None:
    """Torch threads of the chapters' kernels as `execute_all` will run them: the parallel build's
    `threads_per_chapter`, else $OMP_NUM_THREADS (None when unset: torch uses every core)."""
    if _in_parallel(_regular(names), jobs):
        return threads_per_chapter(jobs)
    from catchtag import cores

    return cores.omp_threads()


def warm_up(names: list[str], chosen: dict, force: bool, jobs: int = 1) -> "ChapterProcesses | None":
    """Before `execute_all` in the build's own process (`main`; never in a process that has run
    torch, e.g. a test session): import the library and preload the registry models that the
    chapters to execute name, so that their kernels are forked warm (`catchtag.book.warmkernel`).
    In a parallel build the chapters that name no model (`needs_no_model`) start as soon as the
    library is imported, on the cores the loading leaves idle (at most jobs - 1 of them); the
    `ChapterProcesses` running them is returned, for `execute_all` to go on with. Nothing happens
    (None) when every chapter is up to date, warm kernels are off, or the kernels will run more
    than one torch thread (only one-thread kernels are forked: see warmkernel)."""
    from catchtag.book import warmkernel

    if not warmkernel.enabled() or kernel_threads(names, jobs) != 1:
        return None
    pending = [n for n in names if force or is_summary(BOOK / f"{n}.md") or not _up_to_date(n, chosen[n])]
    if not pending:
        return None
    start = time.time()
    warmkernel.prepare([])  # the library only
    runner = None
    regular = _regular(pending)
    if warmkernel.ready() and _in_parallel(regular, jobs):
        runner = ChapterProcesses(chosen, force, jobs)  # (stopped by `main` if loading is interrupted)
        for name in [n for n in regular if needs_no_model(n, chosen)][:jobs - 1]:
            runner.start(name)
            print(f"[book] {name}: started while the models load (it names none)", flush=True)
    loaded = warmkernel.prepare(_registry_models(pending, chosen))
    if warmkernel.ready():
        print(f"[book] warm kernels: library imported and {', '.join(loaded) or 'no model'} loaded in "
              f"{time.time() - start:.0f} s, once for every chapter", flush=True)
    return runner


def needs_no_model(name: str, chosen: dict) -> bool:
    """Whether the chapter names no registry model among its parameters (declared defaults, with
    `chosen` on top): it can start before the build has loaded the models (it would load any it
    uses itself)."""
    from catchtag.models import REGISTRY

    return not any(v in REGISTRY for v in _registry_models([name], chosen))


def _up_to_date(name: str, params: dict) -> bool:
    """Whether `execute` would reuse the chapter's executed notebook (same cache key)."""
    return _is_current(EXECUTED / f"{name}.ipynb", cache_key(BOOK / f"{name}.md", params))


def _is_current(out: Path, key: str) -> bool:
    """Whether the executed notebook `out` exists and was executed under cache key `key`."""
    return out.exists() and _stored_key(out) == key


def _registry_models(names: list[str], chosen: dict) -> list[str]:
    """The string parameter values of these chapters (their declared defaults, overridden by
    `chosen`), for `warmkernel.prepare` to preload those that are registry models."""
    import jupytext

    found = []
    for name in names:
        values = {**declared_parameters(jupytext.read(BOOK / f"{name}.md")), **chosen[name]}
        for v in values.values():
            found += [x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, str)]
    return list(dict.fromkeys(found))


_RUNNERS = threading.local()  # .made: the `ChapterProcesses` of this thread, for `main` to stop what still runs


def _made_here() -> list:
    """The `ChapterProcesses` made in this thread so far (oldest first)."""
    if not hasattr(_RUNNERS, "made"):
        _RUNNERS.made = []
    return _RUNNERS.made


class ChapterProcesses:
    """A parallel build's chapters, each executed in a process of its own, forked from the build
    process when the chapter starts (so a chapter started after `warm_up` loaded the models gets
    them, and one started before does not wait for them), at most `jobs` at once, each kernel with
    `threads_per_chapter(jobs)` torch threads. No process waits idle for work: a signal always
    finds every chapter process busy with its chapter."""

    def __init__(self, chosen: dict, force: bool, jobs: int):
        import multiprocessing as mp

        self.chosen, self.force, self.jobs = chosen, force, jobs
        self.threads = threads_per_chapter(jobs)
        self.ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.running: dict = {}        # connection -> (process, chapter)
        self.started: list[str] = []
        self.times: list[tuple[str, float, bool]] = []
        self.failure: ChapterFailed | None = None
        _made_here().append(self)

    def start(self, name: str) -> None:
        if not self.started:
            print(f"[book] executing chapters up to {self.jobs} at once, {self.threads} thread(s) each", flush=True)
        receive, send = self.ctx.Pipe(duplex=False)
        with _hold_signals() as mask:  # a Ctrl-C or SIGTERM now is handled once `stop` can see the process
            proc = self.ctx.Process(target=_chapter_process, name=f"chapter {name}",
                                    args=(send, name, self.chosen[name], self.force, self.threads, mask))
            proc.start()
            send.close()  # the child's end: EOF here when the child exits
            self.running[receive] = (proc, name)
            self.started.append(name)

    def run(self, names: list[str]) -> list[tuple[str, float, bool]]:
        """Start `names` in this order as places free up; wait for every chapter started (also
        before this call); returns their (name, seconds, reused) in the order they finished, or
        raises the first failure once the running ones have finished. Ctrl-C or SIGTERM: `stop`."""
        from multiprocessing.connection import wait

        queue = list(names)
        try:
            for conn in wait(list(self.running), timeout=0):  # started before: a failure there starts nothing
                self._finish(conn)
            while queue or self.running:
                while queue and self.failure is None and len(self.running) < self.jobs:
                    self.start(queue.pop(0))
                if not self.running:
                    break
                for conn in wait(list(self.running)):
                    self._finish(conn)
        except BaseException:  # Ctrl-C, SIGTERM (`Terminated`), or a chapter interrupted alone
            self.stop()
            raise
        if self.failure is not None:
            raise self.failure
        return self.times

    def _finish(self, conn) -> None:
        proc, name = self.running.pop(conn)
        try:
            status, value = conn.recv()
        except Exception:  # died before it could report (EOF): killed (the OOM killer), or crashed
            status, value = "died", None
        conn.close()
        proc.join()
        if status == "died":
            status, value = "failed", ChapterFailed(
                f"chapter {name!r}: the process executing it died (exit status {proc.exitcode}; killed, or "
                f"out of memory?); the executed copy is not kept; rerun it with `make chapter CH={name}`")
        if status == "done":
            self.times.append(value)
        elif isinstance(value, KeyboardInterrupt):  # a signal reached this chapter only: the build stops
            raise value
        elif self.failure is None:
            self.failure = value

    def stop(self, grace: float = 30.0) -> None:
        """After Ctrl-C or SIGTERM in the build: start nothing more; send SIGINT to the chapter
        processes (SIGTERM reached the build only; after Ctrl-C, which reached them already, they
        ignore a second one), which stops their chapters as Ctrl-C does (their kernels are shut
        down, nothing is kept); wait for them to exit, at most `grace` seconds, then kill them. A
        second Ctrl-C or SIGTERM to the build meanwhile is ignored: cutting this short would leave
        them running; the build's handlers are put back afterwards."""
        import signal

        handlers = {}
        if threading.current_thread() is threading.main_thread():  # (only there can they be set)
            handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._stop(grace)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _stop(self, grace: float) -> None:
        import signal

        procs = [proc for proc, _ in self.running.values()]

        def send(sig):
            for proc in procs:
                if proc.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig)

        send(signal.SIGINT)
        deadline = time.time() + grace
        # (is_alive asks waitpid; join(timeout) would wait on a pipe that a process forked by the
        # chapter's process may still hold open)
        while any(proc.is_alive() for proc in procs) and time.time() < deadline:
            time.sleep(0.05)
        send(signal.SIGKILL)
        for proc in procs:
            proc.join()
        for conn in self.running:
            conn.close()
        self.running.clear()


def stage(names: list[str]) -> None:
    """Lay out _build/stage: config, toc, plain pages and executed notebooks, for jupyter-book.

    A file is rewritten only when its content changed (and files no longer wanted are removed), so
    Sphinx sees unchanged pages as unchanged and re-renders only what changed."""
    wanted: dict[Path, bytes] = {}
    wanted[STAGE / "_config.yml"] = staged_config()
    wanted[STAGE / "_toc.yml"] = (ROOT / "_toc.yml").read_bytes()
    for rel, path in mathjax_files().items():  # served from _static/mathjax/ (see _config.yml)
        wanted[STAGE / MATHJAX_STATIC / "mathjax" / rel] = path.read_bytes()
    for path in BOOK.rglob("*"):
        rel = path.relative_to(BOOK)
        if not path.is_file() or any(part.startswith((".", "_")) for part in rel.parts):
            continue
        if len(rel.parts) > 1 or path.suffix not in (".md", ".ipynb"):
            wanted[STAGE / "book" / rel] = path.read_bytes()  # images, bibliography, static files
    for name in names:
        md = BOOK / f"{name}.md"
        target = STAGE / "book" / name
        if is_notebook(md):
            wanted[target.with_suffix(".ipynb")] = stage_notebook(EXECUTED / f"{name}.ipynb").encode()
        else:
            wanted[target.with_suffix(".md")] = md.read_bytes()
    if STAGE.exists():
        for path in sorted(STAGE.rglob("*"), reverse=True):
            if path.is_file() and path not in wanted:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    for path, data in wanted.items():
        if path.exists() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def run_line(meta: dict) -> str:
    """The line that ends each staged chapter: how long it ran, when, with which parameters."""
    parts = []
    if meta.get("seconds") is not None:
        parts.append(f"in {meta['seconds']:.0f} s")
    if meta.get("executed_at"):
        parts.append(f"on {meta['executed_at']}")
    params = meta.get("parameters") or {}
    shown = ", ".join(f"`{k} = {v!r}`" for k, v in sorted(params.items()))
    parts.append(f"with the parameters {shown}" if shown else "with its default parameters")
    return ("*This page was executed by papermill " + " ".join(parts) + ". The download button at the "
            "top of the page gives the executed notebook; the launch button opens it in Colab.*")


def stage_notebook(src: Path) -> str:
    """The staged copy of an executed notebook (as text), ending with its run line."""
    import nbformat

    nb = nbformat.read(src, as_version=4)
    meta = nb.metadata.get("catchtag") or {}
    # the install cell as of now (repository URL, package pins), also in a notebook executed before
    nb.cells = [c for c in nb.cells if c.metadata.get("catchtag") != "colab-install"]
    nb.cells.insert(0, colab_cell())
    nb.cells.append(nbformat.v4.new_markdown_cell("---\n\n" + run_line(meta), metadata={"catchtag": "run-line"}))
    for i, cell in enumerate(nb.cells):  # stable ids, so the same notebook stages to the same bytes
        cell["id"] = f"cell-{i}"
    return nbformat.writes(nb)


def build_html() -> None:
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(STAGE), "--path-output", str(ROOT), "-W", "-n", "--keep-going"]
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit("jupyter-book build failed (see the warnings above)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the build's main thread so that the build unwinds as it does for Ctrl-C
    (running chapters stopped, their kernels shut down, nothing half-written kept)."""


def _on_sigterm(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the first one stops the build; the cleanup must finish
    raise Terminated()


def main(argv=None) -> None:
    import signal

    # signal handlers can be set only in the main thread (an in-process caller may use another)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    made_before = len(_made_here())
    try:
        try:
            _main(argv)
        except BaseException:  # e.g. a signal between `warm_up` and `execute_all`: no chapter left running
            for runner in _made_here()[made_before:]:  # (this call's own: not an earlier build's)
                if runner.running:
                    runner.stop()
            raise
    except ChapterFailed as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(exc.status) from None
    except Terminated:
        print("error: terminated (SIGTERM); the chapters that were running were stopped", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        del _made_here()[made_before:]  # this call's runners run nothing any more: not kept past it
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m catchtag.book.bookbuild", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", action="append", help="only this chapter (repeatable); default: all")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a chapter parameter (papermill style)")
    parser.add_argument("--force", action="store_true", help="execute even when a cached copy matches")
    parser.add_argument("--no-html", action="store_true", help="execute only, do not build HTML")
    parser.add_argument("--cold", action="store_true",
                        help="start every chapter's kernel as a new process (default: forked from the build "
                             "process with the library imported and the models loaded; also $CATCHTAG_WARM=0)")
    parser.add_argument("--jobs", "-j", type=_jobs_arg, default=None, metavar="N",
                        help="chapters executed at once, each in its own kernel with cores/N threads "
                             f"(default: ${JOBS_ENV}, else {DEFAULT_JOBS} or the number of cores if fewer)")
    args = parser.parse_args(argv)
    if args.cold:
        os.environ["CATCHTAG_WARM"] = "0"
    params = {k: parse_value(v) for k, v in args.parameter}
    names = chapters_in_toc()
    notebooks = [n for n in names if is_notebook(BOOK / f"{n}.md")]
    # summary pages read the other chapters' executed notebooks, so they run last
    notebooks = ([n for n in notebooks if not is_summary(BOOK / f"{n}.md")]
                 + [n for n in notebooks if is_summary(BOOK / f"{n}.md")])
    todo = args.chapter or notebooks
    unknown = [c for c in todo if c not in notebooks]
    if unknown:
        print(f"error: unknown chapter {unknown[0]!r}: choose from {', '.join(notebooks)}", file=sys.stderr)
        raise SystemExit(2)
    chosen = {n: params for n in todo}
    if params:  # check every chapter's -p values before running any (one line, exit 2)
        import jupytext

        nbs = {n: jupytext.read(BOOK / f"{n}.md") for n in todo}
        if not args.chapter:  # -p for the whole book: each chapter gets the ones it declares
            declared = {n: declared_parameters(nb) for n, nb in nbs.items()}
            nowhere = [p for p in params if not any(p in d for d in declared.values())]
            if nowhere:
                raise ChapterFailed(f"no chapter has a parameter {nowhere[0]!r}", 2)
            chosen = {n: {k: v for k, v in params.items() if k in declared[n]} for n in todo}
        for name in todo:
            check_chapter_params(name, nbs[name], chosen[name])
    jobs = default_jobs() if args.jobs is None else args.jobs
    wall = time.time()
    started = warm_up(todo, chosen, args.force, jobs)
    times = execute_all(todo, chosen, args.force, jobs, started=started)
    missing = [n for n in notebooks if not (EXECUTED / f"{n}.ipynb").exists()]
    if not args.no_html:
        if missing:
            print(f"[book] executing the chapters not built yet: {', '.join(missing)}", flush=True)
            times += execute_all(missing, {n: {} for n in missing}, False, jobs)
        # bring the summary pages up to date with the chapters they read
        stale = [n for n in notebooks if is_summary(BOOK / f"{n}.md") and n not in todo and n not in missing]
        times += execute_all(stale, {n: {} for n in stale}, False, jobs)
    wall = time.time() - wall
    if not args.no_html:
        stage(names)
        build_html()
        print(f"[book] HTML in {ROOT / '_build' / 'html'}")
    print("\n[book] chapter times")
    for name, seconds, reused in times:
        print(f"  {name:<28} {'cached' if reused else f'{seconds:7.1f} s'}")
    print(f"  {'total (sum)':<28} {sum(t[1] for t in times):7.1f} s")
    ran = sum(1 for t in times if not t[2])
    print(f"  {'wall clock':<28} {wall:7.1f} s  ({ran} executed, up to {jobs} at once)")
    if ran:
        record_book_wall(wall, jobs, [t[0] for t in times if not t[2]])


if __name__ == "__main__":
    main()
