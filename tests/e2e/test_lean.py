"""What an idle agent holds, through the binary: the threads it starts are the ones it uses.
A thread that waits for work an agent may never get (the API's store workers, the fleet waiter,
the lease keeper) is started by the first piece of that work, so a fleet of idle agents does not
pay its stack, its start at boot, or its wake-ups (docs/ARCHITECTURE.md, Threads)."""
import os

from agenthost_harness import agent_env, script, wait_for

RECORDER = script("recorder.lua")
SWEEPER = script("lease_sweeper.lua")

# main (libuv loop), Lua worker, store watcher, status writer, HTTP park thread, 2 HTTP threads
IDLE_THREADS = 7


def threads(agent):
    return len(os.listdir(f"/proc/{agent.proc.pid}/task"))


def test_an_idle_agent_starts_only_the_threads_it_uses(fleet, state_file, tmp_path):
    agent = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"))
    agent.wait_state("running", timeout=15)
    assert threads(agent) == IDLE_THREADS
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
    # the fleet's records are read by the fleet waiter: the first listing starts it
    r = agent.get("/api/cluster/agents")
    assert r.status == 200 and "summary" in r.json(), r.body
    assert threads(agent) == with_workers + 1
    r = agent.post("/api/cluster/pause?reason=lean&wait=10", timeout=30)
    assert r.status == 200 and r.json()["wait"]["complete"] is True, r.body
    assert threads(agent) == with_workers + 1  # the same waiter


def test_the_lease_keeper_starts_with_the_first_lease(fleet, state_file, tmp_path):
    events = tmp_path / "sweep.jsonl"
    agent = fleet.start(SWEEPER, env=agent_env(state_file, events, SWEEP_EVERY="1"))
    agent.wait_state("running", timeout=15)
    wait_for(lambda: events.exists() and '"held":true' in events.read_text(), 20,
             message="a sweep run holding the lease")
    assert threads(agent) == IDLE_THREADS + 1  # the keeper; nothing else was asked of it
