#!/usr/bin/env bash
# Create .venv and install requirements.txt + kdlib (editable). Idempotent: a second call
# reinstalls nothing unless requirements.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
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
# Debian packages the tests use: openssh-server (tests/test_remote.py starts its own sshd on 127.0.0.1
# for a real SSH remote) and chromium (tests/test_offline_plots.py, test_study_e2e.py: pages rendered
# with the network off). Installed once, when missing; without root and apt-get, say which test fails.
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      || echo "setup.sh: apt-get could not install ${missing[*]} (see above): the SSH remote and browser tests will fail" >&2
  else
    echo "setup.sh: ${missing[*]} missing, and installing needs root and apt-get: the SSH remote" \
      "(tests/test_remote.py) and browser (tests/test_offline_plots.py) tests will fail" >&2
  fi
fi
