"""agent.http against local HTTP/HTTPS servers started by the tests (real binary, fixture
http_client.lua): statuses, headers, JSON, chunked and large bodies, the body cap, connection and
DNS failures, TLS verification, redirects, keep-alive reuse, proxy variables, a server that never
answers (cut at BATCH_TIMEOUT, or at shutdown), and a request from a hook."""
import json
import signal
import time

import pytest

from agenthost_harness import agent_env, count_events, closed_port, read_events, script, wait_events
from http_fixture import Server, self_signed_cert, tls_context

CLIENT = script("http_client.lua")

# suite_events (module scope) runs the suite once for many tests: keep them on one worker when
# the tests run in parallel (pytest-xdist, --dist loadgroup).
pytestmark = pytest.mark.xdist_group("http_client")


def start(fleet, state_file, tmp_path, name, **env):
    events = str(tmp_path / f"{name}.jsonl")
    a = fleet.start(CLIENT, env=agent_env(state_file, events, **env), name=name)
    a.events = events
    return a


def by_name(events, name):
    return [e for e in events if e["ev"] == name]


@pytest.fixture(scope="module")
def suite_events(tmp_path_factory):
    """Runs the whole suite mode once against fresh servers; returns its records."""
    from agenthost_harness import Fleet
    tmp = tmp_path_factory.mktemp("http_suite")
    cert, key = self_signed_cert(str(tmp))
    fleet = Fleet(tmp)
    try:
        with Server() as plain, Server(tls_context(cert, key)) as tls:
            a = start(fleet, str(tmp / "state.db"), tmp, "suite", MODE="suite", BASE=plain.base,
                      TLS_BASE=tls.base, CA_FILE=cert, CLOSED_PORT=closed_port(),
                      BATCH_TIMEOUT=60)
            ev = wait_events(a.events, lambda e: count_events(e, "suite_done") == 1, 60,
                             "the suite's records")
            assert a.get("/healthz").status == 200
            a.signal(signal.SIGTERM)
            assert a.wait_exit(20) == 0, a.log_text()
            assert not a.find_logs(r"\[ERROR\]"), a.log_text()
            return ev
    finally:
        fleet.close()


def test_any_status_is_a_response(suite_events):
    got = {e["asked"]: e for e in by_name(suite_events, "status")}
    assert sorted(got) == [200, 201, 204, 404, 500, 503]
    for s, e in got.items():
        assert e["status"] == s and "err" not in e, e
        assert e["body"] == ("" if s == 204 else f"status {s}"), e


def test_request_and_response_headers(suite_events):
    e = by_name(suite_events, "headers")[0]
    sent = json.loads(e["body"])
    assert sent["X-Agent"] == "a1" and sent["Accept"] == "text/plain", sent
    assert sent["User-Agent"].startswith("agenthost/"), sent
    assert e["headers"]["x-test"] == "yes"  # names lower-cased
    assert e["headers"]["set-cookie"] == "a=1, b=2"  # repeated headers joined
    assert e["headers"]["content-type"] == "application/json"


def test_json_body_and_query(suite_events):
    e = by_name(suite_events, "json_post")[0]
    echo = json.loads(e["body"])
    assert echo["method"] == "POST"
    assert echo["content_type"] == "application/json"
    assert json.loads(echo["body"]) == {"items": [1, 2, 3], "name": "n"}
    assert echo["query"] == "page=2&q=a%20b%26c"
    put = json.loads(by_name(suite_events, "put_body")[0]["body"])
    assert (put["method"], put["body"], put["content_type"]) == ("PUT", "raw", "text/plain")


def test_large_and_chunked_bodies_and_the_cap(suite_events):
    assert by_name(suite_events, "large")[0]["size"] == 8 * 1024 * 1024
    assert by_name(suite_events, "chunked")[0]["size"] == 3 * 1024 * 1024 + 17
    for name in ("too_large", "too_large_chunked"):
        e = by_name(suite_events, name)[0]
        assert e["code"] == "too_large" and "max_body" in e["err"], e


def test_refused_and_dns_failures(suite_events):
    e = by_name(suite_events, "refused")[0]
    assert e["code"] == "connect", e
    e = by_name(suite_events, "dns")[0]
    assert e["code"] == "resolve", e
    assert "no-such-host.invalid" in e["err"]


def test_redirects(suite_events):
    e = by_name(suite_events, "redirect")[0]
    assert (e["status"], e["body"]) == (200, "status 200"), e
    e = by_name(suite_events, "redirect_off")[0]
    assert e["status"] == 302 and e["headers"]["location"] == "/redirect?n=2", e
    e = by_name(suite_events, "redirect_loop")[0]
    assert e["code"] == "redirects", e


def test_keep_alive_reuses_one_connection(suite_events):
    ports = by_name(suite_events, "keepalive")[0]["ports"]
    assert len(ports) == 5 and "error" not in ports
    assert len(set(ports)) == 1, ports


def test_tls_self_signed_rejected_by_default_accepted_when_told(suite_events):
    e = by_name(suite_events, "tls_default")[0]
    assert e["code"] == "tls", e
    assert by_name(suite_events, "tls_noverify")[0]["status"] == 200
    assert by_name(suite_events, "tls_cafile")[0]["status"] == 200


def test_misuse_raises(suite_events):
    errors = by_name(suite_events, "misuse")[0]["errors"]
    assert "expects a table" in errors[0]
    assert "http:// or https://" in errors[1]
    assert "CR, LF" in errors[2]
    assert "timeout must be" in errors[3]
    assert "not both" in errors[4]
    assert "cannot wait here" in errors[5]


def test_concurrent_requests_from_tasks(suite_events):
    assert by_name(suite_events, "concurrent")[0]["ok"] == 20


def test_proxy_variables_are_honoured(fleet, state_file, tmp_path):
    with Server() as proxy:
        a = start(fleet, state_file, tmp_path, "proxy", MODE="proxy", http_proxy=proxy.base,
                  no_proxy="127.0.0.1", CLOSED_PORT=closed_port())
        ev = wait_events(a.events, lambda e: count_events(e, "direct") == 1, 15, "both requests")
        e = by_name(ev, "proxied")[0]
        assert (e["status"], e["body"]) == (201, "status 201"), e
        assert proxy.requests == 1
        assert by_name(ev, "direct")[0]["code"] == "connect"
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()


def test_server_that_never_answers_is_cut_at_batch_timeout(fleet, state_file, tmp_path):
    with Server() as srv:
        a = start(fleet, state_file, tmp_path, "hang", MODE="hang", BASE=srv.base,
                  BATCH_TIMEOUT=2)
        wait_events(a.events, lambda e: count_events(e, "hang_start") == 1, 15, "request sent")
        ev = wait_events(a.events, lambda e: count_events(e, "hang") == 1, 15, "request cut")
        e = by_name(ev, "hang")[0]
        assert e["code"] == "timeout" and "BATCH_TIMEOUT" in e["err"], e
        assert 1.5 < e["elapsed"] < 6, e
        assert srv.hanging.is_set()
        assert a.get("/healthz").status == 200  # not wedged
        n = a.state()["batches"]
        # the agent goes on with its batches
        wait_events(a.events, lambda e: True, 1)
        deadline = time.monotonic() + 10
        while a.state()["batches"] <= n + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.state()["batches"] > n + 2
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()


def test_sigterm_during_a_hanging_request_runs_on_shutdown_in_time(fleet, state_file, tmp_path):
    with Server() as srv:
        a = start(fleet, state_file, tmp_path, "hangterm", MODE="hang_shutdown", BASE=srv.base,
                  BATCH_TIMEOUT=60, SHUTDOWN_TIMEOUT=3)
        wait_events(a.events, lambda e: count_events(e, "hang_start") == 1, 15, "request sent")
        assert srv.hanging.wait(10)
        t0 = time.monotonic()
        a.signal(signal.SIGTERM)
        assert a.wait_exit(10) == 0, a.log_text()
        assert time.monotonic() - t0 < 3.5
        ev = read_events(a.events)
        e = by_name(ev, "hang")[0]
        assert e["code"] == "cancelled", e
        assert count_events(ev, "on_shutdown") == 1
        assert [x["ev"] for x in ev].index("hang") < [x["ev"] for x in ev].index("on_shutdown")


def test_request_from_on_pause(fleet, state_file, tmp_path):
    with Server() as srv:
        a = start(fleet, state_file, tmp_path, "hook", MODE="webhook", BASE=srv.base)
        a.wait_state("running", timeout=15)
        assert a.post("/api/agent/pause?reason=maintenance").status == 200
        ev = wait_events(a.events, lambda e: count_events(e, "webhook") == 1, 15, "webhook")
        echo = json.loads(by_name(ev, "webhook")[0]["body"])
        assert json.loads(echo["body"]) == {"event": "pause", "reason": "maintenance"}
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()
