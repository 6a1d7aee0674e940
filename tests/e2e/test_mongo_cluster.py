"""Cluster control on MongoDB (docs/OPERATIONS.md): real agenthost processes against the wire-protocol test
server (tests/mongo), in change-stream mode (replica set), polling mode (standalone, or
ENABLE_CHANGE_STREAMS=false) and mixed fleets, plus direct writes by another client and many
concurrent writers."""
import datetime
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import bson
import pytest

from agenthost_harness import (MONGO_DIR, count_events, metric, mongo_agent_env, mongo_status,
                               read_events, script, wait_events, wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server, mongo_standalone  # noqa: E402,F401

RECORDER = script("recorder.lua")
INIT_LINE = "[INFO] [Distributed Control] Initializing cluster coordination"
STREAMS_LINES = ["[INFO] ✓ MongoDB Change Streams are supported",
                 "[INFO] Using MongoDB Change Streams (event-driven, real-time)"]
FALLBACK_LINES = ["[WARNING] MongoDB Change Streams not available: Replica set required. "
                  "Using polling fallback.",
                  "[INFO] Using polling fallback (interval: 0.5s)"]
POLL = 0.5
# Generous bound for a polled command to arrive: interval + 10% jitter + scheduling slack.
POLL_DEADLINE = 10 * POLL + 5


def start_agents(fleet, tmp_path, uri, n, first=1, **extra):
    agents = []
    for i in range(first, first + n):
        name = f"agent-{i}"
        events = tmp_path / f"{name}.jsonl"
        a = fleet.start(RECORDER, env=mongo_agent_env(uri, events, **extra), name=name)
        a.events = str(events)
        agents.append(a)
    for a in agents:
        a.wait_state("running", timeout=20)
    return agents


def lines_in_order(agent, expected):
    """True if the expected lines appear in the agent's log in this order."""
    lines = agent.log_text().split("\n")
    pos = 0
    for want in expected:
        while pos < len(lines) and want not in lines[pos]:
            pos += 1
        if pos == len(lines):
            return False
        pos += 1
    return True


def wait_applied(agents, version, state=None, timeout=15.0):
    for a in agents:
        def applied(a=a):
            st = a.state()
            return st["applied_version"] >= version and (state is None or st["state"] == state)
        wait_for(applied, timeout, message=f"{a.name} applies version {version}")


def control_collection(server):
    client = server.client()
    return client, client.agenthost.agent_control


def batch_starts_between(events, start_ev, end_ev):
    """batch_start records strictly after the first start_ev and before the first end_ev."""
    out, inside = [], False
    for e in events:
        if e["ev"] == start_ev and not inside:
            inside = True
        elif e["ev"] == end_ev and inside:
            break
        elif inside and e["ev"] == "batch_start":
            out.append(e)
    return out


def test_replset_five_agents_pause_resume_shutdown(fleet, tmp_path, mongo_server):
    agents = start_agents(fleet, tmp_path, mongo_server.uri, 5)
    for a in agents:
        assert lines_in_order(a, [INIT_LINE] + STREAMS_LINES), a.log_text()
        assert not a.find_logs(r"polling fallback"), a.log_text()
        wait_for(lambda a=a: a.state()["batches"] > 0, 10, message=f"{a.name} runs batches")
        stats = a.get("/api/cluster/stats").json()
        assert stats["watch_mode"] == "change_streams", stats
        assert stats["polling_interval"] is None, stats
        ms = mongo_status(a)
        assert ms["backend"] == "mongodb" and ms["topology"] == "replica_set", ms
        assert ms["connected"] is True and ms["watch_mode"] == "change_streams", ms

    r = agents[2].post("/api/cluster/pause?reason=Maintenance+window&updated_by=ops_team")
    assert r.status == 200, r.body
    body = r.json()
    assert body["status"] == "success" and body["command"] == "pause", body
    assert body["version"] == 1, body  # the initial document is version 0
    wait_applied(agents, 1, "paused")
    for a in agents:
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause") >= 1, 10,
                         f"{a.name} on_pause")
        pauses = [e for e in ev if e["ev"] == "on_pause"]
        assert len(pauses) == 1, pauses
        assert pauses[0]["reason"] == "Maintenance window", pauses
        assert pauses[0]["updated_by"] == "ops_team", pauses
        assert pauses[0]["source"] == "cluster" and pauses[0]["version"] == 1, pauses

    client, coll = control_collection(mongo_server)
    with client:
        raw = coll.find_one({"_id": "global_control"})
        assert set(raw) == {"_id", "command", "version", "timestamp", "reason", "updated_by"}, raw
        assert raw["command"] == "pause" and raw["reason"] == "Maintenance window", raw
        assert isinstance(raw["version"], bson.Int64) and raw["version"] == 1, raw
        assert isinstance(raw["timestamp"], datetime.datetime), raw
        audit = coll.find_one({"_id": "global_control:v1"})
        assert audit is not None
        assert audit["kind"] == "audit" and audit["command"] == "pause", audit
        assert isinstance(audit["version"], bson.Int64) and audit["version"] == 1, audit
        assert audit["agent_id"] == "agent-3" and audit["updated_by"] == "ops_team", audit

    r = agents[0].post("/api/cluster/resume?reason=done&updated_by=ops_team")
    assert r.status == 200, r.body
    assert r.json()["version"] == 2
    wait_applied(agents, 2, "running")
    for a in agents:
        ev = wait_events(a.events, lambda e: count_events(e, "on_resume") >= 1, 10,
                         f"{a.name} on_resume")
        assert count_events(ev, "on_pause") == 1
        assert count_events(ev, "on_resume") == 1
        # Nothing ran while paused.
        assert batch_starts_between(ev, "on_pause", "on_resume") == [], a.name

    hist = agents[1].get("/api/cluster/history?limit=5").json()
    entries = hist["entries"]
    assert [e["version"] for e in entries][:2] == [2, 1], hist

    r = agents[4].post("/api/cluster/shutdown?reason=bye")
    assert r.status == 200, r.body
    for a in agents:
        assert a.wait_exit(timeout=20) == 0, a.log_text()
        assert count_events(read_events(a.events), "on_shutdown") == 1


@pytest.mark.parametrize("how", ["standalone", "disabled"])
def test_polling_mode_propagates_within_interval(fleet, tmp_path, mongo_server,
                                                 mongo_standalone, how):
    if how == "standalone":
        server, extra, expected = mongo_standalone, {}, FALLBACK_LINES
    else:
        server = mongo_server
        extra = {"ENABLE_CHANGE_STREAMS": "false"}
        expected = ["[INFO] Using polling fallback (interval: 0.5s)"]
    agents = start_agents(fleet, tmp_path, server.uri, 3, CONTROL_POLLING_INTERVAL=POLL, **extra)
    for a in agents:
        assert lines_in_order(a, [INIT_LINE] + expected), a.log_text()
        assert not a.find_logs(r"Change Streams are supported"), a.log_text()
        stats = a.get("/api/cluster/stats").json()
        assert stats["watch_mode"] == "polling" and stats["polling_interval"] == POLL, stats
        ms = mongo_status(a)
        assert ms["topology"] == ("standalone" if how == "standalone" else "replica_set"), ms
    if how == "disabled":
        assert not agents[0].find_logs(r"\[WARNING\]"), agents[0].log_text()

    r = agents[0].post("/api/cluster/pause?reason=poll+test&updated_by=tester")
    assert r.status == 200, r.body
    assert "polling" in r.json()["propagation"]
    wait_applied(agents, 1, "paused", timeout=POLL_DEADLINE)
    r = agents[1].post("/api/cluster/resume")
    assert r.status == 200, r.body
    wait_applied(agents, 2, "running", timeout=POLL_DEADLINE)
    wait_for(lambda: mongo_status(agents[2])["polls"] > 2, 10, message="polls counted")
    for a in agents:
        ev = read_events(a.events)
        assert count_events(ev, "on_pause") == 1 and count_events(ev, "on_resume") == 1


def test_mixed_fleet_and_direct_write_by_another_client(fleet, tmp_path, mongo_server):
    """Stream agents and polling agents share one document; a foreign write check (a foreign
    updateOne with $inc) is applied by all of them."""
    streams = start_agents(fleet, tmp_path, mongo_server.uri, 2)
    polling = start_agents(fleet, tmp_path, mongo_server.uri, 2, first=3,
                           ENABLE_CHANGE_STREAMS="false", CONTROL_POLLING_INTERVAL=POLL)
    agents = streams + polling
    assert all(mongo_status(a)["watch_mode"] == "change_streams" for a in streams)
    assert all(mongo_status(a)["watch_mode"] == "polling" for a in polling)

    r = polling[0].post("/api/cluster/pause?reason=from+poller")
    assert r.status == 200, r.body
    wait_applied(agents, 1, "paused", timeout=POLL_DEADLINE)
    r = streams[0].post("/api/cluster/resume?reason=from+stream")
    assert r.status == 200, r.body
    wait_applied(agents, 2, "running", timeout=POLL_DEADLINE)

    client, coll = control_collection(mongo_server)
    with client:
        res = coll.update_one({"_id": "global_control"},
                              {"$inc": {"version": 1},
                               "$set": {"timestamp": datetime.datetime.utcnow(),
                                        "command": "pause"}})
        assert res.modified_count == 1
    wait_applied(agents, 3, "paused", timeout=POLL_DEADLINE)
    for a in agents:
        ev = wait_events(a.events, lambda e: count_events(e, "on_pause", version=3) == 1, 10,
                         f"{a.name} on_pause v3")
        pause = [e for e in ev if e["ev"] == "on_pause" and e["version"] == 3][0]
        assert pause["source"] == "cluster"
        # The foreign write kept the previous reason and updated_by.
        assert pause["reason"] == "from stream", pause

    # A foreign write with an int32 version and no command field: the version counts, the
    # command stays what it was (pause), with a warning.
    with client:
        coll.update_one({"_id": "global_control"},
                        {"$set": {"version": 10, "timestamp": datetime.datetime.utcnow()},
                         "$unset": {"command": ""}})
    wait_applied(agents, 10, "paused", timeout=POLL_DEADLINE)
    assert streams[0].find_logs(r"\[WARNING\].*version 10 has no command"), \
        streams[0].log_text()
    r = streams[1].post("/api/cluster/resume")
    assert r.status == 200 and r.json()["version"] == 11, r.body
    wait_applied(agents, 11, "running", timeout=POLL_DEADLINE)


def test_concurrent_commands_are_gapless(fleet, tmp_path, mongo_server):
    agents = start_agents(fleet, tmp_path, mongo_server.uri, 4)
    total = 200

    def issue(i):
        cmd = "pause" if i % 2 == 0 else "resume"
        return agents[i % 4].post(f"/api/cluster/{cmd}?reason=load+{i}&updated_by=load",
                                  timeout=30)

    with ThreadPoolExecutor(max_workers=32) as pool:
        replies = list(pool.map(issue, range(total)))
    assert all(r.status == 200 for r in replies), [r.body for r in replies if r.status != 200]
    versions = sorted(r.json()["version"] for r in replies)
    assert versions == list(range(1, total + 1))

    client, coll = control_collection(mongo_server)
    with client:
        doc = coll.find_one({"_id": "global_control"})
        assert doc["version"] == total
        audit = list(coll.find({"kind": "audit"}).sort("version", -1))
        assert [e["version"] for e in audit] == list(range(total, 0, -1))
        last = doc["command"]
    assert audit[0]["command"] == last
    wait_applied(agents, total, "paused" if last == "pause" else "running")
    for a in agents:
        st = a.state()
        assert st["applied_version"] == total and st["cluster_command"] == last, st


@pytest.mark.parametrize("mode", ["change_streams", "polling"])
def test_other_documents_in_agent_control_never_command_an_agent(fleet, tmp_path, mongo_server,
                                                                  mode):
    extra = {} if mode == "change_streams" else {"ENABLE_CHANGE_STREAMS": "false",
                                                 "CONTROL_POLLING_INTERVAL": POLL}
    agents = start_agents(fleet, tmp_path, mongo_server.uri, 2, **extra)
    client, coll = control_collection(mongo_server)
    with client:
        # Looks like a control document, but only _id "global_control" is one.
        coll.insert_one({"_id": "other", "command": "pause", "version": bson.Int64(999),
                         "reason": "not a control document", "updated_by": "someone"})
        coll.update_one({"_id": "other"}, {"$set": {"version": bson.Int64(1000)}})
    # A real command written after it: once it is applied, the stream (in order) or the polls
    # have passed the other document.
    r = agents[0].post("/api/cluster/resume?reason=after+other")
    assert r.status == 200, r.body
    assert r.json()["version"] == 1, r.body
    wait_applied(agents, 1, "running", timeout=POLL_DEADLINE)
    for a in agents:
        st = a.state()
        assert st["state"] == "running" and st["applied_version"] == 1, st
        assert st["cluster_command"] == "running", st
        assert metric(a, "agenthost_control_version") == 1
        ev = read_events(a.events)
        assert count_events(ev, "on_pause") == 0, ev
        assert not a.find_logs(r"not a control document"), a.log_text()


def test_cluster_timestamps_carry_milliseconds_and_the_issuer_logs_issued_before_paused(
        fleet, tmp_path, mongo_server):
    a = start_agents(fleet, tmp_path, mongo_server.uri, 1)[0]
    r = a.post("/api/cluster/pause?reason=ms")
    assert r.status == 200, r.body
    # BSON Dates hold milliseconds: six digits, the last three zero (docs/API.md, Timestamps)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}000Z", r.json()["timestamp"]), r.body
    a.wait_state("paused")
    a.wait_log(r"Agent paused \(cluster command 'pause'")
    assert lines_in_order(a, ["Cluster command pause issued", "Agent paused (cluster command"]), \
        a.log_text()
    history = a.get("/api/cluster/history").json()["entries"]
    assert history[0]["timestamp"].endswith("000Z"), history
