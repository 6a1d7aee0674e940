"""Drains with deadlines: drain= on pause and shutdown (cluster and local), PAUSE_DRAIN_TIMEOUT,
the cancelled waits of the running call, agent.pending() and task:cancel() (the real binary,
fixture drain.lua, a local HTTP server that never answers)."""
import signal
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agenthost_harness import (MONGO_DIR, agent_env, count_events, mongo_agent_env, read_events,
                               run_cli, script, wait_events, wait_for)
from http_fixture import Server as FixtureServer

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

DRAIN = script("drain.lua")


class Server(FixtureServer):
    """The tests' HTTP server with room for 64 connections arriving at once (the listen backlog)
    and an exact count of requests (the handler's `requests += 1` may lose one between threads)."""
    request_queue_size = 256

    @property
    def requests(self):
        with self._lock:
            return self._count

    @requests.setter
    def requests(self, value):
        if value == 0:  # the fixture's __init__
            self._lock = threading.Lock()
            self._count = 0
            return
        with self._lock:
            self._count += 1  # the handler only ever adds one: `requests += 1`


def start(fleet, state_file, tmp_path, name, **env):
    events = str(tmp_path / f"{name}.jsonl")
    a = fleet.start(DRAIN, env=agent_env(state_file, events, **env), name=name)
    a.events = events
    return a


def events_of(ev, name):
    return [e for e in ev if e.get("ev") == name]


# -- the command, its answer, the stores ---------------------------------------------------------

def test_drain_is_stored_and_shown_in_answer_control_state_and_history(fleet, state_file,
                                                                        tmp_path):
    a = start(fleet, state_file, tmp_path, "api", MODE="pending_loop")
    b = start(fleet, state_file, tmp_path, "api2", MODE="pending_loop")
    r = a.post("/api/cluster/pause?drain=90s&reason=r1")
    assert r.status == 200, r.body
    body = r.json()
    assert body["drain"] == 90 and list(body)[-1] == "drain", body
    # every agent reads the same document
    for x in (a, b):
        # (b may still be starting: its control state is then an error without a version)
        wait_for(lambda: x.get("/api/cluster/control-state").json().get("version") == 1, 30)
        cs = x.get("/api/cluster/control-state").json()
        assert cs["drain"] == 90 and list(cs)[-1] == "drain", cs
    r = a.post("/api/cluster/shutdown?drain=1.5m&if_version=1&updated_by=ops")
    # the shutdown stops both agents; the answer already says what was written
    assert r.status == 200 and r.json()["drain"] == 90, r.body
    for x in (a, b):
        assert x.wait_exit(20) == 0, x.log_text()
    db = sqlite3.connect(state_file)
    assert db.execute("SELECT command, drain_ms FROM control").fetchone() == ("shutdown", 90000)
    assert db.execute("SELECT version, drain_ms FROM audit ORDER BY version").fetchall() == [
        (1, 90000), (2, 90000)]
    db.close()
    c = start(fleet, state_file, tmp_path, "api3", MODE="pending_loop")  # held paused
    r = c.post("/api/cluster/resume")
    assert r.status == 200 and r.json()["drain"] is None, r.body
    h = c.get("/api/cluster/history?limit=3").json()["entries"]
    assert [(e["command"], e["drain"]) for e in h] == [
        ("running", None), ("shutdown", 90), ("pause", 90)], h
    assert list(h[0])[-1] == "drain"
    assert c.get("/api/cluster/control-state").json()["drain"] is None


@pytest.mark.parametrize("path, error", [
    ("/api/cluster/resume?drain=2s", "drain is only accepted by pause and shutdown"),
    ("/api/agent/resume?drain=2s", "drain is only accepted by pause and shutdown"),
    ("/api/cluster/pause?drain=0", "drain must be a duration"),
    ("/api/cluster/pause?drain=-1s", "drain must be a duration"),
    ("/api/cluster/pause?drain=2d", "drain must be a duration"),
    ("/api/cluster/pause?drain=1e3", "drain must be a duration"),
    ("/api/cluster/pause?drain=", "drain must be a duration"),
    ("/api/cluster/shutdown?drain=31000000", "drain must be a duration"),
    ("/api/agent/pause?drain=soon", "drain must be a duration"),
])
def test_bad_drain_is_400_naming_it_and_changes_nothing(fleet, state_file, tmp_path, path, error):
    a = start(fleet, state_file, tmp_path, "bad", MODE="pending_loop")
    a.wait_state("running")
    r = a.post(path)
    assert r.status == 400, r.body
    assert r.json()["error"].startswith(error), r.body
    assert a.get("/api/cluster/control-state").json()["version"] == 0
    assert a.state()["state"] == "running"
    assert not read_events(a.events) or not events_of(read_events(a.events), "pending")


def test_ctl_drain_is_sent_and_refused_where_it_does_not_apply(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "ctl", MODE="pending_loop")
    p = run_cli(["ctl", "pause", "--url", a.url, "--drain", "45s"])
    assert p.returncode == 0, p.stderr
    assert '"drain":45' in p.stdout
    assert a.get("/api/cluster/control-state").json()["drain"] == 45
    p = run_cli(["ctl", "resume", "--url", a.url, "--drain", "45s"])
    assert p.returncode == 2 and "--drain applies to pause and shutdown" in p.stderr, p.stderr
    p = run_cli(["ctl", "pause", "--url", a.url, "--drain", "later"])
    assert p.returncode == 1 and "drain must be a duration" in p.stdout, (p.stdout, p.stderr)
    p = run_cli(["ctl", "resume", "--url", a.url])
    assert p.returncode == 0, p.stderr
    p = run_cli(["ctl", "pause", "--local", "--url", a.url, "--drain", "2s"])
    assert p.returncode == 0 and '"drain":2' in p.stdout, (p.stdout, p.stderr)
    a.wait_state("paused")


# -- the running call's waits ------------------------------------------------------------------

def hang_agent(fleet, state_file, tmp_path, srv, name, tasks=64, **env):
    a = start(fleet, state_file, tmp_path, name, MODE="hang", TASKS=tasks,
              HANG_URL=srv.base + "/hang", **env)
    wait_for(lambda: srv.requests >= tasks, 20, message=f"{tasks} requests hanging")
    return a


def assert_drained(ev, tasks, drain_s):
    """Every task saw "cancelled" by the drain, the batch ended, then on_pause ran."""
    ends = events_of(ev, "task_end")
    assert len(ends) == tasks, ends
    assert all(e["code"] == "cancelled" and not e["ok"] for e in ends), ends
    assert all("cancelled" in e["msg"] for e in ends), ends[:2]
    batch = events_of(ev, "batch_end")[0]
    assert batch["after_code"] == "cancelled", batch  # a wait after the deadline: at once
    # the join waiting at the deadline was cancelled; later joins got the tasks' outcomes
    joins = batch["joins"]
    assert joins[0] == "nil:cancelled" and joins[1:] == ["true:cancelled"] * (tasks - 1), joins
    names = [e["ev"] for e in ev]
    assert names.index("on_pause") > names.index("batch_end")


@pytest.mark.parametrize("jit", ["on", "off"])
def test_pause_with_drain_cancels_64_hanging_requests_and_applies(fleet, state_file, tmp_path,
                                                                  jit):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, f"drain-{jit}", JIT=jit)
        t0 = time.monotonic()
        r = a.post("/api/cluster/pause?drain=2s&wait=10&reason=upgrade")
        assert r.status == 200, r.body
        body = r.json()
        assert body["drain"] == 2 and body["wait"]["complete"] is True, body
        # /readyz turned 503 because the batch was cut at the deadline (the requests' own timeout
        # is 60 s); the bound is generous: the target (2.5 s) is measured by scripts/bench.sh
        wait_for(lambda: a.get("/readyz").status == 503, 10, message="/readyz 503")
        assert time.monotonic() - t0 < 15
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 10, "on_pause")
        assert_drained(ev, 64, 2)
        hook = events_of(ev, "on_pause")[0]
        assert hook["drain"] == 2 and hook["source"] == "cluster", hook
        assert a.find_logs(r"cut short at the drain deadline of 'pause'")
        assert a.state()["state"] == "paused"
        assert a.get("/healthz").status == 200
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()


def test_without_drain_the_batch_still_finishes_first(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "nodrain", tasks=8, HTTP_TIMEOUT=3)
        assert a.post("/api/cluster/pause").status == 200
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 20, "on_pause")
        ends = events_of(ev, "task_end")
        # the requests ended on their own timeout, not cut short
        assert len(ends) == 8 and all(e["code"] == "timeout" for e in ends), ends
        names = [e["ev"] for e in ev]
        assert names.index("on_pause") > names.index("batch_end")
        assert events_of(ev, "on_pause")[0]["drain"] == "nil"
        assert not a.find_logs(r"drain deadline")


def test_a_resume_replacing_a_pending_drained_pause_cancels_nothing(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "replaced", tasks=4, HTTP_TIMEOUT=4)
        assert a.post("/api/cluster/pause?drain=1s").status == 200
        assert a.post("/api/cluster/resume").status == 200  # latest wins: no deadline now
        ev = wait_events(a.events, lambda e: count_events(e, "batch_end") >= 1, 20, "batch end")
        ends = events_of(ev, "task_end")
        assert len(ends) == 4 and all(e["code"] == "timeout" for e in ends), ends
        assert count_events(ev, "on_pause") == 0
        assert a.state()["state"] == "running"


def test_pause_drain_timeout_bounds_a_pause_without_drain(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "setting", tasks=8,
                       PAUSE_DRAIN_TIMEOUT=1)
        # a local pause, without drain=: the agent's setting applies
        r = a.post("/api/agent/pause?reason=local")
        assert r.status == 200 and r.json()["drain"] is None, r.body
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
        assert_drained(ev, 8, 1)
        hook = events_of(ev, "on_pause")[0]
        assert hook["drain"] == "nil" and hook["source"] == "local", hook


def test_local_pause_with_drain(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "local", tasks=8)
        r = a.post("/api/agent/pause?drain=1s")
        assert r.status == 200 and r.json()["drain"] == 1, r.body
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
        assert_drained(ev, 8, 1)
        assert events_of(ev, "on_pause")[0]["drain"] == 1


def test_agent_pending_is_seen_by_a_loop(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "pending", MODE="pending_loop")
    wait_events(a.events, lambda e: count_events(e, "batch_start") >= 1, 15, "a batch")
    assert a.post("/api/cluster/pause?drain=30s&reason=stop+soon").status == 200
    ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
    p = events_of(ev, "pending")[-1]
    assert p["command"] == "pause" and p["reason"] == "stop soon", p
    assert 20 < p["deadline"] <= 30, p
    # in the hook the command is applied: nothing is pending
    assert events_of(ev, "on_pause")[0]["pending"] == "nil"
    assert a.post("/api/cluster/resume").status == 200
    wait_events(a.events, lambda e: count_events(e, "batch_start") >= 2, 15, "the next batch")
    assert a.post("/api/agent/pause").status == 200  # no drain, no setting: deadline nil
    ev = wait_events(a.events, lambda e: count_events(e, "pending") == 2, 15, "second pending")
    p = events_of(ev, "pending")[-1]
    assert p["command"] == "pause" and p["deadline"] == "nil", p


def test_task_cancel_cancels_one_task(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "cancel", MODE="cancel_one")
    ev = wait_events(a.events, lambda e: count_events(e, "cancel_one") == 1, 15, "record")
    rec = events_of(ev, "cancel_one")[0]
    assert rec["was_running"] is True and rec["again"] is False, rec
    o = rec["outcomes"]
    assert o[0]["first"] == "false:nil" and o[2]["first"] == "false:nil", o  # slept 0.2 s
    assert o[0]["second"] == "false:nil", o
    assert o[1]["first"] == "nil:cancelled" and o[1]["second"] == "nil:cancelled", o
    assert o[1]["msg"] == "cancelled: task:cancel()", o
    # the call itself was not cancelled: the batch goes on (it sleeps until a command)
    assert a.post("/api/cluster/pause").status == 200
    a.wait_state("paused", 15)


# -- with reload, shutdown, a store fault, on MongoDB ---------------------------------------------

def test_drain_with_a_pending_reload_applies_both(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "reload", tasks=16)
        with ThreadPoolExecutor(1) as pool:
            reload = pool.submit(a.post, "/api/agent/reload", timeout=30)
            assert a.post("/api/cluster/pause?drain=1s").status == 200
            r = reload.result(timeout=30)
        # the reload waited for the batch, which the pause's drain cut short
        assert r.status == 200, r.body
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
        assert_drained(ev, 16, 1)
        a.wait_log(r"Reloaded script")
        assert a.state()["state"] == "paused"
        assert a.post("/api/cluster/resume").status == 200  # the reloaded script runs batches
        wait_for(lambda: srv.requests >= 32, 20, message="the new script's requests")
        a.signal(signal.SIGTERM)
        assert a.wait_exit(30) == 0, a.log_text()


def test_cluster_shutdown_with_drain_exits_before_its_bound(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "shutdown", tasks=16,
                       SHUTDOWN_TIMEOUT=60)
        t0 = time.monotonic()
        r = a.post("/api/cluster/shutdown?drain=1s")
        assert r.status == 200 and r.json()["drain"] == 1, r.body
        # without the drain the call would be interrupted at 80% of SHUTDOWN_TIMEOUT (48 s)
        assert a.wait_exit(30) == 0, a.log_text()
        assert time.monotonic() - t0 < 30
        ev = read_events(a.events)
        ends = events_of(ev, "task_end")
        assert len(ends) == 16 and all(e["code"] == "cancelled" for e in ends), ends
        names = [e["ev"] for e in ev]
        assert names.index("on_shutdown") > names.index("batch_end")
        assert events_of(ev, "on_shutdown")[0]["drain"] == 1


def test_shutdown_bound_caps_a_longer_drain(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "bound", tasks=8, SHUTDOWN_TIMEOUT=3)
        r = a.post("/api/agent/shutdown?drain=10m")
        assert r.status == 200 and r.json()["drain"] == 600, r.body
        # cut at 80% of SHUTDOWN_TIMEOUT (2.4 s), not after 10 minutes; exit 0, not the
        # SHUTDOWN_TIMEOUT hard exit
        assert a.wait_exit(30) == 0, a.log_text()
        ev = read_events(a.events)
        assert [e["code"] for e in events_of(ev, "task_end")] == ["cancelled"] * 8
        assert count_events(ev, "on_shutdown") == 1


def test_drain_holds_while_the_store_is_locked(fleet, state_file, tmp_path):
    with Server() as srv:
        a = hang_agent(fleet, state_file, tmp_path, srv, "locked", tasks=8)
        assert a.post("/api/cluster/pause?drain=1s").status == 200
        # another process takes the write lock: status records cannot be written meanwhile
        db = sqlite3.connect(state_file, timeout=0, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        try:
            ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
            assert_drained(ev, 8, 1)
            assert a.get("/readyz").status == 503
        finally:
            db.execute("ROLLBACK")
            db.close()
        # the acknowledgement follows once the store is writable again
        wait_for(lambda: any(x["state"] == "paused" and x["applied_version"] == 1
                             for x in a.get("/api/cluster/agents").json()["agents"]), 30,
                 message="status record written after the lock")


def test_drain_on_mongodb_cancels_queued_and_running_driver_calls(fleet, tmp_path,
                                                                  mongo_server):
    srv = mongo_server
    srv.configure_fail_point("alwaysOn", {"failCommands": ["find"], "blockConnection": True,
                                          "blockTimeMS": 8000,
                                          "appName": "agenthost-lua/mdrain"})
    events = str(tmp_path / "mdrain.jsonl")
    env = mongo_agent_env(srv.uri, events, MODE="mongo_hang", TASKS=6, UV_THREADPOOL_SIZE=2,
                          AGENT_MONGODB_URI=srv.uri, AGENT_ID="mdrain")
    a = fleet.start(DRAIN, env=env, name="mdrain")
    a.events = events
    wait_for(lambda: len(srv.command_log(command="find", collection="slow")) >= 2, 20,
             message="two finds blocked at the server")
    r = a.post("/api/cluster/pause?drain=1s&wait=10")
    assert r.status == 200, r.body
    assert r.json()["drain"] == 1 and r.json()["wait"]["complete"] is True, r.body
    ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
    ends = events_of(ev, "task_end")
    assert len(ends) == 6, ends
    # queued calls never run; a started one cannot be stopped: its wait ends all the same
    assert all(e["code"] in ("cancelled", "unknown") for e in ends), ends
    assert sum(e["code"] == "cancelled" for e in ends) >= 4, ends
    assert events_of(ev, "batch_end")[0]["after_code"] == "cancelled"
    names = [e["ev"] for e in ev]
    assert names.index("on_pause") > names.index("batch_end")
    # stored on the control document and its audit entry
    client = srv.client()
    try:
        coll = client["agenthost"]["agent_control"]
        assert coll.find_one({"_id": "global_control"})["drain_ms"] == 1000
        audit = coll.find_one({"kind": "audit", "version": 1})
        assert audit["drain_ms"] == 1000, audit
    finally:
        client.close()
    assert a.get("/api/cluster/history").json()["entries"][0]["drain"] == 1
    srv.configure_fail_point("off")
    a.signal(signal.SIGTERM)
    assert a.wait_exit(30) == 0, a.log_text()


def test_a_drained_pause_releases_the_queue_claims_of_the_cut_batch(fleet, state_file, tmp_path,
                                                                    mongo_server):
    with Server() as srv:
        a = start(fleet, state_file, tmp_path, "claims", MODE="queue_hang",
                  HANG_URL=srv.base + "/hang", AGENT_MONGODB_URI=mongo_server.uri)
        wait_for(lambda: srv.requests >= 1, 20, message="the batch working on its claims")
        jobs = mongo_server.client().agenthost.drain_jobs
        assert sorted(j["status"] for j in jobs.find()) == ["claimed", "claimed", "pending"]
        assert a.post("/api/cluster/pause?drain=1s").status == 200
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
        assert events_of(ev, "task_end")[0]["code"] == "cancelled"
        # released after the hook, as on shutdown: the other agents may take them at once
        wait_for(lambda: sorted(j["status"] for j in jobs.find()) == ["pending"] * 3, 10,
                 message="the claims given back")
        a.wait_log(r"agent.queue: released 2 claim\(s\)")
        assert a.state()["state"] == "paused"
        # the queue object still works after a resume: the next batch claims again
        assert a.post("/api/cluster/resume").status == 200
        wait_for(lambda: sorted(j["status"] for j in jobs.find()) ==
                 ["claimed", "claimed", "pending"], 20, message="claims of the next batch")

