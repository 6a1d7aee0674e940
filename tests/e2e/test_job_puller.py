"""examples/job_puller.lua end to end: a fleet of real agenthost processes draining a `jobs`
collection on the MongoDB wire-protocol test server, which is also their control store (change
streams). Every job must be done exactly once (one result record per job, attempts == 1), none
lost, none left claimed; a cluster pause stops all claiming until the resume; SIGTERM to one agent
never strands its claims."""
import datetime
import os
import signal
import sys
import time

import pytest

from agenthost_harness import MONGO_DIR, REPO, mongo_agent_env, wait_for

sys.path.insert(0, MONGO_DIR)
from mongo_fixture import mongo_server  # noqa: E402,F401

JOB_PULLER = os.path.join(REPO, "examples", "job_puller.lua")


def make_jobs(db, n):
    db.jobs.insert_many([{"_id": i, "status": "pending", "attempts": 0,
                          "payload": {"n": i % 50, "text": f"job-{i}"}} for i in range(n)])


def expected_result(i):
    n, text = i % 50, f"job-{i}"
    checksum = 0
    for ch in text.encode():
        checksum = (checksum * 31 + ch) % 2147483647
    return sum(k * k for k in range(1, n + 1)), checksum


def start_fleet(fleet, uri, names, **extra):
    agents = []
    for name in names:
        env = mongo_agent_env(uri, RESULTS_COLLECTION="job_results", **extra)
        agents.append(fleet.start(JOB_PULLER, env=env, name=name))
    for a in agents:
        a.wait_state("running", timeout=20)
    return agents


def count(db, **filt):
    return db.jobs.count_documents(filt)


def assert_all_done_exactly_once(db, n):
    jobs = list(db.jobs.find())
    assert len(jobs) == n
    not_done = [j for j in jobs if j["status"] != "done"]
    assert not_done == [], not_done[:5]
    for j in jobs:
        assert (j["result"]["sum_squares"], j["result"]["checksum"]) == expected_result(j["_id"])
        assert j["attempts"] == 1, j
        assert "lease_until" not in j
    per_job = {}
    for rec in db.job_results.find():
        per_job[rec["job_id"]] = per_job.get(rec["job_id"], 0) + 1
    assert set(per_job) == set(range(n)), "a job was never processed"
    twice = {k: v for k, v in per_job.items() if v != 1}
    assert twice == {}, f"jobs processed more than once: {twice}"


def stop_all(agents):
    for a in agents:
        a.signal(signal.SIGTERM)
    for a in agents:
        assert a.wait_exit() == 0, a.log_text()
        assert a.find_logs(r"job_puller stopped: \d+ processed")


def test_three_agents_drain_500_jobs_exactly_once(fleet, mongo_server):
    db = mongo_server.client().agenthost
    make_jobs(db, 500)
    agents = start_fleet(fleet, mongo_server.uri, ["puller-1", "puller-2", "puller-3"],
                         BATCH_SIZE=10)
    wait_for(lambda: count(db, status="done") == 500, timeout=120, message="500 jobs done")
    stop_all(agents)
    assert_all_done_exactly_once(db, 500)
    assert count(db, status="claimed") == 0
    owners = {j["owner"] for j in db.jobs.find()}
    assert owners <= {"puller-1", "puller-2", "puller-3"}


def test_cluster_pause_stops_claiming_until_resume(fleet, mongo_server):
    db = mongo_server.client().agenthost
    make_jobs(db, 500)
    agents = start_fleet(fleet, mongo_server.uri, ["puller-1", "puller-2", "puller-3"],
                         BATCH_SIZE=5, JOB_WORK_MS=15)
    wait_for(lambda: count(db, status="done") >= 60, timeout=60, message="60 jobs done")
    assert agents[0].post("/api/cluster/pause?reason=e2e").status == 200
    for a in agents:
        a.wait_state("paused", timeout=20)
    paused_at = datetime.datetime.utcnow()
    # The state is committed before on_pause runs: wait for every hook to have finished.
    for a in agents:
        a.wait_log(r"job_puller paused \(e2e\)")
    # Every agent finished the job in hand and gave back the claims it had not started.
    assert count(db, status="claimed") == 0
    done_when_paused = count(db, status="done")
    assert done_when_paused < 500, "the fleet finished before the pause: make the jobs slower"
    # While paused nothing changes (observed for a while: absence cannot be waited for).
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert count(db, status="claimed") == 0
        assert count(db, status="done") == done_when_paused
        time.sleep(0.1)
    resumed_at = datetime.datetime.utcnow()
    assert agents[1].post("/api/cluster/resume?reason=e2e").status == 200
    wait_for(lambda: count(db, status="done") == 500, timeout=120, message="500 jobs done")
    for a in agents:
        a.wait_log(r"job_puller resumed: \d+ processed")
    stop_all(agents)
    assert_all_done_exactly_once(db, 500)
    claimed_while_paused = list(db.jobs.find({"claimed_at": {"$gte": paused_at,
                                                             "$lte": resumed_at}}))
    assert claimed_while_paused == []
    assert count(db, claimed_at={"$gt": resumed_at}) > 0  # the rest was claimed after resume


def test_sigterm_releases_or_finishes_claims_never_strands_them(fleet, mongo_server):
    db = mongo_server.client().agenthost
    make_jobs(db, 300)
    agents = start_fleet(fleet, mongo_server.uri, ["puller-1", "puller-2", "puller-3"],
                         BATCH_SIZE=10, JOB_WORK_MS=10)
    wait_for(lambda: count(db, status="done") >= 40, timeout=60, message="40 jobs done")
    victim = agents[1]
    victim.signal(signal.SIGTERM)
    assert victim.wait_exit() == 0, victim.log_text()
    # Right after it exits, nothing is claimed in its name.
    assert count(db, status="claimed", owner="puller-2") == 0
    assert victim.find_logs(r"job_puller stopped: \d+ processed")
    assert count(db, status="done") < 300, "the fleet finished before SIGTERM"
    wait_for(lambda: count(db, status="done") == 300, timeout=120, message="300 jobs done")
    stop_all([agents[0], agents[2]])
    assert_all_done_exactly_once(db, 300)
    assert count(db, status="claimed") == 0
