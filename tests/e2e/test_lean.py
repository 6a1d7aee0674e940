"""What an idle agent holds, through the binary: the threads it starts are the ones it uses.
A thread that waits for work an agent may never get (the API's store workers, the fleet waiter,
the HTTP park thread, the lease keeper) is started by the first piece of that work, so a fleet of idle agents does not
pay its stack, its start at boot, or its wake-ups (docs/ARCHITECTURE.md, Threads)."""
import os
import threading

from agenthost_harness import agent_env, script, wait_for

RECORDER = script("recorder.lua")
SWEEPER = script("lease_sweeper.lua")

# main (libuv loop), Lua worker, store watcher, status writer, the HTTP thread
IDLE_THREADS = 5


def threads(agent):
    return len(os.listdir(f"/proc/{agent.proc.pid}/task"))


def test_an_idle_agent_starts_only_the_threads_it_uses(fleet, state_file, tmp_path):
    agent = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"))
    agent.wait_state("running", timeout=15)
    assert threads(agent) == IDLE_THREADS
    # and only the agent's own log lines: no library printed to stderr at start
    assert all(line.startswith("[") for line in agent.log_text().splitlines() if line), \
        agent.log_text()
    assert agent.get("/healthz").status == 200 and agent.get("/metrics").status == 200
    assert threads(agent) == IDLE_THREADS  # answered from memory
    # a cluster command is store work: a store worker starts (a second one only when a call
    # finds the first busy), and stays for the next ones
    assert agent.post("/api/cluster/pause?reason=lean").status == 200
    agent.wait_state("paused", timeout=15)
    assert agent.get("/api/cluster/history").status == 200
    assert agent.post("/api/cluster/resume?reason=lean").status == 200
    agent.wait_state("running", timeout=15)
    with_workers = threads(agent)
    assert with_workers in (IDLE_THREADS + 1, IDLE_THREADS + 2), with_workers
    # the fleet's records are read by the fleet waiter: the first listing starts it, and the
    # park thread, which holds the listing's request until the waiter answers it
    r = agent.get("/api/cluster/agents")
    assert r.status == 200 and "summary" in r.json(), r.body
    assert threads(agent) == with_workers + 2
    r = agent.post("/api/cluster/pause?reason=lean&wait=10", timeout=30)
    assert r.status == 200 and r.json()["wait"]["complete"] is True, r.body
    assert threads(agent) == with_workers + 2  # the same waiter and park thread
    r = agent.post("/api/agent/reload?wait=10", timeout=30)
    assert r.status == 200, r.body
    r = agent.post("/api/cluster/resume?reason=lean&wait=10", timeout=30)
    assert r.status == 200 and r.json()["wait"]["complete"] is True, r.body
    assert threads(agent) == with_workers + 2  # and it stays for the next ones


def test_a_shutdown_with_the_first_request_parked_joins_the_park_thread(fleet, state_file,
                                                                         tmp_path):
    """The park thread starts with the first parked request: a reload parked behind a long batch
    is answered at shutdown, and the agent exits 0 with every thread joined."""
    events = tmp_path / "ev.jsonl"
    agent = fleet.start(RECORDER, env=agent_env(state_file, events, BATCH_SECONDS="2",
                                                BATCH_TIMEOUT="30", SHUTDOWN_TIMEOUT="20"))
    agent.wait_state("running", timeout=15)
    before = threads(agent)
    result = {}

    def reload():
        result["r"] = agent.post("/api/agent/reload?wait=30", timeout=60)

    t = threading.Thread(target=reload)
    t.start()
    wait_for(lambda: threads(agent) == before + 1, 15, message="the park thread started")
    agent.signal(15)
    t.join(timeout=60)
    assert "r" in result and result["r"].status in (200, 202, 503), result
    assert agent.wait_exit(timeout=30) == 0, agent.log_text()


def test_the_lease_keeper_starts_with_the_first_lease(fleet, state_file, tmp_path):
    events = tmp_path / "sweep.jsonl"
    agent = fleet.start(SWEEPER, env=agent_env(state_file, events, SWEEP_EVERY="1"))
    agent.wait_state("running", timeout=15)
    wait_for(lambda: events.exists() and '"held":true' in events.read_text(), 20,
             message="a sweep run holding the lease")
    assert threads(agent) == IDLE_THREADS + 1  # the keeper; nothing else was asked of it
