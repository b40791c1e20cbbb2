#!/bin/sh
# Install what the benchmark needs, and only what is missing:
#
#   - .venv-bench/ at the repository root: a virtual environment holding
#     bench/requirements.txt (the baseline bridge's aiosmtpd + aiohttp).  It is
#     (re)filled when it is missing or when requirements.txt or the Python
#     version changed since the last install (stamp file .venv-bench/.bench-stamp).
#   - nginx with the echo module (Debian packages nginx-light and
#     libnginx-mod-http-echo), used by bench/upstream.py as the upstream stub.
#     The system nginx service is not started (nor enabled to answer on port 80):
#     the bench runs its own nginx instances under a temporary directory.
#
# Idempotent; prints what it did; exits non-zero on failure.  Installing Debian
# packages needs root.  Works in a fresh Debian bookworm container.
#
#   sh bench/install.sh          (PYTHON=/path/to/python3.11 to choose Python)
set -eu

HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
ROOT=$(dirname -- "$HERE")
VENV="$ROOT/.venv-bench"
REQUIREMENTS="$HERE/requirements.txt"
STAMP="$VENV/.bench-stamp"
NGINX=/usr/sbin/nginx
ECHO_MODULE=/usr/lib/nginx/modules/ngx_http_echo_module.so
DEB_PACKAGES="nginx-light libnginx-mod-http-echo"

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# apt_install PACKAGE...: install Debian packages without starting services;
# runs "apt-get update" first if the package lists are empty, and once more if
# the first attempt fails (stale lists).
apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to install Debian packages: $*"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install $* by hand"
    # Keep package scripts from starting the system nginx (policy-rc.d exit 101
    # means "action forbidden"); only when no policy is in place already.
    policy_added=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=yes
    fi
    status=0
    if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
        say "apt-get update (empty package lists)"
        DEBIAN_FRONTEND=noninteractive apt-get update -q || status=$?
    fi
    if [ "$status" = 0 ]; then
        say "apt-get install -y $*"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; then
            say "install failed; apt-get update and one more try"
            { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
              DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; } || status=$?
        fi
    fi
    if [ "$policy_added" = yes ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    [ "$status" = 0 ] || die "apt-get install $* failed"
}

# --- Python ------------------------------------------------------------------
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        # Same interpreter as the relay's environment.
        PYTHON=$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)')
    elif command -v python3 >/dev/null 2>&1; then
        PYTHON=$(command -v python3)
    else
        apt_install python3 python3-venv
        PYTHON=/usr/bin/python3
    fi
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PYTHON is older than Python 3.11"
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian's python3 splits venv/ensurepip off into python3-venv.
    apt_install python3-venv
fi

want=$( { "$PYTHON" -c 'import sys; print(sys.version)'; cat "$REQUIREMENTS"; } | sha256sum | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want" = "$have" ] && [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
    say "Python environment up to date: $VENV"
else
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null &&
       [ "$("$VENV/bin/python" -c 'import sys; print(sys.version)')" = "$("$PYTHON" -c 'import sys; print(sys.version)')" ]; then
        say "updating Python environment $VENV"
    else
        say "creating Python environment $VENV with $PYTHON"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" || die "python -m venv $VENV failed"
    fi
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS" ||
        die "pip install -r $REQUIREMENTS failed"
    "$VENV/bin/python" -c 'import aiosmtpd, aiohttp' || die "aiosmtpd/aiohttp do not import"
    printf '%s\n' "$want" >"$STAMP"
    say "installed bench/requirements.txt into $VENV"
fi

# --- nginx + echo module -----------------------------------------------------
if [ -x "$NGINX" ] && [ -f "$ECHO_MODULE" ]; then
    say "nginx and its echo module already installed"
else
    apt_install $DEB_PACKAGES
    [ -x "$NGINX" ] && [ -f "$ECHO_MODULE" ] || die "nginx or $ECHO_MODULE still missing"
    say "installed $DEB_PACKAGES"
fi
"$NGINX" -v 2>&1 | sed 's/^/install.sh: /'
say "done"
