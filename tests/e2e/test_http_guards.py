"""The API refuses what a browser could be turned into and what it does not understand
(docs/API.md, "Requests the API refuses"):

- a POST with a foreign Origin or `Sec-Fetch-Site: cross-site` (CSRF): 403, nothing written;
  same-origin and Origin-less clients (the console, curl, ctl) keep working;
- on a loopback bind, a Host that is not a loopback name (DNS rebinding): 421, GETs too;
  HTTP_ALLOWED_HOSTS adds names;
- a query parameter the route does not know: 400 naming it, nothing written, GETs too."""
import http.client
import json

import pytest

from agenthost_harness import agent_env, run_cli, script

RECORDER = script("recorder.lua")


def request(agent, method, path, headers=None, host=None):
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{agent.port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if method == "POST":
            body = b"x=1"
            conn.putheader("Content-Type", "application/x-www-form-urlencoded")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        else:
            conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def version(agent):
    return agent.get("/api/cluster/control-state").json()["version"]


@pytest.fixture
def agent(fleet, tmp_path, state_file):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl"))
    a.wait_state("running")
    return a


def test_cross_site_posts_are_refused_and_write_nothing(agent):
    before = version(agent)
    status, body = request(agent, "POST", "/api/cluster/pause?reason=csrf",
                           {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert status == 403, body
    assert "cross-site request refused" in json.loads(body)["error"]
    status, body = request(agent, "POST", "/api/cluster/pause?reason=csrf",
                           {"Origin": "http://evil.example"})
    assert status == 403, body
    status, body = request(agent, "POST", "/api/agent/shutdown", {"Sec-Fetch-Site": "cross-site"})
    assert status == 403, body
    status, body = request(agent, "POST", "/api/agent/reload", {"Origin": "null"})
    assert status == 403, body
    assert version(agent) == before
    assert agent.state()["state"] == "running"
    # Same origin (the console's fetch), and clients that send no Origin, keep working.
    status, body = request(agent, "POST", "/api/cluster/pause?reason=console",
                           {"Origin": f"http://127.0.0.1:{agent.port}",
                            "Sec-Fetch-Site": "same-origin"})
    assert status == 200, body
    status, body = request(agent, "POST", "/api/cluster/resume?reason=curl")
    assert status == 200, body
    assert version(agent) == before + 2
    r = run_cli(["ctl", "pause", "--url", agent.url, "--reason", "ctl"])
    assert r.returncode == 0, r.stderr


def test_loopback_bind_answers_only_loopback_hosts(fleet, tmp_path, state_file):
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl",
                                            HTTP_BIND="127.0.0.1",
                                            HTTP_ALLOWED_HOSTS="agents.internal,Ops-Box"))
    a.wait_state("running")
    for path in ("/api/agent/state", "/api/cluster/agents", "/", "/metrics"):
        status, body = request(a, "GET", path, host=f"evil.example:{a.port}")
        assert status == 421, (path, body)
    status, body = request(a, "GET", "/api/agent/state", host=f"evil.example:{a.port}")
    assert "Host 'evil.example:" in json.loads(body)["error"]
    status, _ = request(a, "POST", "/api/cluster/pause", host="rebound.example")
    assert status == 421
    assert a.state()["state"] == "running"
    for host in (f"127.0.0.1:{a.port}", f"localhost:{a.port}", "[::1]", "LOCALHOST",
                 f"agents.internal:{a.port}", "ops-box", f"127.1.2.3:{a.port}"):
        status, body = request(a, "GET", "/api/agent/state", host=host)
        assert status == 200, (host, body)


def test_wildcard_bind_answers_any_host(fleet, tmp_path, state_file):
    # The default bind (0.0.0.0, a pod behind a Service) serves whatever name reaches it.
    a = fleet.start(RECORDER, env=agent_env(state_file, tmp_path / "ev.jsonl",
                                            HTTP_BIND="0.0.0.0"))
    status, body = request(a, "GET", "/api/agent/state", host="agent-1.agents.svc:8000")
    assert status == 200, body


@pytest.mark.parametrize("method,path,name,meant", [
    ("POST", "/api/agent/pause?selector=region%3Deu", "selector", None),  # cluster routes only
    ("POST", "/api/cluster/pause?wiat=10", "wiat", "wait"),
    ("POST", "/api/cluster/pause?if_verison=3", "if_verison", "if_version"),
    ("POST", "/api/cluster/resume?reason=x&Reason=y", "Reason", "reason"),
    ("POST", "/api/agent/pause?wait=5", "wait", None),
    ("POST", "/api/agent/reload?wiat=5", "wiat", "wait"),
    ("GET", "/api/cluster/history?limt=3", "limt", "limit"),
    ("GET", "/api/cluster/agents?verison=2", "verison", "version"),
    ("GET", "/api/agent/state?verbose=1", "verbose", None),
    ("GET", "/readyz?x", "x", None),
])
def test_unknown_query_parameters_are_refused(agent, method, path, name, meant):
    before = version(agent)
    status, body = request(agent, method, path)
    assert status == 400, body
    error = json.loads(body)["error"]
    assert f"unknown query parameter '{name}'" in error
    assert "nothing was done" in error
    if meant:
        assert f"did you mean '{meant}'?" in error
    assert version(agent) == before
    assert agent.state()["state"] == "running"
