"""Work in flight across the end of its owner: an agent.mongo driver call out on libuv's thread
pool when its Lua state closes (a failed load at startup, a failed reload) or when its wait is
cancelled (BATCH_TIMEOUT). The real binary against the MongoDB wire-protocol test server; run
under ASan with LUA_MEMORY_LIMIT (LuaJIT then frees through the counting allocator, so a freed
call object is visible)."""
import signal
import sys

import pytest

from agenthost_harness import (MONGO_DIR, agent_env, free_port, mongo_agent_env, script,
                               wait_for)
from test_lua_mongo import wait_report

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

# The top level spawns a find_one that is out on the thread pool for about 1.5 s (server
# selection against a closed port), gives up joining it after 0.05 s, then raises.
LOAD_FAILS_WITH_A_JOB_OUT = """
local agent = require "agent"
local coll = agent.mongo.collection("things")
local t = agent.spawn(function() return coll:find_one({}) end)
local ok, msg, code = t:join(0.05)
agent.log.info("top level: join gave " .. tostring(code))
error("top level fails while find_one is out")
"""

GOOD = """
local agent = require "agent"
return { batch = function() agent.sleep(0.05) return 0 end }
"""


def closed_port_uri():
    return (f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=1500"
            "&connectTimeoutMS=1500")


def test_failed_load_at_startup_with_a_mongo_job_out_exits_2_not_a_crash(fleet, tmp_path,
                                                                          state_file):
    path = tmp_path / "load_fails.lua"
    path.write_text(LOAD_FAILS_WITH_A_JOB_OUT)
    env = agent_env(state_file, AGENT_MONGODB_URI=closed_port_uri(), LUA_MEMORY_LIMIT="64m")
    agent = fleet.start(str(path), env=env, name="load-fails", wait_port=False)
    rc = agent.wait_exit(timeout=30)
    log = agent.log_text()
    assert rc == 2, log  # was 139 (SIGSEGV): the state was closed under the running job
    assert "top level: join gave timeout" in log, log
    assert "top level fails while find_one is out" in log, log
    assert "AddressSanitizer" not in log, log


def test_failed_reload_with_a_mongo_job_out_keeps_the_old_script(fleet, tmp_path, state_file):
    path = tmp_path / "reloaded.lua"
    path.write_text(GOOD)
    env = agent_env(state_file, AGENT_MONGODB_URI=closed_port_uri(), LUA_MEMORY_LIMIT="64m")
    agent = fleet.start(str(path), env=env, name="reload-fails")
    agent.wait_state("running", timeout=15)
    path.write_text(LOAD_FAILS_WITH_A_JOB_OUT)
    r = agent.post("/api/agent/reload", timeout=30)
    assert r.status == 422, r.body
    assert "top level fails while find_one is out" in r.json()["error"], r.body
    # The old script still runs; the job finished and its state closed cleanly.
    assert agent.get("/healthz").status == 200
    assert agent.state()["state"] == "running"
    path.write_text(GOOD)
    assert agent.post("/api/agent/reload", timeout=30).status == 200
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()
    assert "AddressSanitizer" not in agent.log_text(), agent.log_text()


# batch 1: a find blocked 3 s at the server takes the only pool thread; an insert_one queued
# behind it is cancelled at BATCH_TIMEOUT (1 s). Every later batch inserts a marker through the
# same queue until one lands: the queue is first in, first out, so once the marker is in, the
# cancelled insert would have run before it had it not been taken off the queue.
QUEUED_WRITE = """
local agent = require "agent"
local json = agent.json
local coll = agent.mongo.collection("inflight")
local out = agent.env("OUT_FILE")
local batches = 0
return { batch = function()
    batches = batches + 1
    if batches == 1 then
        local reader = agent.spawn(function() return coll:find({}) end)
        agent.sleep(0.3) -- the find is on the pool thread now
        local doc, msg, code = coll:insert_one({ _id = "late" })
        local _, _, _, find_code = reader:join() -- true, nil, msg, code
        local f = assert(io.open(out .. ".tmp", "w"))
        f:write(json.encode({ insert = { doc == nil, msg, code }, find_code = find_code }))
        f:close()
        os.rename(out .. ".tmp", out)
        return 0
    end
    local ok, msg, code = coll:insert_one({ _id = "marker" .. batches })
    if ok then agent.log.info("marker landed") end
    return 0
end }
"""


def test_a_queued_write_whose_wait_timed_out_never_runs(fleet, tmp_path, state_file,
                                                         mongo_server):
    mongo_server.configure_fail_point(
        {"times": 1}, {"failCommands": ["find"], "blockConnection": True, "blockTimeMS": 3000})
    path = tmp_path / "queued.lua"
    path.write_text(QUEUED_WRITE)
    out = tmp_path / "queued.json"
    env = agent_env(state_file, AGENT_MONGODB_URI=mongo_server.uri, AGENT_MONGODB_DATABASE="w",
                    OUT_FILE=out, BATCH_TIMEOUT="1", UV_THREADPOOL_SIZE="1",
                    LUA_MEMORY_LIMIT="64m")
    agent = fleet.start(str(path), env=env, name="queued-write")
    r = wait_report(str(out), agent, timeout=30)
    is_nil, msg, code = r["insert"]
    assert is_nil and code == "timeout", r
    assert "BATCH_TIMEOUT" in msg, r
    assert r["find_code"] == "timeout", r  # a read that had started: the wait's own code
    agent.wait_log(r"marker landed", timeout=30)
    coll = mongo_server.client().w.inflight
    assert coll.find_one({"_id": "late"}) is None, list(coll.find({}))
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()
    assert "AddressSanitizer" not in agent.log_text(), agent.log_text()


STARTED_WRITE = """
local agent = require "agent"
local json = agent.json
local coll = agent.mongo.collection("inflight")
local out = agent.env("OUT_FILE")
local done = false
return { batch = function()
    if done then agent.sleep(0.2) return 0 end
    done = true
    local doc, msg, code = coll:insert_one({ _id = "slow" })
    local f = assert(io.open(out .. ".tmp", "w"))
    f:write(json.encode({ insert = { doc == nil, msg, code } }))
    f:close()
    os.rename(out .. ".tmp", out)
    return 0
end }
"""


def test_a_started_write_whose_wait_timed_out_reports_unknown(fleet, tmp_path, state_file,
                                                              mongo_server):
    mongo_server.configure_fail_point(
        {"times": 1}, {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": 3000})
    path = tmp_path / "started.lua"
    path.write_text(STARTED_WRITE)
    out = tmp_path / "started.json"
    env = agent_env(state_file, AGENT_MONGODB_URI=mongo_server.uri, AGENT_MONGODB_DATABASE="w",
                    OUT_FILE=out, BATCH_TIMEOUT="1", UV_THREADPOOL_SIZE="1")
    agent = fleet.start(str(path), env=env, name="started-write")
    r = wait_report(str(out), agent, timeout=30)
    is_nil, msg, code = r["insert"]
    assert is_nil and code == "unknown", r
    assert "BATCH_TIMEOUT" in msg and "may have been applied" in msg, r
    # And it was: "unknown" is the truth, "timeout" would have been a lie.
    coll = mongo_server.client().w.inflight
    wait_for(lambda: coll.find_one({"_id": "slow"}), timeout=20, message="the write lands")
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()


def fill_big(server):
    """200 documents of about 2 KB (about 400 KB once in Lua)."""
    server.client().agenthost.big.insert_many(
        [{"_id": i, "pad": "%04d" % i + "x" * 2048} for i in range(1, 201)])


@pytest.mark.parametrize("jit", ["on", "off"])
def test_mongo_misuse_under_a_memory_limit_survives_commands_for_50_batches(
        fleet, tmp_path, mongo_server, jit):
    fill_big(mongo_server)
    uri = mongo_server.uri + "&maxPoolSize=4&waitQueueTimeoutMS=300"
    env = mongo_agent_env(uri, LUA_MEMORY_LIMIT="3m", JIT=jit, BATCH_TIMEOUT="30")
    agent = fleet.start(script("lua_mongo_stress.lua"), env=env, name=f"stress-{jit}")
    # The compiler stays off under the memory limit, whatever the script asks (the crash was an
    # allocation refused inside a compiled trace: lj_err_mem read a stale frame).
    agent.wait_log(r"jit status: false", timeout=30)
    if jit == "on":
        assert agent.find_logs(r"jit.on\(\) ignored: the JIT compiler stays off"), agent.log_text()
    seen = 0
    cycle = 0
    while seen < 50:
        cycle += 1
        before = seen
        # Let a few batches run, then pause and resume the cluster while the script works.
        agent.wait_log(r"stress batch \d+", timeout=60, count=before + 3)
        r = agent.post(f"/api/cluster/pause?reason=stress+{cycle}&updated_by=test", timeout=30)
        assert r.status == 200, r.body
        agent.wait_log(r"stress paused: 1", timeout=60, count=cycle)
        r = agent.post(f"/api/cluster/resume?reason=stress+{cycle}&updated_by=test", timeout=30)
        assert r.status == 200, r.body
        agent.wait_state("running", timeout=30)
        seen = len(agent.find_logs(r"stress batch \d+"))
    assert agent.get("/healthz").status == 200
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=60) == 0, agent.log_text()
    assert not agent.find_logs(r"AddressSanitizer|runtime error"), agent.log_text()
