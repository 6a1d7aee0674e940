#!/usr/bin/python3
"""Time from exec to the first 200 from GET /readyz, on the embedded store.

usage: startup_time.py AGENTHOST SCRIPT [RUNS [BASELINE_AGENTHOST]]

Each run starts AGENTHOST SCRIPT with a fresh AGENTHOST_STATE file in a new temp dir and a free
port, then tries to connect every millisecond; once connected it sends GET /readyz and, if the
answer is not 200 yet, tries again a millisecond later. The clock (time.perf_counter) starts
just before the fork/exec and stops when the 200 status line has arrived. The agent is then
stopped with SIGTERM (killed if it has not exited within 10 s). Prints every run, then one line
"RESULT median_ms=.. min_ms=.. max_ms=.." for scripts. Exit 1 if a start never became ready.
With BASELINE_AGENTHOST (another build, e.g. an older one) the two binaries start in turn, run by
run, so both see the same machine load, and a second line "BASELINE median_ms=.. ..." follows.
"""
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

READY_DEADLINE_S = 10.0
SPACING_S = 0.001


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readyz_status(port):
    """The status code of GET /readyz, or None if the port does not answer yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    parts = data.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])


def one_start(binary, script, index):
    with tempfile.TemporaryDirectory(prefix="ah-bench-start-") as tmp:
        port = free_port()
        env = dict(os.environ)
        env.update({
            "HTTP_PORT": str(port),
            "HTTP_BIND": "127.0.0.1",
            "AGENTHOST_STATE": os.path.join(tmp, "state.db"),
            "AGENT_ID": "bench-start-%d" % index,
        })
        env.pop("MONGODB_URI", None)
        log = open(os.path.join(tmp, "agent.log"), "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen([binary, script], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        elapsed = None
        try:
            while time.perf_counter() - t0 < READY_DEADLINE_S:
                if readyz_status(port) == 200:
                    elapsed = time.perf_counter() - t0
                    break
                if proc.poll() is not None:
                    break
                time.sleep(SPACING_S)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        if elapsed is None:
            with open(os.path.join(tmp, "agent.log"), "rb") as f:
                sys.stderr.write(f.read().decode(errors="replace")[-2000:])
        return elapsed


def main():
    if len(sys.argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    binary, script = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    binaries = [("RESULT", binary)]
    if len(sys.argv) > 4:
        binaries.append(("BASELINE", sys.argv[4]))
    times = {label: [] for label, _ in binaries}
    for i in range(runs):
        for label, path in binaries:
            t = one_start(path, script, i)
            name = "" if label == "RESULT" else " (baseline)"
            if t is None:
                print("run %d%s: not ready within %.0f s" % (i + 1, name, READY_DEADLINE_S))
                return 1
            times[label].append(t * 1000.0)
            print("run %d%s: %.1f ms" % (i + 1, name, t * 1000.0))
    for label, _ in binaries:
        t = times[label]
        print("%s median_ms=%.1f min_ms=%.1f max_ms=%.1f"
              % (label, statistics.median(t), min(t), max(t)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
