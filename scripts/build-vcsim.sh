#!/usr/bin/env bash
# Build the vCenter simulator used by the connector tests into build/vcsim.
#
# Uses Debian's govmomi (golang-github-vmware-govmomi-dev) in GOPATH mode, so it needs no
# network. Does nothing when build/vcsim is already built from the current sources.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/tools/vcsim"
out="$root/build/vcsim"
stamp="$root/build/vcsim.stamp"
gopath="${LIFEBOAT_GOPATH:-/usr/share/gocode}"

if ! command -v go >/dev/null 2>&1; then
    echo "build-vcsim: 'go' is not installed (apt-get install golang-go)" >&2
    exit 1
fi
if [ ! -d "$gopath/src/github.com/vmware/govmomi/simulator" ]; then
    echo "build-vcsim: govmomi sources not found under $gopath (apt-get install golang-github-vmware-govmomi-dev)" >&2
    exit 1
fi

# The stamp names everything the binary is built from: our sources, the Go toolchain and
# the govmomi package version.
govmomi_version="$(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev 2>/dev/null || echo unknown)"
want="$( (cat "$src"/*.go "$0"; go version; echo "$govmomi_version") | sha256sum | cut -d' ' -f1)"
if [ -x "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

mkdir -p "$root/build"
export GOPATH="$gopath" GO111MODULE=off
export GOCACHE="${GOCACHE:-$root/build/.gocache}"
(cd "$src" && go build -trimpath -o "$out.tmp.$$" .)
mv -f "$out.tmp.$$" "$out"
echo "$want" >"$stamp"
echo "build-vcsim: built $out" >&2
