"""agent.queue's contract through the real binary against the MongoDB wire-protocol test server:
a claim whose lease expired and that another owner took is fenced (the late ack and fail say
"lost" and change nothing), and max_attempts bounds the retries exactly (docs/LUA_MONGO.md)."""
import signal
import sys

from agenthost_harness import MONGO_DIR, mongo_agent_env, script
from test_lua_mongo import wait_report

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401


def run_contract(fleet, tmp_path, mongo_server):
    out = tmp_path / "queue.json"
    env = mongo_agent_env(mongo_server.uri, OUT_FILE=out, COLLECTION="queue_jobs")
    agent = fleet.start(script("queue_contract.lua"), env=env, name="queue")
    report = wait_report(str(out), agent, timeout=30.0)
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0, agent.log_text()
    return report, mongo_server.client().agenthost.queue_jobs


def test_ack_after_the_lease_expired_and_another_owner_claimed_returns_lost(fleet, tmp_path,
                                                                             mongo_server):
    r, coll = run_contract(fleet, tmp_path, mongo_server)
    assert r["first_claim_attempts"] == 1
    assert r["second_claim_id"] == "late-ack" and r["second_claim_attempts"] == 2
    assert r["late_ack"] == [False, "lost"]
    assert r["late_fail"] == [False, "lost"]
    assert r["owner_ack"] == [True]
    job = coll.find_one({"_id": "late-ack"})
    assert job["status"] == "done" and job["owner"] == "second"
    assert job["result"] == {"by": "second"}


def test_fail_retries_until_max_attempts_then_marks_the_job_failed(fleet, tmp_path,
                                                                    mongo_server):
    r, coll = run_contract(fleet, tmp_path, mongo_server)
    # max_attempts = 3: pending, pending, failed; a failed job is never claimed again.
    assert r["after_fail"] == [["pending", 1], ["pending", 2], ["failed", 3], "unclaimable"]
    assert coll.find_one({"_id": "flaky"})["error"] == "attempt 3"


def test_renew_returns_true_alone_and_false_lost_once_the_claim_is_gone(fleet, tmp_path,
                                                                        mongo_server):
    r, _ = run_contract(fleet, tmp_path, mongo_server)
    assert r["renew"] == {"n": 1, "1": True}
    assert r["renew_after_fail"] == {"n": 1, "1": True}
    assert r["renew_after_ack"] == {"n": 2, "1": False, "2": "lost"}


def test_enqueue_of_an_empty_list_inserts_nothing(fleet, tmp_path, mongo_server):
    r, _ = run_contract(fleet, tmp_path, mongo_server)
    assert r["empty_enqueue"] == [0, 0]


def test_ack_after_a_failed_attempt_drops_the_old_error(fleet, tmp_path, mongo_server):
    _, coll = run_contract(fleet, tmp_path, mongo_server)
    job = coll.find_one({"_id": "renewed"})
    assert job["status"] == "done" and job["attempts"] == 2 and job["result"] == {"ok": True}
    assert "error" not in job and "lease_until" not in job


def test_the_first_claim_creates_the_claim_index(fleet, tmp_path, mongo_server):
    _, coll = run_contract(fleet, tmp_path, mongo_server)
    keys = [list(ix["key"]) for ix in coll.index_information().values()]
    assert [("status", 1), ("_id", 1)] in keys, keys
