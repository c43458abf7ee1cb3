#!/usr/bin/env bash
# Debian's chromium and chromium-driver, for the browser test (tests/serve/test_dashboard_browser.py).
# Instant when both are installed; otherwise apt-get (as root, else through sudo). `make test` runs it.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=
[ "$(id -u)" -ne 0 ] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium chromium-driver
