#!/usr/bin/env bash
# Installs every Debian package agenthost needs to build, run and test. Idempotent: when all
# packages are present it only checks (well under a second). Needs root (or sudo) to install.
# Whatever is missing is installed by one `apt-get install` (without recommended packages).
# The packages come in sets; without arguments: build, tests and fuzz.
#   --bench      also what scripts/bench.sh needs
#   --container  also what tests/container needs (scripts/test.sh installs it before running them):
#                podman with runc (crun refuses hybrid cgroup layouts) and the CNI plugins and
#                iptables its networks and published ports use; debootstrap for the base images
#   --only=SET[,SET...]  exactly these sets (build, tests, fuzz, container, bench): scripts/test.sh
#                installs what the build needs first and the rest while it builds and tests
set -euo pipefail

declare -A SETS=(
  # compiler, cmake, the libraries (their -dev packages pull in the runtime ones), cmocka for
  # the unit tests
  [build]="build-essential cmake pkg-config
    libluajit-5.1-dev libmongoc-dev libbson-dev libuv1-dev lua-cjson-dev libmicrohttpd-dev
    libsqlite3-dev libcurl4-openssl-dev libcmocka-dev"
  # end-to-end tests: pytest with xdist, the MongoDB test server's pymongo and mongomock; the
  # console tests' headless browser; the deployment checks' YAML (node and kubectl below)
  [tests]="python3 python3-pytest python3-pytest-xdist python3-pymongo python3-mongomock
    chromium chromium-driver python3-selenium python3-yaml"
  # fuzz targets (scripts/fuzz.sh): clang with libFuzzer and the sanitizer runtimes
  [fuzz]="clang libclang-rt-14-dev"
  [container]="podman runc containernetworking-plugins iptables debootstrap"
  [bench]="wrk nginx-light curl"
)
wanted=(build tests fuzz)
for flag in "$@"; do
  case "$flag" in
    --bench) wanted+=(bench) ;;
    --container) wanted+=(container) ;;
    --only=*) IFS=, read -r -a wanted <<<"${flag#--only=}" ;;
    *) echo "usage: $0 [--bench] [--container] [--only=SET,...]" >&2; exit 2 ;;
  esac
done
PACKAGES=()
for set in "${wanted[@]}"; do
  if [[ -z "${SETS[$set]+x}" ]]; then
    echo "install-deps: no package set '$set' (build, tests, fuzz, container, bench)" >&2
    exit 2
  fi
  read -r -a more <<<"$(echo ${SETS[$set]})"
  PACKAGES+=("${more[@]}")
done

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ " ${wanted[*]} " == *" tests "* ]]; then
  # Node.js (tests/deploy runs its validators with node; tests/deploy/lock_install.py fetches
  # their packages from the lockfile, so Debian's npm and its ~390 dependencies are not needed):
  # any install will do, so only install Debian's when there is no node.
  if ! command -v node >/dev/null 2>&1; then
    missing+=(nodejs)
  fi
  # kubectl (for `kubectl kustomize k8s/`): Debian's kubernetes-client unless one is installed.
  if ! command -v kubectl >/dev/null 2>&1; then
    missing+=(kubernetes-client)
  fi
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
