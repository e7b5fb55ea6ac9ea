#!/usr/bin/env bash
# Installs the peers the test suite talks to for real: Go and Debian's govmomi (to build
# the vcsim vCenter simulator), Chromium (browser tests), a Compose client (to validate
# docker-compose.yml). Azurite and htmx come from package.json; aiosmtpd and Playwright
# from requirements.txt. Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || need+=(golang-github-vmware-govmomi-dev)
[ -x /usr/bin/chromium ] || need+=(chromium)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  need+=(docker-compose)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash scripts/build-vcsim.sh
