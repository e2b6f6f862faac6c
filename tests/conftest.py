import os

import pytest

# Tests never reach a model hub, and never touch the user's herd cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo checkpoint, written once per test session."""
    from herd.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(autouse=True, scope="session")
def _herd_home(tmp_path_factory):
    os.environ["HERD_HOME"] = str(tmp_path_factory.mktemp("herd-home"))
