"""Build the book: MyST chapters -> jupytext -> papermill -> jupyter-book (execution off).

    python -m catchtag.bookbuild                 # every chapter in _toc.yml, default parameters
    python -m catchtag.bookbuild --chapter sinks -p model gemma3-270m -p eps 0.3

Each chapter under book/ is a MyST notebook (a .md file with a jupytext header). It is converted
to .ipynb, executed by papermill with its `parameters` cell overridden by -p NAME VALUE, and the
executed notebook is staged with the plain pages for jupyter-book, which renders it without
executing anything again. An executed notebook is reused when the chapter source, the parameters
and the library's source are all unchanged (its cache key is stored in its metadata). A failing
cell stops the build with the chapter's name, the cell's number and the error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOOK = ROOT / "book"
BUILD = ROOT / "_build"
EXECUTED = BUILD / "executed"
STAGE = BUILD / "stage"


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


def library_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "catchtag").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(md: Path, params: dict) -> str:
    digest = hashlib.sha256()
    digest.update(md.read_bytes())
    digest.update(json.dumps(params, sort_keys=True).encode())
    digest.update(library_hash().encode())
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


def execute(name: str, params: dict, force: bool = False) -> tuple[Path, float, bool]:
    """Execute one chapter; returns (executed notebook, seconds, reused from cache)."""
    import jupytext
    import nbformat
    import papermill as pm

    md = BOOK / f"{name}.md"
    out = EXECUTED / f"{name}.ipynb"
    key = cache_key(md, params)
    if not force and out.exists() and _stored_key(out) == key:
        return out, 0.0, True
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = BUILD / "notebooks" / f"{name}.ipynb"
    raw.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(md)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, raw)
    tmp = out.with_suffix(".partial.ipynb")
    # Progress bars are for readers who rerun a chapter; in the rendered book they are noise.
    os.environ["TQDM_DISABLE"] = "1"
    start = time.time()
    try:
        pm.execute_notebook(
            str(raw), str(tmp), parameters=params, kernel_name="python3", cwd=str(BOOK),
            progress_bar=False, log_output=False,
        )
    except pm.PapermillExecutionError as exc:
        tmp.unlink(missing_ok=True)
        line = (exc.evalue or "").strip().splitlines()
        raise SystemExit(
            f"chapter {name!r} failed in cell {exc.cell_index} ({exc.ename}: {line[0] if line else ''}); "
            f"the executed copy is not kept; rerun it with `make chapter CH={name}`"
        ) from None
    seconds = time.time() - start
    done = nbformat.read(tmp, as_version=4)
    done.metadata["catchtag"] = {"cache_key": key, "parameters": params, "seconds": round(seconds, 1)}
    nbformat.write(done, tmp)
    os.replace(tmp, out)  # never leave a half-written executed notebook in place
    return out, seconds, False


def stage(names: list[str]) -> None:
    """Lay out _build/stage: config, toc, plain pages and executed notebooks, for jupyter-book."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "book").mkdir(parents=True)
    for extra in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / extra, STAGE / extra)
    for path in BOOK.iterdir():
        if path.is_file() and path.suffix != ".md" and path.suffix != ".ipynb":
            shutil.copy(path, STAGE / "book" / path.name)  # images, bibliography, static files
        elif path.is_dir() and not path.name.startswith((".", "_")):
            shutil.copytree(path, STAGE / "book" / path.name)
    for name in names:
        md = BOOK / f"{name}.md"
        target = STAGE / "book" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_notebook(md):
            shutil.copy(EXECUTED / f"{name}.ipynb", target.with_suffix(".ipynb"))
        else:
            shutil.copy(md, target.with_suffix(".md"))


def build_html() -> None:
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(STAGE), "--path-output", str(ROOT), "-W", "-n", "--keep-going"]
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit("jupyter-book build failed (see the warnings above)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m catchtag.bookbuild", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", action="append", help="only this chapter (repeatable); default: all")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override a chapter parameter (papermill style)")
    parser.add_argument("--force", action="store_true", help="execute even when a cached copy matches")
    parser.add_argument("--no-html", action="store_true", help="execute only, do not build HTML")
    args = parser.parse_args(argv)
    params = {k: parse_value(v) for k, v in args.parameter}
    names = chapters_in_toc()
    notebooks = [n for n in names if is_notebook(BOOK / f"{n}.md")]
    todo = args.chapter or notebooks
    unknown = [c for c in todo if c not in notebooks]
    if unknown:
        print(f"error: unknown chapter {unknown[0]!r}: choose from {', '.join(notebooks)}", file=sys.stderr)
        raise SystemExit(2)
    times = []
    for name in todo:
        print(f"[book] {name} ...", flush=True)
        _, seconds, reused = execute(name, params, force=args.force)
        times.append((name, seconds, reused))
        print(f"[book] {name}: {'cached' if reused else f'{seconds:.0f} s'}", flush=True)
    missing = [n for n in notebooks if not (EXECUTED / f"{n}.ipynb").exists()]
    if not args.no_html:
        if missing:
            print(f"[book] executing the chapters not built yet: {', '.join(missing)}", flush=True)
            for name in missing:
                _, seconds, reused = execute(name, {})
                times.append((name, seconds, reused))
        stage(names)
        build_html()
        print(f"[book] HTML in {ROOT / '_build' / 'html'}")
    print("\n[book] chapter times")
    for name, seconds, reused in times:
        print(f"  {name:<28} {'cached' if reused else f'{seconds:7.1f} s'}")
    print(f"  {'total':<28} {sum(t[1] for t in times):7.1f} s")


if __name__ == "__main__":
    main()
