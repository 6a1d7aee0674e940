"""Tasks on the Lua worker's loop: agent.spawn, task:join, agent.sleep as a loop timer, and the
cancellation of waits at BATCH_TIMEOUT and at shutdown (the real binary, fixture tasks.lua)."""
import signal
import time

import pytest

from agenthost_harness import agent_env, count_events, read_events, script, wait_events

TASKS = script("tasks.lua")


def start(fleet, state_file, tmp_path, name, **env):
    events = str(tmp_path / f"{name}.jsonl")
    a = fleet.start(TASKS, env=agent_env(state_file, events, **env), name=name)
    a.events = events
    return a


@pytest.mark.parametrize("jit", ["on", "off"])
def test_thousand_tasks_sleeping_one_second_finish_together(fleet, state_file, tmp_path, jit):
    a = start(fleet, state_file, tmp_path, f"many-{jit}", MODE="many", TASKS=1000, SLEEP=1,
              JIT=jit, BATCH_TIMEOUT=30)
    ev = wait_events(a.events, lambda e: count_events(e, "many") == 1, 30, "the batch's record")
    rec = [e for e in ev if e["ev"] == "many"][0]
    assert rec["ok"] == 1000, rec
    assert rec["sum"] == 1000 * 1001 // 2, rec
    # 1000 sequential sleeps would take 1000 s; concurrently they take about one.
    assert 0.9 <= rec["elapsed"] < 5, rec
    assert rec["jit"] is (jit == "on"), rec
    assert a.get("/healthz").status == 200
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()


def test_task_error_surfaces_through_join_and_unjoined_errors_are_logged(fleet, state_file,
                                                                        tmp_path):
    a = start(fleet, state_file, tmp_path, "join", MODE="join_error")
    ev = wait_events(a.events, lambda e: count_events(e, "join_error") == 1, 15, "join record")
    rec = [e for e in ev if e["ev"] == "join_error"][0]
    assert rec["ok"] is False, rec
    assert "task boom" in rec["err"] and "stack traceback" in rec["err"], rec
    assert (rec["ok2"], rec["sum"], rec["x"], rec["again"]) == (True, 42, "x", True), rec
    assert rec["timeout_r"] is True and rec["timeout_code"] == "timeout", rec
    a.wait_log(r"Lua error in a task nobody joined: .*unjoined boom")
    assert not a.find_logs(r"nobody joined: .*task boom")
    st = a.state()
    assert st["errors"] == 0, st  # task failures are not batch failures
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()


def test_pause_arriving_while_tasks_wait_is_applied_when_the_batch_ends(fleet, state_file,
                                                                       tmp_path):
    a = start(fleet, state_file, tmp_path, "pause", MODE="pause_wait", TASKS=20, SLEEP=60)
    wait_events(a.events, lambda e: count_events(e, "waiting") == 1, 15, "tasks waiting")
    t0 = time.monotonic()
    assert a.post("/api/agent/pause").status == 200
    ev = wait_events(a.events, lambda e: count_events(e, "on_pause") == 1, 15, "on_pause")
    assert time.monotonic() - t0 < 10  # the command woke the 60 s sleeps
    ends = [e for e in ev if e["ev"] == "task_end"]
    assert len(ends) == 20 and all(e["woken"] is True for e in ends), ends
    pause = [e for e in ev if e["ev"] == "on_pause"][0]
    assert pause["done"] == 20, pause  # every task had ended before the hook ran
    assert [e["ev"] for e in ev].index("on_pause") > max(
        i for i, e in enumerate(ev) if e["ev"] == "task_end")
    assert a.state()["state"] == "paused"
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()


def test_batch_timeout_cancels_waits_and_the_agent_stays_healthy(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "budget", MODE="budget", TASKS=5, SLEEP=60,
              BATCH_TIMEOUT=1)
    ev = wait_events(a.events, lambda e: count_events(e, "budget") == 1, 15, "budget record")
    rec = [e for e in ev if e["ev"] == "budget"][0]
    assert rec["codes"] == ["true:nil:timeout:timeout"] * 5, rec
    assert rec["main_code"] == "timeout", rec
    assert rec["elapsed"] < 5, rec
    msg = [e for e in ev if e["ev"] == "budget_msg"][0]["msg"]
    assert "BATCH_TIMEOUT" in msg
    st = a.state()
    assert a.get("/healthz").status == 200, st
    assert st["errors"] == 0, st
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()


def test_sigterm_wakes_waiting_tasks_and_on_shutdown_runs(fleet, state_file, tmp_path):
    a = start(fleet, state_file, tmp_path, "term", MODE="shutdown_wait", TASKS=50, SLEEP=60,
              SHUTDOWN_TIMEOUT=10)
    wait_events(a.events, lambda e: count_events(e, "waiting") == 1, 15, "tasks waiting")
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.wait_exit(15) == 0, a.log_text()
    assert time.monotonic() - t0 < 10
    ev = read_events(a.events)
    shut = [e for e in ev if e["ev"] == "on_shutdown"]
    assert len(shut) == 1 and shut[0]["done"] == 50, ev[-3:]


def test_a_sleep_after_idle_batches_lasts_its_time(fleet, state_file, tmp_path):
    # The worker's loop does not run between calls; its clock must not make the first timer of
    # a later call fire early.
    a = start(fleet, state_file, tmp_path, "idle", MODE="sleep_after_idle")
    ev = wait_events(a.events, lambda e: count_events(e, "slept") == 1, 20, "the sleep")
    rec = [e for e in ev if e["ev"] == "slept"][0]
    assert rec["idle_batches"] == 5 and rec["elapsed"] >= 0.45, rec
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()
