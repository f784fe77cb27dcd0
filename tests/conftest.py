"""Shared fixtures: the two real offline models, loaded once per test session (cached conversion)."""

import pytest


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
