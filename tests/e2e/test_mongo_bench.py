"""MongoDB control benchmark (opt-in: AGENTHOST_BENCH=1; not part of the default run).

For each watch mode, starts BENCH_AGENTS agents (default 20) on the test server and measures
  * propagation: from the moment the POST /api/cluster/{pause,resume} is sent (an upper bound:
    the issuing agent's write is included) to the moment each agent's hook ran (wall clock recorded by tests/e2e/scripts/mongo_idle.lua),
    over BENCH_ROUNDS commands (default 20): p50/p99/max per agent and the max per command;
  * idle load: database commands received by the server per agent per minute while nothing
    happens, over BENCH_IDLE_SECONDS (default 60), by command name.
Results are printed and appended as JSON lines to $BENCH_OUT if set."""
import json
import os
import sys
import time

import pytest

from agenthost_harness import (MONGO_DIR, mongo_agent_env, mongo_status, read_events, script,
                               wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

pytestmark = pytest.mark.skipif(os.environ.get("AGENTHOST_BENCH") != "1",
                                reason="benchmark: set AGENTHOST_BENCH=1")

AGENTS = int(os.environ.get("BENCH_AGENTS", "20"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))
IDLE_SECONDS = float(os.environ.get("BENCH_IDLE_SECONDS", "60"))
POLL = float(os.environ.get("BENCH_POLL_INTERVAL", "1"))
MODES = {"change_streams": {}, "polling": {"ENABLE_CHANGE_STREAMS": "false",
                                           "CONTROL_POLLING_INTERVAL": POLL}}


def percentile(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))
    return values[k]


@pytest.mark.parametrize("mode", list(MODES))
def test_bench_propagation_and_idle_load(fleet, tmp_path, mongo_server, mode):
    agents = []
    for i in range(AGENTS):
        events = tmp_path / f"b{i}.jsonl"
        a = fleet.start(script("mongo_idle.lua"),
                        env=mongo_agent_env(mongo_server.uri, events, **MODES[mode]),
                        name=f"bench-{i}")
        a.events = str(events)
        agents.append(a)
    for a in agents:
        a.wait_state("running", timeout=30)
        wait_for(lambda a=a: mongo_status(a)["watch_mode"] == mode, 30, message="mode")

    per_agent, per_command, post_ms = [], [], []
    for r in range(ROUNDS):
        cmd = "pause" if r % 2 == 0 else "resume"
        hook = "on_pause" if cmd == "pause" else "on_resume"
        sent = time.time()
        reply = agents[r % AGENTS].post(f"/api/cluster/{cmd}?reason=bench")
        post_ms.append((time.time() - sent) * 1000.0)
        assert reply.status == 200, reply.body
        version = reply.json()["version"]
        times = []
        for a in agents:
            ev = wait_for(lambda a=a: [e for e in read_events(a.events)
                                       if e["ev"] == hook and e["version"] == version],
                          60, interval=0.005, message=f"{a.name} {hook} v{version}")
            times.append(max(0.0, ev[0]["t"] - sent) * 1000.0)
        per_agent.extend(times)
        per_command.append(max(times))

    mongo_server.reset_stats()
    time.sleep(IDLE_SECONDS)  # a measurement window, not a synchronisation
    counts = mongo_server.stats()
    counts.pop("testControl", None)
    per_min = {k: round(v / AGENTS * 60.0 / IDLE_SECONDS, 2) for k, v in sorted(counts.items())}
    result = {
        "mode": mode, "agents": AGENTS, "rounds": ROUNDS,
        "poll_interval": POLL if mode == "polling" else None,
        "post_ms": {"p50": round(percentile(post_ms, 50), 1),
                    "max": round(max(post_ms), 1)},
        "propagation_ms_per_agent": {"p50": round(percentile(per_agent, 50), 1),
                                     "p99": round(percentile(per_agent, 99), 1),
                                     "max": round(max(per_agent), 1)},
        "propagation_ms_all_agents": {"p50": round(percentile(per_command, 50), 1),
                                      "p99": round(percentile(per_command, 99), 1),
                                      "max": round(max(per_command), 1)},
        "idle_ops_per_agent_per_minute": per_min,
        "idle_ops_per_agent_per_minute_total": round(sum(per_min.values()), 2),
    }
    print("\nBENCH " + json.dumps(result))
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "a") as f:
            f.write(json.dumps(result) + "\n")
