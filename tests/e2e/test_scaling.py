"""Settings docs/SCALING.md recommends for large fleets, through the binary. The others it names
are tested where they live: CONTROL_POLLING_INTERVAL and its jitter in test_mongo_faults.py
(test_polls_are_spread_by_jitter), ENABLE_CHANGE_STREAMS=false in test_mongo_cluster.py,
AGENT_HEARTBEAT_INTERVAL and the stale rule in test_fleet.py."""
import time

from agenthost_harness import agent_env, script, wait_for

RECORDER = script("recorder.lua")


def embedded_polls(agent):
    return agent.get("/api/mongo/status").json()["polls"]


def test_embedded_store_poll_interval_bounds_the_checks(fleet, state_file, tmp_path):
    """AGENTHOST_STATE_POLL=1: at most one data_version check a second (the default, 0.1 s, makes
    ten), and a command from another agent on the file still arrives, within about a poll."""
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "a.jsonl",
                                            AGENTHOST_STATE_POLL="1"), name="slow-poller")
    b = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "b.jsonl"), name="issuer")
    a.wait_state("running", timeout=15)
    b.wait_state("running", timeout=15)
    # The counter is published at most once a second: take the first value after a change.
    first = wait_for(lambda: embedded_polls(a) or None, 15, message="a first poll")
    start_value = wait_for(lambda: (lambda p: p if p > first else None)(embedded_polls(a)), 15,
                           message="the counter moves")
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 >= 5, 10, interval=0.2, message="five seconds")
    polls = embedded_polls(a) - start_value
    elapsed = time.monotonic() - t0
    # A poll never comes sooner than the interval (load only delays it); one more for the
    # publication lag of the counter.
    assert polls <= elapsed / 1.0 + 2, (polls, elapsed)
    assert polls >= 1, polls
    r = b.post("/api/cluster/pause?reason=scaling")
    assert r.status == 200, r.body
    a.wait_state("paused", timeout=15)


def test_an_agent_that_opened_a_locked_file_still_writes_its_status(fleet, state_file, tmp_path):
    """Found with 100 agents starting at once on one file: an agent whose store open met another
    process's write lock defers its API connection; its status writes and fleet listings must
    open it too (they used the missing connection and failed with SQLite's "out of memory"
    forever, so the agent was never listed and no wait= counted it)."""
    import sqlite3
    first = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "a.jsonl"), name="first")
    first.wait_state("running", timeout=15)
    holder = sqlite3.connect(state_file, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        late = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "b.jsonl"), name="late")
        assert late.state()["state"] == "starting"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    late.wait_state("running", timeout=20)

    def listed(agent):
        r = agent.get("/api/cluster/agents")
        if r.status != 200:
            return None
        states = {a["agent_id"]: a["state"] for a in r.json()["agents"]}
        return states if states.get("late") == "running" else None

    wait_for(lambda: listed(first), 20, message="the late agent listed by the first")
    wait_for(lambda: listed(late), 20, message="the late agent's own listing")
    assert "status write failed" not in late.log_text(), late.log_text()
