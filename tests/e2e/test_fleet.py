"""Fleet awareness (docs/API.md, "Fleet"): every agent's status record in the control store,
GET /api/cluster/agents, staleness, the stopped record of a clean shutdown, and the record
sweep / TTL index, end to end with real agenthost processes on both stores: the embedded SQLite
file and MongoDB (the wire-protocol test server of tests/mongo, one-member replica set)."""
import datetime
import re
import signal
import sqlite3
import sys
import time

from agenthost_harness import (FLEET_HEARTBEAT, MONGO_DIR, Store, agent_env, script, wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import MongoTestServer  # noqa: E402

RECORDER = script("recorder.lua")
HEARTBEAT = FLEET_HEARTBEAT  # AGENT_HEARTBEAT_INTERVAL in these tests: stale after 1.5 s
MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
RECORD_FIELDS = {"agent_id", "state", "applied_version", "watch_mode", "last_seen", "started_at",
                 "host", "pid", "agenthost_version", "batches", "errors", "stale", "labels",
                 "leases"}


def start_agent(fleet, store, name, **extra):
    events = store.tmp_path / f"{name}.jsonl"
    a = fleet.start(RECORDER, env=store.env(events, **extra), name=name)
    a.events = str(events)
    return a


def start_fleet(fleet, store, n, **extra):
    agents = [start_agent(fleet, store, f"agent-{i + 1}", **extra) for i in range(n)]
    for a in agents:
        a.wait_state("running", timeout=20)
    return agents


def agents_body(agent, query=""):
    r = agent.get("/api/cluster/agents" + query)
    assert r.status == 200, r.body
    return r.json()


def record_of(body, agent_id):
    for rec in body["agents"]:
        if rec["agent_id"] == agent_id:
            return rec
    return None


def wait_records(agent, predicate, timeout=15.0, message="agent records", query=""):
    """Polls GET /api/cluster/agents until predicate(body) holds; returns the body."""
    seen = {}

    def check():
        seen["body"] = agents_body(agent, query)
        return predicate(seen["body"])

    wait_for(check, timeout, message=message)
    return seen["body"]


def test_agents_lists_each_agent_with_the_version_it_applied(fleet, store):
    agents = start_fleet(fleet, store, 3)
    names = [a.name for a in agents]
    body = wait_records(agents[0], lambda b: b["summary"]["total"] == 3 and all(
        r["state"] == "running" for r in b["agents"]), message="3 running records")
    assert [r["agent_id"] for r in body["agents"]] == names  # sorted by agent_id
    assert body["count"] == 3 and body["version"] == 0
    assert body["summary"] == {"total": 3, "states": {"running": 3}, "applied_current": 3,
                               "stale": 0}
    for rec, a in zip(body["agents"], agents):
        assert set(rec) == RECORD_FIELDS, rec
        assert rec["pid"] == a.proc.pid
        assert rec["stale"] is False
        assert rec["applied_version"] == 0
        assert rec["watch_mode"] == ("change_streams" if store.kind == "mongodb" else "polling")
        assert MS_RE.match(rec["last_seen"]) and MS_RE.match(rec["started_at"]), rec
        assert rec["started_at"] <= rec["last_seen"]
        assert rec["agenthost_version"] and rec["host"]

    r = agents[1].post("/api/cluster/pause?reason=fleet+test")
    assert r.status == 200, r.body
    version = r.json()["version"]
    # The write that carries the new applied_version is each agent's acknowledgement.
    body = wait_records(agents[2], lambda b: b["summary"]["applied_current"] == 3,
                        message="every agent acknowledges the pause")
    assert body["version"] == version
    assert body["summary"]["states"] == {"paused": 3}
    assert all(r["state"] == "paused" and r["applied_version"] == version
               for r in body["agents"]), body

    # ?version=N lists who has not applied N yet; the summary still covers the whole fleet.
    nobody = agents_body(agents[0], f"?version={version}")
    assert nobody["count"] == 0 and nobody["agents"] == []
    assert nobody["summary"]["total"] == 3
    everyone = agents_body(agents[0], f"?version={version + 1}")
    assert everyone["count"] == 3 and len(everyone["agents"]) == 3


def test_killed_agent_goes_stale_and_a_restarted_one_reappears(fleet, store):
    agents = start_fleet(fleet, store, 3)
    wait_records(agents[0], lambda b: b["summary"]["total"] == 3, message="3 records")
    victim = agents[2]
    victim.kill()  # SIGKILL: no final record
    body = wait_records(agents[0], lambda b: b["summary"]["stale"] == 1, timeout=10,
                        message="the killed agent turns stale")
    rec = record_of(body, victim.name)
    assert rec["stale"] is True and rec["state"] == "running", rec
    assert all(not r["stale"] for r in body["agents"] if r["agent_id"] != victim.name)
    # still listed until AGENT_STATUS_TTL removes it, and counted among the not-applied
    r = agents[0].post("/api/cluster/pause")
    version = r.json()["version"]
    behind = wait_records(agents[0], lambda b: b["count"] == 1, query=f"?version={version}",
                          message="only the stale agent is behind")
    assert behind["agents"][0]["agent_id"] == victim.name and behind["agents"][0]["stale"]

    again = start_agent(fleet, store, victim.name)
    again.wait_state("paused", timeout=20)
    # Its first record may still say "starting" (written before the pause was applied); the
    # paused one follows.
    body = wait_records(agents[0], lambda b: b["summary"]["stale"] == 0 and
                        record_of(b, victim.name)["pid"] == again.proc.pid and
                        record_of(b, victim.name)["state"] == "paused",
                        message="the restarted agent reappears, paused")
    rec = record_of(body, victim.name)
    assert rec["state"] == "paused" and rec["applied_version"] == version


def test_clean_shutdown_writes_stopped(fleet, store):
    agents = start_fleet(fleet, store, 2)
    wait_records(agents[0], lambda b: b["summary"]["total"] == 2, message="2 records")
    agents[1].signal(signal.SIGTERM)
    assert agents[1].wait_exit() == 0
    body = agents_body(agents[0])  # written before the process exited: no wait needed
    assert record_of(body, agents[1].name)["state"] == "stopped"
    assert body["summary"]["states"] == {"running": 1, "stopped": 1}


def test_bad_version_parameter_is_a_400_naming_it(fleet, store):
    a = start_fleet(fleet, store, 1)[0]
    for bad in ["x", "-1", "1.5", "", "99999999999999999999", "9007199254740993", "1e3"]:
        r = a.get("/api/cluster/agents?version=" + bad)
        assert r.status == 400, (bad, r.body)
        assert "version" in r.json()["error"], r.body


def test_agents_without_distributed_control_is_503(fleet, tmp_path):
    a = fleet.start(RECORDER, env=agent_env(str(tmp_path / "s.db"), tmp_path / "e.jsonl",
                                            ENABLE_DISTRIBUTED_CONTROL="false"))
    a.wait_state("running")
    r = a.get("/api/cluster/agents")
    assert r.status == 503 and "distributed control is disabled" in r.json()["error"]


def test_embedded_sweep_removes_records_older_than_the_ttl(fleet, tmp_path):
    store = Store("embedded", tmp_path)
    first = start_fleet(fleet, store, 1)[0]
    wait_records(first, lambda b: b["summary"]["total"] == 1, message="1 record")
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    db = sqlite3.connect(store.state_file + "-agents")  # the status records' file
    old_us = int((datetime.datetime.now().timestamp() - 7200) * 1e6)
    db.execute("UPDATE agent_status SET last_seen_us = ?", (old_us,))
    db.commit()
    db.close()
    # The next agent's first write sweeps what AGENT_STATUS_TTL (60 s here) has outlived.
    second = start_agent(fleet, store, "agent-2", AGENT_STATUS_TTL=60)
    second.wait_state("running")
    body = wait_records(second, lambda b: b["summary"]["total"] == 1, message="the sweep")
    assert [r["agent_id"] for r in body["agents"]] == ["agent-2"]


def test_mongodb_records_and_ttl_index(fleet, tmp_path):
    srv = MongoTestServer(mode="replset").start()
    try:
        store = Store("mongodb", tmp_path, srv)
        a = start_fleet(fleet, store, 1, AGENT_STATUS_TTL=1800)[0]
        wait_records(a, lambda b: b["summary"]["total"] == 1, message="1 record")
        client = srv.client()
        coll = client.agenthost.agent_status
        doc = coll.find_one({"_id": a.name})
        assert isinstance(doc["last_seen"], datetime.datetime), doc
        assert isinstance(doc["started_at"], datetime.datetime), doc
        assert doc["state"] == "running" and doc["pid"] == a.proc.pid
        ttl = [ix for ix in coll.list_indexes() if "expireAfterSeconds" in ix]
        assert len(ttl) == 1, list(coll.list_indexes())
        assert dict(ttl[0]["key"]) == {"last_seen": 1}
        assert ttl[0]["expireAfterSeconds"] == 1800
        client.close()
    finally:
        srv.close()


# -- compare-and-set (if_version) ------------------------------------------------------------

def history(agent):
    r = agent.get("/api/cluster/history?limit=1000")
    assert r.status == 200, r.body
    return r.json()["entries"]


def test_if_version_conflict_is_a_409_and_writes_nothing(fleet, store):
    agents = start_fleet(fleet, store, 2)
    before = history(agents[0])
    r = agents[0].post("/api/cluster/pause?if_version=5&reason=stale+view")
    assert r.status == 409, r.body
    body = r.json()
    assert body["status"] == "error"
    assert body["error"] == "version conflict: expected 5, current is 0"
    current = body["current"]
    assert current["command"] == "running" and current["version"] == 0
    assert list(current) == ["command", "version", "timestamp", "reason", "updated_by",
                             "watch_mode", "note", "expires_at", "drain"]
    assert history(agents[0]) == before

    r = agents[1].post("/api/cluster/pause?if_version=0&reason=right+view")
    assert r.status == 200, r.body
    assert r.json()["version"] == 1
    for a in agents:
        a.wait_state("paused")
    # the other agent's view is now stale: its resume conditioned on 0 is refused
    r = agents[0].post("/api/cluster/resume?if_version=0")
    assert r.status == 409, r.body
    assert r.json()["current"]["command"] == "pause"
    assert r.json()["current"]["version"] == 1
    assert [e["version"] for e in history(agents[0])] == [1]
    for a in agents:
        assert a.state()["state"] == "paused"


def test_concurrent_compare_and_set_writes_exactly_one(fleet, store):
    """Many writers conditioned on the same version: one wins, every other gets 409."""
    from concurrent.futures import ThreadPoolExecutor
    agents = start_fleet(fleet, store, 2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda i: agents[i % 2].post(f"/api/cluster/pause?if_version=0&reason=w{i}"),
            range(8)))
    assert sorted(r.status for r in results) == [200] + [409] * 7, [r.body for r in results]
    assert [e["version"] for e in history(agents[0])] == [1]


# -- timed pause -----------------------------------------------------------------------------

def test_timed_pause_ends_with_exactly_one_automatic_resume(fleet, store):
    agents = start_fleet(fleet, store, 8)
    sent = time.time()
    r = agents[0].post("/api/cluster/pause?for=3s&reason=short+maintenance")
    answered = time.time()
    assert r.status == 200, r.body
    body = r.json()
    pause_version = body["version"]
    expires_at = body["expires_at"]
    # 3 s from a moment while the request was handled (the command's own timestamp is taken
    # when it is written, which on a loaded machine can be a few hundred ms later); the
    # milliseconds of expires_at are rounded.
    expires = datetime.datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    assert sent + 3 - 0.01 <= expires <= answered + 3 + 0.01, (sent, answered, body)
    for a in agents:
        a.wait_state("paused")
    for a in agents[:2]:
        wait_for(lambda a=a: a.get("/api/cluster/control-state").json()["version"] == pause_version,
                 10, message="control-state shows the pause")
        assert a.get("/api/cluster/control-state").json()["expires_at"] == expires_at
        assert a.get("/api/cluster/stats").json()["expires_at"] == expires_at

    resume_version = pause_version + 1
    body = wait_records(agents[3], lambda b: b["summary"]["total"] == 8 and
                        b["summary"]["applied_current"] == 8 and b["version"] == resume_version,
                        timeout=20, message="every agent applies the automatic resume")
    assert body["summary"]["states"] == {"running": 8}
    entries = history(agents[5])
    assert [e["version"] for e in entries] == [resume_version, pause_version]
    auto = entries[0]
    assert auto["command"] == "running" and auto["updated_by"] == "system"
    assert f"timed pause version {pause_version} expired" in auto["reason"], auto
    assert auto["agent_id"] in {a.name for a in agents}
    for a in agents:
        assert a.state()["state"] == "running"
        cs = a.get("/api/cluster/control-state").json()
        assert cs["version"] == resume_version and cs["expires_at"] is None, cs


def test_pause_until_an_iso_time(fleet, store):
    a = start_fleet(fleet, store, 1)[0]
    until = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2))
    text = until.strftime("%Y-%m-%dT%H:%M:%S.%f") + "789Z"  # nanoseconds: cut to milliseconds
    r = a.post("/api/cluster/pause?until=" + text)
    assert r.status == 200, r.body
    assert r.json()["expires_at"] == text[:23] + "000Z"
    a.wait_state("paused")
    wait_for(lambda: a.state()["state"] == "running" and a.state()["applied_version"] == 2, 15,
             message="the pause ends at its until time")


def expire_stored_pause(store):
    """Moves the stored pause's expiry into the past, as if every agent had been down then."""
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=30)
    if store.kind == "embedded":
        db = sqlite3.connect(store.state_file)
        db.execute("UPDATE control SET expires_us = ?", (int(past.timestamp() * 1e6),))
        db.commit()
        db.close()
    else:
        client = store.server.client()
        client.agenthost.agent_control.update_one({"_id": "global_control"},
                                                  {"$set": {"expires_at": past}})
        client.close()


def test_an_agent_starting_after_the_expiry_resumes(fleet, store):
    first = start_fleet(fleet, store, 1)[0]
    r = first.post("/api/cluster/pause?for=1h")
    assert r.status == 200, r.body
    pause_version = r.json()["version"]
    first.wait_state("paused")
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    expire_stored_pause(store)
    late = start_agent(fleet, store, "late")
    wait_for(lambda: late.state()["state"] == "running" and
             late.state()["applied_version"] == pause_version + 1, 20,
             message="the late agent ends the expired pause")
    entries = history(late)
    assert entries[0]["updated_by"] == "system" and entries[0]["agent_id"] == "late"
    assert len(entries) == 2


# -- bad input -------------------------------------------------------------------------------

BAD_PARAMETERS = [
    ("if_version", "/api/cluster/pause?if_version=x"),
    ("if_version", "/api/cluster/pause?if_version=-1"),
    ("if_version", "/api/cluster/pause?if_version=1.5"),
    ("if_version", "/api/cluster/pause?if_version=99999999999999999999"),
    ("if_version", "/api/cluster/resume?if_version="),
    ("for", "/api/cluster/pause?for=abc"),
    ("for", "/api/cluster/pause?for=-5s"),
    ("for", "/api/cluster/pause?for=0"),
    ("for", "/api/cluster/pause?for=10d"),
    ("for", "/api/cluster/pause?for=1e9"),
    ("for", "/api/cluster/pause?for=999999h"),
    ("for", "/api/cluster/pause?for=nan"),
    ("for", "/api/cluster/pause?for="),
    ("for", "/api/cluster/resume?for=10s"),
    ("for", "/api/cluster/shutdown?for=10s"),
    ("until", "/api/cluster/pause?until=tomorrow"),
    ("until", "/api/cluster/pause?until=2020-01-01T00:00:00Z"),
    ("until", "/api/cluster/pause?until=9999-01-01T00:00:00Z"),
    ("until", "/api/cluster/pause?until=2026-13-01T00:00:00Z"),
    ("until", "/api/cluster/pause?until=2099-02-30T00:00:00Z"),
    ("until", "/api/cluster/pause?until=2099-01-01T00:00:00"),
    ("until", "/api/cluster/pause?until=2099-01-01T00:00:00%2B02:00"),
    ("until", "/api/cluster/resume?until=2099-01-01T00:00:00Z"),
    ("for", "/api/cluster/pause?for=10s&until=2099-01-01T00:00:00Z"),
]


def test_bad_command_parameters_are_400_naming_them_and_write_nothing(fleet, store):
    a = start_fleet(fleet, store, 1)[0]
    before = history(a)
    for name, path in BAD_PARAMETERS:
        r = a.post(path)
        assert r.status == 400, (path, r.body)
        assert name in r.json()["error"], (path, r.body)
    assert history(a) == before
    assert a.state()["state"] == "running"


def test_ctl_if_version_and_timed_pause(fleet, store):
    from agenthost_harness import run_cli
    a = start_fleet(fleet, store, 1)[0]
    p = run_cli(["ctl", "pause", "--url", a.url, "--if-version", "3"])
    assert p.returncode == 1, p
    assert '"version conflict: expected 3, current is 0"' in p.stdout
    assert "HTTP 409" in p.stderr
    p = run_cli(["ctl", "pause", "--url", a.url, "--if-version", "0", "--for", "15m"])
    assert p.returncode == 0, p
    assert '"version":1' in p.stdout and '"expires_at":"' in p.stdout
    p = run_cli(["ctl", "pause", "--url", a.url, "--local", "--for", "15m"])
    assert p.returncode == 2 and "--for applies to cluster commands only" in p.stderr


# -- idle cost: the long change-stream await does not hold up shutdown ----------------------

def test_idle_mongodb_agent_shuts_down_without_waiting_for_its_stream(fleet, tmp_path):
    """An idle change stream waits up to 15 s per getMore on the server; SIGTERM must not wait
    for it: close() kills the stream's cursor and the getMore returns at once."""
    import time
    srv = MongoTestServer(mode="replset").start()
    try:
        store = Store("mongodb", tmp_path, srv)
        a = start_fleet(fleet, store, 1)[0]
        # the stream is open and its first getMore is waiting on the server
        wait_for(lambda: any(e["command"] == "getMore" for e in srv.command_log()), 10,
                 message="a getMore is under way")
        started = time.monotonic()
        a.signal(signal.SIGTERM)
        assert a.wait_exit(timeout=30) == 0
        took = time.monotonic() - started
        assert took < 5, f"shutdown took {took:.1f}s: it waited for the stream's await"
        assert not a.find_logs(r"\[WARNING\]"), a.log_text()
        killed = [e for e in srv.command_log() if e["command"] == "killCursors"]
        assert killed or srv.stats().get("killCursors"), srv.stats()
    finally:
        srv.close()


def test_mongodb_agent_holds_two_connections(fleet, tmp_path):
    srv = MongoTestServer(mode="replset").start()
    try:
        before = srv.status()["connections"]
        store = Store("mongodb", tmp_path, srv)
        a = start_fleet(fleet, store, 1)[0]
        wait_records(a, lambda b: b["summary"]["total"] == 1, message="the record")
        a.post("/api/cluster/pause")  # API client: command + audit; watcher: the event
        a.wait_state("paused")
        assert a.get("/api/cluster/agents").status == 200
        assert srv.status()["connections"] - before == 2
    finally:
        srv.close()


# -- wait= -----------------------------------------------------------------------------------

def test_eight_agents_pause_wait_is_complete_and_compare_and_set_guards_it(fleet, store):
    agents = start_fleet(fleet, store, 8)
    names = sorted(a.name for a in agents)
    wait_records(agents[0], lambda b: b["summary"]["total"] == 8, message="8 records")
    r = agents[2].post("/api/cluster/pause?wait=10&reason=maintenance")
    assert r.status == 200, r.body
    body = r.json()
    version = body["version"]
    w = body["wait"]
    assert w["complete"] is True, w
    assert sorted(w["acknowledged"]) == names and w["pending"] == [] and w["excluded"] == []
    assert 0 <= w["waited_s"] < 10
    assert list(body)[:10] == ["status", "message", "command", "version", "timestamp", "reason",
                               "propagation", "expires_at", "drain", "wait"]
    # the answer came after the acknowledgements: the store shows every agent paused on it
    fleet_now = agents_body(agents[5])
    assert fleet_now["summary"]["applied_current"] == 8
    assert all(rec["state"] == "paused" and rec["applied_version"] == version
               for rec in fleet_now["agents"]), fleet_now

    before = history(agents[0])
    r = agents[0].post(f"/api/cluster/resume?wait=10&if_version={version - 1}")
    assert r.status == 409, r.body
    assert r.json()["current"]["version"] == version
    assert history(agents[0]) == before
    r = agents[0].post(f"/api/cluster/resume?wait=10&if_version={version}")
    assert r.status == 200, r.body
    assert r.json()["version"] == version + 1 and r.json()["wait"]["complete"] is True
    assert sorted(r.json()["wait"]["acknowledged"]) == names


def test_a_killed_agent_is_excluded_from_the_next_wait(fleet, store):
    agents = start_fleet(fleet, store, 3)
    wait_records(agents[0], lambda b: b["summary"]["total"] == 3, message="3 records")
    victim = agents[1]
    victim.kill()
    wait_records(agents[0], lambda b: record_of(b, victim.name)["stale"], timeout=10,
                 message="the killed agent turns stale")
    r = agents[0].post("/api/cluster/pause?wait=10")
    assert r.status == 200, r.body
    w = r.json()["wait"]
    assert w["complete"] is True, w
    assert w["excluded"] == [victim.name] and victim.name not in w["acknowledged"]
    assert sorted(w["acknowledged"]) == sorted(a.name for a in agents if a is not victim)
    again = start_agent(fleet, store, victim.name)
    again.wait_state("paused", timeout=20)
    r = agents[2].post("/api/cluster/resume?wait=10")
    w = r.json()["wait"]
    assert w["complete"] is True and victim.name in w["acknowledged"], w


def test_wait_for_an_agent_that_cannot_apply_ends_at_the_deadline(fleet, store):
    import time
    agents = start_fleet(fleet, store, 2)
    slow = start_agent(fleet, store, "slow", BATCH_SECONDS=20)
    from agenthost_harness import count_events, wait_events
    wait_events(slow.events, lambda ev: count_events(ev, "batch_start") >= 1, 20,
                "the slow agent is in a batch")
    wait_records(agents[0], lambda b: b["summary"]["total"] == 3, message="3 records")
    started = time.monotonic()
    r = agents[0].post("/api/cluster/pause?wait=2")
    took = time.monotonic() - started
    assert r.status == 200, r.body
    w = r.json()["wait"]
    assert w["complete"] is False, w
    assert w["pending"] == ["slow"], w
    assert sorted(w["acknowledged"]) == sorted(a.name for a in agents)
    assert 2 <= w["waited_s"] < 4, w
    assert took >= 2, took


def test_twenty_waits_hold_no_server_thread(fleet, store):
    """Twenty requests waiting for an agent that cannot apply: the probes of the agent that
    holds them still answer at once (libmicrohttpd serves with 2 threads)."""
    import threading
    a = start_fleet(fleet, store, 1)[0]
    start_agent(fleet, store, "slow", BATCH_SECONDS=30).wait_state("running", timeout=20)
    wait_records(a, lambda b: b["summary"]["total"] == 2, message="2 records")
    results = []

    def post(i):
        results.append(a.post(f"/api/cluster/{'pause' if i % 2 else 'resume'}?wait=8",
                              timeout=30))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    from agenthost_harness import metric
    wait_for(lambda: metric(a, "agenthost_http_parked_requests") == 20, 10,
             message="twenty parked requests")
    for _ in range(5):
        r = a.get("/healthz", timeout=2)
        assert r.status == 200, r.body
        assert a.get("/api/agent/state", timeout=2).status == 200
    assert len(results) < 20, "the waits should still be pending"
    for t in threads:
        t.join(30)
    assert len(results) == 20 and all(r.status == 200 for r in results), \
        [r.body for r in results if r.status != 200]


def test_bad_wait_values_are_400(fleet, store):
    a = start_fleet(fleet, store, 1)[0]
    before = history(a)
    for bad in ["x", "-1", "0", "301", "1e2", "nan", "inf", "", "99999999999999999999", "5s"]:
        r = a.post("/api/cluster/pause?wait=" + bad)
        assert r.status == 400, (bad, r.body)
        assert "wait" in r.json()["error"], r.body
    assert history(a) == before


def test_ctl_wait_and_agents(fleet, store):
    from agenthost_harness import run_cli
    agents = start_fleet(fleet, store, 2)
    wait_records(agents[0], lambda b: b["summary"]["total"] == 2, message="2 records")
    p = run_cli(["ctl", "pause", "--url", agents[0].url, "--wait", "10"])
    assert p.returncode == 0, p
    assert '"complete":true' in p.stdout and "every live agent applied it" in p.stderr
    p = run_cli(["ctl", "agents", "--url", agents[1].url])
    assert p.returncode == 0, p
    lines = p.stdout.strip().split("\n")
    assert lines[0].split()[:4] == ["AGENT", "STATE", "APPLIED", "STALE"]
    assert [l.split()[:4] for l in lines[1:3]] == [["agent-1", "paused", "1", "no"],
                                                   ["agent-2", "paused", "1", "no"]]
    assert "2 agents, 2 applied version 1, 0 stale" in lines[-1]
    p = run_cli(["ctl", "agents", "--url", agents[1].url, "--version", "2", "--json"])
    assert p.returncode == 0 and '"count":2' in p.stdout, p

    slow = start_agent(fleet, store, "slow", BATCH_SECONDS=30)
    slow.wait_state("paused", timeout=20)
    p = run_cli(["ctl", "resume", "--url", agents[0].url, "--wait", "10"])
    assert p.returncode == 0, p  # resuming needs no batch to end
    from agenthost_harness import count_events, wait_events
    wait_events(slow.events, lambda ev: count_events(ev, "batch_start") >= 1, 20,
                "the slow agent is in a batch")
    p = run_cli(["ctl", "pause", "--url", agents[0].url, "--wait", "1.5"])
    assert p.returncode == 1, p
    assert "pending: slow" in p.stderr, p.stderr
    p = run_cli(["ctl", "state", "--wait", "3", "--url", agents[0].url])
    assert p.returncode == 2 and "--wait applies to" in p.stderr


def test_shutdown_answers_a_waiting_request_and_exits_cleanly(fleet, store):
    import threading
    a = start_fleet(fleet, store, 1)[0]
    slow = start_agent(fleet, store, "slow", BATCH_SECONDS=30)
    slow.wait_state("running", timeout=20)
    from agenthost_harness import count_events, wait_events
    wait_events(slow.events, lambda ev: count_events(ev, "batch_start") >= 1, 20,
                "the slow agent is in a batch")
    wait_records(a, lambda b: b["summary"]["total"] == 2, message="2 records")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=a.post("/api/cluster/pause?wait=60",
                                                               timeout=60)))
    t.start()
    a.wait_state("paused")  # written and applied here: the request now waits for "slow"
    a.signal(signal.SIGTERM)
    assert a.wait_exit(timeout=30) == 0
    t.join(30)
    r = result["r"]
    assert r.status == 200, r.body  # answered with what was known, before the server stopped
    w = r.json()["wait"]
    # (agent-1's own acknowledgement may or may not have been read before it stopped)
    assert w["complete"] is False and "slow" in w["pending"], w


def test_agents_reads_hold_no_server_thread_while_the_store_hangs(fleet, tmp_path):
    """GET /api/cluster/agents reads the store off libmicrohttpd's threads: while MongoDB
    answers nothing, ten such requests wait and the probes are still answered at once."""
    import threading
    srv = MongoTestServer(mode="replset").start()
    try:
        a = start_fleet(fleet, Store("mongodb", tmp_path, srv), 1)[0]
        wait_records(a, lambda b: b["summary"]["total"] == 1, message="the record")
        srv.blackhole(3)
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            a.get("/api/cluster/agents", timeout=30))) for _ in range(10)]
        for t in threads:
            t.start()
        for _ in range(5):
            assert a.get("/healthz", timeout=2).status == 200
            assert a.get("/api/agent/state", timeout=2).status == 200
        assert len(results) < 10, "the reads should still be waiting for the store"
        for t in threads:
            t.join(30)
        assert len(results) == 10
        assert all(r.status in (200, 503) for r in results), [r.body for r in results]
        srv.heal()
        wait_for(lambda: a.get("/api/cluster/agents").status == 200, 20,
                 message="the fleet is readable again")
    finally:
        srv.close()
