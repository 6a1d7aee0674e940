import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agenthost_harness import Fleet  # noqa: E402


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.fixture
def state_file(tmp_path):
    return str(tmp_path / "agenthost-state.db")
