#!/usr/bin/env bash
# Installs dependencies, builds, and runs one agent: scripts/run.sh SCRIPT.lua [agenthost flags]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ $# -lt 1 ]]; then
  echo "usage: scripts/run.sh SCRIPT.lua [options]   (see: build/agenthost --help)" >&2
  exit 2
fi
"$here/install-deps.sh"
"$here/build.sh"
exec "$here/../build/agenthost" run "$@"
