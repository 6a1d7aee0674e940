"""Settings docs/SCALING.md recommends for large fleets, through the binary. The others it names
are tested where they live: CONTROL_POLLING_INTERVAL and its jitter in test_mongo_faults.py
(test_polls_are_spread_by_jitter), ENABLE_CHANGE_STREAMS=false in test_mongo_cluster.py,
AGENT_HEARTBEAT_INTERVAL and the stale rule in test_fleet.py."""
import sqlite3
import threading
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
    first = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "a.jsonl"), name="first")
    first.wait_state("running", timeout=15)
    # waits out the new file's setup, which may still hold the lock after the start
    holder = sqlite3.connect(state_file, isolation_level=None, timeout=15)
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


FLEET_SIZE = 8


def listed_states(agent):
    """{agent_id: state} of the fleet listing, or None when it did not answer 200."""
    r = agent.get("/api/cluster/agents", timeout=10)
    if r.status != 200:
        return None
    return {a["agent_id"]: a["state"] for a in r.json()["agents"]}


def start_agents(fleet, state_file, tmp_path, n):
    agents = [fleet.start(RECORDER, env=agent_env(state_file, tmp_path / f"e{i}.jsonl"),
                          name=f"fleet-{i}") for i in range(n)]
    for a in agents:
        a.wait_state("running", timeout=30)
    names = {a.name for a in agents}
    wait_for(lambda: (lambda s: s is not None and set(s) == names
                      and set(s.values()) == {"running"})(listed_states(agents[0])), 30,
             message="every agent listed running")
    return agents


def test_status_writes_land_while_the_control_file_is_write_locked(fleet, state_file, tmp_path):
    """Found with 300 agents on one file: after a command every agent writes its status record
    at once, and those writes queued on the control file's write lock with the commands, while
    each of them made all 300 watchers re-read the control document. The records live in a file
    of their own ("<AGENTHOST_STATE>-agents"): with another process holding the control file's
    write lock, all agents change state at once (a local pause each, so the writes contend on
    the status file) and every record lands; the listing shows them while the lock is held."""
    agents = start_agents(fleet, state_file, tmp_path, FLEET_SIZE)
    # waits out the new file's setup, which may still hold the lock after the start
    holder = sqlite3.connect(state_file, isolation_level=None, timeout=15)
    holder.execute("BEGIN IMMEDIATE")
    try:
        answers = {}
        threads = [threading.Thread(target=lambda a=a: answers.setdefault(
            a.name, a.post("/api/agent/pause?reason=contended", timeout=30).status))
            for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert set(answers.values()) == {200}, answers
        wait_for(lambda: (lambda s: s is not None and set(s.values()) == {"paused"}
                          and len(s) == FLEET_SIZE)(listed_states(agents[-1])), 30,
                 message="every status record written while the control file is locked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for a in agents:
        assert "status write failed" not in a.log_text(), a.log_text()


def test_commands_are_applied_while_the_status_file_is_write_locked(fleet, state_file,
                                                                     tmp_path):
    """The other way round: another process holds the status records' file; a cluster command
    is still written at once and every agent applies it (their acknowledgements wait for the
    lock), and once it is released every record shows the command's version."""
    agents = start_agents(fleet, state_file, tmp_path, FLEET_SIZE)
    holder = sqlite3.connect(state_file + "-agents", isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        r = agents[0].post("/api/cluster/pause?reason=status-locked", timeout=30)
        assert r.status == 200, r.body
        version = r.json()["version"]
        for a in agents:
            a.wait_state("paused", timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    def acknowledged():
        r = agents[1].get("/api/cluster/agents", timeout=10)
        body = r.json() if r.status == 200 else {}
        recs = body.get("agents", [])
        return len(recs) == FLEET_SIZE and all(
            x["applied_version"] >= version and x["state"] == "paused" for x in recs)

    wait_for(acknowledged, 60, message="every record shows the version after the lock")
