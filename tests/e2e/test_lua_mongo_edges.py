"""The edges of agent.mongo's client pool and of agent.queue's ownership fence, through the real
binary against the MongoDB wire-protocol test server (fixture lua_mongo_edges.lua; the control
store is the embedded one, so the test server sees agent.mongo's commands only): an iterator
whose getMore fails gives its pooled client back at once, and renew is fenced by owner."""
import datetime
import sys

from agenthost_harness import MONGO_DIR, agent_env, script
from test_lua_mongo import stop, wait_report

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

EDGES = script("lua_mongo_edges.lua")
POOL_WAIT_MS = 5000  # a find_one that has to wait for a lost client takes this long


def run(fleet, tmp_path, server, mode, uri_options=""):
    out = tmp_path / f"{mode}.json"
    env = agent_env(str(tmp_path / "state.db"), OUT_FILE=out, MODE=mode,
                    AGENT_MONGODB_URI=server.uri + uri_options, AGENT_MONGODB_DATABASE="agenthost")
    agent = fleet.start(EDGES, env=env, name=mode)
    return agent, wait_report(str(out), agent, timeout=60)


def test_an_iterator_whose_getmore_fails_gives_its_client_back(fleet, tmp_path, mongo_server):
    mongo_server.client().agenthost.docs.insert_many([{"_id": i} for i in range(1, 11)])
    mongo_server.configure_fail_point("alwaysOn", {"failCommands": ["getMore"], "errorCode": 2})
    agent, r = run(fleet, tmp_path, mongo_server, "getmore_failure",
                   f"&maxPoolSize=1&waitQueueTimeoutMS={POOL_WAIT_MS}")
    assert r["first_batch"] == [1, 2], r
    is_nil, msg, code = r["getmore"]
    assert is_nil is True and code == 2, r
    assert "find_iter failed" in msg, r
    doc_id, msg, code, seconds = r["find_one"]
    assert doc_id == 3, r  # the one client was back in the pool
    assert seconds < POOL_WAIT_MS / 1000 / 2, r  # no wait for a client
    assert r["after_failure"] == 1, r  # it:next() after the failure: nil, the iterator ended
    stop(agent)


def test_renew_after_another_owner_claimed_is_lost_and_changes_nothing(fleet, tmp_path,
                                                                        mongo_server):
    agent, r = run(fleet, tmp_path, mongo_server, "renew_fence")
    assert r["claims"] == [1, 2, "second"], r
    assert r["renew"] == {"n": 2, "1": False, "2": "lost"}, r
    assert r["lease_kept"] is True, r
    assert r["after"] == ["second", "claimed", 2], r
    assert r["owner_renew"] == {"n": 1, "1": True}, r
    job = mongo_server.client().agenthost.queue_jobs.find_one({"_id": "fenced"})
    assert job["owner"] == "second" and job["status"] == "claimed", job
    # still second's 30 s lease (first's would end 0.2 s after its renew)
    assert job["lease_until"] > datetime.datetime.utcnow() + datetime.timedelta(seconds=15), job
    stop(agent)
