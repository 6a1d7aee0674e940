"""agent.mongo's client pool under a misbehaving script: Lua errors raised in the middle of a
call (the LUA_MEMORY_LIMIT error while a result is built, __index metamethods, errors inside a
find_iter loop, the BATCH_TIMEOUT hook), unclosed iterators, and an empty pool. With
maxPoolSize=4 every failure is repeated more often than the pool has clients: a call that lost its
client on a Lua error would leave the next ones waiting forever. The control store has
connections of its own, so a cluster command answers while the script holds the whole pool."""
import sys

from bson import Int64

from agenthost_harness import MONGO_DIR, mongo_agent_env, script, wait_for

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401
from test_lua_mongo import stop, wait_report  # noqa: E402

POOL_WAIT_MS = 300


def fill_big(server):
    """200 documents of about 2 KB (distinct strings: about 400 KB once in Lua), each with an
    int64 past 2^53 (built by calling Lua)."""
    server.client().agenthost.big.insert_many(
        [{"_id": i, "pad": "%04d" % i + "x" * 2048, "big": Int64(2 ** 62 + i)}
         for i in range(1, 201)])


def test_misuse_under_a_small_pool_and_a_memory_limit_never_hangs(fleet, tmp_path, mongo_server):
    fill_big(mongo_server)
    out = tmp_path / "pool.json"
    uri = mongo_server.uri + f"&maxPoolSize=4&waitQueueTimeoutMS={POOL_WAIT_MS}"
    # The first batch (every misuse, dozens of calls) must end within BATCH_TIMEOUT, also on a
    # loaded machine; the next three overrun it on purpose.
    env = mongo_agent_env(uri, OUT_FILE=out, LUA_MEMORY_LIMIT="32m", BATCH_TIMEOUT="5")
    agent = fleet.start(script("lua_mongo_pool_misuse.lua"), env=env, name="misuse")
    r = wait_report(str(out), agent, timeout=120)

    # Each misuse raised its own error every time, and agent.mongo answered after each.
    assert not r["errors"], r
    assert r["memory"] == 8, r
    assert r["index_doc"] == 8 and r["index_opts"] == 8, r
    assert r["loop_errors"] == 8, r
    assert r["unclosed_iterators"] == 40, r
    assert r["timeouts"] == 3, r
    agent.wait_log(r"BATCH_TIMEOUT", count=3)

    # All 4 clients held by open iterators: nil, message, code after the bounded wait.
    is_nil, msg, code, seconds = r["empty_pool"]
    assert is_nil is True and code == -1, r
    assert msg == ("agent.mongo: find_one on agenthost.big failed: no free connection in the "
                   f"pool after {POOL_WAIT_MS} ms (all maxPoolSize clients are in use, e.g. by "
                   "open find_iter iterators)"), msg
    assert POOL_WAIT_MS / 1000 * 0.9 <= seconds < 10, seconds

    # The script still holds the whole pool: the cluster command goes through the control
    # store's own connections, and the script gets its clients back once it closes them.
    resp = agent.post("/api/cluster/pause?reason=pool+held&updated_by=test", timeout=5)
    assert resp.status == 200, resp.body
    agent.wait_state("paused", timeout=10)
    agent.wait_log(r"pool misuse fixture: paused, find_one after closing: 1", timeout=10)
    stop(agent)


def test_a_collected_iterator_gives_its_client_back(fleet, tmp_path, mongo_server):
    """Without a bounded wait and the collection before it, the fifth find_iter of a loop that
    drops its iterators would wait for a client forever (waitQueueTimeoutMS left at its
    default: agent.mongo bounds it anyway)."""
    fill_big(mongo_server)
    out = tmp_path / "iters.json"
    uri = mongo_server.uri + "&maxPoolSize=2"
    env = mongo_agent_env(uri, OUT_FILE=out, ITERATORS="50")
    agent = fleet.start(script("lua_mongo_iterators.lua"), env=env, name="iters")
    r = wait_report(str(out), agent, timeout=60)
    assert r["opened"] == 50, r
    assert r["empty_pool"][0] is True and r["empty_pool"][2] == -1, r
    assert "after 1000 ms" in r["empty_pool"][1], r
    assert 0.9 <= r["empty_pool"][3] < 10, r
    assert r["after_close"] == 1, r
    wait_for(lambda: agent.post("/api/cluster/pause?reason=x", timeout=5).status == 200, 10,
             message="cluster pause answered")
    stop(agent)
