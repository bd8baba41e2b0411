#!/usr/bin/env bash
# A local S3-compatible server for the tests: moto's `moto_server`, installed from PyPI into a
# venv. Prints the path of the `moto_server` binary; `.ci/run` exports it as MOTO_SERVER.
#
#   MOTO_VENV   where the venv lives (default /var/tmp/popcon-worker-ci/venv-moto)
set -euo pipefail
venv="${MOTO_VENV:-/var/tmp/popcon-worker-ci/venv-moto}"
if [ ! -x "$venv/bin/moto_server" ]; then
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q 'moto[server]==5.1.*' >&2
fi
echo "$venv/bin/moto_server"
