import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agenthost_harness import MONGO_DIR, Fleet, Store  # noqa: E402


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.fixture
def state_file(tmp_path):
    return str(tmp_path / "agenthost-state.db")


@pytest.fixture(params=["embedded", "mongodb"])
def store(request, tmp_path):
    """The control store of a fleet test, once per kind: the embedded SQLite file, and MongoDB
    (the wire-protocol test server of tests/mongo, one-member replica set)."""
    if request.param == "embedded":
        yield Store("embedded", tmp_path)
        return
    sys.path.insert(0, MONGO_DIR)
    from mongo_fixture import MongoTestServer
    srv = MongoTestServer(mode="replset").start()
    try:
        yield Store("mongodb", tmp_path, srv)
    finally:
        srv.close()
