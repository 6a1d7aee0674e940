"""HTTP API: read routes, probes, metrics, and a table of bad input that must be rejected with a
JSON error, without writing anything and without disturbing the agent."""
import re

import pytest

from agenthost_harness import agent_env, parse_metrics, script, wait_for

TOKEN = "s3cret-token"
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def agent(fleet, state_file, tmp_path):
    a = fleet.start(script("recorder.lua"),
                    env=agent_env(state_file, tmp_path / "ev.jsonl", AGENT_API_TOKEN=TOKEN),
                    name="api")
    a.wait_state("running", timeout=15)
    return a


# (name, method, path, send token, expected status, expected Allow header methods)
BAD_INPUT = [
    ("unknown route", "GET", "/api/nope", True, 404, None),
    ("unknown route under cluster", "GET", "/api/cluster/nope", True, 404, None),
    ("wrong method on a command", "GET", "/api/cluster/pause", True, 405, "POST"),
    ("wrong method on a read", "POST", "/api/cluster/control-state", True, 405, "GET"),
    ("unknown command", "POST", "/api/cluster/explode", True, 400, None),
    ("reason of 5 KiB", "POST", "/api/cluster/pause?reason=" + "r" * 5120, True, 400, None),
    ("invalid UTF-8 reason", "POST", "/api/cluster/pause?reason=%FF", True, 400, None),
    ("invalid UTF-8 updated_by", "POST", "/api/cluster/pause?updated_by=a%C3%28", True, 400,
     None),
    ("huge URL", "POST", "/api/cluster/pause?reason=" + "u" * 16384, True, 413, None),
    ("missing token", "POST", "/api/cluster/pause?reason=x", None, 401, None),
    ("wrong token", "POST", "/api/cluster/pause?reason=x", "nope", 401, None),
    ("empty bearer token", "POST", "/api/cluster/pause?reason=x", "", 401, None),
    ("blank bearer token", "POST", "/api/cluster/pause?reason=x", "   ", 401, None),
    ("prefix of the token", "POST", "/api/cluster/pause?reason=x", TOKEN[:3], 401, None),
    ("missing token on agent route", "POST", "/api/agent/pause", None, 401, None),
    ("limit zero", "GET", "/api/cluster/history?limit=0", True, 400, None),
    ("limit not a number", "GET", "/api/cluster/history?limit=abc", True, 400, None),
    ("limit too large", "GET", "/api/cluster/history?limit=1001", True, 400, None),
    ("limit negative", "GET", "/api/cluster/history?limit=-5", True, 400, None),
    ("limit trailing junk", "GET", "/api/cluster/history?limit=10x", True, 400, None),
]


@pytest.mark.parametrize("name,method,path,token,status,allow", BAD_INPUT,
                         ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_rejected_with_json_error(agent, name, method, path, token, status, allow):
    before = agent.get("/api/cluster/history?limit=1000").json()
    before_cs = agent.get("/api/cluster/control-state").json()
    tok = TOKEN if token is True else token
    r = agent.get(path, token=tok) if method == "GET" else agent.post(path, token=tok)
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert body["status"] == "error", body
    assert isinstance(body["error"], str) and body["error"], body
    if allow is not None:
        allowed = {m.strip() for m in r.headers.get("Allow", "").split(",")}
        assert allow in allowed, r.headers
    # The agent keeps serving and nothing was written.
    assert agent.get("/healthz").status == 200
    assert agent.get("/api/cluster/history?limit=1000").json() == before
    assert agent.get("/api/cluster/control-state").json() == before_cs
    st = agent.state()
    assert st["state"] == "running" and st["local_override"] is False


def test_empty_authorization_schemes_are_rejected(agent):
    for value in ("Bearer", "Bearer ", "bearer\t", "Basic " + TOKEN, TOKEN, ""):
        r = agent.post("/api/agent/pause", headers={"Authorization": value})
        assert r.status == 401, (value, r.status, r.body)
        assert r.headers.get("WWW-Authenticate") == "Bearer", r.headers
    assert agent.state()["state"] == "running"


def test_an_empty_api_token_setting_leaves_commands_open(fleet, state_file, tmp_path):
    a = fleet.start(script("recorder.lua"),
                    env=agent_env(state_file, tmp_path / "ev.jsonl", AGENT_API_TOKEN=""),
                    name="open")
    a.wait_state("running", timeout=15)
    r = a.post("/api/cluster/pause?reason=no+token+configured")
    assert r.status == 200, r.body
    a.wait_state("paused")
    r = a.post("/api/cluster/resume", token="")  # an empty Bearer is no token at all
    assert r.status == 200, r.body
    a.wait_state("running")


def test_right_token_is_accepted(agent):
    r = agent.post("/api/cluster/pause?reason=authorized&updated_by=me", token=TOKEN)
    assert r.status == 200, r.body
    assert r.json()["version"] == 1
    hist = agent.get("/api/cluster/history").json()
    assert hist["count"] == 1 and hist["entries"][0]["reason"] == "authorized"
    agent.wait_state("paused")


def test_reads_need_no_token(agent):
    for path in ("/api/cluster/control-state", "/api/cluster/stats", "/api/cluster/history",
                 "/api/agent/state", "/api/mongo/status", "/healthz", "/readyz", "/metrics"):
        assert agent.get(path).status == 200, path


def test_control_state_and_stats_shape(agent):
    cs = agent.get("/api/cluster/control-state").json()
    assert list(cs) == ["command", "version", "timestamp", "reason", "updated_by", "watch_mode",
                        "note", "expires_at", "drain"]
    assert cs["command"] == "running" and cs["version"] == 0
    assert cs["watch_mode"] == "polling"
    stats = agent.get("/api/cluster/stats").json()
    assert list(stats) == ["watch_mode", "polling_interval", "current_command",
                           "current_version", "last_updated", "updated_by", "reason",
                           "expires_at"]
    assert stats["watch_mode"] == "polling" and stats["current_version"] == 0
    r = agent.post("/api/cluster/pause?reason=shape&updated_by=t", token=TOKEN).json()
    assert list(r) == ["status", "message", "command", "version", "timestamp", "reason",
                       "propagation", "expires_at", "drain"]
    assert TS_RE.match(r["timestamp"]), r
    wait_for(lambda: agent.get("/api/cluster/stats").json()["current_version"] == 1, 10,
             message="stats follow the command")
    stats = agent.get("/api/cluster/stats").json()
    assert stats["current_command"] == "pause" and stats["updated_by"] == "t"
    assert TS_RE.match(stats["last_updated"]), stats


def test_history_defaults_and_limit(agent):
    for i in range(3):
        cmd = "pause" if i % 2 == 0 else "resume"
        assert agent.post(f"/api/cluster/{cmd}?reason=h{i}", token=TOKEN).status == 200
    hist = agent.get("/api/cluster/history?limit=2").json()
    assert hist["count"] == 2
    assert [e["version"] for e in hist["entries"]] == [3, 2]
    e = hist["entries"][0]
    assert list(e) == ["version", "command", "timestamp", "reason", "updated_by", "agent_id",
                       "drain"]
    assert e["updated_by"] == "api" and e["agent_id"] == "api" and e["command"] == "pause"
    assert agent.get("/api/cluster/history").json()["count"] == 3


def test_readyz_explains_why_not_ready(agent):
    assert agent.get("/readyz").status == 200
    agent.post("/api/agent/pause", token=TOKEN)
    agent.wait_state("paused")
    r = agent.get("/readyz")
    assert r.status == 503
    assert "paused" in r.body


def test_mongo_status_reports_embedded_backend(agent):
    st = agent.get("/api/mongo/status").json()
    assert st["backend"] == "embedded", st


def test_metrics_are_prometheus_text_with_the_agents_values(agent):
    wait_for(lambda: agent.state()["batches"] > 0, 10, message="a batch")
    st = agent.state()
    text = agent.get("/metrics").body
    samples = parse_metrics(text)  # fails on any line that is not a sample, HELP or TYPE
    assert samples["agenthost_batches_total"] >= st["batches"] > 0
    assert samples["agenthost_batch_errors_total"] == 0
    assert samples["agenthost_hook_errors_total"] == 0
    assert samples['agenthost_state{state="running"}'] == 1
    assert samples['agenthost_state{state="paused"}'] == 0
    assert samples["agenthost_applied_version"] == st["applied_version"]
    assert samples["agenthost_commands_applied_total"] == 1  # the startup sync
    for family in ("agenthost_batches_total", "agenthost_state"):
        assert re.search(rf"^# TYPE {family} ", text, re.M), text


def test_reason_of_1024_bytes_is_accepted(agent):
    reason = "é" * 512  # 1024 bytes of UTF-8: the limit itself is allowed
    from urllib.parse import quote
    r = agent.post("/api/cluster/pause?reason=" + quote(reason), token=TOKEN)
    assert r.status == 200, r.body
    assert r.json()["reason"] == reason
    assert agent.get("/api/cluster/history").json()["entries"][0]["reason"] == reason


def test_distributed_control_disabled_answers_503(fleet, state_file, tmp_path):
    a = fleet.start(script("recorder.lua"),
                    env=agent_env(state_file, tmp_path / "ev.jsonl",
                                  ENABLE_DISTRIBUTED_CONTROL="false"), name="solo")
    a.wait_state("running", timeout=15)
    for method, path in (("POST", "/api/cluster/pause"), ("GET", "/api/cluster/control-state"),
                         ("GET", "/api/cluster/history")):
        r = a.get(path) if method == "GET" else a.post(path)
        assert r.status == 503, (path, r.status, r.body)
        assert r.json()["status"] == "error" and r.json()["error"], r.body
    assert a.state()["state"] == "running"
    # Local control still works.
    assert a.post("/api/agent/pause").status == 200
    a.wait_state("paused")
