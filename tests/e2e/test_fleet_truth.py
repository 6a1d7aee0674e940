"""Answers that stay true and hooks that stay prompt when the store misbehaves or the agent is on
its way out: the Lua worker never waits on a store write, status records are written after a
startup write lock, a wait= round whose fleet read failed never completes, a shutdown issued
through one of its own agents is reported as done, a reload after the worker stopped is refused.
The real binary on the embedded store (a second process holds its write lock where needed)."""
import signal
import sqlite3
import threading
import time

from agenthost_harness import (WriteLock, agent_env, metric, read_events, run_cli, script,
                               wait_for, wait_store_set_up)

RECORDER = script("recorder.lua")


def test_hooks_run_promptly_while_a_cluster_write_is_blocked_on_the_store_lock(
        fleet, state_file, tmp_path):
    events = tmp_path / "ev.jsonl"
    agent = fleet.start(RECORDER, env=agent_env(state_file, events, BATCH_SECONDS="3"))
    agent.wait_state("running", timeout=15)
    wait_for(lambda: any(e["ev"] == "batch_start" for e in read_events(str(events))), 15,
             message="a batch runs")
    # A pause is written and waits for the batch; then another process takes the write lock
    # and a second cluster command blocks in the store (4 x 5 s busy timeout).
    assert agent.post("/api/cluster/pause?reason=first", timeout=10).status == 200
    lock = WriteLock(state_file)
    blocked = {}
    t = threading.Thread(target=lambda: blocked.setdefault(
        "r", agent.post("/api/cluster/resume?reason=blocked", timeout=60)), daemon=True)
    t.start()
    try:
        wait_for(lambda: metric(agent, 'agenthost_http_store_jobs{state="running"}') >= 1, 10,
                 message="the resume is blocked in the store")
        paused_seen = wait_for(lambda: agent.state()["state"] == "paused" and time.time(), 15,
                               interval=0.01, message="the pause is applied")
        hook = wait_for(lambda: [e for e in read_events(str(events)) if e["ev"] == "on_pause"],
                        10, message="on_pause ran while the store is locked")[0]
        assert hook["t"] - paused_seen < 1.0, (hook, paused_seen)
        assert "r" not in blocked  # the second command is still stuck in the store
    finally:
        lock.release()
    t.join(timeout=60)


def test_status_records_are_written_after_a_startup_write_lock(fleet, state_file, tmp_path):
    holder = WriteLock(state_file)
    agent = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"), name="late")
    try:
        wait_for(lambda: "locked" in agent.get("/readyz", timeout=2).json()["reason"], 15,
                 message="/readyz names the lock")
    finally:
        holder.release()
    agent.wait_state("running", timeout=30)

    def record():
        conn = sqlite3.connect(state_file + "-agents", timeout=5)  # the status records' file
        try:
            return conn.execute("SELECT state FROM agent_status WHERE agent_id = 'late'"
                                ).fetchall()
        except sqlite3.OperationalError:
            return None  # not set up yet: the status writer starts after the startup sync
        finally:
            conn.close()

    wait_for(lambda: record() == [("running",)], 15, message="the agent's status record")
    assert not agent.find_logs(r"status write failed"), agent.log_text()


SLOW_SHUTDOWN = """
local agent = require "agent"
return {
    batch = function() agent.sleep(0.05) return 0 end,
    on_shutdown = function()
        agent.log.info("on_shutdown starts")
        local t0 = agent.monotonic()
        while agent.monotonic() - t0 < 3 do end -- agent.sleep does not wait once stopping
    end,
}
"""


def test_a_reload_requested_while_the_agent_stops_is_refused_503(fleet, state_file, tmp_path):
    path = tmp_path / "slow_shutdown.lua"
    path.write_text(SLOW_SHUTDOWN)
    agent = fleet.start(str(path), env=agent_env(state_file, SHUTDOWN_TIMEOUT="30"))
    agent.wait_state("running", timeout=15)
    assert agent.post("/api/agent/shutdown", timeout=10).status == 200
    agent.wait_log(r"on_shutdown starts", timeout=15)
    r = agent.post("/api/agent/reload", timeout=15)
    assert r.status == 503, r.body
    assert r.json()["error"] == "the agent is shutting down: the reload was not applied", r.body
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()
    assert not agent.find_logs(r"Reloading script"), agent.log_text()


def test_an_extreme_expires_at_from_a_foreign_writer_is_saturated(fleet, state_file, tmp_path):
    """A pause whose expiry is the smallest int64 (written by another program): the agent
    computes the time left without overflowing (UBSan would report it), ends the long-past pause
    and keeps answering."""
    events = tmp_path / "ev.jsonl"
    agent = fleet.start(RECORDER, env=agent_env(state_file, events))
    agent.wait_state("running", timeout=15)
    wait_store_set_up(state_file)
    conn = sqlite3.connect(state_file, isolation_level=None, timeout=10)
    conn.execute("UPDATE control SET command = 'pause', version = version + 1, "
                 "expires_us = ?, reason = 'foreign'", (-2 ** 63,))
    paused_version = conn.execute("SELECT version FROM control").fetchone()[0]

    def ended():
        command, version = conn.execute("SELECT command, version FROM control").fetchone()
        return command == "running" and version > paused_version

    # The agent ends the pause (it expired long ago) with its conditional resume.
    wait_for(ended, 30, message="the expired pause ended by the agent")
    conn.close()
    wait_for(lambda: agent.state()["state"] == "running", 30, message="running again")
    assert agent.get("/healthz").status == 200


SLEEPY_RELOAD = """
local agent = require "agent"
local t0 = agent.monotonic()
local woken = agent.sleep(1)
agent.log.info(string.format("main chunk slept %.3f woken=%s", agent.monotonic() - t0,
                             tostring(woken)))
return {
    init = function()
        local t1 = agent.monotonic()
        local w = agent.sleep(1)
        agent.log.info(string.format("init slept %.3f woken=%s", agent.monotonic() - t1,
                                     tostring(w)))
    end,
    batch = function() agent.sleep(0.05) return 0 end,
}
"""


def test_agent_sleep_sleeps_in_a_reloaded_main_chunk_and_init(fleet, state_file, tmp_path):
    path = tmp_path / "sleepy.lua"
    path.write_text(SLEEPY_RELOAD)
    agent = fleet.start(str(path), env=agent_env(state_file))
    agent.wait_state("running", timeout=20)
    r = agent.post("/api/agent/reload", timeout=30)
    assert r.status == 200, r.body
    # The reload being served is not a wake-up: both sleeps last their full second.
    for what in ("main chunk", "init"):
        line = agent.wait_log(what + r" slept (\S+) woken=(\w+)", timeout=15, count=2)
        assert float(line.group(1)) >= 0.95 and line.group(2) == "false", line.group(0)


def test_a_wait_whose_fleet_read_fails_never_reports_complete(fleet, state_file, tmp_path):
    """The status records cannot be listed (another program dropped their table): the command
    is written, but the wait cannot know who applied it, so it is not "complete" and ctl
    --wait fails with the reason instead of printing "every agent applied it"."""
    agent = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"))
    agent.wait_state("running", timeout=15)
    # The records' file and table exist once the status writer wrote the agent's record, which
    # on a loaded machine can come after the agent reports running.
    wait_for(lambda: agent.get("/api/cluster/agents").json()["summary"]["total"] == 1, 30,
             message="the agent's own status record")
    conn = sqlite3.connect(state_file + "-agents", isolation_level=None, timeout=10)
    conn.execute("DROP TABLE agent_status")
    conn.close()
    r = agent.post("/api/cluster/pause?wait=2&reason=blind", timeout=30)
    assert r.status == 200, r.body
    wait = r.json()["wait"]
    assert wait["complete"] is False and "agent_status" in wait["error"], wait
    cli = run_cli(["ctl", "resume", "--url", agent.url, "--wait", "2"], timeout=60)
    assert cli.returncode == 1, (cli.stdout, cli.stderr)
    assert "cannot tell whether every agent applied it" in cli.stderr, cli.stderr
    assert "every agent applied it (" not in cli.stderr, cli.stderr


LOOPS_AT_TOP = """
jit.off() -- the hook that stops Lua code does not run inside compiled traces
local n = 0
while true do n = n + 1 end
"""


def test_a_reload_whose_main_chunk_loops_is_stopped_at_batch_timeout(fleet, state_file,
                                                                    tmp_path):
    path = tmp_path / "reloaded.lua"
    path.write_text("""
local agent = require "agent"
return { batch = function() agent.log.info("old script batch") agent.sleep(0.1) return 0 end }
""")
    agent = fleet.start(str(path), env=agent_env(state_file, BATCH_TIMEOUT="1",
                                                 SHUTDOWN_TIMEOUT="20"))
    agent.wait_state("running", timeout=15)
    path.write_text(LOOPS_AT_TOP)
    r = agent.post("/api/agent/reload", timeout=30)
    assert r.status == 422, r.body
    assert "BATCH_TIMEOUT" in r.json()["error"], r.body
    # The old script keeps running, and the agent still stops cleanly.
    seen = len(agent.find_logs(r"old script batch"))
    agent.wait_log(r"old script batch", timeout=15, count=seen + 2)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()


def test_a_shutdown_issued_through_one_of_its_agents_with_wait_reports_every_agent_stopped(
        fleet, state_file, tmp_path):
    import json
    agents = [fleet.start(RECORDER, env=agent_env(state_file, tmp_path / f"ev{i}.jsonl"),
                          name=f"a{i}") for i in (1, 2, 3)]
    for a in agents:
        a.wait_state("running", timeout=30)
    # every agent's record is written before the command (the wait counts records)
    wait_for(lambda: len(agents[0].get("/api/cluster/agents", timeout=5).json()["agents"]) == 3,
             15, message="three status records")
    p = run_cli(["ctl", "shutdown", "--url", agents[0].url, "--wait", "20"], timeout=60)
    assert p.returncode == 0, (p, agents[0].log_text())
    assert "every live agent applied it" in p.stderr, p
    wait = json.loads(p.stdout)["wait"]
    assert wait["complete"] is True, wait
    assert wait["acknowledged"] == ["a1", "a2", "a3"], wait
    assert wait["pending"] == [] and wait["excluded"] == [], wait
    for a in agents:
        assert a.wait_exit(timeout=40) == 0, a.log_text()
