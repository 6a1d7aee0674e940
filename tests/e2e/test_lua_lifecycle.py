"""What a script gets at the edges of its life: a reload or a shutdown gives back agent.queue's
claims (after on_reload), init can wait with agent.sleep, a local resume cannot release the hold
of a cluster shutdown, agent.shutdown() ends the agent, and mistakes are reported at the
script's line (unknown hooks, agent.metrics misuse)."""
import signal
import sys

from agenthost_harness import (MONGO_DIR, agent_env, mongo_agent_env, run_cli, wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

HOLDER = """
local agent = require "agent"
local q = agent.queue.open {{ collection = "held_jobs", lease = 300, owner = "holder" }}
local M = {{}}
function M.batch()
    if {claim} and q.held_count == 0 then
        local jobs = assert(q:claim(3))
        agent.log.info("holding %d job(s)", #jobs)
    end
    agent.sleep(0.2)
    return 0
end
function M.on_reload(ctx)
    agent.log.info("on_reload of %s while holding %d", ctx.script, q.held_count)
end
return M
"""


def start_holder(fleet, tmp_path, mongo_server):
    coll = mongo_server.client().agenthost.held_jobs
    coll.delete_many({})
    coll.insert_many([{"_id": i, "status": "pending", "attempts": 0, "payload": i}
                      for i in range(3)])
    path = tmp_path / "holder.lua"
    path.write_text(HOLDER.format(claim="true"))
    agent = fleet.start(str(path), env=mongo_agent_env(mongo_server.uri), name="holder")
    agent.wait_log(r"holding 3 job\(s\)", timeout=20)
    assert coll.count_documents({"status": "claimed", "owner": "holder"}) == 3
    return agent, path, coll


def test_a_reload_runs_on_reload_and_gives_the_old_scripts_claims_back(fleet, tmp_path,
                                                                       mongo_server):
    agent, path, coll = start_holder(fleet, tmp_path, mongo_server)
    path.write_text(HOLDER.format(claim="false"))
    r = agent.post("/api/agent/reload")
    assert r.status == 200, r.body
    agent.wait_log(r"on_reload of .*holder.lua while holding 3")
    agent.wait_log(r"released 3 claim\(s\)")
    docs = list(coll.find({}))
    assert [(d["status"], d["attempts"]) for d in docs] == [("pending", 0)] * 3, docs
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0, agent.log_text()


def test_a_clean_shutdown_gives_the_claims_back(fleet, tmp_path, mongo_server):
    agent, _, coll = start_holder(fleet, tmp_path, mongo_server)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0, agent.log_text()
    assert coll.count_documents({"status": "pending", "attempts": 0}) == 3
    assert "released 3 claim(s)" in agent.log_text()


def test_unknown_on_keys_are_reported_by_check_with_the_closest_hook(tmp_path):
    path = tmp_path / "typo.lua"
    path.write_text("return { batch = function() end, on_puase = function() end,\n"
                    "  on_whatever = function() end, on_reload = function() end }\n")
    r = run_cli(["check", str(path)])
    assert r.returncode == 0, r.stderr
    assert "'on_puase', which is not a hook (did you mean 'on_pause'?)" in r.stderr
    assert "'on_whatever', which is not a hook (hooks: on_pause," in r.stderr
    assert "on_reload'" not in r.stderr


def test_agent_module_misuse_is_reported_at_the_scripts_line(tmp_path):
    cases = {
        'agent.metrics.counter("x_total")\nagent.metrics.gauge("x_total")': 4,
        'agent.metrics.gauge("g"):set("high")': 3,
        'agent.metrics.counter("bad name")': 3,
        'agent.log.info("%d items", "many")': 3,
        'local c = agent.metrics.counter("c_total")\nc.inc(2)': 4,
        'local g = agent.metrics.gauge("g2")\ng.set(2)': 4,
        'agent.metrics.counter("n_total"):inc(-1)': 3,
    }
    for body, line in cases.items():
        path = tmp_path / "misuse.lua"
        path.write_text('local agent = require "agent"\n\n%s\nreturn { batch = function() end }\n'
                        % body)
        r = run_cli(["check", str(path)])
        assert r.returncode == 2, (body, r.stderr)
        first = r.stderr.splitlines()[0]
        assert f"misuse.lua:{line}: " in first and "agent.lua" not in first, (body, first)


SLEEPY_INIT = """
local agent = require "agent"
local M = {}
function M.init()
    local t0 = agent.monotonic()
    local woken = agent.sleep(1.0)
    agent.log.info("init slept %.3f woken=%s state=%s", agent.monotonic() - t0, tostring(woken),
                   agent.state())
end
function M.batch() agent.sleep(0.2) return 0 end
return M
"""


def test_agent_sleep_in_init_waits_although_the_startup_sync_is_pending(fleet, tmp_path,
                                                                        state_file):
    path = tmp_path / "sleepy.lua"
    path.write_text(SLEEPY_INIT)
    a = fleet.start(str(path), env=agent_env(state_file), name="sleepy")
    m = a.wait_log(r"init slept ([0-9.]+) woken=(\w+) state=(\w+)", timeout=15)
    assert float(m.group(1)) >= 0.95 and m.group(2) == "false" and m.group(3) == "starting", \
        m.group(0)
    a.wait_state("running")
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0, a.log_text()


def test_a_sigterm_still_cuts_a_sleep_in_init_short(fleet, tmp_path, state_file):
    path = tmp_path / "sleepy.lua"
    path.write_text(SLEEPY_INIT.replace("agent.sleep(1.0)", "agent.sleep(60)"))
    a = fleet.start(str(path), env=agent_env(state_file), name="sleepy")
    a.signal(signal.SIGTERM)
    m = a.wait_log(r"init slept ([0-9.]+) woken=(\w+)", timeout=15)
    assert float(m.group(1)) < 30 and m.group(2) == "true", m.group(0)
    assert a.wait_exit() == 0, a.log_text()


COUNTER = """
local agent = require "agent"
local M, n = {}, 0
function M.batch()
    n = n + 1
    agent.log.info("batch %d", n)
    if n == 3 then
        agent.log.info("asked: %s", tostring(agent.shutdown("done after 3")))
    end
    return 1
end
function M.on_shutdown(ev)
    agent.log.info("on_shutdown source=%s reason=%s after %d", ev.source, ev.reason, n)
end
return M
"""


def test_agent_shutdown_ends_the_agent_after_the_running_batch(fleet, tmp_path, state_file):
    path = tmp_path / "oneshot.lua"
    path.write_text(COUNTER)
    a = fleet.start(str(path), env=agent_env(state_file), name="oneshot")
    assert a.wait_exit() == 0, a.log_text()
    log = a.log_text()
    assert "asked: true" in log
    assert "on_shutdown source=local reason=done after 3 after 3" in log, log
    assert "batch 4" not in log
    assert "Agent shutting down (local command 'shutdown' by script: done after 3)" in log, log


def start_held(fleet, tmp_path, state_file):
    first = fleet.start(str(write_idle(tmp_path)), env=agent_env(state_file), name="first")
    first.wait_state("running", timeout=15)
    assert first.post("/api/cluster/shutdown?reason=gone").status == 200
    assert first.wait_exit() == 0, first.log_text()
    late = fleet.start(str(write_idle(tmp_path)), env=agent_env(state_file), name="late")
    late.wait_state("paused", timeout=15)
    late.wait_log(r"stays paused until")
    return late


def write_idle(tmp_path):
    path = tmp_path / "idle.lua"
    path.write_text('local agent = require "agent"\n'
                    'return { batch = function() agent.log.info("a batch ran") '
                    'agent.sleep(0.1) return 0 end }\n')
    return path


def test_a_local_resume_does_not_release_the_hold_of_a_cluster_shutdown(fleet, tmp_path,
                                                                        state_file):
    late = start_held(fleet, tmp_path, state_file)
    r = late.post("/api/agent/resume?reason=try")
    assert r.status == 409, r.body
    assert "cluster command is 'shutdown'" in r.json()["error"]
    late.signal(signal.SIGUSR2)
    # the log names the signal and why it is refused
    late.wait_log(r"Local resume by signal SIGUSR2 refused: this agent is held paused because the "
                  r"cluster command is 'shutdown'")
    st = late.state()
    assert st["state"] == "paused" and st["batches"] == 0 and st["cluster_command"] == "shutdown"
    assert "a batch ran" not in late.log_text()
    # a local pause changes nothing; the cluster resume releases the hold
    assert late.post("/api/agent/pause").status == 200
    assert late.post("/api/cluster/resume?reason=back").status == 200
    late.wait_state("running")
    late.wait_log(r"a batch ran")
    # released: an ordinary agent again, local commands work
    assert late.post("/api/agent/pause").status == 200
    late.wait_state("paused")
    assert late.post("/api/agent/resume").status == 200
    late.wait_state("running")
    late.signal(signal.SIGTERM)
    assert late.wait_exit() == 0, late.log_text()


def test_a_reload_warns_about_a_misspelled_hook(fleet, tmp_path, state_file):
    path = tmp_path / "typo.lua"
    path.write_text("return { batch = function() return 0 end }\n")
    a = fleet.start(str(path), env=agent_env(state_file), name="typo")
    a.wait_state("running")
    path.write_text("return { batch = function() return 0 end, on_shutdwn = function() end }\n")
    assert a.post("/api/agent/reload").status == 200
    a.wait_log(r"'on_shutdwn', which is not a hook \(did you mean 'on_shutdown'\?\)")
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0, a.log_text()
