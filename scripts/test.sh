#!/usr/bin/env bash
# Runs every test: installs dependencies, builds, runs the unit tests (CTest), the MongoDB test
# server's own tests and the end-to-end tests (pytest), then does it all again in an
# AddressSanitizer + UndefinedBehaviorSanitizer build and fails on any sanitizer report, then
# builds the libFuzzer targets with clang and runs each for a few seconds (scripts/fuzz.sh), and
# finally builds the container image from the Dockerfile and runs it with podman (tests/container:
# about a minute once the base images exist; making them takes about 30 s more, once per machine).
# Set SKIP_SANITIZE=1 to skip the sanitizer pass, SKIP_FUZZ=1 to skip the fuzz targets,
# SKIP_CONTAINER=1 to skip the container checks, during development; E2E_WORKERS=N sets how many
# end-to-end tests run at once (default: the number of CPUs; 1: one after the other).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=/usr/bin/python3

scripts/install-deps.sh

# The end-to-end tests run in E2E_WORKERS parallel pytest processes (pytest-xdist; 1 runs them
# in this process, one after the other). Tests are handed out one at a time (--dist loadgroup)
# except those marked with an xdist_group, which run together on one worker: the browser tests,
# the agent.http suite (one module-scoped run) and the install checks (one build and prefix).
# Every test has its own directory, agents on ports the kernel picks and its own servers, so
# they can run side by side (docs/TESTING.md, "Running in parallel").
E2E_WORKERS=${E2E_WORKERS:-$(nproc)}

run_suite() { # $1 = build dir
  local dir=$1 parallel=()
  if [[ "$E2E_WORKERS" != "1" ]]; then
    parallel=(-n "$E2E_WORKERS" --dist loadgroup)
  fi
  echo "== unit tests ($dir)"
  ctest --test-dir "$dir" --output-on-failure -j2
  echo "== end-to-end tests ($dir, E2E_WORKERS=$E2E_WORKERS)"
  AGENTHOST_BIN="$repo/$dir/agenthost" MONGO_C_DRIVER_CHECK="$repo/$dir/tests/mongo/mongo_c_driver_check" \
    "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    tests/mongo tests/e2e tests/console tests/deploy tests/install
}

echo "== build (release)"
BUILD_DIR=build scripts/build.sh
run_suite build

echo "== build (Release: -O3 warnings are errors too; the container image builds this way)"
BUILD_DIR=build-release BUILD_TYPE=Release scripts/build.sh -DBUILD_TESTING=OFF >/dev/null

if [[ "${SKIP_SANITIZE:-0}" != "1" ]]; then
  echo "== build (ASan/UBSan)"
  BUILD_DIR=build-asan BUILD_TYPE=Debug scripts/build.sh -DAH_SANITIZE=ON
  reports=$(mktemp -d)
  export ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=1:abort_on_error=0"
  export UBSAN_OPTIONS="log_path=$reports/ubsan:print_stacktrace=1"
  export LSAN_OPTIONS="suppressions=$repo/tests/lsan.supp:print_suppressions=0"
  run_suite build-asan
  if compgen -G "$reports/*" >/dev/null; then
    echo "== sanitizer reports:" >&2
    cat "$reports"/* >&2
    exit 1
  fi
  rm -rf "$reports"
fi
if [[ "${SKIP_FUZZ:-0}" != "1" ]]; then
  # Every fuzz target replays its corpus (the regression inputs included), then fuzzes briefly.
  echo "== fuzz targets (clang, ASan/UBSan; a few seconds each)"
  scripts/fuzz.sh "${FUZZ_SECONDS:-5}"
else
  echo "== fuzz targets SKIPPED (SKIP_FUZZ=1)" >&2
fi
if [[ "${SKIP_CONTAINER:-0}" != "1" ]]; then
  echo "== container image (podman: tests/container)"
  scripts/install-deps.sh --container
  "$PY" -m pytest -q -p no:cacheprovider tests/container
else
  echo "== container checks SKIPPED (SKIP_CONTAINER=1)" >&2
fi
echo "== all tests passed"
