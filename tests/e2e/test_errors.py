"""Errors name the real problem, and settings read the way operators write them: durations with
units (BATCH_TIMEOUT=1s, SHUTDOWN_TIMEOUT=2m), sizes as 8MB or 8m; a script that exceeds
LUA_MEMORY_LIMIT gets its line and traceback like any other error."""
import textwrap

import pytest

from agenthost_harness import agent_env, run_cli


def write_script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


SLEEPER = """
    local agent = require "agent"
    local M = {}
    function M.batch()
        local t0 = agent.monotonic()
        local ok, msg, code = agent.sleep(60)
        agent.log.info(string.format("sleep ended: %s after %.1fs", tostring(code),
                                     agent.monotonic() - t0))
    end
    return M
"""


def test_duration_settings_accept_units(fleet, tmp_path, state_file):
    script = write_script(tmp_path, "sleeper.lua", SLEEPER)
    a = fleet.start(script, env=agent_env(state_file, BATCH_TIMEOUT="1s", SHUTDOWN_TIMEOUT="2m",
                                          AGENT_HEARTBEAT_INTERVAL="500ms",
                                          LUA_MEMORY_LIMIT="64MB"))
    line = a.wait_log(r"sleep ended: timeout after (\d+\.\d)s", timeout=30)
    assert float(line.group(1)) < 30  # BATCH_TIMEOUT=1s, not 1 minute or refused
    r = run_cli(["run", script], env=agent_env(state_file, BATCH_TIMEOUT="5 minutes"))
    assert r.returncode == 2
    assert "BATCH_TIMEOUT" in r.stderr and "90s, 5m or 1h" in r.stderr


MEMORY_HOG = """
    local agent = require "agent"
    jit.off() -- interpreted, so the failing line is known even on later batches
    local M = {}
    local keep = {}
    local function grow()
        for i = 1, 1e7 do
            keep[#keep + 1] = string.rep("x", 100) .. i -- line 8
        end
    end
    function M.batch()
        keep = {}
        grow()
    end
    return M
"""


def test_memory_limit_error_names_the_line_and_has_a_traceback(fleet, tmp_path, state_file):
    path = write_script(tmp_path, "hog.lua", MEMORY_HOG)
    a = fleet.start(path, env=agent_env(state_file, LUA_MEMORY_LIMIT="8MB"))
    a.wait_log(r"Lua error in batch .*not enough memory: the script exceeded "
               r"LUA_MEMORY_LIMIT \(8388608 bytes\) at .*hog\.lua:8$", timeout=30)
    a.wait_log(r"in function 'grow'|in upvalue 'grow'|in function <.*hog\.lua:6>")
    a.wait_log(r"Lua error in batch", count=2, timeout=30)  # it goes on, and the state is usable
    assert a.state()["state"] == "running"


@pytest.mark.parametrize("table,message", [
    ("{ Batch = function() end }",
     "script does not define function batch (it defines 'Batch': did you mean 'batch'?)"),
    ("{ bacth = function() end }",
     "script does not define function batch (it defines 'bacth': did you mean 'batch'?)"),
])
def test_a_misspelt_batch_is_named(tmp_path, table, message):
    path = write_script(tmp_path, "typo.lua", "return " + table + "\n")
    r = run_cli(["check", path])
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def test_misspelt_contract_names_get_a_suggestion(tmp_path):
    path = write_script(tmp_path, "typo.lua", """
        return { batch = function() end, Init = function() end, init_ = function() end,
                 onPause = function() end, On_Resume = function() end, on_shutdwn = 1,
                 helper = function() end }
    """)
    r = run_cli(["check", path])
    assert r.returncode == 0, r.stderr
    for key, meant, kind in (("Init", "init", "a contract function"),
                             ("init_", "init", "a contract function"),
                             ("onPause", "on_pause", "a hook"),
                             ("On_Resume", "on_resume", "a hook"),
                             ("on_shutdwn", "on_shutdown", "a hook")):
        assert f"has '{key}', which is not {kind} (did you mean '{meant}'?)" in r.stderr, r.stderr
    assert "helper" not in r.stderr


def test_an_unknown_command_gets_a_suggestion():
    r = run_cli(["cheque", "x.lua"])
    assert r.returncode == 2
    assert 'unknown command "cheque" (did you mean "check"?)' in r.stderr
    r = run_cli(["ctl", "relaod"])
    assert r.returncode == 2
    assert 'unknown command "relaod" (did you mean "reload"?)' in r.stderr


ITERATIONS = """
    VERSION = %d
    local agent = require "agent"
    local M = {}
    function M.init(ctx) agent.log.info("init v%%d iteration=%%d", VERSION, ctx.iteration) end
    function M.batch(ctx)
        agent.log.info("batch v%%d iteration=%%d", VERSION, ctx.iteration)
        agent.sleep(0.05)
    end
    return M
"""


def test_ctx_iteration_counts_the_agents_batches_across_reloads(fleet, tmp_path, state_file):
    path = tmp_path / "count.lua"
    path.write_text(textwrap.dedent(ITERATIONS % 1))
    a = fleet.start(str(path), env=agent_env(state_file))
    a.wait_log("init v1 iteration=0")
    a.wait_log("batch v1 iteration=3", timeout=30)
    path.write_text(textwrap.dedent(ITERATIONS % 2))
    assert a.post("/api/agent/reload?wait=30").status == 200
    started = int(a.wait_log(r"init v2 iteration=(\d+)").group(1))
    assert started >= 3
    first = int(a.wait_log(r"batch v2 iteration=(\d+)", timeout=30).group(1))
    assert first == started + 1
    # The API's `batches` counts finished batches: a running one is counted once it ends.
    batches = a.state()["batches"]
    assert first <= batches + 1
