#!/usr/bin/env bash
# Runs every test: installs dependencies, builds, runs the unit tests (CTest), the MongoDB test
# server's own tests and the end-to-end tests (pytest), then does it all again in an
# AddressSanitizer + UndefinedBehaviorSanitizer build and fails on any sanitizer report, builds
# the libFuzzer targets with clang and runs each for a few seconds (scripts/fuzz.sh), and builds
# the container image from the Dockerfile and runs it with podman (tests/container).
# Set SKIP_SANITIZE=1 to skip the sanitizer pass, SKIP_FUZZ=1 to skip the fuzz targets,
# SKIP_CONTAINER=1 to skip the container checks, during development; E2E_WORKERS=N sets how many
# end-to-end tests run at once (default: the number of CPUs; 1: one after the other).
#
# What overlaps (docs/TESTING.md, "How long it takes"): the end-to-end tests mostly wait (timers,
# heartbeats, batch timeouts, browsers), so the two passes run at the same time: the sanitizer
# pass (its build niced, started with the optimised build) in the background beside the
# optimised one, and beside both, niced, the fuzz targets and then the container checks.
# Packages are installed in the background as far as they are not needed yet (below), and the
# container base images (network and disk) are made beside the tests. The output of a
# background phase is printed when the script waits for it; each phase's time is printed at the
# end.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=/usr/bin/python3

# The end-to-end tests run in E2E_WORKERS parallel pytest processes (pytest-xdist; 1 runs them
# in this process, one after the other). Tests are handed out one at a time (--dist loadgroup),
# longest first (tests/conftest.py), except those marked with an xdist_group, which run together
# on one worker: the browser tests, the agent.http suite (one module-scoped run) and the install
# checks (one build and prefix). Every test has its own directory, agents on ports the kernel
# picks and its own servers, so they can run side by side (docs/TESTING.md, "Running in parallel").
E2E_WORKERS=${E2E_WORKERS:-$(nproc)}
sanitize=$([[ "${SKIP_SANITIZE:-0}" != "1" ]] && echo 1 || true)
fuzz=$([[ "${SKIP_FUZZ:-0}" != "1" ]] && echo 1 || true)
container=$([[ "${SKIP_CONTAINER:-0}" != "1" ]] && echo 1 || true)

start=$SECONDS
logs=$(mktemp -d) # output and times of the background phases
timings=()
declare -A background_pid=()
clock() { printf '%d:%02d' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }
record() { timings+=("$(printf '%-44s %3d:%02d  %s' "$1" $(($2 / 60)) $(($2 % 60)) "${3:-}")"); }
cleanup() {
  local pid
  for pid in "${background_pid[@]}"; do
    kill -- -"$pid" 2>/dev/null || true
  done
  rm -rf "$logs"
}
trap cleanup EXIT

# timed NAME COMMAND...: runs COMMAND, records how long it took.
timed() {
  local name=$1 t=$SECONDS
  shift
  echo "== [$(clock)] $name"
  "$@"
  record "$name" $((SECONDS - t))
}

# background NAME COMMAND...: runs COMMAND (a command or a function) in the background, in a
# process group of its own, its output into a log; `finish NAME` waits for it. (`set -e` does
# not apply inside it: a function run so returns at its first failure itself.)
background() {
  local name=$1 file=$logs/${1//[^A-Za-z0-9]/_}
  shift
  echo "== [$(clock)] $name (in the background)"
  set -m
  (
    t=$SECONDS rc=0
    "$@" >"$file.log" 2>&1 || rc=$?
    echo "$((SECONDS - t))" >"$file.time"
    exit "$rc"
  ) &
  background_pid[$name]=$!
  set +m
}

# finish NAME: waits for a background phase, prints its output; fails when it failed.
finish() {
  local name=$1 file=$logs/${1//[^A-Za-z0-9]/_} rc=0
  wait "${background_pid[$name]}" || rc=$?
  unset "background_pid[$name]"
  echo "== [$(clock)] $name: done (exit $rc)"
  cat "$file.log"
  record "$name" "$(cat "$file.time" 2>/dev/null || echo 0)" "(in the background)"
  if [[ $rc -ne 0 ]]; then
    echo "== $name FAILED" >&2
    exit 1
  fi
}

unit_tests() { # $1 = build dir
  ctest --test-dir "$1" --output-on-failure -j2
}

end_to_end() { # $1 = build dir
  local dir=$1 parallel=()
  if [[ "$E2E_WORKERS" != "1" ]]; then
    parallel=(-n "$E2E_WORKERS" --dist loadgroup)
  fi
  AGENTHOST_BIN="$repo/$dir/agenthost" MONGO_C_DRIVER_CHECK="$repo/$dir/tests/mongo/mongo_c_driver_check" \
    "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    tests/mongo tests/e2e tests/console tests/deploy tests/install
}

# podman's settings for this suite (tests/container/container_helpers.py), for the base images
# made ahead of the container checks.
base_images() {
  local conf=$logs/containers.conf
  "$PY" -c 'import sys, pathlib; sys.path.insert(0, "tests/container")
from container_helpers import containers_conf; containers_conf(pathlib.Path(sys.argv[1]))' "$conf" \
    || return 1
  CONTAINERS_CONF=$conf nice -n 10 tests/container/make-base-images.sh
}

# The sanitizer pass: build (niced: the optimised tree builds and is tested beside it), unit
# tests, end-to-end tests once the test packages are in; fails on any sanitizer report.
sanitizer_pass() {
  local reports status=0
  echo "== [$(clock)] build (ASan/UBSan)"
  BUILD_DIR=build-asan BUILD_TYPE=Debug nice -n 10 scripts/build.sh -DAH_SANITIZE=ON || return 1
  wait_for_test_packages || return 1
  reports=$(mktemp -d)
  export ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=1:abort_on_error=0"
  export UBSAN_OPTIONS="log_path=$reports/ubsan:print_stacktrace=1"
  export LSAN_OPTIONS="suppressions=$repo/tests/lsan.supp:print_suppressions=0"
  echo "== [$(clock)] unit tests (build-asan)"
  unit_tests build-asan || status=$?
  echo "== [$(clock)] end-to-end tests (build-asan, E2E_WORKERS=$E2E_WORKERS)"
  end_to_end build-asan || status=$?
  if compgen -G "$reports/*" >/dev/null; then
    echo "== sanitizer reports:"
    cat "$reports"/*
    status=1
  fi
  rm -rf "$reports"
  return "$status"
}

# The test packages; the sanitizer pass, started before they are in, waits for the mark.
test_packages() {
  scripts/install-deps.sh --only=tests && touch "$logs/test-packages-installed"
}

wait_for_test_packages() {
  while [[ ! -e "$logs/test-packages-installed" ]]; do
    if [[ -e "$logs/install_dependencies__tests_.time" ]]; then
      echo "== the test packages were not installed" >&2
      return 1
    fi
    sleep 1
  done
}

later_dependencies() { # $1 = package sets
  scripts/install-deps.sh --only="$1" || return 1
  if [[ -n "$container" ]]; then
    base_images
  fi
}

fuzz_targets() {
  # Every fuzz target replays its corpus (the regression inputs included), then fuzzes briefly.
  scripts/fuzz.sh "${FUZZ_SECONDS:-5}"
}

container_checks() {
  "$PY" -m pytest -q -p no:cacheprovider tests/container
}

# Their packages and the base images, the fuzz targets, then the container checks, niced (the
# end-to-end passes run beside them): both need CPU, so they take turns.
later_checks() { # $1 = package sets
  renice -n 10 -p "$BASHPID" >/dev/null
  later_dependencies "$1" || return 1
  if [[ -n "$fuzz" ]]; then
    echo "== [$(clock)] fuzz targets (clang, ASan/UBSan; a few seconds each)"
    fuzz_targets || return 1
  fi
  if [[ -n "$container" ]]; then
    echo "== [$(clock)] container image (podman: tests/container)"
    container_checks
  fi
}

# Packages: what the build needs first; the test packages while it builds (needed before the
# first test); the fuzz and container packages and the container base images (debootstrap) in
# the background while the tests run. With everything installed each of these is a check.
timed "install dependencies (build)" scripts/install-deps.sh --only=build
background "install dependencies (tests)" test_packages
if [[ -n "$sanitize" ]]; then
  background "sanitizer pass (ASan/UBSan build, unit, end-to-end)" sanitizer_pass
else
  echo "== sanitizer pass SKIPPED (SKIP_SANITIZE=1)" >&2
fi

# One optimised tree for the unit and end-to-end tests, built as the container image builds:
# Release (-O3), warnings are errors.
timed "build (Release)" env BUILD_DIR=build BUILD_TYPE=Release scripts/build.sh
finish "install dependencies (tests)"
later_sets=$(IFS=,; echo "${fuzz:+fuzz}${fuzz:+${container:+,}}${container:+container}")
if [[ -n "$later_sets" ]]; then
  background "fuzz targets, container checks (and their packages)" later_checks "$later_sets"
fi
timed "unit tests (build)" unit_tests build
timed "end-to-end tests (build, E2E_WORKERS=$E2E_WORKERS)" end_to_end build
[[ -z "$fuzz" ]] && echo "== fuzz targets SKIPPED (SKIP_FUZZ=1)" >&2
[[ -z "$container" ]] && echo "== container checks SKIPPED (SKIP_CONTAINER=1)" >&2
if [[ -n "$later_sets" ]]; then
  finish "fuzz targets, container checks (and their packages)"
fi
if [[ -n "$sanitize" ]]; then
  finish "sanitizer pass (ASan/UBSan build, unit, end-to-end)"
fi
echo "== [$(clock)] all tests passed; time per phase:"
printf '   %s\n' "${timings[@]}"
echo "   total $(clock)"
