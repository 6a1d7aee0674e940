"""MongoDB faults (docs/OPERATIONS.md): no command is missed, a running agent keeps running
batches and a paused agent runs none while MongoDB is gone, cluster commands answer 503 quickly
and write nothing, and an agent that cannot read the state at startup runs no batch.

Every test starts two agents: `runner` (running) and `parked` (paused locally through
/api/agent/pause, so it stays paused whatever happens to MongoDB). After each fault a new cluster
command must reach both (applied_version)."""
import datetime
import time
import os
import sys

import pytest

from agenthost_harness import (MONGO_DIR, count_events, free_port, mongo_agent_env,
                               mongo_status, read_events, script, wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import MongoTestServer, mongo_server  # noqa: E402,F401

RECORDER = script("recorder.lua")
POLL = 0.5
MODES = {"change_streams": {}, "polling": {"ENABLE_CHANGE_STREAMS": "false",
                                           "CONTROL_POLLING_INTERVAL": POLL}}
RECOVERY = 30.0  # reconnect backoff is capped at 5 s (streams) / 30 s (polling)


def start_pair(fleet, tmp_path, uri, mode="change_streams"):
    agents = []
    for name in ("runner", "parked"):
        events = tmp_path / f"{name}.jsonl"
        a = fleet.start(RECORDER, env=mongo_agent_env(uri, events, **MODES[mode]), name=name)
        a.events = str(events)
        agents.append(a)
    runner, parked = agents
    for a in agents:
        a.wait_state("running", timeout=20)
        wait_for(lambda a=a: mongo_status(a)["watch_mode"] == mode, 10, message="watch mode")
    r = parked.post("/api/agent/pause?reason=parked")
    assert r.status == 200, r.body
    parked.wait_state("paused")
    return runner, parked


class Liveness:
    """Records batch counters at the start of a fault; checks() proves the runner made progress
    and the parked agent ran nothing."""

    def __init__(self, runner, parked):
        self.runner, self.parked = runner, parked
        self.runner_batches = runner.state()["batches"]
        self.parked_batches = parked.state()["batches"]

    def runner_progressed(self, extra=3):
        wait_for(lambda: self.runner.state()["batches"] >= self.runner_batches + extra, 10,
                 message="the running agent keeps running batches")

    def check_parked(self):
        st = self.parked.state()
        assert st["state"] == "paused" and st["batches"] == self.parked_batches, st


def write_direct(server, command="pause"):
    """A foreign write through pymongo; returns the new version."""
    client = server.client()
    with client:
        doc = client.agenthost.agent_control.find_one_and_update(
            {"_id": "global_control"},
            {"$inc": {"version": 1}, "$set": {"timestamp": datetime.datetime.utcnow(),
                                              "command": command}},
            return_document=True, upsert=True)
    return doc["version"]


def wait_applied(agents, version, timeout=RECOVERY):
    for a in agents:
        wait_for(lambda a=a: a.state()["applied_version"] >= version, timeout,
                 message=f"{a.name} applies version {version}")


def cluster_pause(agent, reason):
    r = agent.post(f"/api/cluster/pause?reason={reason}", timeout=30)
    assert r.status == 200, r.body
    return r.json()["version"]


@pytest.mark.parametrize("mode", list(MODES))
def test_hangup_of_every_connection(fleet, tmp_path, mongo_server, mode):
    runner, parked = start_pair(fleet, tmp_path, mongo_server.uri, mode)
    live = Liveness(runner, parked)
    mongo_server.hangup()
    version = cluster_pause(runner, "after+hangup")
    wait_applied([runner, parked], version)
    runner.wait_state("paused")
    live.check_parked()
    mongo_server.hangup()
    version = write_direct(mongo_server, "running")
    wait_applied([runner, parked], version)
    runner.wait_state("running")
    live.runner_progressed()


@pytest.mark.parametrize("mode", list(MODES))
def test_blackhole_then_direct_write(fleet, tmp_path, mongo_server, mode):
    runner, parked = start_pair(fleet, tmp_path, mongo_server.uri, mode)
    live = Liveness(runner, parked)
    mongo_server.blackhole(3.0)  # longer than a getMore's await (1 s) and a poll (0.5 s)
    live.runner_progressed()
    wait_for(lambda: not mongo_server.status()["blackholed"], 10, message="blackhole ends")
    live.check_parked()
    # Written the moment the server answers again, while the agents' requests from the
    # blackhole are still unanswered: they must notice and catch up.
    version = write_direct(mongo_server, "pause")
    wait_applied([runner, parked], version)
    runner.wait_state("paused")
    live.check_parked()


@pytest.mark.parametrize("mode", list(MODES))
def test_server_down_then_restarted(fleet, tmp_path, mongo_server, mode):
    runner, parked = start_pair(fleet, tmp_path, mongo_server.uri, mode)
    live = Liveness(runner, parked)
    before = runner.state()["applied_version"]
    mongo_server.stop()
    # The command cannot be issued: 503 well within the HTTP timeout, nothing written.
    r = runner.post("/api/cluster/pause?reason=while+down", timeout=15)
    assert r.status == 503, r.body
    assert "unavailable" in r.json()["error"], r.body
    for a in (runner, parked):
        wait_for(lambda a=a: not mongo_status(a)["connected"], 15, message=f"{a.name} sees it")
        assert mongo_status(a)["last_error"], mongo_status(a)
    live.runner_progressed()
    live.check_parked()
    assert runner.get("/readyz").status == 200  # running agents stay ready

    mongo_server.start()
    for a in (runner, parked):
        wait_for(lambda a=a: mongo_status(a)["connected"], RECOVERY, message=f"{a.name} back")
        assert mongo_status(a)["reconnects"] >= 1, mongo_status(a)
    client = mongo_server.client()
    with client:
        doc = client.agenthost.agent_control.find_one({"_id": "global_control"})
    assert doc["version"] == before, doc  # the refused command wrote nothing
    version = cluster_pause(parked, "after+restart")
    assert version == before + 1
    wait_applied([runner, parked], version)
    runner.wait_state("paused")
    live.check_parked()


def test_resumable_getmore_error_resumes_the_stream(fleet, tmp_path, mongo_server):
    runner, parked = start_pair(fleet, tmp_path, mongo_server.uri)
    live = Liveness(runner, parked)
    # Three failures for the runner only: the driver's own single resume attempt fails too, so
    # the store has to back off and resume from its token.
    mongo_server.configure_fail_point({"times": 3}, {
        "failCommands": ["getMore", "aggregate"], "errorCode": 6,
        "errorLabels": ["ResumableChangeStreamError"], "appName": "agenthost/runner"})
    wait_for(lambda: mongo_status(runner)["stream_resumes"] >= 1, RECOVERY,
             message="stream resumed")
    assert runner.find_logs(r"Change stream resumed")
    live.runner_progressed()
    version = write_direct(mongo_server, "pause")
    wait_applied([runner, parked], version)
    live.check_parked()


def test_history_lost_leads_to_a_reread(fleet, tmp_path, mongo_server):
    runner, parked = start_pair(fleet, tmp_path, mongo_server.uri)
    live = Liveness(runner, parked)
    mongo_server.configure_fail_point("alwaysOn", {
        "failCommands": ["getMore", "aggregate"], "errorCode": 6,
        "errorLabels": ["ResumableChangeStreamError"], "appName": "agenthost/runner"})
    # the stream notices at its next getMore, which may be a whole await period away
    wait_for(lambda: not mongo_status(runner)["connected"], 45, message="runner's stream broken")
    version = write_direct(mongo_server, "pause")  # the runner's stream cannot see this ...
    write_direct(mongo_server, "pause")
    mongo_server.trim_change_log(0)  # ... and its resume point is gone
    live.runner_progressed()
    mongo_server.configure_fail_point("off")
    wait_applied([runner, parked], version + 1)
    assert runner.find_logs(r"Change stream cannot resume|history lost"), runner.log_text()
    runner.wait_state("paused")
    live.check_parked()


def test_stepdown_resumes(fleet, tmp_path, mongo_server):
    runner, parked = start_pair(fleet, tmp_path, mongo_server.uri)
    live = Liveness(runner, parked)
    mongo_server.step_down()
    r = runner.post("/api/cluster/pause?reason=no+primary", timeout=15)
    assert r.status == 503, r.body
    live.runner_progressed()
    live.check_parked()
    mongo_server.step_up()
    version = write_direct(mongo_server, "pause")
    wait_applied([runner, parked], version)
    runner.wait_state("paused")
    live.check_parked()


def test_startup_with_server_down_waits_then_syncs(fleet, tmp_path):
    server = MongoTestServer(mode="replset", port=free_port())
    try:
        # The cluster is paused; then MongoDB goes away before the agent starts.
        server.start()
        version = write_direct(server, "pause")
        server.stop()
        events = tmp_path / "late.jsonl"
        agent = fleet.start(RECORDER, env=mongo_agent_env(server.uri, events), name="late")
        wait_for(lambda: not mongo_status(agent)["connected"] and
                 mongo_status(agent)["last_error"], 15, message="startup read failing")
        st = agent.state()
        assert st["state"] == "starting", st
        assert agent.get("/readyz").status == 503
        assert st["batches"] == 0
        r = agent.post("/api/cluster/resume", timeout=15)
        assert r.status == 503, r.body

        server.start()
        agent.wait_state("paused", timeout=RECOVERY)
        st = agent.state()
        assert st["applied_version"] == version and st["batches"] == 0, st
        pauses = [e for e in read_events(str(events)) if e["ev"] == "on_pause"]
        assert len(pauses) == 1 and pauses[0]["source"] == "startup", pauses
        assert count_events(read_events(str(events)), "batch_start") == 0
        r = agent.post("/api/cluster/resume")
        assert r.status == 200, r.body
        agent.wait_state("running")
        wait_for(lambda: agent.state()["batches"] > 0, 10, message="batches after sync")
    finally:
        server.close()


def start_one(fleet, tmp_path, uri, name, **extra):
    events = tmp_path / f"{name}.jsonl"
    a = fleet.start(RECORDER, env=mongo_agent_env(uri, events, **extra), name=name)
    a.events = str(events)
    a.wait_state("running", timeout=20)
    return a


def poll_times(server, after):
    """Wall-clock times at which the server received a find on agent_control after `after`."""
    return [e["t"] for e in server.command_log(command="find", collection="agent_control")
            if e["t"] > after]


def test_lost_change_events_are_caught_by_the_verifying_read(fleet, tmp_path, mongo_server):
    a = start_one(fleet, tmp_path, mongo_server.uri, "verifier",
                  CHANGE_STREAM_VERIFY_INTERVAL=1)
    assert mongo_status(a)["watch_mode"] == "change_streams"
    mongo_server.drop_change_events(True)  # the stream never sees the next write
    version = write_direct(mongo_server, "pause")
    wait_applied([a], version, timeout=15)
    a.wait_state("paused")
    a.wait_log(rf"The change stream missed version {version}: reopening it")
    # The reopened stream delivers again once events flow.
    mongo_server.drop_change_events(False)
    version = write_direct(mongo_server, "running")
    wait_applied([a], version, timeout=15)
    a.wait_state("running")


def test_failing_polls_back_off_exponentially(fleet, tmp_path, mongo_server):
    interval = 0.1
    a = start_one(fleet, tmp_path, mongo_server.uri, "poller", ENABLE_CHANGE_STREAMS="false",
                  CONTROL_POLLING_INTERVAL=interval)
    wait_for(lambda: mongo_status(a)["polls"] >= 2, 10, message="polls succeed")
    since = time.time()
    # Every find fails (a non-retryable server error, so the driver does not retry it).
    mongo_server.configure_fail_point("alwaysOn", {"failCommands": ["find"], "errorCode": 2})
    try:
        polls = wait_for(lambda: (lambda t: t if len(t) >= 6 else None)(
            poll_times(mongo_server, since)), 30, message="six failing polls")
    finally:
        mongo_server.configure_fail_point("off")
    gaps = [b - t for t, b in zip(polls, polls[1:])][:5]
    # The k-th retry waits interval * 2^k scaled by 50-100% (jitter); load only lengthens it.
    for k, gap in enumerate(gaps):
        assert gap >= 0.5 * interval * 2 ** k * 0.9, (k, gaps)
    assert sum(gaps) >= 0.5 * interval * (2 ** 5 - 1) * 0.9, gaps
    # Polls succeed again at the normal interval.
    version = write_direct(mongo_server, "pause")
    wait_applied([a], version)


def test_polls_are_spread_by_jitter(fleet, tmp_path, mongo_server):
    interval = 0.3
    a = start_one(fleet, tmp_path, mongo_server.uri, "poller", ENABLE_CHANGE_STREAMS="false",
                  CONTROL_POLLING_INTERVAL=interval)
    since = time.time()
    polls = wait_for(lambda: (lambda t: t if len(t) >= 31 else None)(
        poll_times(mongo_server, since)), 60, message="thirty-one polls")
    gaps = [b - t for t, b in zip(polls, polls[1:])][:30]
    # Each wait is interval * [0.9, 1.1), and it starts after the server logged the previous
    # poll and answered it: scheduling delays (however large on a loaded machine) only lengthen
    # a gap. So no gap is shorter than 90% of the interval, and a gap shorter than the interval
    # itself can only come from the jitter: without it every gap would be >= the interval. With
    # it, a gap drawn below 96% stays below 98% unless delayed by 6 ms; 30 draws all above 96%
    # have a probability of 0.7^30 ~ 2e-5.
    assert min(gaps) >= 0.9 * interval - 0.01, gaps
    shorter = [g for g in gaps if g < 0.98 * interval]
    assert shorter, gaps
    assert mongo_status(a)["connected"] is True
