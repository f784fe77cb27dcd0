"""Shared fixtures: the two real offline models, loaded once per test session (cached conversion).

Which tests are slow is decided here, in one place (`pytest_collection_modifyitems`), not in each
file: a test is marked `slow` when it uses a real-model fixture (`smollm`, `gemma`, `any_model`),
lives in a module of SLOW_MODULES, or its own source runs a chapter, loads a real model or starts
the command line in a new interpreter (the calls in SLOW_CALLS). `make test` runs everything (CI); `make test-fast` (`pytest -m "not slow"`)
skips those, for development, in under a minute. Check with
`pytest -m "not slow" --durations=15` that no unmarked test takes more than a second or two.
"""

import inspect
import re
import shutil
import tempfile
from pathlib import Path

import pytest

SLOW_FIXTURES = {"smollm", "gemma", "any_model"}
# Modules whose every test runs a chapter or a real model.
SLOW_MODULES = {"test_determinism", "test_head_writes", "test_bench"}
# Calls that run a chapter (papermill, the book build, the shared sinks runs of _chapters.py), load
# a real model, or start the command line in a new interpreter (torch and transformers imported
# afresh: seconds each), found in a test function's own source.
SLOW_CALLS = re.compile(
    r"sinks_runs\(|bookbuild\.execute\(|execute_notebook\(|tiny_chapter\(|catchtag\.book\.bookbuild\""
    r"|load_model\(\s*[\"'](smollm2-135m|gemma3-270m)[\"']\s*\)|load_model\(\s*(name|model_name)\b"
    r"|\brun_chapter\(|\bnbclient\b|sys\.executable,\s*\"-m\",\s*\"catchtag"
)


def _runs_something_slow(item) -> bool:
    function = getattr(item, "function", None)
    if function is None:
        return False
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return bool(SLOW_CALLS.search(source))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else ""
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or module in SLOW_MODULES or _runs_something_slow(item)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def short_tmp():
    """A temporary folder with a short path, removed afterwards: for $TMPDIR of a build whose
    kernels put Unix sockets there (a socket path must fit in 107 bytes; pytest's tmp_path is too
    deep for one, and the kernels would fall back to TCP)."""
    folder = Path(tempfile.mkdtemp(prefix="ck"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm():
    from catchtag.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    from catchtag.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(params=["smollm2-135m", "gemma3-270m"], scope="session")
def any_model(request):
    return request.getfixturevalue({"smollm2-135m": "smollm", "gemma3-270m": "gemma"}[request.param])
