"""Job throughput of examples/job_puller.lua: N agents drain a fresh `jobs` collection on the
given server (which is also their control store); prints jobs/s per fleet size. Run by
scripts/bench_find_one.sh:  bench_job_puller.py URI JOBS FLEET_SIZE...  """
import os
import signal
import sys
import time

import pymongo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
from agenthost_harness import REPO, Agent, mongo_agent_env, wait_for  # noqa: E402


def run(uri, jobs, size, batch):
    client = pymongo.MongoClient(uri)
    db = client.agenthost
    db.jobs.drop()
    db.jobs.insert_many([{"_id": i, "status": "pending", "attempts": 0,
                          "payload": {"n": i % 50, "text": f"job-{i}"}} for i in range(jobs)])
    db.jobs.create_index([("status", 1), ("_id", 1)])
    env = mongo_agent_env(uri, BATCH_SIZE=batch)
    agents = []
    # Start paused so every agent is up before the clock starts.
    db.agent_control.update_one({"_id": "global_control"},
                                {"$set": {"command": "pause"}, "$inc": {"version": 1}},
                                upsert=True)
    for i in range(size):
        agents.append(Agent(os.path.join(REPO, "examples", "job_puller.lua"), env=env,
                            name=f"bench-{i + 1}").start())
    for a in agents:
        a.wait_state("paused", timeout=20)
    t0 = time.monotonic()
    db.agent_control.update_one({"_id": "global_control"},
                                {"$set": {"command": "running"}, "$inc": {"version": 1}})
    wait_for(lambda: db.jobs.count_documents({"status": "done"}) == jobs, timeout=600,
             interval=0.25, message="all jobs done")
    elapsed = time.monotonic() - t0
    for a in agents:
        a.signal(signal.SIGTERM)
    for a in agents:
        a.wait_exit()
    print(f"job_puller {size} agent(s), BATCH_SIZE={batch}: {jobs} jobs in {elapsed:.2f}s = "
          f"{jobs / elapsed:.0f} jobs/s", flush=True)


def main():
    uri, jobs = sys.argv[1], int(sys.argv[2])
    for size in [int(s) for s in sys.argv[3:]] or [1, 3]:
        run(uri, jobs, size, int(os.environ.get("BATCH_SIZE", "10")))


if __name__ == "__main__":
    main()
