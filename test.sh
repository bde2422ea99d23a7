#!/usr/bin/env bash
# The test command of README.md, self-sufficient on a fresh clone: installs what the tests need, then runs pytest.
#   bash test.sh [pytest args]
# - Debian's chromium for the real-browser test (apt-get; the playwright package cannot download a browser here);
# - a virtual environment .venv with requirements-test.txt (runtime packages + diffusers and the other references).
# The released key lists the tests compare against are in tests/data/checkpoint-keys/ (nothing outside the repository).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will fail" >&2
  elif command -v sudo >/dev/null 2>&1; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will fail" >&2
  else
    echo "warning: chromium is missing and this user cannot apt-get install it; the browser test will fail" >&2
  fi
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements-test.txt
# The tests' temporary files (pytest's tmp_path folders, the session's tiny checkpoints: about 2.5 GB at the peak)
# go where more disk is free: the system's temporary folder or .tmp/ on this checkout's disk.
tmp_free=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2{print $4}')
here_free=$(df -Pk . | awk 'NR==2{print $4}')
if [ "${here_free:-0}" -gt "${tmp_free:-0}" ]; then
  mkdir -p .tmp && export TMPDIR="$PWD/.tmp" && tmp_free=$here_free
fi
echo "temporary files go to ${TMPDIR:-/tmp}: $(( ${tmp_free:-0} / 1048576 )) GiB free there"
exec .venv/bin/python -m pytest "$@"
