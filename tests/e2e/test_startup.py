"""Start-up on the embedded store, through the binary: what opening the store checks at once (a bad
AGENTHOST_STATE exits 2 naming it, before the API starts), what is deferred off the path to
/readyz (the file's setup, done by the watcher; the status record, written once the agent has
synced or at the first watchdog tick), and start-up meeting another process's lock, other agents
opening the same new file, a shutdown before the file is set up, and commands right after the
start."""
import os
import signal
import sqlite3
import subprocess
import threading

import pytest

from agenthost_harness import (WriteLock, agent_env, count_events, read_events, run_cli, script,
                               wait_events, wait_for, wait_store_set_up)

RECORDER = script("recorder.lua")


def listed(agent):
    """{agent_id: state} of the agent's fleet listing, or None when it did not answer 200."""
    r = agent.get("/api/cluster/agents", timeout=10)
    if r.status != 200:
        return None
    return {a["agent_id"]: a["state"] for a in r.json()["agents"]}


# -- a bad AGENTHOST_STATE ---------------------------------------------------------------------

def _read_only_file(path):
    """Makes path a file this process cannot write, or skips (root writes through permissions:
    then the immutable attribute, where the file system and the capabilities allow it)."""
    with open(path, "wb") as f:
        f.write(b"")
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        return lambda: os.chmod(path, 0o644)
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no file is read-only here")
    return lambda: subprocess.run(["chattr", "-i", path], capture_output=True)


BAD_STATE = {
    "missing directory": ("no/such/dir/state.db", None, "No such file or directory"),
    "under a regular file": ("plain.txt/state.db", "plain", "is not a directory"),
    "a directory": (".", None, "Is a directory"),
    "not a database": ("notes.txt", "text", "file is not a database"),
    "no file can be created there": ("/proc/agenthost-state.db", None, "cannot open"),
    "a read-only file": ("ro.db", "read-only", "the file is not writable"),
}


@pytest.mark.parametrize("case", list(BAD_STATE), ids=list(BAD_STATE))
def test_a_bad_agenthost_state_exits_2_naming_it_before_the_api_starts(tmp_path, case):
    rel, kind, reason = BAD_STATE[case]
    path = rel if rel.startswith("/") else str(tmp_path / rel)
    undo = None
    if kind == "plain":
        (tmp_path / "plain.txt").write_text("a plain file\n")
    elif kind == "text":
        (tmp_path / "notes.txt").write_text("these are notes, long enough to fill a header\n")
    elif kind == "read-only":
        undo = _read_only_file(path)
    try:
        p = run_cli(["run", RECORDER],
                    env=agent_env(path, tmp_path / "ev.jsonl", HTTP_PORT="0"), timeout=30)
    finally:
        if undo is not None:
            undo()
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "AGENTHOST_STATE" in out and path.rstrip("/.") in out and reason in out, out
    assert "HTTP API listening" not in out, out
    assert not os.path.exists(str(tmp_path / "ev.jsonl")) or "batch" not in open(
        str(tmp_path / "ev.jsonl")).read()


# -- what is deferred, and what meets it --------------------------------------------------------

def test_a_new_file_is_set_up_and_the_status_record_follows_the_sync(fleet, state_file,
                                                                      tmp_path):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "a.jsonl"), name="a")
    a.wait_state("running", timeout=15)
    # the watcher told the initial document while setting the file up, and its first read of
    # the same document applied nothing more: one sync, one transition
    assert a.log_text().count("Synced to cluster state: 'running' (version 0)") == 1, a.log_text()
    assert a.log_text().count("Agent running") == 1, a.log_text()
    # the watcher sets the file up (its commit may follow the delivery): schema version, initial
    # document, WAL
    db = sqlite3.connect(state_file)
    try:
        wait_for(lambda: db.execute("PRAGMA user_version").fetchone()[0] == 1, 15,
                 message="the setup committed")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT command, version FROM control").fetchall() == [("running", 0)]
    finally:
        db.close()
    # the record is written once the agent has synced: it is listed running, never starting
    wait_for(lambda: (listed(a) or {}).get("a") == "running", 15,
             message="the agent's record, running")
    assert os.path.exists(state_file + "-agents")
    r = a.post("/api/cluster/pause?reason=after-start")
    assert r.status == 200 and r.json()["version"] == 1, r.body
    a.wait_state("paused")


def test_an_agent_waiting_for_a_lock_is_listed_starting_then_running(fleet, state_file,
                                                                      tmp_path):
    """The status writer does not wait for the sync for ever: an agent whose store is locked at
    start is listed (state starting) from the first watchdog tick on, and running once synced."""
    first = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "a.jsonl"), name="first")
    first.wait_state("running", timeout=15)
    lock = WriteLock(state_file)
    try:
        late = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "b.jsonl"), name="late")
        wait_for(lambda: (listed(first) or {}).get("late") == "starting", 15,
                 message="the late agent listed starting while the store is locked")
        assert late.state()["state"] == "starting"
    finally:
        lock.release()
    late.wait_state("running", timeout=20)
    wait_for(lambda: (listed(first) or {}).get("late") == "running", 15,
             message="the late agent listed running")


def test_six_agents_opening_one_new_file_at_once_all_sync(fleet, state_file, tmp_path):
    agents = [None] * 6

    def start(i):
        agents[i] = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / f"{i}.jsonl"),
                                name=f"agent-{i}")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for a in agents:
        a.wait_state("running", timeout=30)
    wait_store_set_up(state_file)  # the setup may commit after the agents run
    db = sqlite3.connect(state_file)
    try:
        assert db.execute("SELECT command, version FROM control").fetchall() == [("running", 0)]
        assert db.execute("SELECT count(*) FROM audit").fetchone()[0] == 0
    finally:
        db.close()
    r = agents[3].post("/api/cluster/pause?reason=all")
    assert r.status == 200 and r.json()["version"] == 1, r.body
    for a in agents:
        a.wait_state("paused", timeout=15)
    wait_for(lambda: (lambda s: s is not None and len(s) == 6 and set(s.values()) == {"paused"})(
        listed(agents[0])), 20, message="six records, paused")
    for a in agents:
        assert "[ERROR]" not in a.log_text(), a.log_text()


def test_sigterm_before_the_new_file_is_set_up_exits_cleanly(fleet, state_file, tmp_path):
    """Another process created the file and holds its write lock before any schema exists: the
    agent comes up starting (the watcher cannot set the file up), and a SIGTERM then ends it at
    once with exit 0, leaving the file as it was."""
    holder = sqlite3.connect(state_file, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        events = tmp_path / "a.jsonl"
        a = fleet.start(RECORDER, env=agent_env(state_file, events), name="a")
        wait_for(lambda: "locked" in a.get("/readyz", timeout=2).json()["reason"], 15,
                 message="/readyz names the lock")
        a.signal(signal.SIGTERM)
        assert a.wait_exit(timeout=15) == 0, a.log_text()
        assert "[ERROR]" not in a.log_text(), a.log_text()
        assert count_events(read_events(str(events)), "batch_start") == 0
        assert holder.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_commands_right_after_start_open_the_api_connection_beside_the_watcher(fleet, state_file,
                                                                                tmp_path):
    """The first command of a new agent on a new file opens the store's API connection (lazily,
    on a store worker) while the watcher may still be setting the file up: both end up with one
    document, versions 1 and 2, and the agent applies both."""
    events = tmp_path / "a.jsonl"
    a = fleet.start(RECORDER, env=agent_env(state_file, events), name="a")
    r = a.post("/api/cluster/pause?reason=right-after-start", timeout=15)
    assert r.status == 200 and r.json()["version"] == 1, r.body
    a.wait_state("paused", timeout=15)
    r = a.post("/api/cluster/resume?reason=and-back", timeout=15)
    assert r.status == 200 and r.json()["version"] == 2, r.body
    a.wait_state("running", timeout=15)
    wait_events(str(events), lambda e: count_events(e, "on_resume") == 1, 10, "on_resume")
    r = a.post("/api/agent/pause?reason=local")
    assert r.status == 200, r.body
    a.wait_state("paused")
    assert a.post("/api/agent/resume").status == 200
    a.wait_state("running")
    assert [h["version"] for h in a.get("/api/cluster/history").json()["entries"]] == [2, 1]


# -- the script's load, on the Lua worker beside the store and the API ---------------------------

# The main chunk waits (agent.sleep, so a command or a signal can wake it) until the test creates
# GO_FILE, then fails if FAIL is set: the load is then seen from outside while it runs.
WAITING_MAIN_CHUNK = """
local agent = require "agent"
local go = os.getenv("GO_FILE")
agent.log.info("main chunk waiting for " .. go)
local deadline = os.time() + 60
local woken = false
while os.time() < deadline do
    local f = io.open(go)
    if f then f:close() break end
    if agent.sleep(0.05) then woken = true break end
end
agent.log.info("main chunk done (woken: " .. tostring(woken) .. ")")
if os.getenv("FAIL") then error("the script failed after its main chunk waited") end
return {
    init = function() agent.log.info("init ran") end,
    batch = function() agent.sleep(0.1) return 0 end,
    on_shutdown = function() agent.log.info("on_shutdown ran") end,
}
"""


def _waiting_agent(fleet, tmp_path, state_file, **extra):
    path = tmp_path / "waiting.lua"
    path.write_text(WAITING_MAIN_CHUNK)
    go = tmp_path / "go"
    agent = fleet.start(str(path), env=agent_env(state_file, GO_FILE=str(go), **extra))
    agent.wait_log(r"main chunk waiting for", timeout=15)
    return agent, go


def test_the_api_answers_while_the_scripts_main_chunk_runs(fleet, state_file, tmp_path):
    agent, go = _waiting_agent(fleet, tmp_path, state_file)
    assert agent.get("/healthz").status == 200
    r = agent.get("/readyz")
    assert r.status == 503 and "starting" in r.body, r.body
    assert agent.state()["state"] == "starting"
    assert not agent.find_logs(r"main chunk done|init ran"), agent.log_text()
    go.write_text("")
    agent.wait_state("running", timeout=15)
    assert agent.get("/readyz").status == 200
    # the log is read from the agent's output by another thread: wait for the lines
    agent.wait_log(r"init ran")
    done, init = agent.find_logs(r"main chunk done")[0], agent.find_logs(r"init ran")[0]
    lines = agent.log_text().splitlines()
    assert lines.index(done) < lines.index(init), agent.log_text()
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()


def test_sigterm_while_the_main_chunk_waits_at_start_wakes_it_and_stops_cleanly(
        fleet, state_file, tmp_path):
    agent, _ = _waiting_agent(fleet, tmp_path, state_file)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()
    agent.wait_log(r"main chunk done \(woken: true\)")
    agent.wait_log(r"on_shutdown ran")


def test_a_script_failing_once_the_api_is_up_exits_2_naming_its_line(fleet, state_file,
                                                                    tmp_path):
    agent, go = _waiting_agent(fleet, tmp_path, state_file, FAIL="1")
    assert agent.get("/healthz").status == 200
    go.write_text("")
    assert agent.wait_exit(timeout=30) == 2, agent.log_text()
    assert agent.find_logs(r"agenthost: .*waiting\.lua:\d+: the script failed after its main"), \
        agent.log_text()
    assert not agent.find_logs(r"init ran|Agent running|Agent stopped"), agent.log_text()


LOOPS_AT_TOP = """
jit.off() -- the hook that stops Lua code does not run inside compiled traces
local n = 0
while true do n = n + 1 end
"""


def test_a_main_chunk_that_loops_at_start_is_stopped_at_batch_timeout(tmp_path, state_file):
    path = tmp_path / "loops.lua"
    path.write_text(LOOPS_AT_TOP)
    p = run_cli(["run", str(path)], env=agent_env(state_file, HTTP_PORT=0, BATCH_TIMEOUT="1"),
                timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "BATCH_TIMEOUT" in p.stderr and "loops.lua" in p.stderr, p.stderr


def test_a_script_error_wins_over_a_taken_port(state_file):
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        p = run_cli(["run", script("syntax_error.lua")],
                    env=agent_env(state_file, HTTP_PORT=port, HTTP_BIND="127.0.0.1"))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "syntax_error.lua:4" in p.stderr, p.stderr


def test_a_script_error_wins_over_a_bad_agenthost_state(tmp_path):
    p = run_cli(["run", script("syntax_error.lua")],
                env=agent_env(str(tmp_path / "no" / "such" / "dir.db"), HTTP_PORT=0))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "syntax_error.lua:4" in p.stderr, p.stderr


def test_a_taken_port_while_the_main_chunk_never_ends_exits_after_shutdown_timeout(state_file,
                                                                                  tmp_path):
    """The start failed but the script's load cannot be joined (a compiled loop: nothing stops
    it): the agent exits 1 naming the port once SHUTDOWN_TIMEOUT has passed, instead of hanging
    with no loop to handle signals."""
    import socket
    path = tmp_path / "endless.lua"
    path.write_text("local n = 0\nwhile true do n = n + 1 end\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        p = run_cli(["run", str(path)],
                    env=agent_env(state_file, HTTP_PORT=port, HTTP_BIND="127.0.0.1",
                                  SHUTDOWN_TIMEOUT="1"), timeout=60)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert str(port) in p.stderr and "main chunk was still running" in p.stderr, p.stderr


def test_commands_while_the_main_chunk_loads_at_start_are_served_once_it_runs(
        fleet, state_file, tmp_path):
    """A reload and a cluster pause sent while the main chunk still runs: the local pause is
    refused (still starting), the reload wakes the main chunk's sleep and is served once the
    agent runs, and the agent ends paused by the cluster command."""
    import threading
    agent, go = _waiting_agent(fleet, tmp_path, state_file)
    r = agent.post("/api/agent/pause")
    assert r.status == 409 and "starting" in r.body, r.body
    replies = {}
    reloader = threading.Thread(
        target=lambda: replies.setdefault("reload", agent.post("/api/agent/reload", timeout=30)))
    reloader.start()
    agent.wait_log(r"main chunk done \(woken: true\)", timeout=15)
    r = agent.post("/api/cluster/pause?reason=during-load")
    assert r.status == 200, r.body
    go.write_text("")  # the reload's main chunk waits for it
    reloader.join(timeout=30)
    assert replies["reload"].status == 200, replies["reload"].body
    agent.wait_state("paused", timeout=15)
    assert agent.get("/readyz").status == 503
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()
    agent.wait_log(r"on_shutdown ran")
