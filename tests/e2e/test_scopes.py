"""Commands for part of the fleet (docs/API.md, "Scoped commands"): agents with labels, scope
documents addressed by a Kubernetes label selector, the effective command (shutdown > pause >
running over the cluster document and every matching scope), scoped waits, restarts, timed
scoped pauses and the audit trail, end to end with real agenthost processes on both stores: the
embedded SQLite file and MongoDB (the wire-protocol test server of tests/mongo)."""
import re
import sys
import urllib.parse

from agenthost_harness import (MONGO_DIR, Store, count_events, run_cli, script, wait_events,
                               wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import MongoTestServer  # noqa: E402

RECORDER = script("recorder.lua")
LABELS = {"a1": "region=eu,role=ingest", "a2": "region=eu,role=api",
          "a3": "region=us,role=ingest", "a4": ""}


def start(fleet, store, name, labels=None, generation=0):
    events = store.tmp_path / f"{name}-{generation}.jsonl"
    env = store.env(events, AGENT_LABELS=LABELS.get(name, "") if labels is None else labels)
    a = fleet.start(RECORDER, env=env, name=name)
    a.events = str(events)
    return a


def wait_running(*agents):
    """Waits until every agent runs and is listed. An agent's first status record follows its
    startup sync, and a wait= counts the agents listed: a command sent the moment an agent runs
    may not count it yet (docs/OPERATIONS.md)."""
    for a in agents:
        a.wait_state("running", timeout=20)
    ids = {a.name for a in agents}

    def listed():
        r = agents[0].get("/api/cluster/agents")
        return r.status == 200 and ids <= {x["agent_id"] for x in r.json()["agents"]}
    wait_for(listed, 20, message="every agent's record")


def start_four(fleet, store):
    agents = {name: start(fleet, store, name) for name in LABELS}
    wait_running(*agents.values())
    return agents


def re_escape(text):
    return re.escape(text)


def q(selector):
    return urllib.parse.quote(selector, safe="")


def post(agent, path):
    r = agent.post(path)
    assert r.status == 200, (path, r.status, r.body)
    return r.json()


def states(agents):
    return {name: a.state()["state"] for name, a in agents.items()}


def wait_states(agents, expected, timeout=15.0):
    wait_for(lambda: states(agents) == expected, timeout, message=f"states {expected}")


def test_scoped_pause_holds_exactly_the_matching_agents_until_its_own_resume(fleet, store):
    agents = start_four(fleet, store)
    a1 = agents["a1"]
    body = post(a1, f"/api/cluster/pause?selector={q('region=eu')}&wait=10&reason=eu+db+down")
    assert body["selector"] == "region=eu"
    assert body["version"] == 1
    assert body["matched"] == 2
    assert body["wait"]["complete"] is True
    assert sorted(body["wait"]["acknowledged"]) == ["a1", "a2"]  # non-matching agents unlisted
    assert body["wait"]["pending"] == [] and body["wait"]["excluded"] == []
    assert states(agents) == {"a1": "paused", "a2": "paused", "a3": "running", "a4": "running"}

    held = a1.state()["held_by"]
    assert held == [{"selector": "region=eu", "command": "pause", "version": 1,
                     "reason": "eu db down"}]
    assert agents["a3"].state()["held_by"] == []
    assert a1.state()["labels"] == {"agent": "a1", "region": "eu", "role": "ingest"}

    # a cluster pause + resume does not lift the scoped pause
    post(a1, "/api/cluster/pause?wait=10")
    wait_states(agents, {n: "paused" for n in agents})
    body = post(agents["a3"], "/api/cluster/resume?wait=10")
    assert body["wait"]["complete"] is True
    assert sorted(body["wait"]["acknowledged"]) == ["a1", "a2", "a3", "a4"]
    assert states(agents) == {"a1": "paused", "a2": "paused", "a3": "running", "a4": "running"}

    scopes = agents["a4"].get("/api/cluster/scopes").json()
    assert scopes["count"] == 1 and scopes["active"] == 1
    s = scopes["scopes"][0]
    assert (s["selector"], s["command"], s["version"]) == ("region=eu", "pause", 1)
    assert (s["matched"], s["acknowledged"], s["holds"]) == (2, 2, 2)

    # another spelling of the same selector is the same scope
    body = post(agents["a4"], f"/api/cluster/resume?selector={q('region == eu')}&wait=10")
    assert body["selector"] == "region=eu" and body["version"] == 2 and body["held"] is True
    assert sorted(body["wait"]["acknowledged"]) == ["a1", "a2"]
    assert states(agents) == {n: "running" for n in agents}
    # the acknowledgement is written when the state changes; the hook runs just after it
    events = wait_events(a1.events, lambda ev: count_events(ev, "on_resume"), message="on_resume")
    resumes = [e for e in events if e["ev"] == "on_resume"]
    assert resumes[-1]["scope"] == "region=eu"

    # resuming a scope that holds nobody is a 200 that says so
    body = post(a1, f"/api/cluster/resume?selector={q('region=eu')}")
    assert body["held"] is False and "held no agent" in body["message"]

    history = a1.get("/api/cluster/history").json()["entries"]
    scoped = [(e["command"], e["version"]) for e in history if e.get("selector") == "region=eu"]
    assert scoped == [("running", 3), ("running", 2), ("pause", 1)]
    assert [e.get("selector") for e in history if e["command"] == "pause"].count(None) == 1


def test_scoped_resume_does_not_lift_a_cluster_pause(fleet, store):
    a1 = start(fleet, store, "a1")
    a3 = start(fleet, store, "a3")
    wait_running(a1, a3)
    post(a3, f"/api/cluster/pause?selector={q('region=eu')}&wait=10")
    post(a3, "/api/cluster/pause?wait=10&reason=freeze")
    body = post(a3, f"/api/cluster/resume?selector={q('region=eu')}&wait=10")
    assert body["held"] is True and body["wait"]["acknowledged"] == ["a1"]
    assert (a1.state()["state"], a3.state()["state"]) == ("paused", "paused")
    assert a1.state()["held_by"] == [{"selector": None, "command": "pause", "version": 1,
                                      "reason": "freeze"}]
    events = wait_events(a1.events, lambda ev: count_events(ev, "on_pause"), message="on_pause")
    hooks = [e["ev"] for e in events if e["ev"].startswith("on_")]
    assert hooks == ["on_pause"]  # one pause; neither the cluster's nor the resume ran a hook
    post(a3, "/api/cluster/resume?wait=10")
    assert (a1.state()["state"], a3.state()["state"]) == ("running", "running")


def test_restarted_matching_agent_comes_up_paused_before_its_first_batch(fleet, store):
    a1 = start(fleet, store, "a1")
    a3 = start(fleet, store, "a3")
    wait_running(a1, a3)
    post(a3, f"/api/cluster/pause?selector={q('region in (eu)')}&wait=10")
    a1.wait_state("paused")
    a1.signal(15)
    a1.wait_exit()
    again = start(fleet, store, "a1", generation=1)
    again.wait_state("paused", timeout=20)
    events = wait_events(again.events, lambda ev: count_events(ev, "on_pause"), timeout=20,
                         message="on_pause at startup")
    assert not [e for e in events if e["ev"] == "batch_start"]
    pause = [e for e in events if e["ev"] == "on_pause"]
    assert pause and pause[0]["source"] == "startup" and pause[0]["scope"] == "region in (eu)"
    assert a3.state()["state"] == "running"


def test_agent_label_pauses_one_agent_durably_across_its_restart(fleet, store):
    a1 = start(fleet, store, "a1")
    a2 = start(fleet, store, "a2")
    wait_running(a1, a2)
    body = post(a1, "/api/cluster/pause?selector=agent%3Da2&wait=10")
    assert body["wait"]["acknowledged"] == ["a2"]
    assert a1.state()["state"] == "running" and a2.state()["state"] == "paused"
    a2.signal(15)
    a2.wait_exit()
    again = start(fleet, store, "a2", generation=1)
    again.wait_state("paused", timeout=20)
    assert a1.state()["state"] == "running"


def test_notin_and_not_exists_select_agents_without_the_label(fleet, store):
    agents = start_four(fleet, store)
    body = post(agents["a1"], f"/api/cluster/pause?selector={q('role notin (api)')}&wait=10")
    assert sorted(body["wait"]["acknowledged"]) == ["a1", "a3", "a4"]
    wait_states(agents, {"a1": "paused", "a2": "running", "a3": "paused", "a4": "paused"})
    post(agents["a1"], f"/api/cluster/resume?selector={q('role notin (api)')}&wait=10")
    body = post(agents["a2"], f"/api/cluster/pause?selector={q('!region')}&wait=10")
    assert body["wait"]["acknowledged"] == ["a4"]
    wait_states(agents, {"a1": "running", "a2": "running", "a3": "running", "a4": "paused"})
    listed = agents["a1"].get(f"/api/cluster/agents?selector={q('region=eu')}").json()
    assert [r["agent_id"] for r in listed["agents"]] == ["a1", "a2"]
    assert listed["summary"]["total"] == 2
    assert listed["agents"][1]["labels"] == {"agent": "a2", "region": "eu", "role": "api"}


def test_scoped_shutdown_holds_restarted_matching_agents_paused(fleet, store):
    a1 = start(fleet, store, "a1")
    a3 = start(fleet, store, "a3")
    wait_running(a1, a3)
    post(a3, f"/api/cluster/shutdown?selector={q('region=eu')}")
    assert a1.wait_exit() == 0
    again = start(fleet, store, "a1", generation=1)
    again.wait_state("paused", timeout=20)
    # a cluster resume does not release it; a local resume is refused; the scope's resume does
    post(a3, "/api/cluster/pause?wait=10")
    post(a3, "/api/cluster/resume?wait=10")
    assert again.state()["state"] == "paused"
    assert again.post("/api/agent/resume").status == 409
    post(a3, f"/api/cluster/resume?selector={q('region=eu')}&wait=10")
    again.wait_state("running")


def test_if_version_conflict_on_a_scope_is_409_with_the_scope_version(fleet, store):
    a1 = start(fleet, store, "a1")
    a1.wait_state("running", timeout=20)
    body = post(a1, f"/api/cluster/pause?selector={q('region=eu')}&if_version=0")
    assert body["version"] == 1
    r = a1.post(f"/api/cluster/resume?selector={q('region=eu')}&if_version=0")
    assert r.status == 409, r.body
    assert r.json()["current"]["version"] == 1
    assert r.json()["current"]["selector"] == "region=eu"
    body = post(a1, f"/api/cluster/resume?selector={q('region=eu')}&if_version=1")
    assert body["version"] == 2


def test_drain_on_a_scoped_pause_is_stored_and_reaches_the_hook(fleet, store):
    a1 = start(fleet, store, "a1")
    a3 = start(fleet, store, "a3")
    wait_running(a1, a3)
    body = post(a3, f"/api/cluster/pause?selector={q('region=eu')}&drain=5s&wait=10")
    assert body["drain"] == 5 and body["wait"]["acknowledged"] == ["a1"]
    entry = a3.get("/api/cluster/history").json()["entries"][0]
    assert entry["selector"] == "region=eu" and entry["drain"] == 5
    events = wait_events(a1.events, lambda ev: count_events(ev, "on_pause"), message="on_pause")
    pause = [e for e in events if e["ev"] == "on_pause"][-1]
    assert pause["scope"] == "region=eu" and pause["drain"] == 5
    assert a3.state()["state"] == "running"


def test_timed_scoped_pause_expires_exactly_once(fleet, store):
    agents = {n: start(fleet, store, n) for n in ("a1", "a2", "a3")}
    wait_running(*agents.values())
    body = post(agents["a1"], f"/api/cluster/pause?selector={q('role=ingest')}&for=1s&wait=10")
    assert sorted(body["wait"]["acknowledged"]) == ["a1", "a3"]
    assert body["expires_at"] is not None
    wait_states(agents, {"a1": "running", "a2": "running", "a3": "running"}, timeout=20)

    def resumes():
        entries = agents["a2"].get("/api/cluster/history").json()["entries"]
        return [e for e in entries if e.get("selector") == "role=ingest" and e["command"] == "running"]
    wait_for(lambda: len(resumes()) == 1, 10, message="one automatic resume")

    def seen_by_all():  # every agent's view holds the resume: none has an expiry left to end
        return all(a.get("/api/cluster/scopes").json()["scopes"][0]["version"] == 2
                   for a in agents.values())
    wait_for(seen_by_all, 10, message="every agent saw the resume")
    assert len(resumes()) == 1
    assert resumes()[0]["updated_by"] == "system"


def test_malformed_selectors_and_labels_are_refused_naming_the_problem(fleet, store, tmp_path):
    a1 = start(fleet, store, "a1")
    a1.wait_state("running", timeout=20)
    r = a1.post(f"/api/cluster/pause?selector={q('region in (eu')}")
    assert r.status == 400 and "expected ',' or ')'" in r.json()["error"]
    r = a1.post("/api/cluster/pause?selector=")
    assert r.status == 400 and "empty" in r.json()["error"]
    r = a1.get(f"/api/cluster/agents?selector={q('-x')}")
    assert r.status == 400 and "label key '-x'" in r.json()["error"]
    assert a1.get("/api/cluster/history").json()["count"] == 0

    env = store.env(tmp_path / "bad.jsonl", AGENT_LABELS="region=eu,tier=gold plus")
    bad = fleet.start(RECORDER, env=env, name="bad", wait_port=False)
    assert bad.wait_exit() == 2
    assert "AGENT_LABELS: label value 'gold plus'" in bad.log_text()
    env = store.env(tmp_path / "bad2.jsonl", AGENT_LABELS="agent=x")
    bad = fleet.start(RECORDER, env=env, name="bad2", wait_port=False)
    assert bad.wait_exit() == 2
    assert "the label 'agent' is implicit" in bad.log_text()


def test_downward_api_labels_file_gives_the_pod_labels(fleet, store, tmp_path):
    labels_file = tmp_path / "labels"
    labels_file.write_text('app.kubernetes.io/name="agenthost"\nregion="eu"\n')
    a = fleet.start(RECORDER, env=store.env(tmp_path / "d.jsonl", AGENT_LABELS="role=api",
                                            AGENT_LABELS_FILE=str(labels_file)), name="pod-1")
    wait_running(a)
    assert a.state()["labels"] == {"agent": "pod-1", "app.kubernetes.io/name": "agenthost",
                                   "region": "eu", "role": "api"}
    metrics = a.get("/metrics").body
    assert ('agenthost_agent_labels{label_agent="pod-1",label_app_kubernetes_io_name="agenthost",'
            'label_region="eu",label_role="api"} 1') in metrics
    post(a, f"/api/cluster/pause?selector={q('app.kubernetes.io/name=agenthost')}&wait=10")
    assert a.state()["state"] == "paused"


def test_ctl_scoped_commands_and_scopes_listing(fleet, store):
    a1 = start(fleet, store, "a1")
    a3 = start(fleet, store, "a3")
    wait_running(a1, a3)
    out = run_cli(["ctl", "pause", "--url", a1.url, "--selector", "region=eu", "--wait", "10",
                   "--reason", "maintenance"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert a1.state()["state"] == "paused" and a3.state()["state"] == "running"
    out = run_cli(["ctl", "scopes", "--url", a1.url])
    assert out.returncode == 0, out.stderr
    assert "region=eu" in out.stdout and "pause" in out.stdout
    out = run_cli(["ctl", "agents", "--url", a1.url, "--selector", "region"])
    assert "agent=a1,region=eu,role=ingest" in out.stdout
    assert "1 listed; fleet: 2 agents" not in out.stdout and "2 listed" in out.stdout
    out = run_cli(["ctl", "pause", "--url", a1.url, "--selector", "region in (eu"])
    assert out.returncode != 0 and "expected ',' or ')'" in out.stdout + out.stderr


def test_mongodb_streams_and_polling_both_deliver_scopes_and_ignore_malformed_ones(fleet,
                                                                                   tmp_path):
    srv = MongoTestServer(mode="replset").start()
    try:
        store = Store("mongodb", tmp_path, srv)
        streams = start(fleet, store, "a1")
        polling = fleet.start(RECORDER, name="a2", env=store.env(
            tmp_path / "a2.jsonl", AGENT_LABELS=LABELS["a2"], ENABLE_CHANGE_STREAMS="false",
            CONTROL_POLLING_INTERVAL="0.5"))
        other = start(fleet, store, "a3")
        wait_running(streams, polling, other)
        assert polling.get("/api/mongo/status").json()["watch_mode"] == "polling"
        coll = srv.client()["agenthost"]["agent_control"]
        # a foreign writer's malformed scope documents: ignored, one warning each, no crash
        coll.insert_many([
            {"_id": "scope:b=2,a=1", "selector": "b=2,a=1", "command": "pause", "version": 1},
            {"_id": "scope:bad((", "selector": "bad((", "command": "pause", "version": 1},
            {"_id": "scope:zone=x", "selector": "zone=x", "command": "pause", "version": "one"},
            {"_id": "scope:zone=y", "selector": "zone=y", "command": "hold", "version": 1},
        ])
        # and a well-formed one, written directly: both watch modes deliver it
        coll.insert_one({"_id": "scope:region=eu", "selector": "region=eu", "command": "pause",
                         "version": 1, "reason": "foreign writer", "updated_by": "dba"})
        streams.wait_state("paused", timeout=15)
        polling.wait_state("paused", timeout=15)
        assert polling.state()["held_by"][0]["reason"] == "foreign writer"
        # more scope changes make every agent read the set again: still one warning each
        post(other, f"/api/cluster/pause?selector={q('zone=z')}&wait=10")
        post(other, f"/api/cluster/resume?selector={q('zone=z')}&wait=10")
        for a in (streams, polling, other):
            for bad in ("scope:b=2,a=1", "scope:bad((", "scope:zone=x", "scope:zone=y"):
                a.wait_log(re_escape(f"Ignoring the malformed scope document '{bad}'"),
                           timeout=10)
                assert len(a.find_logs(f"malformed scope document '{re_escape(bad)}'")) == 1
            assert a.proc.poll() is None
        assert other.state()["state"] == "running"
        scopes = [s["selector"] for s in other.get("/api/cluster/scopes").json()["scopes"]]
        assert scopes == ["region=eu", "zone=z"]
        body = post(other, f"/api/cluster/resume?selector={q('region=eu')}&wait=10")
        assert body["version"] == 2 and sorted(body["wait"]["acknowledged"]) == ["a1", "a2"]
    finally:
        srv.close()
