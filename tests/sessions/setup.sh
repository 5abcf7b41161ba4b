#!/usr/bin/env bash
# Installs the pinned session libraries the session tests run (cluster/tests/sessions.rs):
# express-session + connect-redis + node-redis from npm (package-lock.json), Flask-Session +
# redis-py from PyPI (requirements.txt) into a virtualenv under target/. Needs node, npm and
# python3 with venv; does nothing for a part already installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if ! (cd "$here/node" && node -e 'import("connect-redis").then(() => import("express-session"))' 2>/dev/null); then
  npm ci --prefix "$here/node" --no-audit --no-fund --loglevel=error
fi

venv="$root/target/sessions-venv"
if ! "$venv/bin/python" -c 'import flask_session, redis' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/python/requirements.txt"
fi
