"""The edges of waiting in tasks, through the real binary (fixture task_edges.lua): task:join(0)
times out at once, agent.sleep returns true at once while a command is pending, and
LUA_MEMORY_LIMIT holds inside a spawned task (under an address-space cap, so that a broken limit
fails the test instead of eating the machine's memory)."""
import resource
import signal
import subprocess

import pytest

from agenthost_harness import BINARY, agent_env, count_events, script, wait_events, wait_for

EDGES = script("task_edges.lua")
ADDRESS_SPACE_CAP = 1 << 30  # an idle agent maps about 420 MiB; LUA_MEMORY_LIMIT here is 32 MiB


def start(fleet, state_file, tmp_path, name, preexec_fn=None, **env):
    events = str(tmp_path / f"{name}.jsonl")
    a = fleet.start(EDGES, env=agent_env(state_file, events, **env), name=name,
                    preexec_fn=preexec_fn)
    a.events = events
    return a


def record(events, name):
    return [e for e in events if e["ev"] == name][0]


def stop(a):
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()


def sanitized_binary():
    """AddressSanitizer reserves terabytes of address space: no cap can be set under it."""
    out = subprocess.run(["ldd", BINARY], capture_output=True, text=True).stdout
    return "libasan" in out


def cap_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


def test_join_zero_on_a_sleeping_task_times_out_at_once(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "join0", MODE="join_zero")
    ev = wait_events(a.events, lambda e: count_events(e, "join_zero") == 1, 15, "the join")
    rec = record(ev, "join_zero")
    assert (rec["r"], rec.get("code")) == ("nil", "timeout"), rec
    assert "did not end in time" in rec.get("msg", ""), rec
    assert rec["elapsed"] < 0.1, rec
    assert (rec["ok"], rec["value"]) == (True, "slept"), rec  # it kept running; joined later
    stop(a)


def test_sleep_returns_true_at_once_while_a_command_is_pending(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "pending", MODE="sleep_pending")
    wait_events(a.events, lambda e: count_events(e, "sleeping") == 1, 15, "the first sleep")
    assert a.post("/api/agent/pause?reason=pending").status == 200
    # the second sleep is 10 s long: a sleep that ignored the pending command ends after it
    ev = wait_events(a.events, lambda e: count_events(e, "slept") == 1, 30, "both sleeps")
    rec = record(ev, "slept")
    assert (rec["first"], rec["second"]) == (True, True), rec
    assert rec["elapsed"] < 2, rec
    ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "the pause")
    assert [e["ev"] for e in ev].index("slept") < [e["ev"] for e in ev].index("on_pause")
    stop(a)


def test_memory_limit_holds_inside_a_spawned_task(fleet, state_file, tmp_path):
    cap = None if sanitized_binary() else cap_address_space
    a = start(fleet, state_file, tmp_path, "memory", preexec_fn=cap, MODE="task_memory",
              LUA_MEMORY_LIMIT="32m", BATCH_TIMEOUT=60)
    ev = wait_events(a.events, lambda e: count_events(e, "task_memory") == 1, 60,
                     "the task's end")
    rec = record(ev, "task_memory")
    assert rec["ok"] is False, rec
    assert rec["err"].startswith(
        "not enough memory: the script exceeded LUA_MEMORY_LIMIT (33554432 bytes)"), rec
    assert 1 <= rec["chunks"] < 32, rec  # at most 32 MiB were ever kept
    assert rec["limit"] == 32 * 1024 * 1024 and rec["used"] < rec["limit"], rec
    # the agent goes on: healthy, batches running, no batch error
    assert a.get("/healthz").status == 200
    n = a.state()["batches"]
    wait_for(lambda: a.state()["batches"] >= n + 3, 15, message="later batches")
    assert a.state()["errors"] == 0
    stop(a)


def test_memory_the_system_refuses_is_not_reported_as_the_limit(fleet, state_file, tmp_path):
    if sanitized_binary():
        pytest.skip("no address-space cap under AddressSanitizer: the task would take 2 GiB")
    a = start(fleet, state_file, tmp_path, "system", preexec_fn=cap_address_space,
              MODE="task_memory", LUA_MEMORY_LIMIT="2g", BATCH_TIMEOUT=60)
    ev = wait_events(a.events, lambda e: count_events(e, "task_memory") == 1, 60,
                     "the task's end")
    rec = record(ev, "task_memory")
    assert rec["ok"] is False, rec
    assert "not enough memory" in rec["err"], rec
    assert "LUA_MEMORY_LIMIT" not in rec["err"], rec  # the 2 GiB limit was never reached
    assert 32 < rec["chunks"] < 1024, rec
    assert a.get("/healthz").status == 200
    n = a.state()["batches"]
    wait_for(lambda: a.state()["batches"] >= n + 3, 15, message="later batches")
    stop(a)
