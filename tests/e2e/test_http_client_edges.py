"""The edges of agent.http through the real binary (fixture http_edges.lua) against local servers
started by the tests: every letter of a response header name is lower-cased, a request's own
timeout ends it (well before BATCH_TIMEOUT), max_body at its exact edge with and without
Content-Length, and TLS host name verification (a certificate naming only DNS:localhost, made
at test time with the openssl command, is refused for https://127.0.0.1)."""
import signal
import time

from agenthost_harness import agent_env, closed_port, count_events, script, wait_events
from http_fixture import Server, self_signed_cert, tls_context

EDGES = script("http_edges.lua")


def run(fleet, tmp_path, mode, timeout=30, **env):
    """Runs MODE in a fresh agent; returns {name: record} once the batch is done."""
    events = str(tmp_path / f"{mode}.jsonl")
    a = fleet.start(EDGES, env=agent_env(str(tmp_path / "state.db"), events, MODE=mode, **env),
                    name=mode)
    ev = wait_events(events, lambda e: count_events(e, "done") == 1, timeout, f"{mode} done")
    assert a.get("/healthz").status == 200
    a.signal(signal.SIGTERM)
    assert a.wait_exit(20) == 0, a.log_text()
    return {e["ev"]: e for e in ev}


def test_every_letter_of_a_header_name_is_lower_cased(fleet, tmp_path):
    with Server() as srv:
        rec = run(fleet, tmp_path, "header_case", BASE=srv.base)["zone"]
    assert rec["status"] == 200, rec
    assert rec["headers"].get("x-zone") == "z", rec["headers"]
    assert all(name == name.lower() for name in rec["headers"]), rec["headers"]


def test_request_timeout_ends_a_request_nobody_answers(fleet, tmp_path):
    with Server() as srv:
        rec = run(fleet, tmp_path, "timeout", BASE=srv.base, BATCH_TIMEOUT=10)["hang"]
        assert srv.hanging.is_set()
    assert rec.get("code") == "timeout", rec
    assert "BATCH_TIMEOUT" not in rec["err"], rec  # the request's own timeout, not the call's
    assert 0.45 <= rec["elapsed"] < 5, rec


def test_max_body_at_its_edge(fleet, tmp_path):
    with Server() as srv:
        recs = run(fleet, tmp_path, "max_body", BASE=srv.base)
    for over in ("chunked_over", "length_over"):
        assert recs[over].get("code") == "too_large", recs[over]
        assert "max_body" in recs[over]["err"], recs[over]
    for exact in ("chunked_exact", "length_exact"):
        assert (recs[exact].get("status"), recs[exact].get("size")) == (200, 1000000), recs[exact]


def test_tls_certificate_for_another_host_name_is_refused(fleet, tmp_path):
    cert, key = self_signed_cert(str(tmp_path))  # subjectAltName DNS:localhost only
    with Server(tls_context(cert, key)) as srv:
        recs = run(fleet, tmp_path, "tls_host", TLS_PORT=srv.server_address[1], CA_FILE=cert)
    assert recs["by_name"].get("status") == 200, recs["by_name"]  # the CA file is trusted
    rec = recs["by_address"]
    assert rec.get("code") == "tls", rec
    assert "status" not in rec, rec


def test_a_reused_transfer_carries_nothing_of_the_previous_request(fleet, tmp_path):
    """One task's requests one after the other reuse the transfer (and libcurl easy handle) the
    previous one gave back: method, body, headers, query, timeout, max_body, follow_redirects,
    ca_file and tls_verify of a request never reach the next, whether it succeeded, failed,
    timed out or was cancelled in flight; then a reload drops the kept transfers (a fresh state
    makes the same requests again: the agent exits clean, under ASan too)."""
    cert, key = self_signed_cert(str(tmp_path))
    with Server() as srv, Server(tls_context(cert, key)) as tls:
        events = str(tmp_path / "reuse.jsonl")
        a = fleet.start(EDGES, env=agent_env(str(tmp_path / "state.db"), events, MODE="reuse",
                                             BASE=srv.base, TLS_PORT=tls.server_address[1],
                                             CA_FILE=cert, CLOSED_PORT=closed_port(),
                                             BATCH_TIMEOUT=60), name="reuse")
        wait_events(events, lambda e: count_events(e, "done") == 1, 60, "the first round")
        assert a.post("/api/agent/reload").status == 200
        ev = wait_events(events, lambda e: count_events(e, "done") == 2, 60, "the second round")
        assert a.get("/healthz").status == 200
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()
        assert not a.find_logs(r"\[ERROR\]"), a.log_text()
    done = [i for i, e in enumerate(ev) if e["ev"] == "done"]
    for rounds in (ev[:done[0]], ev[done[0] + 1:done[1]]):
        r = {e["ev"]: e for e in rounds}
        assert r["put"]["echo"] == {"method": "PUT", "query": "", "body": "abc",
                                    "content_type": "application/x-www-form-urlencoded"}, r["put"]
        for name in ("get_after_put", "get_after_head", "get_after_post", "no_query",
                     "after_follow", "after_refused", "after_cancel"):
            assert r[name]["status"] == 200, r[name]
            assert r[name]["echo"] == {"method": "GET", "query": "", "body": "",
                                       "content_type": None}, r[name]
        assert "X-One" not in r["headers_after_put"]["echo"], r["headers_after_put"]
        assert (r["head"]["status"], r["head"]["size"]) == (200, 0), r["head"]
        assert r["post_json"]["echo"]["method"] == "POST", r["post_json"]
        assert r["post_json"]["echo"]["body"] == '{"a":1}', r["post_json"]
        assert r["query"]["echo"]["query"] == "a=1", r["query"]
        assert r["short_timeout"]["code"] == "timeout", r["short_timeout"]
        assert r["after_timeout"]["status"] == 200, r["after_timeout"]  # 1.5 s, not cut at 0.5
        assert r["small_max_body"]["code"] == "too_large", r["small_max_body"]
        assert (r["after_max_body"]["status"], r["after_max_body"]["size"]) == (200, 1000)
        assert r["no_follow"]["status"] == 302, r["no_follow"]
        assert r["follow"]["status"] == 200, r["follow"]
        assert r["refused"]["code"] == "connect", r["refused"]
        assert r["cancelled"]["code"] == "cancelled", r["cancelled"]
        assert r["tls_with_ca_file"]["status"] == 200, r["tls_with_ca_file"]
        assert r["tls_without_ca_file"]["code"] == "tls", r["tls_without_ca_file"]
        assert r["tls_unverified"]["status"] == 200, r["tls_unverified"]
        assert r["tls_verified_again"]["code"] == "tls", r["tls_verified_again"]


def test_a_connection_the_server_closed_unannounced_is_not_reused(fleet, tmp_path):
    """The server closes every connection right after its answer without saying so: the next
    request, made at once, finds the kept connection dead (curl's liveness check before a reuse,
    answered from the loop's own view of the socket, or the send) and gets its answer on a new
    connection, 30 times in a row, with no error."""
    with Server() as srv:
        recs = run(fleet, tmp_path, "server_closes", BASE=srv.base)
        served = srv.requests
    for i in range(1, 31):
        assert recs[f"close_{i}"].get("status") == 200, recs[f"close_{i}"]
        assert recs[f"next_{i}"].get("status") == 200, recs[f"next_{i}"]
    assert all("err" not in r for r in recs.values()), recs


def test_every_request_has_curls_retries_however_many_retried_before(fleet, tmp_path):
    """The server drops every request sent on a kept connection (reads it, closes without an
    answer): curl retries each on a new connection. curl counts the retries of an easy handle
    until it is reset (5 at most, "Connection died, tried 5 times"), and a request reuses the
    easy handle of the one before: 8 requests in a row, each retried once, all answered."""
    with Server() as srv:
        recs = run(fleet, tmp_path, "retries", BASE=srv.base)
        served = srv.requests
    for i in range(1, 9):
        assert recs[f"retried_{i}"].get("status") == 200, recs[f"retried_{i}"]
    assert served == 15, served  # the first request, then two for each of the 7 others


def assert_answered_never_on_a_closed_connection(recs, srv, closed):
    for i in range(1, 7):
        assert recs[f"open_{i}"].get("status") == 200, recs[f"open_{i}"]
        assert recs[f"after_{i}"].get("status") == 200, recs[f"after_{i}"]
    assert all("err" not in r for r in recs.values()), recs
    assert closed == 6, closed
    assert srv.after_shut == 0, f"{srv.after_shut} request(s) sent on a connection the server closed"


def test_idle_connections_the_server_closed_while_the_loop_watched_are_not_reused(fleet, tmp_path):
    """Six kept connections; the server closes its side of the five idle ones (an end of stream
    the agent's loop sees on their idle sockets) and of the sixth with its answer: the six
    requests made next never go to a closed one (curl's liveness check before a reuse is
    answered from the loop's view only when the loop saw the connection open), all answered."""
    with Server() as srv:
        recs = run(fleet, tmp_path, "closed_seen", BASE=srv.base)
        closed = len(srv.shut)
        assert_answered_never_on_a_closed_connection(recs, srv, closed)


def test_idle_connections_closed_while_lua_code_runs_are_not_reused(fleet, tmp_path):
    """The server closes the idle connections 30 ms after its answer, while the task runs Lua
    code without waiting (so the loop does not look at the sockets): the loop's last view is then
    too old to answer curl's check, the sockets are asked, no request goes to a closed one."""
    marker = str(tmp_path / "shut")
    with Server() as srv:
        recs = run(fleet, tmp_path, "closed_unseen", BASE=srv.base, MARKER=marker,
                   BATCH_TIMEOUT=60)
        assert_answered_never_on_a_closed_connection(recs, srv, len(srv.shut))


def test_idle_connections_closed_while_the_agent_is_paused_are_not_reused(fleet, tmp_path):
    """The connections are opened in one batch; the agent is paused (no batch, the loop does not
    run), the server closes them all, the agent is resumed: the next batch's requests never go to
    a closed one, and a reload and a shutdown afterwards are clean."""
    marker = str(tmp_path / "shut")
    events = str(tmp_path / "paused.jsonl")
    with Server() as srv:
        a = fleet.start(EDGES, env=agent_env(str(tmp_path / "state.db"), events,
                                             MODE="closed_while_paused", BASE=srv.base,
                                             MARKER=marker), name="paused")
        wait_events(events, lambda e: count_events(e, "opened") == 1, 30, "connections opened")
        assert a.post("/api/agent/pause?reason=closing").status == 200
        a.wait_state("paused")
        closed = srv.shut_idle(marker=marker)
        # Paused for longer than the loop's last look at the sockets is trusted (5 ms): an end
        # of stream that comes sooner after it is the race curl's retry covers (not this test).
        time.sleep(0.1)
        assert a.post("/api/agent/resume").status == 200
        ev = wait_events(events, lambda e: count_events(e, "done") == 1, 30, "requests after")
        assert a.post("/api/agent/reload").status == 200
        assert a.get("/healthz").status == 200
        a.signal(signal.SIGTERM)
        assert a.wait_exit(20) == 0, a.log_text()
        assert not a.find_logs(r"\[ERROR\]"), a.log_text()
        assert_answered_never_on_a_closed_connection({e["ev"]: e for e in ev}, srv, closed)


def test_a_server_that_closes_with_every_answer_never_gets_a_request_on_a_closed_connection(
        fleet, tmp_path):
    """Every answer ends with the server's end of stream in the same TCP segment (the loop's
    report of the answer carries it): each next request, made at once, goes to a new
    connection, ten times in a row, all answered."""
    with Server() as srv:
        recs = run(fleet, tmp_path, "shut_after", BASE=srv.base)
        for i in range(1, 11):
            assert recs[f"shut_{i}"].get("status") == 200, recs[f"shut_{i}"]
        assert srv.after_shut == 0, f"{srv.after_shut} request(s) sent on a closed connection"
        assert srv.requests == 10, srv.requests


def test_the_c_half_refuses_what_is_not_a_live_transfer(fleet, tmp_path):
    """agent.http.core's wait/result/release given a table, another userdata, nothing, or a
    transfer already released: a Lua error naming the problem, never a crash."""
    with Server() as srv:
        recs = run(fleet, tmp_path, "core_misuse", BASE=srv.base)
    assert "agent.http.transfer expected, got table" in recs["table"]["err"], recs["table"]
    assert "agent.http.transfer expected, got userdata" in recs["other_userdata"]["err"], recs
    assert "agent.http.transfer expected, got no value" in recs["nothing"]["err"], recs["nothing"]
    assert (recs["answered"]["status"], recs["answered"]["body"]) == (200, "status 200"), recs
    assert "the request was released" in recs["released"]["err"], recs["released"]
