# agenthost container image: build on Debian bookworm, run on bookworm-slim with only the runtime
# libraries. Build:  docker build -t agenthost:0.1.0 .        (podman: add --format docker to keep
#                                                              the HEALTHCHECK)
# Run:    docker run --rm --stop-timeout 30 -p 127.0.0.1:8000:8000 agenthost:0.1.0  (hello example)
#         docker run --rm --stop-timeout 30 -p 127.0.0.1:8000:8000 -e AGENT_API_TOKEN \
#           -v "$PWD/my.lua:/etc/agenthost/agent.lua:ro" agenthost:0.1.0 run /etc/agenthost/agent.lua
# Without AGENT_API_TOKEN the POST routes (pause, resume, shutdown) need no token: publish the
# port on loopback, or set the token, before exposing it.
# --stop-timeout: on SIGTERM the agent finishes its batch and runs on_shutdown, taking up to
# SHUTDOWN_TIMEOUT (25 s by default) before it gives up with exit 1; docker's own default of 10 s
# would SIGKILL it first (exit 137, no on_shutdown). Keep it above SHUTDOWN_TIMEOUT.
# Read-only root (--read-only): the embedded store (no MONGODB_URI) lives in /tmp, so give the
# container a writable /tmp (docker: --tmpfs /tmp; podman and Kubernetes' emptyDir do it).
# tests/container/ builds and runs this image (tests/container/README.md).

FROM debian:bookworm AS build
# apt-get clean: the build does not rely on the base image's apt settings to drop the packages.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      libluajit-5.1-dev libmongoc-dev libbson-dev libuv1-dev lua-cjson-dev \
      libmicrohttpd-dev libsqlite3-dev libcurl4-openssl-dev \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Only what the runtime stage takes: the binary, its plugins (MongoDB and libcurl, looked up in
# /usr/local/lib/agenthost) and the example scripts. The Lua half of the agent module is compiled
# into the binary; the shared library, headers and examples/embed are for embedders.
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr/local \
      -DBUILD_TESTING=OFF -DAH_BUILD_TESTS=OFF \
 && cmake --build build -j"$(nproc)" --target agenthost agenthost_mongo agenthost_curl \
 && install -D -m 0755 build/agenthost /usr/local/bin/agenthost \
 && install -D -m 0644 build/agenthost_mongo.so /usr/local/lib/agenthost/agenthost_mongo.so \
 && install -D -m 0644 build/agenthost_curl.so /usr/local/lib/agenthost/agenthost_curl.so \
 && mkdir -p /usr/local/share/agenthost/examples \
 && cp -r examples/*.lua examples/lib /usr/local/share/agenthost/examples/

FROM debian:bookworm-slim AS runtime
# Runtime libraries only (lua-cjson, libmicrohttpd, LuaJIT, libuv and SQLite are linked
# statically; libmicrohttpd without its TLS library, see CMakeLists.txt). libluajit-5.1-2 and libuv1
# stay for the plugins, which name them (and bind to the executable's copies). libmongoc/libbson
# serve only the
# MongoDB plugin (/usr/local/lib/agenthost/agenthost_mongo.so, loaded when MONGODB_URI is set or a
# script uses agent.mongo); the image runs both stores, so they stay. ca-certificates: TLS to
# MongoDB (mongodb+srv:// / Atlas) and HTTPS from agent.http. libcurl4 serves only the libcurl
# plugin (/usr/local/lib/agenthost/agenthost_curl.so: agent.http and `agenthost ctl`; the curl
# tool is not installed: the HEALTHCHECK below uses bash's /dev/tcp).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libluajit-5.1-2 libmongoc-1.0-0 libbson-1.0-0 libuv1 \
      libcurl4 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 agenthost \
 && useradd --system --uid 10001 --gid agenthost --home-dir /var/lib/agenthost \
      --create-home --shell /usr/sbin/nologin agenthost
COPY --from=build /usr/local/bin/agenthost /usr/local/bin/agenthost
COPY --from=build /usr/local/lib/agenthost /usr/local/lib/agenthost
COPY --from=build /usr/local/share/agenthost /usr/local/share/agenthost
# Numeric user so Kubernetes' runAsNonRoot can verify it. The embedded store (no MONGODB_URI)
# lives in /tmp: writable with a read-only root filesystem too (Kubernetes' emptyDir in k8s/,
# compose's tmpfs, docker run --read-only --tmpfs /tmp). Mount a volume and point AGENTHOST_STATE
# into it to keep the embedded store across containers.
USER 10001:10001
WORKDIR /var/lib/agenthost
ENV HTTP_PORT=8000 \
    AGENTHOST_STATE=/tmp/agenthost-state.db
EXPOSE 8000
# Liveness (/healthz: 200 unless the host is wedged) over bash's /dev/tcp: one HTTP/1.0 request,
# healthy only on a 200 status line.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${HTTP_PORT:-8000} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && timeout 4 head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["agenthost"]
CMD ["run", "/usr/local/share/agenthost/examples/hello.lua"]
