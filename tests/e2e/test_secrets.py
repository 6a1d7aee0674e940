"""Credentials never leave the process (docs/OPERATIONS.md, "Secrets"): a sentinel password in
MONGODB_URI / AGENT_MONGODB_URI and a sentinel AGENT_API_TOKEN never appear in stdout, stderr,
any HTTP body or `ctl`'s output, on every path that reports a URI or a failure: a bad scheme, a
bad option, an unreachable host, a refused authentication, agent.mongo, `agenthost check`,
`ctl` errors and the JSON log format. Also: store errors that name the real problem."""
import json
import os
import sys

import pytest

from agenthost_harness import (MONGO_DIR, free_port, mongo_status, run_cli, script, wait_for)

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

PASSWORD = "S3ntinelPw"
TOKEN = "T0kenSentinel"
LEAKY = script("leaky.lua")


def assert_clean(*texts):
    for text in texts:
        assert PASSWORD not in text, text
        assert TOKEN not in text, text


def env_for(**extra):
    env = {"LOG_FORMAT": "text", "AGENT_API_TOKEN": TOKEN}
    env.update(extra)
    return env


@pytest.mark.parametrize("uri", [
    f"mongdb://admin:{PASSWORD}@db1:27017/?replicaSet=rs0",          # bad scheme
    f"mongodb:/admin:{PASSWORD}@db1",                                 # missing slash
    f"mongodb://admin:{PASSWORD}@/x",                                 # the driver refuses it
    f"mongodb://admin:{PASSWORD}@db1/?authMechanism=BOGUS",           # unknown mechanism
    f"mongodb://admin@db1/?authMechanism=MONGODB-AWS&authMechanismProperties="
    f"AWS_SESSION_TOKEN:{PASSWORD}&authMechanism=BOGUS",
])
def test_a_refused_uri_is_reported_without_its_password(tmp_path, uri):
    r = run_cli(["run", LEAKY], env=env_for(MONGODB_URI=uri, HTTP_PORT="0"))
    assert r.returncode == 2, r.stderr
    assert "MONGODB_URI" in r.stderr
    assert_clean(r.stdout, r.stderr)
    if "invalid MONGODB_URI=" in r.stderr:  # the URI is shown, its password is not
        assert "admin:***@" in r.stderr
    r = run_cli(["run", LEAKY, "--mongodb-uri", uri], env=env_for(HTTP_PORT="0"))
    assert r.returncode == 2
    assert_clean(r.stdout, r.stderr)


def test_a_uri_given_where_none_is_expected_is_shown_redacted():
    r = run_cli(["run", LEAKY, f"mongodb://u:{PASSWORD}@h"], env=env_for())
    assert r.returncode == 2
    assert "mongodb://u:***@h" in r.stderr
    assert_clean(r.stdout, r.stderr)


def test_unknown_auth_mechanism_is_a_configuration_error():
    r = run_cli(["run", LEAKY], env=env_for(
        MONGODB_URI=f"mongodb://a:{PASSWORD}@127.0.0.1:{free_port()}/?authMechanism=BOGUS",
        HTTP_PORT="0"), timeout=20)
    assert r.returncode == 2, r.stderr
    assert 'unknown authMechanism "BOGUS"' in r.stderr
    assert "MONGODB_URI MONGODB_URI" not in r.stderr and "MONGODB_URI: MONGODB_URI" not in r.stderr
    assert_clean(r.stdout, r.stderr)
    r = run_cli(["run", LEAKY], env=env_for(
        AGENT_MONGODB_URI=f"mongodb://a:{PASSWORD}@127.0.0.1:1/?authMechanism=scram-sha-9",
        HTTP_PORT="0"), timeout=20)
    assert r.returncode == 2, r.stderr
    assert "AGENT_MONGODB_URI has an unknown authMechanism" in r.stderr
    assert_clean(r.stdout, r.stderr)


def test_the_driver_message_names_the_variable_once():
    r = run_cli(["run", LEAKY], env=env_for(MONGODB_URI=f"mongodb://admin:{PASSWORD}@/x",
                                            HTTP_PORT="0"))
    assert r.returncode == 2
    assert "MONGODB_URI is invalid" in r.stderr
    assert "MONGODB_URI: MONGODB_URI" not in r.stderr
    assert_clean(r.stderr)


def test_check_does_not_print_the_uri_a_script_quotes():
    r = run_cli(["check", LEAKY], env={"MONGODB_URI": f"mongodb://admin:{PASSWORD}@db1/",
                                       "LEAK_IN_ERROR": "1"})
    assert r.returncode == 2
    assert "cannot use mongodb://admin:***@db1/" in r.stderr
    assert_clean(r.stdout, r.stderr)


def bodies(agent, token=TOKEN):
    """Every GET body an operator (or the console) reads, and one refused cluster command."""
    out = []
    for path in ("/readyz", "/healthz", "/api/mongo/status", "/api/agent/state",
                 "/api/cluster/control-state", "/api/cluster/stats", "/metrics", "/"):
        out.append(agent.get(path, timeout=30).body)
    out.append(agent.post("/api/cluster/pause?reason=x", token=token, timeout=30).body)
    return out


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_unreachable_store_and_agent_mongo_never_show_the_password(fleet, tmp_path, log_format):
    port = free_port()
    uri = f"mongodb://admin:{PASSWORD}@127.0.0.1:{port}/?serverSelectionTimeoutMS=300"
    own = f"mongodb://worker:{PASSWORD}x@127.0.0.1:{port}/?serverSelectionTimeoutMS=300"
    a = fleet.start(LEAKY, env=env_for(MONGODB_URI=uri, AGENT_MONGODB_URI=own,
                                       LOG_FORMAT=log_format))
    a.wait_log("find_one failed", timeout=30)
    # Item 4: nothing listens on the port: the message says so.
    a.wait_log(f"connection refused by 127.0.0.1:{port}", timeout=30)
    a.wait_log("uri mongodb://worker:\\*\\*\\*@127.0.0.1")
    a.wait_log("token \\*\\*\\*")
    status = mongo_status(a)
    assert "connection refused" in status["last_error"], status
    ready = a.get("/readyz")
    assert ready.status == 503 and "connection refused" in ready.body, ready.body
    texts = bodies(a)
    ctl = run_cli(["ctl", "pause", "--url", a.url, "--token", TOKEN], timeout=60)
    assert ctl.returncode == 1
    assert "connection refused" in ctl.stdout + ctl.stderr
    a.signal(15)
    a.wait_exit()
    if log_format == "json":
        for line in a.lines:
            if line.startswith("{"):
                json.loads(line)
    assert_clean(a.log_text(), ctl.stdout, ctl.stderr, *texts)


def test_refused_authentication_and_wrong_replica_set_are_named(fleet, tmp_path, mongo_server):
    # The test server refuses every authentication, like a server that does not know the user.
    auth = fleet.start(LEAKY, name="auth", env=env_for(
        MONGODB_URI=f"mongodb://admin:{PASSWORD}@{mongo_server.host}:{mongo_server.port}/"
                    "?replicaSet=rs0&serverSelectionTimeoutMS=500"))
    auth.wait_log("Authentication failed", timeout=30)
    # A replica set name the server does not have: the message says what the server reported.
    rs = fleet.start(LEAKY, name="rs", env=env_for(
        MONGODB_URI=f"mongodb://{mongo_server.host}:{mongo_server.port}/"
                    "?replicaSet=rs1&serverSelectionTimeoutMS=500"))
    rs.wait_log('belongs to replica set "rs0", not "rs1"', timeout=30)
    for a in (auth, rs):
        wait_for(lambda a=a: mongo_status(a)["last_error"], 30, message="last_error")
    assert 'replica set "rs0", not "rs1"' in mongo_status(rs)["last_error"]
    assert "change stream: " + 'the server' in rs.get("/readyz").body
    r = rs.post("/api/cluster/pause?reason=x", token=TOKEN, timeout=30)
    assert r.status == 503 and 'replica set "rs0"' in r.json()["error"], r.body
    texts = bodies(auth)
    for a in (auth, rs):
        a.signal(15)
        a.wait_exit()
    assert_clean(auth.log_text(), rs.log_text(), *texts)


def test_ctl_errors_hide_the_token_and_the_url_credentials():
    url = f"http://ops:{PASSWORD}@127.0.0.1:{free_port()}"
    r = run_cli(["ctl", "state", "--url", url, "--token", TOKEN], timeout=30)
    assert r.returncode == 1
    assert "ops:***@127.0.0.1" in r.stderr
    assert_clean(r.stdout, r.stderr)
    r = run_cli(["ctl", "state", "--url", f"ftp://ops:{PASSWORD}@h"], timeout=30)
    assert r.returncode == 2
    assert_clean(r.stdout, r.stderr)
    r = run_cli(["ctl", "state"], env={"AGENTHOST_URL": url, "AGENT_API_TOKEN": TOKEN},
                timeout=30)
    assert_clean(r.stdout, r.stderr)
