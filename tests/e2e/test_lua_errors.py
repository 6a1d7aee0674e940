"""Bad scripts and misbehaving Lua: syntax errors, runtime errors, failing hooks, overruns."""
import signal

from agenthost_harness import (agent_env, count_events, metric, run_cli, script, wait_events,
                               wait_for)


def test_syntax_error_exits_2_naming_file_and_line(state_file):
    p = run_cli(["run", script("syntax_error.lua")], env=agent_env(state_file, HTTP_PORT=0))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "syntax_error.lua:4" in p.stdout + p.stderr, (p.stdout, p.stderr)


def test_runtime_error_in_batch_is_counted_and_agent_stays_up(fleet, state_file):
    a = fleet.start(script("batch_error.lua"), env=agent_env(state_file), name="err")
    # Backoff 0.5 s, then 1 s: a second error comes well within the deadline.
    wait_for(lambda: a.state()["errors"] >= 2, 15, message="two batch errors counted")
    assert a.proc.poll() is None
    st = a.state()
    assert st["state"] == "running"
    assert a.get("/healthz").status == 200
    a.wait_log(r"boom from fixture batch 1")
    a.wait_log(r"stack traceback")
    a.wait_log(r"explode_deeply")  # the traceback names the failing function
    # The counter agrees with the state's count (both grow only after another backoff).
    errors = a.state()["errors"]
    assert errors >= 2
    assert metric(a, "agenthost_batch_errors_total") in (errors, errors + 1)
    assert metric(a, "agenthost_hook_errors_total") == 0


def test_batch_recovers_after_errors(fleet, state_file):
    a = fleet.start(script("batch_error.lua"), env=agent_env(state_file, FAIL_TIMES=1),
                    name="recover")
    wait_for(lambda: a.state()["batches"] >= 3, 15, message="batches after an error")
    assert a.state()["errors"] == 1


def test_error_in_hook_still_transitions(fleet, state_file, tmp_path):
    events = str(tmp_path / "hook.jsonl")
    a = fleet.start(script("recorder.lua"),
                    env=agent_env(state_file, events, FAIL_HOOK="on_pause"), name="hook")
    a.wait_state("running", timeout=15)
    r = a.post("/api/cluster/pause?reason=hook+test")
    assert r.status == 200, r.body
    a.wait_state("paused")
    a.wait_log(r"fixture failure in on_pause")
    assert a.find_logs(r"on_pause"), a.log_text()
    ev = wait_events(events, lambda e: count_events(e, "on_pause") == 1, 10, "on_pause ran")
    i = next(i for i, e in enumerate(ev) if e["ev"] == "on_pause")
    assert count_events(ev[i + 1:], "batch_start") == 0
    assert a.get("/readyz").status == 503
    assert metric(a, "agenthost_hook_errors_total") == 1
    assert metric(a, "agenthost_batch_errors_total") == 0
    # Resuming still works after the failed hook.
    assert a.post("/api/cluster/resume").status == 200
    a.wait_state("running")
    assert metric(a, "agenthost_hook_errors_total") == 1  # on_resume did not fail


def test_batch_timeout_interrupts_interpreted_loop(fleet, state_file):
    a = fleet.start(script("busy_interpreted.lua"),
                    env=agent_env(state_file, BATCH_TIMEOUT=1), name="busy")
    wait_for(lambda: a.state()["errors"] >= 1, 20, message="the overrun batch counted as error")
    a.wait_log(r"BATCH_TIMEOUT", 20)  # the counter may be read before the log line
    assert a.proc.poll() is None
    # The interrupted call returned: liveness recovers (until the next batch overruns again,
    # so wait for any 200).
    wait_for(lambda: a.get("/healthz").status == 200, 10, interval=0.05,
             message="healthz 200 after the interrupt")
    assert a.state()["state"] == "running"


COMPUTE_THEN_WAIT = """
local agent = require "agent"
local events = agent.env("EVENTS_FILE")
local done = false
return { batch = function()
    if done then agent.sleep(0.5) return 0 end
    done = true
    local t0 = agent.monotonic()
    while agent.monotonic() - t0 < 0.6 do end -- Lua code, not a wait: the watchdog's to see
    local r, msg, code = agent.sleep(30)
    local f = assert(io.open(events, "a"))
    f:write(agent.json.encode({elapsed = agent.monotonic() - t0, code = code or "none",
                               msg = msg or ""}), "\\n")
    f:close()
    return 0
end }
"""


def test_batch_timeout_counts_from_the_calls_start_when_it_computes_then_waits(fleet, state_file,
                                                                              tmp_path):
    # No clock is read per call: the call's start is stamped when first seen running (the
    # watchdog's tick or its first wait). Its waits are still cut at BATCH_TIMEOUT, never before.
    path = tmp_path / "compute_then_wait.lua"
    path.write_text(COMPUTE_THEN_WAIT)
    events = str(tmp_path / "ctw.jsonl")
    fleet.start(str(path), env=agent_env(state_file, events, BATCH_TIMEOUT=1.5), name="ctw")
    ev = wait_events(events, lambda e: len(e) >= 1, 30, "the batch's sleep ended")[0]
    assert ev["code"] == "timeout" and "BATCH_TIMEOUT" in ev["msg"], ev
    assert ev["elapsed"] >= 1.45, ev  # from the call's start, never earlier
    assert ev["elapsed"] < 15, ev  # at most a watchdog interval later (and load), never the 30 s


COMPUTE_WAIT_UNWIND = """
local agent = require "agent"
local events = agent.env("EVENTS_FILE")
local done = false
local function busy(seconds) -- interpreted, so that an interrupt would stop it
    local t0 = agent.monotonic()
    while agent.monotonic() - t0 < seconds do end
end
jit.off(busy)
return { batch = function()
    if done then agent.sleep(0.5) return 0 end
    done = true
    busy(0.6) -- Lua code first: the watchdog's tick stamps the call, its ticks then fall at the
              -- deadline's instant
    local r, msg, code = agent.sleep(30)
    busy(0.3) -- the script unwinds through code of its own after the "timeout"
    local f = assert(io.open(events, "a"))
    f:write(agent.json.encode({code = code or "none"}), "\\n")
    f:close()
    return 0
end }
"""


def test_a_call_unwinding_after_its_deadline_is_not_interrupted(fleet, state_file, tmp_path):
    """After the deadline cut its waits, a call runs its own code for a while (here 0.3 s) and
    is not interrupted as an overrun: the watchdog leaves it 0.5 s (docs/LUA.md)."""
    path = tmp_path / "unwind.lua"
    path.write_text(COMPUTE_WAIT_UNWIND)
    events = str(tmp_path / "unwind.jsonl")
    a = fleet.start(str(path), env=agent_env(state_file, events, BATCH_TIMEOUT=1.5), name="unwind")
    ev = wait_events(events, lambda e: len(e) >= 1, 30, "the unwinding call's record")[0]
    assert ev["code"] == "timeout", ev
    assert not a.find_logs(r"interrupting it"), a.log_text()
    assert "Lua error" not in a.log_text(), a.log_text()


def test_jit_endless_loop_cannot_wedge_shutdown(fleet, state_file):
    a = fleet.start(script("jit_forever.lua"),
                    env=agent_env(state_file, BATCH_TIMEOUT=1, SHUTDOWN_TIMEOUT=2), name="jit")
    a.wait_log(r"jit batch starting", timeout=15)
    a.wait_log(r"BATCH_TIMEOUT", timeout=15)
    wait_for(lambda: a.get("/healthz").status == 503, 10, message="healthz 503 while wedged")
    a.signal(signal.SIGTERM)
    rc = a.wait_exit(timeout=2 + 10)
    assert rc != 0, a.log_text()
    assert a.find_logs(r"SHUTDOWN_TIMEOUT"), a.log_text()


def test_check_accepts_good_script():
    p = run_cli(["check", script("recorder.lua")], env={"EVENTS_FILE": "/dev/null"})
    assert p.returncode == 0, (p.stdout, p.stderr)


def test_check_rejects_syntax_error_with_file_and_line():
    p = run_cli(["check", script("syntax_error.lua")])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "syntax_error.lua:4" in p.stdout + p.stderr


def test_check_rejects_script_without_batch():
    p = run_cli(["check", script("no_batch.lua")])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "batch" in p.stdout + p.stderr


def test_a_scripts_multi_line_message_continues_indented_and_control_bytes_are_escaped(
        fleet, state_file, tmp_path):
    path = tmp_path / "multiline.lua"
    path.write_text('local agent = require "agent"\n'
                    'local M = {}\n'
                    'function M.init() agent.log.warn("first\\n[ERROR] forged\\r\\27[31mred") end\n'
                    'function M.batch() agent.sleep(1) return 0 end\n'
                    'return M\n')
    a = fleet.start(str(path), env=agent_env(state_file), name="multiline")
    a.wait_log(r"^\[WARNING\] first$")
    a.wait_log(r"^    \[ERROR\] forged\\r\\x1b\[31mred$")
    assert not a.find_logs(r"^\[ERROR\]"), a.log_text()
