#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/fuzz_*.c) with clang, ASan and UBSan into build-fuzz/
# (or $BUILD_DIR) and runs each for SECONDS_PER_TARGET seconds (default 60) on its seed corpus
# (tests/fuzz/corpus/<target>/, read only: new inputs go to a scratch directory). Stops at the
# first crash, leak or sanitizer report and prints the input that caused it (to be added to
# the corpus once fixed). Extra arguments go to every fuzzer (e.g. -jobs=1 -max_len=4096).
# Prints the executions each target ran. FUZZ_ONLY="bson http" runs only those targets.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
seconds=${1:-60}
shift || true
BUILD_DIR=${BUILD_DIR:-build-fuzz}
CC=${CC_FUZZ:-clang}

CC=$CC cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Debug -DAH_FUZZ=ON -DAH_SANITIZE=ON \
  -DBUILD_TESTING=OFF >/dev/null
targets=()
for src in tests/fuzz/fuzz_*.c; do
  t=$(basename "$src" .c)
  if [[ -z "${FUZZ_ONLY:-}" || " $FUZZ_ONLY " == *" ${t#fuzz_} "* ]]; then
    targets+=("$t")
  fi
done
cmake --build "$BUILD_DIR" -j"$(nproc)" --target "${targets[@]}"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$repo/tests/fuzz/lsan.supp:print_suppressions=0"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  name=${t#fuzz_}
  mkdir -p "$scratch/$name" "$scratch/artifacts"
  log="$scratch/$name.log"
  echo "== $t (${seconds}s)"
  if ! "$BUILD_DIR/tests/fuzz/$t" -max_total_time="$seconds" -print_final_stats=1 \
      -artifact_prefix="$scratch/artifacts/$name-" "$@" \
      "$scratch/$name" "tests/fuzz/corpus/$name" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    for a in "$scratch"/artifacts/"$name"-*; do
      [[ -e "$a" ]] || continue
      echo "== crashing input ($a), as hex:" >&2
      od -An -tx1 -v "$a" | head -n 40 >&2
      cp "$a" "$repo/$BUILD_DIR/" && echo "== copied to $BUILD_DIR/$(basename "$a")" >&2
    done
    echo "== $t FAILED" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "   $t: ${runs:-?} executions, no failure"
done
echo "== fuzzing: all targets passed"
