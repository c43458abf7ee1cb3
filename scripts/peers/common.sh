# Shared by the peer setup scripts (sourced, not run). Peers are what a user would pick instead of
# dsla; they live in their own venvs under $DSLA_HOME/peers and are never dependencies of dsla.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DSLA_HOME=${DSLA_HOME:-$HOME/.cache/dsla}
PEERS=$DSLA_HOME/peers
PEER_PYTHON=${PEER_PYTHON:-python3.11}  # the interpreter each peer venv is made from
# Builds and installs stay polite on a shared machine: lowest priority, one compile job.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-1} MAKEFLAGS=${MAKEFLAGS:--j1}
NICE=(nice -n "${NICE_LEVEL:-19}")

die() { echo "error: $*" >&2; exit 1; }

# make_venv DIR: create a venv at DIR with PEER_PYTHON unless one is there.
make_venv() {
  command -v "$PEER_PYTHON" > /dev/null || die "no $PEER_PYTHON on PATH: set PEER_PYTHON to a Python 3.11 interpreter"
  [ -x "$1/bin/python" ] || "${NICE[@]}" "$PEER_PYTHON" -m venv "$1" || die "could not create a venv at $1"
}

# stamp_ok DIR LOCK: true when DIR was installed from exactly this lock file (re-runs are no-ops).
stamp_ok() { [ -f "$1/.dsla-installed" ] && [ "$(cat "$1/.dsla-installed")" = "$(sha256sum < "$2")" ]; }
stamp() { sha256sum < "$2" > "$1/.dsla-installed"; }

# atomic_cp SRC DST: copy so that DST is either absent or complete.
atomic_cp() { cp "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"; }

# One setup at a time per peer: two concurrent runs would write the same venv and files.
lock_peer() {
  mkdir -p "$PEERS"
  exec 9> "$PEERS/.setup-$1.lock"
  flock -n 9 || die "another setup of the $1 peer is running (lock $PEERS/.setup-$1.lock): wait for it"
}
