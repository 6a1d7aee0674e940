"""The edges of cluster commands and fleet waits, end to end on the embedded store (real agenthost
processes, fixture recorder.lua): commands queued behind a locked store when SIGTERM arrives are
answered 503 and never written; a state change wakes the status writer at once (a wait completes
long before the next heartbeat); an agent that is stopping or stopped is excluded from a wait at
once; until= and wait= at their bounds; and a local pause of an agent held paused by a cluster
shutdown keeps the hold."""
import datetime
import os
import signal
import sqlite3
import threading

from agenthost_harness import agent_env, count_events, metric, script, wait_events, wait_for

RECORDER = script("recorder.lua")
STORE_WORKERS = 2  # core/ah_http_park.c
PAUSE_MAX_S = 30 * 86400  # the longest timed pause


def start(fleet, state_file, tmp_path, name, **extra):
    events = str(tmp_path / f"{name}.jsonl")
    a = fleet.start(RECORDER, env=agent_env(state_file, events, **extra), name=name)
    a.events = events
    return a


def start_fleet(fleet, state_file, tmp_path, n, **extra):
    agents = [start(fleet, state_file, tmp_path, f"agent-{i + 1}", **extra) for i in range(n)]
    for a in agents:
        a.wait_state("running", timeout=20)
    ids = sorted(a.name for a in agents)
    # every agent has written its record (the first write is made at start)
    wait_for(lambda: sorted(r["agent_id"] for r in agents[0].get("/api/cluster/agents").json()
                            ["agents"]) == ids, 20, message="every agent's record")
    return agents


def stop(a):
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()


def store_jobs(agent, state):
    return metric(agent, f'agenthost_http_store_jobs{{state="{state}"}}')


def audit_reasons(state_file):
    db = sqlite3.connect(state_file, timeout=10)
    try:
        return [r[0] for r in db.execute("SELECT reason FROM audit ORDER BY version")]
    finally:
        db.close()


def iso(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_commands_queued_behind_a_locked_store_at_sigterm_get_503_and_are_never_written(
        fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "locked", SHUTDOWN_TIMEOUT=30)
    a.wait_state("running", timeout=15)
    # waits out the new file's setup, which may still hold the lock after the start
    lock = sqlite3.connect(state_file, isolation_level=None, timeout=15)
    lock.execute("BEGIN IMMEDIATE")  # another process's write lock: store calls wait on it
    answers = {}

    def post(reason):
        answers[reason] = a.post(f"/api/cluster/pause?reason={reason}", timeout=60)

    clients = []
    try:
        for i in range(STORE_WORKERS):
            clients.append(threading.Thread(target=post, args=(f"running-{i}",), daemon=True))
            clients[-1].start()
        wait_for(lambda: store_jobs(a, "running") == STORE_WORKERS, 15,
                 message="both store workers in the store")
        for i in range(5):
            clients.append(threading.Thread(target=post, args=(f"queued-{i}",), daemon=True))
            clients[-1].start()
        wait_for(lambda: store_jobs(a, "queued") == 5, 15, message="five commands queued")
        a.signal(signal.SIGTERM)
        # the API's stop drops the queue and waits for the two store calls, which keep waiting
        # for the lock meanwhile (up to 4 x 5 s)
        stopping = a.wait_log(r"Stopping the API: (\d+) queued control-store request\(s\) "
                              r"dropped \(answered 503\), (\d+) running", timeout=20)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    for c in clients:
        c.join(timeout=60)
    assert a.wait_exit(30) == 0, a.log_text()
    for i in range(5):
        r = answers[f"queued-{i}"]
        assert r.status == 503 and "shutting down" in r.json()["error"], (i, r.status, r.body)
    written = audit_reasons(state_file)
    assert not [w for w in written if w.startswith("queued")], written
    for i in range(STORE_WORKERS):  # the two in the store finished once the lock was gone
        r = answers[f"running-{i}"]
        assert r.status == 200, (i, r.status, r.body)
        assert f"running-{i}" in written, written
    assert stopping.groups() == ("5", "2"), a.log_text()


def test_a_state_change_wakes_the_status_writer_at_once(fleet, state_file, tmp_path):
    agents = start_fleet(fleet, state_file, tmp_path, 2, AGENT_HEARTBEAT_INTERVAL=30)
    r = agents[0].post("/api/cluster/pause?reason=writer&wait=5", timeout=30)
    assert r.status == 200, r.body
    w = r.json()["wait"]
    assert w["complete"] is True, w
    assert sorted(w["acknowledged"]) == ["agent-1", "agent-2"], w
    assert w["waited_s"] < 2, w  # the next heartbeat is about 30 s away
    for a in agents:
        stop(a)


def test_a_stopping_agent_is_excluded_from_a_wait_at_once(fleet, state_file, tmp_path):
    agents = start_fleet(fleet, state_file, tmp_path, 3, AGENT_HEARTBEAT_INTERVAL=5)
    agents[2].signal(signal.SIGTERM)
    r = agents[0].post("/api/cluster/pause?reason=one+leaving&wait=3", timeout=30)
    assert r.status == 200, r.body
    w = r.json()["wait"]
    assert w["complete"] is True, w
    assert w["excluded"] == ["agent-3"], w
    assert sorted(w["acknowledged"]) == ["agent-1", "agent-2"] and w["pending"] == [], w
    # a stale record would take 15 s (3 heartbeats); the stopping one counts out at once
    assert w["waited_s"] < 1, w
    assert agents[2].wait_exit(20) == 0, agents[2].log_text()
    for a in agents[:2]:
        stop(a)


def test_until_and_wait_at_their_bounds(fleet, state_file, tmp_path):
    a = start_fleet(fleet, state_file, tmp_path, 1)[0]
    now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    too_far = iso(now + PAUSE_MAX_S + 60)
    r = a.post(f"/api/cluster/pause?until={too_far}")
    assert r.status == 400 and "until" in r.json()["error"], r.body
    in_an_hour = iso(now + 3600)
    r = a.post(f"/api/cluster/pause?until={in_an_hour}&reason=hour")
    assert r.status == 200, r.body
    assert parse_iso(r.json()["expires_at"]) == parse_iso(in_an_hour), r.body
    a.wait_state("paused")
    assert parse_iso(a.get("/api/cluster/control-state").json()["expires_at"]) == \
        parse_iso(in_an_hour)
    almost_max = iso(datetime.datetime.now(datetime.timezone.utc).timestamp() + PAUSE_MAX_S - 60)
    r = a.post(f"/api/cluster/pause?until={almost_max}&reason=month")
    assert r.status == 200, r.body
    assert parse_iso(r.json()["expires_at"]) == parse_iso(almost_max), r.body
    r = a.post("/api/cluster/resume?reason=max+wait&wait=300", timeout=330)
    assert r.status == 200, r.body
    w = r.json()["wait"]
    assert w["complete"] is True and w["acknowledged"] == ["agent-1"], w
    a.wait_state("running")
    for bad in ("300.001", "301"):
        r = a.post(f"/api/cluster/pause?wait={bad}")
        assert r.status == 400 and "wait" in r.json()["error"], (bad, r.body)
    stop(a)


def test_a_local_pause_while_held_keeps_the_hold(fleet, state_file, tmp_path):
    first = start(fleet, state_file, tmp_path, "first")
    first.wait_state("running", timeout=15)
    assert first.post("/api/cluster/shutdown?reason=maintenance").status == 200
    assert first.wait_exit() == 0, first.log_text()

    late = start(fleet, state_file, tmp_path, "late")
    late.wait_log(r"stays paused until POST /api/cluster/resume", timeout=20)
    late.wait_state("paused")
    r = late.post("/api/agent/pause?reason=local")
    assert r.status == 200, r.body
    wait_for(lambda: late.state()["local_override"], 10, message="the local pause applied")
    # still held: a local resume (API or SIGUSR2) is refused, only a cluster command releases
    r = late.post("/api/agent/resume?reason=local")
    assert r.status == 409 and "held paused" in r.json()["error"], r.body
    late.signal(signal.SIGUSR2)
    late.wait_log(r"Local resume by signal SIGUSR2 refused: this agent is held paused")
    st = late.state()
    assert st["state"] == "paused" and st["batches"] == 0, st
    assert count_events(wait_events(late.events, lambda e: True, 5), "batch_start") == 0
    r = late.post("/api/cluster/resume?reason=back")
    assert r.status == 200, r.body
    late.wait_state("running")
    wait_events(late.events, lambda e: count_events(e, "batch_start") >= 1, 15, "batches")
    stop(late)


def test_another_process_closing_the_new_file_never_takes_the_agents_log_away(
        fleet, state_file, tmp_path):
    # A new file is synced after the watcher's first read. That sync must not drop the agent's
    # own locks on the file (closing any descriptor of a file drops every POSIX lock the process
    # holds on it): without them, the last close of another process's connection takes the
    # exclusive lock, checkpoints and deletes the WAL the agent still writes to, and the agent's
    # next commands, answered 200, land in a deleted file that no other process (agent) reads.
    a = start(fleet, state_file, tmp_path, "fresh")
    a.wait_state("running", timeout=15)
    r = a.post("/api/cluster/pause?reason=first")
    assert r.status == 200, r.body
    a.wait_state("paused")  # delivered by the watcher, whose first read (and sync) came before
    assert audit_reasons(state_file) == ["first"]  # another process's connection, closed
    assert os.path.exists(state_file + "-wal"), "another process's close deleted the agent's WAL"
    r = a.post("/api/cluster/resume?reason=second")
    assert r.status == 200, r.body
    assert audit_reasons(state_file) == ["first", "second"]  # what every other agent reads
    a.wait_state("running")
    stop(a)
    assert audit_reasons(state_file) == ["first", "second"]
