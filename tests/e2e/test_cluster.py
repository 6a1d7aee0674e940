"""Cluster control on the embedded store: several agents sharing one AGENTHOST_STATE file."""
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from agenthost_harness import (agent_env, count_events, read_events, script, wait_events,
                               wait_for)

RECORDER = script("recorder.lua")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def start_cluster(fleet, state_file, tmp_path, n, **extra):
    agents = []
    for i in range(n):
        name = f"agent-{i + 1}"
        events = tmp_path / f"{name}.jsonl"
        a = fleet.start(RECORDER, env=agent_env(state_file, events, **extra), name=name)
        a.events = str(events)
        agents.append(a)
    for a in agents:
        a.wait_state("running", timeout=15)
    return agents


def batches(agent):
    return agent.state()["batches"]


def test_cluster_pause_resume_shutdown_reaches_all_agents(fleet, state_file, tmp_path):
    agents = start_cluster(fleet, state_file, tmp_path, 3)
    for a in agents:
        wait_for(lambda: batches(a) > 0, 10, message=f"{a.name} runs batches")

    r = agents[0].post("/api/cluster/pause?reason=Maintenance+window&updated_by=ops_team")
    assert r.status == 200, r.body
    body = r.json()
    assert body["status"] == "success"
    assert body["command"] == "pause"
    assert body["reason"] == "Maintenance window"
    assert TS_RE.match(body["timestamp"]), body["timestamp"]
    pause_version = body["version"]
    assert pause_version == 1  # the initial state is version 0

    for a in agents:
        a.wait_state("paused", timeout=10)
        ready = a.get("/readyz")
        assert ready.status == 503, ready.body
        assert ready.json()  # a JSON body saying why
        st = a.state()
        assert st["applied_version"] == pause_version
        assert st["cluster_command"] == "pause"
        assert st["local_override"] is False
    for a in agents:
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") >= 1, 10,
                         f"{a.name} on_pause")
        pauses = [e for e in ev if e["ev"] == "on_pause"]
        assert len(pauses) == 1, pauses
        p = pauses[0]
        assert p["command"] == "pause"
        assert p["version"] == pause_version
        assert p["reason"] == "Maintenance window"
        assert p["updated_by"] == "ops_team"
        assert p["source"] == "cluster"
        assert TS_RE.match(p["timestamp"]), p["timestamp"]

    cs = agents[1].get("/api/cluster/control-state").json()
    assert cs["command"] == "pause" and cs["version"] == pause_version
    assert cs["updated_by"] == "ops_team" and cs["watch_mode"] == "polling"

    counts = {a.name: batches(a) for a in agents}
    r = agents[1].post("/api/cluster/resume?reason=done&updated_by=ops_team")
    assert r.status == 200, r.body
    assert r.json()["command"] == "running"
    assert r.json()["version"] == pause_version + 1
    for a in agents:
        a.wait_state("running", timeout=10)
        wait_for(lambda: batches(a) > counts[a.name], 10, message=f"{a.name} batches grow")
        assert a.get("/readyz").status == 200
        ev = read_events(a.events)
        assert count_events(ev, "on_resume", source="cluster", version=pause_version + 1) == 1

    r = agents[2].post("/api/cluster/shutdown?reason=bye&updated_by=admin")
    assert r.status == 200, r.body
    assert r.json()["command"] == "shutdown"
    for a in agents:
        assert a.wait_exit(timeout=20) == 0, a.log_text()
        ev = read_events(a.events)
        shut = [e for e in ev if e["ev"] == "on_shutdown"]
        assert len(shut) == 1, ev[-5:]
        assert shut[0]["source"] == "cluster" and shut[0]["reason"] == "bye"
        assert ev[-1]["ev"] == "on_shutdown"  # nothing ran after the hook


def test_pause_waits_for_current_batch(fleet, state_file, tmp_path):
    events = str(tmp_path / "slow.jsonl")
    a = fleet.start(RECORDER, env=agent_env(state_file, events, BATCH_SECONDS=1.5), name="slow")
    wait_events(events, lambda e: count_events(e, "batch_start") >= 1, 15, "a batch starts")
    sent_at = time.time()
    r = a.post("/api/cluster/pause?reason=slow&updated_by=test")
    assert r.status == 200, r.body
    a.wait_state("paused", timeout=15)
    ev = wait_events(events, lambda e: count_events(e, "on_pause") == 1, 10, "on_pause")

    i_pause = next(i for i, e in enumerate(ev) if e["ev"] == "on_pause")
    before, after = ev[:i_pause], ev[i_pause + 1:]
    # Premise: a batch was in progress when the command was sent (1.5 s batches, sent right
    # after one started).
    starts = {e["n"]: e for e in ev if e["ev"] == "batch_start"}
    ends = {e["n"]: e for e in ev if e["ev"] == "batch_end"}
    in_progress = [n for n, s in starts.items()
                   if s["t"] <= sent_at and (n not in ends or ends[n]["t"] >= sent_at)]
    assert in_progress, f"premise failed: no batch in progress at {sent_at}: {ev}"
    n = in_progress[0]
    # That batch completed before the hook ran...
    assert any(e["ev"] == "batch_end" and e["n"] == n for e in before), ev
    # ...every batch that started before the hook ended before it, and none started after it.
    assert count_events(before, "batch_start") == count_events(before, "batch_end"), before
    assert count_events(after, "batch_start") == 0, after
    assert ev[i_pause]["state"] == "paused"
    assert a.state()["batches"] == count_events(before, "batch_end")


def test_restarted_agent_in_paused_cluster_starts_paused(fleet, state_file, tmp_path):
    first = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "first.jsonl"),
                        name="first")
    first.wait_state("running", timeout=15)
    r = first.post("/api/cluster/pause?reason=hold&updated_by=ops")
    assert r.status == 200, r.body
    version = r.json()["version"]
    first.wait_state("paused")
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0, first.log_text()

    events = str(tmp_path / "second.jsonl")
    second = fleet.start(RECORDER, env=agent_env(state_file, events), name="second")
    second.wait_state("paused", timeout=15)
    ev = wait_events(events, lambda e: count_events(e, "on_pause") >= 1, 10, "on_pause")
    pauses = [e for e in ev if e["ev"] == "on_pause"]
    assert len(pauses) == 1
    assert pauses[0]["source"] == "startup"
    assert pauses[0]["version"] == version
    assert pauses[0]["reason"] == "hold" and pauses[0]["updated_by"] == "ops"
    assert count_events(ev, "batch_start") == 0, ev
    st = second.state()
    assert st["batches"] == 0 and st["applied_version"] == version
    assert second.get("/readyz").status == 503

    # Still alive and obedient: a cluster resume starts its batches.
    assert second.post("/api/cluster/resume?reason=go").status == 200
    wait_events(events, lambda e: count_events(e, "batch_start") >= 1, 10, "batches after resume")


def test_agent_pause_is_local_and_cluster_resume_overrides_it(fleet, state_file, tmp_path):
    a, b = start_cluster(fleet, state_file, tmp_path, 2)
    r = a.post("/api/agent/pause?reason=debugging")
    assert r.status == 200, r.body
    assert r.json()["status"] == "success"
    a.wait_state("paused")
    st = a.state()
    assert st["local_override"] is True
    assert st["cluster_command"] == "running"
    pause = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 10, "a on_pause")
    assert [e for e in pause if e["ev"] == "on_pause"][0]["source"] == "local"

    # b keeps running: its batch count grows while a is paused, and the cluster is unchanged.
    nb = batches(b)
    wait_for(lambda: batches(b) > nb + 2, 10, message="b keeps running")
    assert b.state()["state"] == "running"
    cs = b.get("/api/cluster/control-state").json()
    assert cs["command"] == "running" and cs["version"] == 0
    assert b.get("/api/cluster/history").json()["count"] == 0

    r = b.post("/api/cluster/resume?reason=latest+wins&updated_by=ops")
    assert r.status == 200, r.body
    version = r.json()["version"]
    a.wait_state("running")
    st = a.state()
    assert st["local_override"] is False
    assert st["applied_version"] == version
    ev = read_events(a.events)
    assert count_events(ev, "on_resume", source="cluster", version=version) == 1


def test_concurrent_cluster_commands_get_consecutive_versions(fleet, state_file, tmp_path):
    agents = start_cluster(fleet, state_file, tmp_path, 3)
    n = 100
    errors = []
    lock = threading.Lock()

    def issue(i):
        a = agents[i % len(agents)]
        cmd = "pause" if i % 2 == 0 else "resume"
        r = a.post(f"/api/cluster/{cmd}?reason=load+{i}&updated_by=thread-{i}", timeout=30)
        if r.status != 200:
            with lock:
                errors.append((i, r.status, r.body))
            return None
        body = r.json()
        return (body["version"], body["command"], f"load {i}")

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = [x for x in pool.map(issue, range(n)) if x is not None]
    assert not errors, errors[:5]
    versions = sorted(v for v, _, _ in results)
    assert versions == list(range(1, n + 1)), versions

    hist = agents[0].get("/api/cluster/history?limit=1000").json()
    assert hist["count"] == n
    entries = hist["entries"]
    assert [e["version"] for e in entries] == list(range(n, 0, -1))
    by_version = {v: (c, reason) for v, c, reason in results}
    for e in entries:
        assert (e["command"], e["reason"]) == by_version[e["version"]], e
        assert e["agent_id"] in {a.name for a in agents}
        assert TS_RE.match(e["timestamp"]), e

    last_command = by_version[n][0]
    for a in agents:
        wait_for(lambda: a.state()["applied_version"] == n, 15,
                 message=f"{a.name} applies version {n}")
        st = a.state()
        assert st["cluster_command"] == last_command
        assert st["state"] == ("paused" if last_command == "pause" else "running")
        cs = a.get("/api/cluster/control-state").json()
        assert cs["version"] == n and cs["command"] == last_command


def _shutdown_is_answered(fleet, state_file, tmp_path, path, rounds):
    """The agent that receives a shutdown command answers it before it exits (each round is a
    fresh agent: the response races the agent's own exit)."""
    lost = []
    for i in range(rounds):
        a = fleet.start(RECORDER, env=agent_env(str(tmp_path / f"s{i}.db"),
                                                tmp_path / f"s{i}.jsonl"), name=f"s{i}")
        a.wait_state("running", timeout=15)
        try:
            r = a.post(path)
            if r.status != 200:
                lost.append((i, r.status, r.body))
        except OSError as e:  # connection closed without a response
            lost.append((i, type(e).__name__, str(e)))
        assert a.wait_exit(timeout=20) == 0, a.log_text()
    assert not lost, f"{len(lost)}/{rounds} shutdown requests got no answer: {lost}"


def test_cluster_shutdown_is_answered_before_exit(fleet, state_file, tmp_path):
    _shutdown_is_answered(fleet, state_file, tmp_path, "/api/cluster/shutdown?reason=bye", 10)


def test_agent_shutdown_is_answered_before_exit(fleet, state_file, tmp_path):
    _shutdown_is_answered(fleet, state_file, tmp_path, "/api/agent/shutdown?reason=bye", 10)


def test_agent_started_after_cluster_shutdown_starts_paused(fleet, state_file, tmp_path):
    first = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "first.jsonl"),
                        name="first")
    first.wait_state("running", timeout=15)
    assert first.post("/api/cluster/shutdown?reason=gone").status == 200
    assert first.wait_exit() == 0

    events = str(tmp_path / "late.jsonl")
    late = fleet.start(RECORDER, env=agent_env(state_file, events), name="late")
    late.wait_state("paused", timeout=15)  # held paused and reachable, not exiting
    ev = wait_events(events, lambda e: count_events(e, "on_pause") == 1, 10, "on_pause")
    assert count_events(ev, "on_pause", source="startup") == 1
    assert count_events(ev, "batch_start") == 0
    assert late.post("/api/cluster/resume?reason=back").status == 200
    wait_events(events, lambda e: count_events(e, "batch_start") >= 1, 10, "batches")



def test_store_locked_at_startup_delays_the_agent_until_released_then_it_syncs(
        fleet, state_file, tmp_path):
    import sqlite3
    first = start_cluster(fleet, state_file, tmp_path, 1)[0]
    r = first.post("/api/cluster/pause?reason=before+restart")
    assert r.status == 200 and r.json()["version"] == 1, r.body
    first.wait_state("paused")
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0, first.log_text()

    # Another process holds the store's write lock while the agent starts, longer than the
    # store's busy timeout (5 s): the agent starts like on an unreachable MongoDB — API up,
    # probes answering, not ready, no batch — and syncs once the lock is released.
    holder = sqlite3.connect(state_file, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    events = tmp_path / "late.jsonl"
    late = fleet.start(RECORDER, env=agent_env(state_file, events), name="late")
    try:
        wait_for(lambda: "locked" in late.get("/readyz", timeout=1).json()["reason"], 15,
                 message="/readyz names the lock")
        deadline = time.monotonic() + 6.0  # past the busy timeout: still up, still starting
        while time.monotonic() < deadline:
            assert late.get("/healthz", timeout=1).status == 200
            ready = late.get("/readyz", timeout=1)
            assert ready.status == 503 and ready.json()["state"] == "starting", ready.body
            assert "control store" in ready.json()["reason"], ready.body
            time.sleep(0.2)
        assert late.proc.poll() is None, late.log_text()
        assert late.state()["batches"] == 0
        assert count_events(read_events(str(events)), "batch_start") == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    late.wait_state("paused", timeout=20)
    st = late.state()
    assert st["applied_version"] == 1 and st["batches"] == 0, st
    ev = wait_events(str(events), lambda e: count_events(e, "on_pause") == 1, 10, "on_pause")
    assert [e["source"] for e in ev if e["ev"] == "on_pause"] == ["startup"], ev
    assert count_events(ev, "batch_start") == 0, ev
    assert late.get("/readyz").status == 503


def test_a_reason_or_name_cannot_forge_log_lines_on_any_agent(fleet, state_file, tmp_path):
    agents = start_cluster(fleet, state_file, tmp_path, 2)
    forged = "%0A%5BERROR%5D%20forged"  # "\n[ERROR] forged"
    r = agents[0].post(f"/api/cluster/pause?reason=x{forged}&updated_by=ops{forged}")
    assert r.status == 200, r.body
    assert r.json()["reason"] == "x\n[ERROR] forged"  # stored and answered as given
    for a in agents:
        a.wait_state("paused")
        a.wait_log(r"Agent paused \(cluster command")
    r = agents[1].post(f"/api/agent/resume?reason=y{forged}&updated_by=me{forged}")
    assert r.status == 200, r.body
    agents[1].wait_state("running")
    agents[1].wait_log(r"Agent running \(local command")
    for a in agents:
        lines = a.log_text().splitlines()
        assert not [l for l in lines if "forged" in l and not l.startswith("[INFO]")], \
            a.log_text()
        assert any(r"(cluster command 'pause', version 1, by ops\n[ERROR] forged: x\n[ERROR] "
                   r"forged)" in l for l in lines), a.log_text()


def test_a_local_resume_while_starting_neither_skips_the_sync_nor_the_shutdown_hold(
        fleet, state_file, tmp_path):
    import sqlite3
    first = start_cluster(fleet, state_file, tmp_path, 1)[0]
    r = first.post("/api/cluster/shutdown?reason=maintenance")
    assert r.status == 200, r.body
    assert first.wait_exit() == 0, first.log_text()

    holder = sqlite3.connect(state_file, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    events = tmp_path / "late.jsonl"
    late = fleet.start(RECORDER, env=agent_env(state_file, events), name="late")
    try:
        assert late.state()["state"] == "starting"
        for path in ("/api/agent/resume", "/api/agent/pause"):
            r = late.post(path)
            assert r.status == 409, r.body
            assert "has not synced to the cluster state yet" in r.json()["error"], r.body
        late.signal(signal.SIGUSR2)
        late.wait_log(r"SIGUSR2 ignored: the agent is starting")
        assert late.state()["state"] == "starting" and late.state()["batches"] == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    late.wait_state("paused", timeout=20)  # held paused by the cluster shutdown
    assert late.wait_log(r"stays paused until POST /api/cluster/resume")
    st = late.state()
    assert st["applied_version"] == 1 and st["batches"] == 0 and not st["local_override"], st
    r = late.post("/api/agent/pause")  # synced now: a local command is accepted again
    assert r.status == 200, r.body
    r = late.post("/api/agent/resume")  # but a held agent is released by a cluster command only
    assert r.status == 409 and "held paused" in r.json()["error"], r.body


def test_local_commands_after_a_final_shutdown_answer_409(fleet, state_file, tmp_path):
    path = tmp_path / "slow_batch.lua"
    # wall-clock spin (CPU time crawls on a loaded machine)
    path.write_text('jit.off()\nlocal agent = require "agent"\nlocal M = {}\n'
                    'function M.batch()\n'
                    '    local t = agent.monotonic() + 2\n'
                    '    while agent.monotonic() < t do local x = {} end\n'
                    '    return 1\n'
                    'end\nreturn M\n')
    a = fleet.start(str(path), env=agent_env(state_file), name="slow")
    a.wait_state("running", timeout=15)
    # each batch spins 2 s and the next starts at once: after the first, one is always running
    wait_for(lambda: a.state()["batches"] >= 1, 60, message="the first batch done")
    r = a.post("/api/agent/shutdown?reason=final")
    assert r.status == 200, r.body
    for cmd in ("pause", "resume", "shutdown"):
        r = a.post(f"/api/agent/{cmd}")  # the batch still runs: the agent is still up
        assert r.status == 409, (cmd, r.body)
        assert "the agent is shutting down" in r.json()["error"], r.body
    assert a.wait_exit() == 0, a.log_text()

def test_the_issuing_agent_logs_issued_before_its_own_transition(fleet, state_file, tmp_path):
    a = start_cluster(fleet, state_file, tmp_path, 1)[0]
    for command, line in (("pause", "Agent paused (cluster command 'pause'"),
                          ("resume", "Agent running (cluster command 'running'")):
        assert a.post(f"/api/cluster/{command}?reason=order").status == 200
        a.wait_log(re.escape(line))
        log = a.log_text()
        issued = log.find(f"Cluster command {'running' if command == 'resume' else command} "
                          "issued")
        assert 0 <= issued < log.find(line), log
    assert a.post("/api/agent/pause?reason=order").status == 200
    a.wait_log(r"Agent paused \(local command")
    log = a.log_text()
    assert log.find("Local command pause requested through the API") < \
        log.find("Agent paused (local command"), log
