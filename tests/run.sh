#!/usr/bin/env bash
# Installs what the tests need (idempotently) and runs lint, types and the whole suite.
# Needs root for the system packages and the unprivileged SSH test user.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need_pkgs+=(openssh-client)
command -v git >/dev/null 2>&1 || need_pkgs+=(git)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v pkill >/dev/null 2>&1 || need_pkgs+=(procps)
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
command -v shellcheck >/dev/null 2>&1 || need_pkgs+=(shellcheck)
# The store's PostgreSQL tests make their own throwaway cluster with initdb.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_pkgs+=(postgresql)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi
# Debian's prometheus package starts a server; the tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi
# Likewise Debian's postgresql package starts a cluster on port 5432; the tests need none.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postgresql 2>/dev/null; then
    systemctl stop postgresql || true
fi
mkdir -p /run/sshd

# Test hosts log in as an unprivileged user (root's shell start-up is slow and unrealistic).
if ! id deployd-test >/dev/null 2>&1; then
    useradd --create-home --shell /bin/sh deployd-test
fi
usermod -p '*' deployd-test  # unlock for key-only login (sshd refuses locked accounts)

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'

.venv/bin/ruff check daemon tests
.venv/bin/mypy
# Everything the tests write goes under one directory, removed afterwards: a run leaves
# nothing in /tmp. The test user must reach the sshd and host directories made in it.
test_tmp=$(mktemp -d /tmp/deployd-tests.XXXXXX)
chmod 755 "$test_tmp"
cleanup() {
    local left
    left=$(ls -A "$test_tmp" | grep -vx pytest || true)
    [ -z "$left" ] || echo "the tests left these behind: $left" >&2
    rm -rf "$test_tmp"
}
trap cleanup EXIT
export TMPDIR="$test_tmp" DEPLOYD_TEST_TMP="$test_tmp"
.venv/bin/pytest --basetemp "$test_tmp/pytest" "$@"
