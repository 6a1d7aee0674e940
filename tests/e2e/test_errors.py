"""Errors name the real problem, and settings read the way operators write them: durations with
units (BATCH_TIMEOUT=1s, SHUTDOWN_TIMEOUT=2m), sizes as 8MB or 8m; a script that exceeds
LUA_MEMORY_LIMIT gets its line and traceback like any other error."""
import textwrap

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
