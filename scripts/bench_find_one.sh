#!/usr/bin/env bash
# agent.mongo benchmarks against the MongoDB wire-protocol test server (tests/mongo):
#   1. find_one from Lua (agent.mongo) next to the same query from C (mongo-c-driver), same run;
#   2. job throughput of examples/job_puller.lua with 1 and 3 agents (jobs/s).
# Usage: scripts/bench_find_one.sh [calls_per_round=2000] [rounds=7] [jobs=1000]
# Needs $BUILD_DIR (default build) with agenthost and bench_find_one (tests/bench/find_one.cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
CALLS=${1:-2000}
ROUNDS=${2:-7}
JOBS=${3:-1000}
PY=/usr/bin/python3

if [ ! -x "$BUILD_DIR/bench_find_one" ] && [ -x "$BUILD_DIR/tests/bench/bench_find_one" ]; then
  BENCH="$BUILD_DIR/tests/bench/bench_find_one"
else
  BENCH="$BUILD_DIR/bench_find_one"
fi
if [ ! -x "$BENCH" ]; then
  echo "bench_find_one not built: include tests/bench/find_one.cmake and build $BUILD_DIR" >&2
  exit 2
fi

tmp=$(mktemp -d)
srv_pid=
cleanup() {
  if [ -n "$srv_pid" ]; then kill "$srv_pid" 2>/dev/null || true; wait "$srv_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
mkfifo "$tmp/ready"
$PY tests/mongo/mongo_test_server.py --port 0 >"$tmp/ready" 2>"$tmp/server.log" &
srv_pid=$!
read -r _ port <"$tmp/ready"
uri="mongodb://127.0.0.1:$port/?replicaSet=rs0"

echo "== find_one: Lua binding vs C (test server on port $port)"
"$BENCH" "$uri" "$CALLS" "$ROUNDS"

echo "== job_puller.lua throughput ($JOBS jobs)"
AGENTHOST_BIN="$BUILD_DIR/agenthost" $PY tests/bench/bench_job_puller.py "$uri" "$JOBS" 1 3
