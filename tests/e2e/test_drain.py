"""Drains with deadlines: drain= on pause and shutdown (cluster and local), PAUSE_DRAIN_TIMEOUT,
the cancelled waits of the running call, agent.pending() and task:cancel() (the real binary,
fixture drain.lua, a local HTTP server that never answers)."""
import signal
import sqlite3
import time

import pytest

from agenthost_harness import (agent_env, count_events, read_events, run_cli, script,
                               wait_events, wait_for)
from http_fixture import Server

DRAIN = script("drain.lua")


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
        wait_for(lambda: x.get("/api/cluster/control-state").json()["version"] == 1, 10)
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
