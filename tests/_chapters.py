"""Helpers for the reliability tests (not collected): tiny chapters and real chapter runs.

`tiny_chapter` writes a MyST chapter with the book's common parameters cell, the check cell every
chapter has, and extra cells. `sinks_runs` executes book/sinks.md (2 prompts, one model) through
the book build in subprocesses, each into its own temporary _build and results folder, with a
dummy NDIF_API_KEY in the environment; it runs once per test session and is shared by
test_determinism.py and test_security.py.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DUMMY_KEY = "ndif-dummy-KEY-5b1e0c77-must-not-leak"

HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# Tiny

```{code-cell} ipython3
:tags: [parameters]

model = "smollm2-135m"
compare = ""
eps = 0.2
seed = 0
n_prompts = 2
remote = False
```

```{code-cell} ipython3
from catchtag.book.params import check_params

params = check_params(model=model, compare=compare, eps=eps, seed=seed, n_prompts=n_prompts, remote=remote)
globals().update(params)
```
"""


def tiny_chapter(folder: Path, name: str = "tiny", *cells: str) -> Path:
    """book-like folder/<name>.md: the common parameters cell, the check cell, then `cells`."""
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(f"\n```{{code-cell}} ipython3\n{c.strip()}\n```\n" for c in cells)
    path = folder / f"{name}.md"
    path.write_text(HEADER + body)
    return path


def model_free_chapter(folder: Path, name: str, *cells: str) -> Path:
    """folder/<name>.md like `tiny_chapter`'s, but its parameters name no model (`label` in place of
    `model`, and no check cell): a parallel build starts it before it has loaded the models."""
    path = tiny_chapter(folder, name)
    head = path.read_text().replace('model = "smollm2-135m"', 'label = "none"')
    head = head.split("```{code-cell} ipython3\nfrom catchtag.book.params")[0]
    path.write_text(head + "".join(f"\n```{{code-cell}} ipython3\n{c.strip()}\n```\n" for c in cells))
    return path


# The build's entry point on a book folder (argv[1]) of chapters "free" and "named", the model
# loading replaced by a stand-in of argv[2] seconds: like the real one (`warmkernel.prepare`) its
# first call imports the library, torch included (so kernels are forked warm); then it puts a
# stand-in model among the preloaded ones and writes the time it finished to argv[3].
LOADING_STAND_IN = """
import sys, time
from pathlib import Path
from catchtag.book import bookbuild as b, warmkernel
b.BOOK = Path(sys.argv[1])
b.chapters_in_toc = lambda: ["free", "named"]
imports_only = warmkernel.prepare
def stand_in(names):
    imports_only([])
    if names:
        from catchtag import models
        time.sleep(float(sys.argv[2]))
        models._PRELOADED[("stand-in",)] = None
        Path(sys.argv[3]).write_text(repr(time.time()))
    return ["stand-in"] if names else []
warmkernel.prepare = stand_in
b.main(["--chapter", "free", "--chapter", "named", "--force", "--no-html", "--jobs", "2"])
"""


@dataclasses.dataclass
class Run:
    folder: Path  # everything the run wrote: build/, results/, config/
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def results(self) -> Path:
        return self.folder / "results"

    @property
    def executed(self) -> Path:
        return self.folder / "build" / "executed" / "sinks.ipynb"


# remote="local": the chapter's traces take nnsight's remote code path (serialised as for NDIF), run
# here; so CI executes a whole chapter through the remote path, with a dummy NDIF key set.
SINKS_ARGS = ["--chapter", "sinks", "--force", "--no-html", "-p", "n_prompts", "2", "-p", "compare", "",
              "-p", "remote", "local"]


@functools.lru_cache(maxsize=None)
def sinks_runs(n: int = 2) -> tuple[Run, ...]:
    """Execute book/sinks.md with 2 prompts on SmolLM2 only, remote="local", `n` times side by side."""
    import time

    base = Path(tempfile.mkdtemp(prefix="catchtag-runs-"))
    atexit.register(shutil.rmtree, base, True)
    procs = []
    start = time.time()
    for i in range(n):
        folder = base / f"run{i}"
        (folder / "config").mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ("NNSIGHT_CONFIG",)}
        env.update(
            CATCHTAG_BUILD=str(folder / "build"),
            CATCHTAG_RESULTS=str(folder / "results"),
            NDIF_API_KEY=DUMMY_KEY,
            XDG_CONFIG_HOME=str(folder / "config"),  # where nnsight would save a config file
            HF_HUB_OFFLINE="1",
        )
        cmd = [sys.executable, "-m", "catchtag.book.bookbuild", *SINKS_ARGS]
        procs.append((folder, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)))
    runs = []
    for folder, proc in procs:
        out, err = proc.communicate(timeout=600)
        runs.append(Run(folder, proc.returncode, out, err, time.time() - start))
    return tuple(runs)
