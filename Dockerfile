# syntax=docker/dockerfile:1
# agenthost container image: build on Debian bookworm, run on bookworm-slim with only the runtime
# libraries. Build:  docker build -t agenthost:0.1.0 .
# Run:    docker run --rm -p 8000:8000 agenthost:0.1.0                  (the hello example)
#         docker run --rm -p 8000:8000 -v "$PWD/my.lua:/etc/agenthost/agent.lua:ro" \
#           agenthost:0.1.0 run /etc/agenthost/agent.lua

FROM debian:bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      libluajit-5.1-dev libmongoc-dev libbson-dev libuv1-dev lua-cjson-dev \
      libmicrohttpd-dev libsqlite3-dev libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DAH_BUILD_TESTS=OFF \
 && cmake --build build -j"$(nproc)" \
 && cmake --install build --prefix /usr/local \
 && mkdir -p /usr/local/share/agenthost/examples \
 && cp -r examples/. /usr/local/share/agenthost/examples/

FROM debian:bookworm-slim AS runtime
# Runtime libraries only (lua-cjson is linked statically). libmongoc/libbson serve only the
# MongoDB plugin (/usr/local/lib/agenthost/agenthost_mongo.so, loaded when MONGODB_URI is set or a
# script uses agent.mongo); the image runs both stores, so they stay. ca-certificates: TLS to
# MongoDB (mongodb+srv:// / Atlas) and HTTPS from agent.http. libcurl4: agent.http and
# `agenthost ctl` (the curl tool is not installed: the HEALTHCHECK below uses bash's /dev/tcp).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libluajit-5.1-2 libmongoc-1.0-0 libbson-1.0-0 libuv1 libmicrohttpd12 libsqlite3-0 \
      libcurl4 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 agenthost \
 && useradd --system --uid 10001 --gid agenthost --home-dir /var/lib/agenthost \
      --create-home --shell /usr/sbin/nologin agenthost
COPY --from=build /usr/local/bin/agenthost /usr/local/bin/agenthost
COPY --from=build /usr/local/lib/agenthost /usr/local/lib/agenthost
COPY --from=build /usr/local/share/agenthost /usr/local/share/agenthost
# Numeric user so Kubernetes' runAsNonRoot can verify it. The embedded store (no MONGODB_URI)
# lives in the writable home directory.
USER 10001:10001
WORKDIR /var/lib/agenthost
ENV HTTP_PORT=8000 \
    AGENTHOST_STATE=/var/lib/agenthost/agenthost-state.db
EXPOSE 8000
# Liveness (/healthz: 200 unless the host is wedged) over bash's /dev/tcp: one HTTP/1.0 request,
# healthy only on a 200 status line.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${HTTP_PORT:-8000} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && timeout 4 head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["agenthost"]
CMD ["run", "/usr/local/share/agenthost/examples/hello.lua"]
