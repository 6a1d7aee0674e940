"""The edges of agent.http through the real binary (fixture http_edges.lua) against local servers
started by the tests: every letter of a response header name is lower-cased, a request's own
timeout ends it (well before BATCH_TIMEOUT), max_body at its exact edge with and without
Content-Length, and TLS host name verification (a certificate naming only DNS:localhost, made
at test time with the openssl command, is refused for https://127.0.0.1)."""
import signal

from agenthost_harness import agent_env, count_events, script, wait_events
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
