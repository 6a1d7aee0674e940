#!/usr/bin/env bash
# Installs every Debian package agenthost needs to build, run and test. Idempotent: when all
# packages are present it only checks (well under a second). Needs root (or sudo) to install.
# Whatever is missing is installed by one `apt-get install` (without recommended packages).
#   --bench      also what scripts/bench.sh needs
#   --container  also what tests/container needs (scripts/test.sh installs it before running them):
#                podman with runc (crun refuses hybrid cgroup layouts) and the CNI plugins and
#                iptables its networks and published ports use; debootstrap for the base images
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config
  # runtime libraries (the -dev packages pull them in)
  libluajit-5.1-dev libmongoc-dev libbson-dev libuv1-dev lua-cjson-dev libmicrohttpd-dev
  libsqlite3-dev libcurl4-openssl-dev
  # tests
  libcmocka-dev python3 python3-pytest python3-pytest-xdist python3-pymongo python3-mongomock
  # console tests (tests/console): a headless browser driven from pytest
  chromium chromium-driver python3-selenium
  # fuzz targets (scripts/fuzz.sh): clang with libFuzzer and the sanitizer runtimes
  clang libclang-rt-14-dev
  # deployment checks (manifest/schema validation with npm packages, kubectl kustomize)
  python3-yaml
)
for flag in "$@"; do
  case "$flag" in
    --bench) PACKAGES+=(wrk nginx-light curl) ;;
    --container) PACKAGES+=(podman runc containernetworking-plugins iptables debootstrap) ;;
    *) echo "usage: $0 [--bench] [--container]" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# Node.js and npm (tests/deploy): any install will do (e.g. NodeSource's nodejs bundles npm and
# conflicts with Debian's npm package), so only install Debian's when there is no npm at all.
if ! command -v npm >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi
# kubectl (for `kubectl kustomize k8s/`): Debian's kubernetes-client unless one is installed.
if ! command -v kubectl >/dev/null 2>&1; then
  missing+=(kubernetes-client)
fi
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# force-unsafe-io: dpkg does not sync each unpacked file to disk (as in Debian's container
# images); an install cut off by a crash is repaired by running this again.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-unsafe-io \
  "${missing[@]}" >/dev/null
