"""Every test sees an empty profile directory of its own, so no test reads or writes the user's."""

import pytest


@pytest.fixture(autouse=True)
def _own_profile_directory(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HYBRIMOE_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
