"""Hot reload (SIGHUP, POST /api/agent/reload), LUA_MEMORY_LIMIT and agent.metrics."""
import signal

from agenthost_harness import agent_env, metric, wait_for

VERSIONED = """
local agent = require "agent"
local batches = agent.metrics.counter("demo_batches_total", "Batches run by the demo script")
local M = {{}}
function M.init() agent.log.info("init script version {version}") end
function M.batch()
    batches:inc()
    agent.log.info("batch from version {version}")
    agent.sleep(0.05)
    return 1
end
function M.on_pause(ev) agent.log.info("paused in version {version}") end
return M
"""


def write_version(path, version):
    path.write_text(VERSIONED.format(version=version))


def start_versioned(fleet, tmp_path, state_file, **env):
    path = tmp_path / "versioned.lua"
    write_version(path, 1)
    a = fleet.start(str(path), env=agent_env(state_file, **env), name="reloader")
    a.wait_state("running", timeout=15)
    a.wait_log(r"batch from version 1")
    return a, path


def test_reload_with_a_good_script_runs_the_new_code_from_the_next_batch(fleet, tmp_path,
                                                                         state_file):
    a, path = start_versioned(fleet, tmp_path, state_file)
    write_version(path, 2)
    r = a.post("/api/agent/reload")
    assert r.status == 200, r.body
    assert r.json()["status"] == "success"
    a.wait_log(r"init script version 2")
    a.wait_log(r"batch from version 2")
    assert metric(a, "agenthost_reloads_total") == 1
    # the script's counter lives in the host: it keeps counting across the reload
    before = metric(a, "demo_batches_total")
    wait_for(lambda: metric(a, "demo_batches_total") > before, 10, message="counter grows")


def test_reload_with_a_syntax_error_keeps_the_old_script(fleet, tmp_path, state_file):
    a, path = start_versioned(fleet, tmp_path, state_file)
    path.write_text("local M = {\nreturn M\n")
    r = a.post("/api/agent/reload")
    assert r.status == 422, r.body
    body = r.json()
    assert body["status"] == "error"
    assert "versioned.lua:" in body["error"] and "previous script keeps running" in body["error"]
    a.wait_log(r"Reload failed, the previous script keeps running")
    assert metric(a, "agenthost_reload_failures_total") == 1
    seen = len(a.find_logs(r"batch from version 1"))
    a.wait_log(r"batch from version 1", count=seen + 2)  # the old script still runs
    assert a.state()["state"] == "running"


def test_reload_without_batch_is_rejected(fleet, tmp_path, state_file):
    a, path = start_versioned(fleet, tmp_path, state_file)
    path.write_text("return {init = function() end}\n")
    r = a.post("/api/agent/reload")
    assert r.status == 422
    assert "batch" in r.json()["error"]


def test_sighup_reloads_and_a_paused_agent_stays_paused(fleet, tmp_path, state_file):
    a, path = start_versioned(fleet, tmp_path, state_file)
    assert a.post("/api/agent/pause").status == 200
    a.wait_state("paused")
    a.wait_log(r"paused in version 1")
    write_version(path, 3)
    a.signal(signal.SIGHUP)
    a.wait_log(r"init script version 3")
    a.wait_log(r"Reloaded script .* \(state: paused\)")
    assert a.state()["state"] == "paused"
    assert a.get("/readyz").status == 503
    assert not a.find_logs(r"batch from version 3")
    assert a.post("/api/agent/resume").status == 200
    a.wait_log(r"batch from version 3")


def test_reload_needs_the_token(fleet, tmp_path, state_file):
    a, _ = start_versioned(fleet, tmp_path, state_file, AGENT_API_TOKEN="t0k")
    assert a.post("/api/agent/reload").status == 401
    assert a.post("/api/agent/reload", token="t0k").status == 200


HOG = """
local agent = require "agent"
local M = {}
function M.batch()
    local t = {}
    for i = 1, 1e9 do t[i] = string.rep("x", 1000) .. i end
end
return M
"""


def test_unbounded_allocation_gets_a_memory_error_and_the_agent_lives(fleet, tmp_path,
                                                                       state_file):
    path = tmp_path / "hog.lua"
    path.write_text(HOG)
    a = fleet.start(str(path), env=agent_env(state_file, LUA_MEMORY_LIMIT="32m"), name="hog")
    a.wait_log(r"not enough memory: the script exceeded LUA_MEMORY_LIMIT \(33554432 bytes")
    wait_for(lambda: a.state()["errors"] >= 2, 15, message="memory errors counted")
    assert a.get("/healthz").status == 200
    assert a.proc.poll() is None
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0


def test_bad_memory_limit_is_a_config_error(fleet, tmp_path, state_file):
    from agenthost_harness import run_cli, script
    for bad in ("lots", "-5", "100k", "12q"):
        r = run_cli([script("recorder.lua")], env={"LUA_MEMORY_LIMIT": bad, "HTTP_PORT": "0"})
        assert r.returncode == 2, (bad, r.stderr)
        assert "LUA_MEMORY_LIMIT" in r.stderr


def test_metric_names_are_validated(fleet, tmp_path, state_file):
    path = tmp_path / "badmetric.lua"
    path.write_text('local agent = require "agent"\n'
                    'agent.metrics.counter("agenthost_batches_total")\n'
                    'return {batch = function() return 0 end}\n')
    from agenthost_harness import run_cli
    r = run_cli(["check", str(path)])
    assert r.returncode == 2
    assert "invalid metric name" in r.stderr


MANY_METRICS = """
local agent = require "agent"
for i = 1, 256 do agent.metrics.counter("many_" .. i .. "_total", "metric " .. i):inc(i) end
local ok, err = pcall(agent.metrics.gauge, "one_too_many")
agent.log.info("257th metric: " .. tostring(ok) .. " " .. tostring(err))
return {batch = function() agent.sleep(0.2) return 0 end}
"""


def test_256_metrics_are_served_and_the_257th_is_refused(fleet, tmp_path, state_file):
    path = tmp_path / "many.lua"
    path.write_text(MANY_METRICS)
    a = fleet.start(str(path), env=agent_env(state_file))
    a.wait_state("running", timeout=15)
    a.wait_log(r"257th metric: false .*too many metrics \(at most 256\)")
    text = a.get("/metrics").body
    for i in (1, 8, 9, 17, 128, 129, 256):  # each side of every growth of the array
        assert f"# HELP many_{i}_total metric {i}\n" in text, i
        assert f"\nmany_{i}_total {i}\n" in text, i
    assert "one_too_many" not in text
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0


SPINNING = """
jit.off()  -- interpreted: hooks (the BATCH_TIMEOUT interrupt) reach it
local agent = require "agent"
local M = {{}}
local function spin(seconds)
    local until_clock = os.clock() + seconds
    while os.clock() < until_clock do local x = {{}} end
end
function M.init()
    agent.log.info("init of version {version}")
    spin({init_seconds})
end
function M.batch()
    agent.log.info("spinning batch of version {version}")
    spin({batch_seconds})
    return 1
end
return M
"""


def write_spinning(path, version, init_seconds=0, batch_seconds=0.05):
    path.write_text(SPINNING.format(version=version, init_seconds=init_seconds,
                                    batch_seconds=batch_seconds))


def test_a_reloaded_scripts_endless_init_is_interrupted_and_the_old_script_keeps_running(
        fleet, tmp_path, state_file):
    path = tmp_path / "spinning.lua"
    write_spinning(path, 1)
    a = fleet.start(str(path), env=agent_env(state_file, BATCH_TIMEOUT=1), name="reloader")
    a.wait_state("running", timeout=15)
    a.wait_log(r"spinning batch of version 1")
    write_spinning(path, 2, init_seconds=3600)
    r = a.post("/api/agent/reload", timeout=15)
    assert r.status == 422, r.body  # not 202 after 10 s with the agent wedged in init
    assert "BATCH_TIMEOUT" in r.json()["error"], r.body
    assert a.find_logs(r"init of version 2")
    count = len(a.find_logs(r"spinning batch of version 1"))
    a.wait_log(r"spinning batch of version 1", count=count + 3)
    wait_for(lambda: a.get("/healthz").status == 200, 10, message="healthz 200 again")


def test_concurrent_reloads_of_a_broken_script_all_answer_422(fleet, tmp_path, state_file):
    import threading
    path = tmp_path / "spinning.lua"
    write_spinning(path, 1, batch_seconds=1.0)
    a = fleet.start(str(path), env=agent_env(state_file), name="reloader")
    a.wait_state("running", timeout=15)
    a.wait_log(r"spinning batch of version 1")
    count = len(a.find_logs(r"spinning batch of version 1"))
    path.write_text("this is not Lua\n")
    # Both requests arrive while the same batch runs: one load serves both.
    a.wait_log(r"spinning batch of version 1", count=count + 1)
    answers = []
    clients = [threading.Thread(target=lambda: answers.append(
        a.post("/api/agent/reload", timeout=15))) for _ in range(2)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    assert [r.status for r in answers] == [422, 422], [(r.status, r.body) for r in answers]
    for r in answers:
        assert "reload failed, the previous script keeps running" in r.json()["error"]
    assert metric(a, "agenthost_reload_failures_total") == 1  # merged into one load
    assert metric(a, "agenthost_reloads_total") == 0
