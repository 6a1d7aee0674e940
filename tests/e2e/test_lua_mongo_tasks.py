"""agent.mongo from many tasks at once: every call waits on libuv's thread pool while the other
tasks run, and each task gets its own correct results (the real binary against the MongoDB
wire-protocol test server)."""
import signal
import sys

import pytest

from agenthost_harness import MONGO_DIR, agent_env, script
from test_lua_mongo import wait_report

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401


@pytest.mark.parametrize("jit", ["on", "off"])
def test_sixteen_tasks_query_mongodb_at_once(fleet, tmp_path, mongo_server, state_file, jit):
    out = tmp_path / "tasks.json"
    env = agent_env(state_file, OUT_FILE=out, AGENT_MONGODB_URI=mongo_server.uri,
                    AGENT_MONGODB_DATABASE=f"work_{jit}", JIT=jit)
    agent = fleet.start(script("lua_mongo_tasks.lua"), env=env, name=f"mongo-tasks-{jit}")
    r = wait_report(str(out), agent, timeout=60)
    assert len(r["results"]) == 16
    for k, res in enumerate(r["results"], start=1):
        assert "error" not in res, (k, res)
        assert res["inserted"] == 5 and res["matched"] == 5 and res["counted"] == 5, (k, res)
        assert res["ok"] == [True] * 5, (k, res)
        assert res["ids"] == [k * 100 + i for i in range(1, 6)], (k, res)
    assert r["total"] == 80 and r["inline"] == 80, r
    docs = list(mongo_server.client()[f"work_{jit}"].tasks.find({}))
    assert len(docs) == 80 and all(d["seen"] is True for d in docs)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0, agent.log_text()
    assert not agent.find_logs(r"\[ERROR\]"), agent.log_text()
