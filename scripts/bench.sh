#!/usr/bin/env bash
# Benchmarks that print numbers next to their targets (docs/BENCHMARKS.md). Never a test: each
# section prints one summary line ending in PASS or FAIL, and the script exits 0 unless a bench
# itself broke (build failure, an agent that would not start, a missing tool).
#
#   scripts/bench.sh                 all sections
#   scripts/bench.sh idle rps        only the named sections (batch idle rps startup probes
#                                    mongo lua_mongo fleet http drain jit)
#
# Environment: BUILD_DIR (default build; built with scripts/build.sh unless BENCH_NO_BUILD=1),
# BASELINE_AGENTHOST (another build's binary: idle and startup measure it too, in the same run),
# AGENTHOST (the binary, default $BUILD_DIR/agenthost), BENCH_BATCH (the bench_batch binary,
# default $BUILD_DIR/tests/bench/bench_batch, compiled by hand into $BUILD_DIR/bench if the
# build has no tests/bench yet). Tools: wrk, nginx, curl (scripts/install-deps.sh --bench).
#
# Adding a section: write section_<name>() that prints its line with `verdict`, and add <name>
# to SECTIONS.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECTIONS=(batch idle rps startup probes mongo lua_mongo fleet http drain jit)
BUILD_DIR=${BUILD_DIR:-build}
AGENTHOST=${AGENTHOST:-$BUILD_DIR/agenthost}
BENCH_BATCH=${BENCH_BATCH:-$BUILD_DIR/tests/bench/bench_batch}
PY=/usr/bin/python3
HELLO=$ROOT/examples/hello.lua

TMP=$(mktemp -d /tmp/ah-bench.XXXXXX)
PIDS=()
BROKEN=0

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null
        fi
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers ------------------------------------------------------------------------------

die_section() { # a bench that could not run: say so, remember it, go on with the next section
    echo "$1: BENCH BROKEN: $2"
    BROKEN=1
}

# verdict OK -> "PASS" or "FAIL"; OK is the exit status of a test expression.
verdict() { if "$@"; then echo PASS; else echo FAIL; fi; }

# fcmp "a <= b" with floating point: awk exit status.
fcmp() { awk "BEGIN { exit !($1) }"; }

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL STATUS SECONDS: polls until URL answers STATUS.
wait_http() {
    local deadline=$((SECONDS + $3))
    while ((SECONDS <= deadline)); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' "$1") == "$2" ]]; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# start_agent NAME SCRIPT: starts agenthost on a fresh state file and a free port; sets
# AGENT_PID and AGENT_URL. Returns 1 if it is not ready within 10 s.
start_agent() {
    local name=$1 script=$2 port
    port=$(free_port)
    mkdir -p "$TMP/$name"
    HTTP_PORT=$port HTTP_BIND=127.0.0.1 AGENTHOST_STATE="$TMP/$name/state.db" \
        AGENT_ID="bench-$name" MONGODB_URI= \
        "$AGENTHOST" "$script" >"$TMP/$name/agent.log" 2>&1 &
    AGENT_PID=$!
    PIDS+=("$AGENT_PID")
    AGENT_URL="http://127.0.0.1:$port"
    if ! wait_http "$AGENT_URL/readyz" 200 10; then
        tail -5 "$TMP/$name/agent.log" >&2
        return 1
    fi
}

stop_pid() {
    kill -TERM "$1" 2>/dev/null
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
rss_kib() { awk -v k="${2:-VmRSS}:" '$1 == k { print $2 }' "/proc/$1/status"; }

# cpu_ticks PID: utime + stime (fields 14 and 15 of /proc/PID/stat, counted after the ")"
# that ends the command name).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }

# wrk_rps URL: requests/s of wrk -t2 -c64 -d5s.
wrk_rps() { # wrk_rps URL [THREADS]: requests/s of wrk -c64 for 5 s (2 threads unless told)
    wrk -t"${2:-2}" -c64 -d5s "$1" 2>&1 | tee -a "$TMP/wrk.log" | awk '/^Requests\/sec:/ { print $2 }'
}

wrk_close_rps() { # wrk_close_rps URL: requests/s of wrk -t2 -c16 for 5 s, a new connection each
    wrk -t2 -c16 -d5s -H "Connection: close" "$1" 2>&1 | tee -a "$TMP/wrk.log" |
        awk '/^Requests\/sec:/ { print $2 }'
}

# ---- sections -----------------------------------------------------------------------------

section_batch() {
    local out raw host ratio
    if ! out=$("$BENCH_BATCH" 2000000 5); then
        die_section "empty batch" "bench_batch failed"
        return
    fi
    echo "$out" | grep -v '^RESULT' | sed 's/^/  /'
    raw=$(echo "$out" | sed -n 's/^RESULT.* raw_ns=\([0-9.]*\).*/\1/p')
    host=$(echo "$out" | sed -n 's/^RESULT.* host_ns=\([0-9.]*\).*/\1/p')
    ratio=$(echo "$out" | sed -n 's/^RESULT.* ratio=\([0-9.]*\).*/\1/p')
    echo "empty batch: host $host ns, raw lua_pcall $raw ns, ratio ${ratio}x (target <= 2.5x)" \
        "$(verdict fcmp "$ratio <= 2.5")"
}

# pss_kib PID: proportional set size (shared pages divided among the processes mapping them).
pss_kib() { awk '$1 == "Pss:" { print $2 }' "/proc/$1/smaps_rollup" 2>/dev/null; }

# idle_measure LABEL PID: RSS and PSS now, then CPU over 10 s.
idle_measure() {
    local label=$1 pid=$2 rss pss anon file t0 t1 hz cpu
    hz=$(getconf CLK_TCK)
    rss=$(rss_kib "$pid")
    pss=$(pss_kib "$pid")
    anon=$(rss_kib "$pid" RssAnon)
    file=$(rss_kib "$pid" RssFile)
    t0=$(cpu_ticks "$pid")
    sleep 10
    t1=$(cpu_ticks "$pid")
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN { printf "%.2f", d / hz / 10 * 100 }')
    echo "idle ($label): RSS $(mib "$rss") MiB (anon $(mib "$anon"), files $(mib "$file")," \
        "PSS $(mib "${pss:-0}")) (target <= 8 MiB) $(verdict fcmp "$rss <= 8192")," \
        "CPU $cpu% of one core over 10 s, $((t1 - t0)) ticks at $hz Hz" \
        "(target ~0%, < 1%) $(verdict fcmp "$cpu < 1")"
}

section_idle() {
    if ! start_agent idle "$HELLO"; then
        die_section "idle" "agenthost did not become ready"
        return
    fi
    sleep 3
    idle_measure "hello.lua running" "$AGENT_PID"
    if [[ $(curl -s -o /dev/null -w '%{http_code}' -X POST \
        "$AGENT_URL/api/cluster/pause?reason=bench") != 200 ]]; then
        die_section "idle" "POST /api/cluster/pause failed"
        stop_pid "$AGENT_PID"
        return
    fi
    local deadline=$((SECONDS + 10))
    until curl -s "$AGENT_URL/api/agent/state" | grep -q '"state" *: *"paused"'; do
        if ((SECONDS > deadline)); then
            die_section "idle" "the agent did not report paused"
            stop_pid "$AGENT_PID"
            return
        fi
        sleep 0.05
    done
    sleep 1
    idle_measure "hello.lua paused" "$AGENT_PID"
    stop_pid "$AGENT_PID"
    if [[ -n ${BASELINE_AGENTHOST:-} ]]; then
        # The same measurement of another build (BASELINE_AGENTHOST), in the same run.
        if ! AGENTHOST=$BASELINE_AGENTHOST start_agent idle_baseline "$HELLO"; then
            die_section "idle" "the baseline agenthost did not become ready"
            return
        fi
        sleep 3
        idle_measure "hello.lua running, baseline $BASELINE_AGENTHOST" "$AGENT_PID"
        stop_pid "$AGENT_PID"
    fi
}

start_nginx() { # start_nginx ROOTDIR PORT [PROBE_FILE]: sets NGINX_PID
    local dir=$TMP/nginx
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 1000000;
    default_type application/json;
    server {
        listen 127.0.0.1:$2;
        root $1;
    }
}
CONF
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>"$dir/stderr.log" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_http "http://127.0.0.1:$2/${3:-control-state.json}" 200 10
}

section_rps() {
    local port body_size ah nx ratio ah_close nx_close
    for tool in wrk nginx curl; do
        if ! command -v "$tool" >/dev/null; then
            die_section "requests/s" "$tool not installed (scripts/install-deps.sh --bench)"
            return
        fi
    done
    if ! start_agent rps "$HELLO" ||
        ! wait_http "$AGENT_URL/api/cluster/control-state" 200 10; then
        die_section "requests/s" "agenthost did not serve control-state"
        return
    fi
    mkdir -p "$TMP/www"
    chmod 755 "$TMP" "$TMP/www"
    curl -s "$AGENT_URL/api/cluster/control-state" >"$TMP/www/control-state.json"
    body_size=$(stat -c %s "$TMP/www/control-state.json")
    chmod 644 "$TMP/www/control-state.json"
    ah=$(wrk_rps "$AGENT_URL/api/cluster/control-state")
    ah_close=$(wrk_close_rps "$AGENT_URL/healthz")
    stop_pid "$AGENT_PID"
    port=$(free_port)
    if ! start_nginx "$TMP/www" "$port"; then
        cat "$TMP/nginx/stderr.log" "$TMP/nginx/error.log" 2>/dev/null | tail -5 >&2
        die_section "requests/s" "nginx did not start"
        return
    fi
    nx=$(wrk_rps "http://127.0.0.1:$port/control-state.json")
    nx_close=$(wrk_close_rps "http://127.0.0.1:$port/control-state.json")
    stop_pid "$NGINX_PID"
    if [[ -z $ah || -z $nx || -z $ah_close || -z $nx_close ]]; then
        die_section "requests/s" "wrk printed no Requests/sec (see $TMP/wrk.log)"
        return
    fi
    ratio=$(awk -v a="$ah" -v n="$nx" 'BEGIN { printf "%.2f", a / n }')
    echo "requests/s: GET /api/cluster/control-state $(printf '%.0f' "$ah")" \
        "(target >= 20000) $(verdict fcmp "$ah >= 20000"); nginx static $body_size-byte file" \
        "$(printf '%.0f' "$nx"); ratio ${ratio}x (target >= 0.5x) $(verdict fcmp "$ratio >= 0.5")"
    echo "requests/s, a new connection per request (as probes and one-shot clients):" \
        "GET /healthz $(printf '%.0f' "$ah_close"), nginx $(printf '%.0f' "$nx_close");" \
        "ratio $(awk -v a="$ah_close" -v n="$nx_close" 'BEGIN { printf "%.2f", a / n }')x (no target)"
}

# wait_log FILE PATTERN SECONDS: polls until FILE has a line matching PATTERN; prints it.
wait_log() {
    local deadline=$((SECONDS + $3)) line
    while ((SECONDS <= deadline)); do
        if line=$(grep -m1 -E "$2" "$1" 2>/dev/null); then
            echo "$line"
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# start_agent_env NAME SCRIPT VAR=VALUE...: start_agent with extra environment.
start_agent_env() {
    local name=$1 script=$2
    shift 2
    (export "$@" && start_agent "$name" "$script" && echo "$AGENT_PID $AGENT_URL" >"$TMP/$name.pid")
    local rc=$?
    read -r AGENT_PID AGENT_URL <"$TMP/$name.pid" 2>/dev/null || return 1
    PIDS+=("$AGENT_PID")
    return $rc
}

section_http() {
    # agent.http: 64 tasks looping agent.http.get against nginx, next to wrk -c64 on the same
    # nginx; RSS with 10,000 idle tasks; the empty batch against a raw lua_pcall.
    local port line ah_req ah_sec errors ah nx nx1 nx1b nx1a ratio ratio2 base tasks per out host raw bratio
    for tool in wrk nginx curl; do
        if ! command -v "$tool" >/dev/null; then
            die_section "http" "$tool not installed (scripts/install-deps.sh --bench)"
            return
        fi
    done
    mkdir -p "$TMP/www"
    chmod 755 "$TMP" "$TMP/www"
    echo '{"items":[1,2,3],"next":null}' >"$TMP/www/page.json"
    chmod 644 "$TMP/www/page.json"
    port=$(free_port)
    if ! start_nginx "$TMP/www" "$port" page.json; then
        die_section "http" "nginx did not start"
        return
    fi
    nx=$(wrk_rps "http://127.0.0.1:$port/page.json" 2)
    nx1b=$(wrk_rps "http://127.0.0.1:$port/page.json" 1)
    if ! start_agent_env http_rps "$ROOT/tests/bench/http_tasks.lua" MODE=rps TASKS=64 SECONDS=5 \
        "URL=http://127.0.0.1:$port/page.json" BATCH_TIMEOUT=60; then
        stop_pid "$NGINX_PID"
        die_section "http" "agenthost did not become ready"
        return
    fi
    if ! line=$(wait_log "$TMP/http_rps/agent.log" "HTTPBENCH" 30); then
        stop_pid "$AGENT_PID"
        stop_pid "$NGINX_PID"
        die_section "http" "the agent printed no HTTPBENCH line"
        return
    fi
    stop_pid "$AGENT_PID"
    # wrk -t1 again after the agent: the target is judged against the mean of the runs before and
    # after it, so that a machine still settling (e.g. right after the fleet section) weighs on
    # both sides alike
    nx1a=$(wrk_rps "http://127.0.0.1:$port/page.json" 1)
    stop_pid "$NGINX_PID"
    nx1=$(awk -v b="$nx1b" -v a="$nx1a" 'BEGIN { printf "%.0f", (b + a) / 2 }')
    ah_req=$(echo "$line" | sed -n 's/.*requests=\([0-9]*\).*/\1/p')
    ah_sec=$(echo "$line" | sed -n 's/.*seconds=\([0-9.]*\).*/\1/p')
    errors=$(echo "$line" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')
    ah=$(awk -v r="$ah_req" -v s="$ah_sec" 'BEGIN { printf "%.0f", r / s }')
    # The target is judged against wrk -t1: one client thread, like the agent's one Lua thread
    # (wrk -t2 takes both cores of a 2-core machine from nginx); -t2 is printed next to it.
    ratio=$(awk -v a="$ah" -v n="$nx1" 'BEGIN { printf "%.2f", a / n }')
    ratio2=$(awk -v a="$ah" -v n="$nx" 'BEGIN { printf "%.2f", a / n }')
    echo "http: 64 tasks agent.http.get $ah req/s ($errors errors), wrk -t1 -c64" \
        "$nx1 req/s (before $(printf '%.0f' "$nx1b"), after $(printf '%.0f' "$nx1a"))," \
        "wrk -t2 -c64 $(printf '%.0f' "$nx") req/s on the same" \
        "nginx; ratio ${ratio}x of -t1 (target >= 0.6x) $(verdict fcmp "$ratio >= 0.6")," \
        "${ratio2}x of -t2"

    if ! start_agent_env http_idle "$ROOT/tests/bench/http_tasks.lua" MODE=idle TASKS=10000 \
        BATCH_TIMEOUT=120; then
        die_section "http" "agenthost (idle tasks) did not become ready"
        return
    fi
    if ! wait_log "$TMP/http_idle/agent.log" "IDLE_BASE" 10 >/dev/null; then
        stop_pid "$AGENT_PID"
        die_section "http" "no IDLE_BASE line"
        return
    fi
    sleep 1
    base=$(rss_kib "$AGENT_PID")
    if ! line=$(wait_log "$TMP/http_idle/agent.log" "TASKS_SLEEPING" 30); then
        stop_pid "$AGENT_PID"
        die_section "http" "no TASKS_SLEEPING line"
        return
    fi
    tasks=$(rss_kib "$AGENT_PID")
    stop_pid "$AGENT_PID"
    per=$(awk -v a="$base" -v b="$tasks" 'BEGIN { printf "%.0f", (b - a) * 1024 / 10000 }')
    echo "http: 10,000 idle tasks: RSS $(mib "$base") -> $(mib "$tasks") MiB," \
        "about $per bytes per task ($(echo "$line" | sed 's/.*lua_kib=/Lua heap KiB /'))"

    if ! out=$("$BENCH_BATCH" 2000000 5); then
        die_section "http" "bench_batch failed"
        return
    fi
    raw=$(echo "$out" | sed -n 's/^RESULT.* raw_ns=\([0-9.]*\).*/\1/p')
    host=$(echo "$out" | sed -n 's/^RESULT.* host_ns=\([0-9.]*\).*/\1/p')
    bratio=$(echo "$out" | sed -n 's/^RESULT.* ratio=\([0-9.]*\).*/\1/p')
    echo "http: empty batch (a coroutine per call) $host ns vs raw lua_pcall $raw ns," \
        "ratio ${bratio}x (target <= 2.5x) $(verdict fcmp "$bratio <= 2.5")"
}

section_jit() {
    # What LUA_MEMORY_LIMIT costs CPU-heavy Lua (the limit turns the JIT compiler off): the CPU
    # time of tests/bench/jit_cost.lua's four kernels without and with a limit, 3 runs of each in
    # turn, medians. No target: the number is written next to the setting (docs/LUA.md).
    local run mode line kernel ms jit_state bad=0
    declare -A cpu
    for run in 1 2 3; do
        for mode in 0 256m; do
            if ! start_agent_env "jit_${run}_${mode}" "$ROOT/tests/bench/jit_cost.lua" \
                "LUA_MEMORY_LIMIT=$mode" BATCH_TIMEOUT=300; then
                die_section "jit" "agenthost did not become ready"
                return
            fi
            if ! line=$(wait_log "$TMP/jit_${run}_${mode}/agent.log" "JITBENCH done" 120); then
                stop_pid "$AGENT_PID"
                die_section "jit" "the agent printed no JITBENCH done line"
                return
            fi
            stop_pid "$AGENT_PID"
            jit_state=$(echo "$line" | sed -n 's/.*jit=\([a-z]*\).*/\1/p')
            [[ $mode == 0 && $jit_state != true ]] && bad=1
            [[ $mode != 0 && $jit_state != false ]] && bad=1
            while read -r kernel ms; do
                cpu[$kernel.$mode]+="$ms "
            done < <(sed -n 's/.*JITBENCH kernel=\([a-z]*\) cpu_ms=\([0-9.]*\).*/\1 \2/p' \
                "$TMP/jit_${run}_${mode}/agent.log")
        done
    done
    local summary="" on off
    for kernel in numeric string table json; do
        on=$(echo "${cpu[$kernel.0]}" | tr ' ' '\n' | sed '/^$/d' | sort -n | sed -n 2p)
        off=$(echo "${cpu[$kernel.256m]}" | tr ' ' '\n' | sed '/^$/d' | sort -n | sed -n 2p)
        echo "  jit $kernel: JIT on ${on} ms CPU, LUA_MEMORY_LIMIT=256m (JIT off) ${off} ms CPU"
        summary+=" $kernel $(awk -v a="$off" -v b="$on" 'BEGIN { printf "%.1fx", a / b }'),"
    done
    echo "jit: CPU time with LUA_MEMORY_LIMIT (JIT off) vs without:${summary%,}" \
        "(no target; check: the JIT was on without a limit and off with one)" \
        "$(verdict test "$bad" = 0)"
}

section_startup() {
    local out med base=()
    if [[ -n ${BASELINE_AGENTHOST:-} ]]; then
        base=("$BASELINE_AGENTHOST")
    fi
    if ! out=$("$PY" "$ROOT/tests/bench/startup_time.py" "$AGENTHOST" "$HELLO" \
        "${STARTUP_RUNS:-20}" "${base[@]}"); then
        echo "$out" | sed 's/^/  /'
        die_section "startup" "an agent did not become ready"
        return
    fi
    echo "$out" | grep -vE '^(RESULT|BASELINE)' | tr '\n' ' ' | sed 's/^/  /;s/ $/\n/'
    med=$(echo "$out" | sed -n 's/^RESULT median_ms=\([0-9.]*\).*/\1/p')
    echo "startup: exec to /readyz 200 (embedded store, fresh file) median $med ms of" \
        "${STARTUP_RUNS:-20} (target <= 10 ms) $(verdict fcmp "$med <= 10")"
    if [[ -n ${BASELINE_AGENTHOST:-} ]]; then
        echo "startup: baseline $BASELINE_AGENTHOST, started in turn with it:" \
            "$(echo "$out" | sed -n 's/^BASELINE //p')"
    fi
}

section_probes() {
    # /healthz while the store hangs (MongoDB blackholed; the embedded store write-locked) and 8
    # clients call the store routes; SIGTERM to exit with a request stuck in the store.
    local out r
    if ! out=$("$PY" "$ROOT/tests/bench/probes_bench.py" "$AGENTHOST" "$HELLO" \
        "${BENCH_PROBE_SECONDS:-10}" 2>&1); then
        echo "$out" | tail -20 | sed 's/^/  /'
        die_section "probes" "the probe benchmark failed"
        return
    fi
    echo "$out" | grep -v '^RESULT' | sed 's/^/  /'
    r=$(echo "$out" | sed -n 's/^RESULT //p')
    local bh_p99 lk_p99 bh_failed lk_failed term_max limit
    bh_p99=$(echo "$r" | sed -n 's/.*blackhole_p99_ms=\([0-9.]*\).*/\1/p')
    lk_p99=$(echo "$r" | sed -n 's/.*locked_p99_ms=\([0-9.]*\).*/\1/p')
    bh_failed=$(echo "$r" | sed -n 's/.*blackhole_failed=\([0-9]*\).*/\1/p')
    lk_failed=$(echo "$r" | sed -n 's/.*locked_failed=\([0-9]*\).*/\1/p')
    term_max=$(echo "$r" | sed -n 's/.*sigterm_max_s=\([0-9.]*\).*/\1/p')
    limit=$(echo "$r" | sed -n 's/.*shutdown_timeout_s=\([0-9.]*\).*/\1/p')
    echo "probes: /healthz p99 $bh_p99 ms blackholed, $lk_p99 ms locked, $((bh_failed + lk_failed))" \
        "failed (target p99 < 100 ms, none failed)" \
        "$(verdict fcmp "$bh_p99 < 100 && $lk_p99 < 100 && $bh_failed + $lk_failed == 0");" \
        "SIGTERM to exit with a request stuck in the store $term_max s" \
        "(target <= SHUTDOWN_TIMEOUT $limit + 0.5 s) $(verdict fcmp "$term_max <= $limit + 0.5")"
}

section_mongo() {
    # Command propagation with BENCH_AGENTS agents in each watch mode, and idle database load per
    # agent, against the MongoDB wire-protocol test server (tests/e2e/test_mongo_bench.py).
    local out
    if ! out=$(AGENTHOST_BENCH=1 AGENTHOST_BIN="$AGENTHOST" BENCH_AGENTS=${BENCH_AGENTS:-20} \
        BENCH_ROUNDS=${BENCH_ROUNDS:-20} BENCH_IDLE_SECONDS=${BENCH_IDLE_SECONDS:-30} \
        "$PY" -m pytest -q -s -p no:cacheprovider "$ROOT/tests/e2e/test_mongo_bench.py" 2>&1); then
        echo "$out" | tail -30 | sed 's/^/  /'
        die_section "mongo" "the MongoDB benchmark failed"
        return
    fi
    echo "$out" | grep -vE '^(\.|=|[0-9]+ passed|$)' | sed 's/^/  /'
}

section_lua_mongo() {
    # find_one from Lua next to the same query from C, and job_puller.lua throughput.
    local out
    if ! out=$(BUILD_DIR=$BUILD_DIR "$ROOT/scripts/bench_find_one.sh" 2>&1); then
        echo "$out" | tail -20 | sed 's/^/  /'
        die_section "lua_mongo" "the agent.mongo benchmark failed"
        return
    fi
    echo "$out" | sed 's/^/  /'
}

section_fleet() {
    # FLEET_N agents (default 100) on the MongoDB test server (change streams) and on the
    # embedded store: time from POST ...?wait=30 to "complete" for 3 commands, idle database
    # commands per agent per minute counted at the server, connections, CPU, RSS/PSS and fds per
    # agent (tests/bench/bench_fleet.py; FLEET_ENV adds agent settings). The agents
    # carry labels over 4 regions: a scoped pause/resume (?selector=region=eu&wait=30) is timed
    # too, and the MongoDB idle cost is measured with 20 scope documents present.
    local out
    if ! out=$(AGENTHOST_BIN="$AGENTHOST" FLEET_N=${FLEET_N:-100} \
        "$PY" "$ROOT/tests/bench/bench_fleet.py" 2>&1); then
        echo "$out" | tail -30 | sed 's/^/  /'
        die_section "fleet" "the fleet benchmark failed"
        return
    fi
    echo "$out" | sed 's/^/  /'
}

section_drain() {
    # POST /api/cluster/pause?drain=2s with 64 tasks waiting on requests that never answer, to
    # /readyz 503 (tests/bench/drain_bench.py); then the empty batch again (the drain's checks
    # must not make it slower).
    local out median worst
    if ! out=$("$PY" "$ROOT/tests/bench/drain_bench.py" "$AGENTHOST" 5 2>&1); then
        echo "$out" | tail -20 | sed 's/^/  /'
        die_section "drain" "the drain benchmark failed"
        return
    fi
    echo "$out" | grep -v '^RESULT' | sed 's/^/  /'
    median=$(echo "$out" | sed -n 's/^RESULT.* median_s=\([0-9.]*\).*/\1/p')
    worst=$(echo "$out" | sed -n 's/^RESULT.* max_s=\([0-9.]*\).*/\1/p')
    echo "drain: pause?drain=2s -> /readyz 503 with 64 tasks hanging: median $median s," \
        "worst $worst s (target <= 2.5 s) $(verdict fcmp "$worst <= 2.5")"
    section_batch
}

# ---- main ---------------------------------------------------------------------------------

build() {
    if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
        BUILD_DIR=$BUILD_DIR scripts/build.sh >"$TMP/build.log" 2>&1 || {
            tail -20 "$TMP/build.log" >&2
            echo "bench: build failed" >&2
            exit 1
        }
    fi
    if [[ ! -x $BENCH_BATCH ]]; then
        # The top-level CMakeLists.txt does not build tests/bench yet: compile it by hand.
        BENCH_BATCH=$BUILD_DIR/bench/bench_batch
        mkdir -p "$BUILD_DIR/bench"
        local cjson
        cjson=$(sed -n 's/^CJSON_LIBRARY:FILEPATH=//p' "$BUILD_DIR/CMakeCache.txt")
        # shellcheck disable=SC2046
        cc -O2 -g -std=gnu11 -Wall -Wextra -Icore -o "$BENCH_BATCH" tests/bench/bench_batch.c \
            "$BUILD_DIR/libagenthost.a" "$cjson" \
            $(pkg-config --cflags --libs luajit libmongoc-1.0 libuv libmicrohttpd sqlite3) \
            -lpthread -lm || {
            echo "bench: cannot compile tests/bench/bench_batch.c" >&2
            exit 1
        }
    fi
    if [[ ! -x $AGENTHOST ]]; then
        echo "bench: no agenthost binary at $AGENTHOST" >&2
        exit 1
    fi
}

main() {
    local want=("$@") s
    if ((${#want[@]} == 0)); then
        want=("${SECTIONS[@]}")
    fi
    for s in "${want[@]}"; do
        if [[ " ${SECTIONS[*]} " != *" $s "* ]]; then
            echo "usage: scripts/bench.sh [${SECTIONS[*]}]..." >&2
            exit 2
        fi
    done
    build
    echo "agenthost bench on $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    for s in "${want[@]}"; do
        "section_$s"
    done
    exit "$BROKEN"
}

main "$@"
