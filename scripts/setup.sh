#!/usr/bin/env bash
# Create .venv and install requirements.txt + kdlib (editable). Idempotent: a second call
# reinstalls nothing unless requirements.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/test_remote.py starts its own sshd on 127.0.0.1 to test a real SSH remote (dvc-ssh)
if [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup.sh: /usr/sbin/sshd is missing and cannot be installed here (needs root and apt-get):" \
      "install openssh-server, or tests/test_remote.py's SSH test fails" >&2
  elif ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server >/dev/null; then
    echo "setup.sh: apt-get install openssh-server failed (see above; try apt-get update first):" \
      "tests/test_remote.py's SSH test will fail" >&2
  fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.kdlib-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
# Debian's Chromium, for tests/test_offline_plots.py (plots rendered in a browser with the network off)
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
      || echo "setup.sh: apt-get could not install chromium (see above); tests/test_offline_plots.py will fail" >&2
  else
    echo "setup.sh: /usr/bin/chromium is missing and installing it needs root and apt-get;" \
      "tests/test_offline_plots.py will fail" >&2
  fi
fi
