#!/usr/bin/env bash
# The whole test suite from a fresh Debian 12 machine: host packages, Python deps, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup-host.sh

# tox lives in its own small venv so the host Python stays untouched (PEP 668 on Debian).
if [ ! -x .venv-tox/bin/tox ]; then
  python3 -m venv .venv-tox
  .venv-tox/bin/pip install -q --disable-pip-version-check 'tox>=4.11'
fi
exec .venv-tox/bin/tox -e lint,ci -- "$@"
