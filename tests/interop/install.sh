#!/usr/bin/env bash
# Install what `make interop` drives: swaks, curl, msmtp, Postfix, PHPMailer,
# the Ruby mail gem and s-nail (Debian packages, with apt-get when missing; needs
# root then) and the pinned nodemailer (npm ci into the git-ignored tests/e2e/node/node_modules).
#
# Idempotent: installed packages are left alone, `apt-get update` runs at most
# once and only if something is missing. Postfix is installed with debconf's
# "No configuration", so the package sets up no system MTA on port 25; if a
# Postfix master runs anyway afterwards it is stopped with `postfix stop`.
# The interop tests start their own Postfix instances (tests/common/postfix.py).
#
# Usage: bash tests/interop/install.sh   (PY=path/to/python overrides .venv/bin/python)
# Exit status: 0 when everything is there; 1 with a message naming what failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
PY=${PY:-.venv/bin/python}

say() { printf 'interop install: %s\n' "$*"; }
die() { printf 'interop install: ERROR: %s\n' "$*" >&2; exit 1; }

# Debian packages and the command each must provide. libsasl2-modules gives
# Postfix's SMTP client its PLAIN/LOGIN SASL mechanisms; libnet-ssleay-perl
# gives swaks TLS.  haproxy is for tests/test_proxy_protocol.py (real HAProxy
# sending PROXY v1/v2 in front of the relay; the tests start their own).
# php-cli + libphp-phpmailer (PHPMailer 6.x) and ruby + ruby-mail (the mail
# gem ActionMailer uses) are for tests/interop/test_php_ruby_clients.py,
# s-nail for tests/interop/test_more_clients.py.
PACKAGES=(swaks curl msmtp postfix libsasl2-modules libnet-ssleay-perl ca-certificates haproxy
          php-cli libphp-phpmailer ruby ruby-mail s-nail)
declare -A COMMAND=([swaks]=swaks [curl]=curl [msmtp]=msmtp [postfix]=postfix [haproxy]=haproxy
                    [php-cli]=php [ruby]=ruby [s-nail]=s-nail)

updated=no
apt_install() {
    # apt_install PACKAGE...: apt-get update (once per run), then install.
    [ "$(id -u)" = 0 ] || die "missing Debian packages: $*; run as root or: sudo apt-get install $*"
    command -v apt-get >/dev/null 2>&1 || die "missing packages $* and no apt-get to install them"
    if [ "$updated" = no ]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
        updated=yes
    fi
    say "installing $*"
    apt-get install -y -qq --no-install-recommends "$@" >"${TMPDIR:-/tmp}/poststack-interop-apt.log" 2>&1 \
        || { tail -n 30 "${TMPDIR:-/tmp}/poststack-interop-apt.log" >&2; die "apt-get install $* failed (log above)"; }
}

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    for p in "${missing[@]}"; do
        if [ "$p" = postfix ]; then
            # No system MTA: the tests run their own Postfix with their own config.
            echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections \
                || die "debconf-set-selections failed for postfix"
        fi
    done
    apt_install "${missing[@]}"
fi

for p in "${!COMMAND[@]}"; do
    command -v "${COMMAND[$p]}" >/dev/null 2>&1 || die "package $p is installed but ${COMMAND[$p]} is not on PATH"
done

# The package's own Postfix must not be left running (no systemd here, so the
# maintainer scripts may or may not have started it). `postfix status` exits
# 0 only when a master runs for the default configuration.
if [ -f /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then
    say "stopping the system Postfix started by the package"
    postfix stop >/dev/null 2>&1 || die "postfix stop failed"
fi

# nodemailer (tests/e2e/test_e2e_nodemailer.py): node >= 20 and npm, then npm ci.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
[ -x "$PY" ] || die "$PY not found: run make venv first"
PYTHONPATH=. "$PY" - <<'EOF' || die "nodemailer set-up failed (see above)"
import sys
from tests.common.node import ensure_node_modules, node_available
reason = node_available()
if reason is not None:
    sys.exit(f"interop install: ERROR: {reason}")
ensure_node_modules()
EOF

say "ready: $(swaks --version 2>/dev/null | head -n 1); $(curl --version | head -n 1 | cut -d' ' -f1-2);" \
    "$(msmtp --version | head -n 1); postfix $(postconf -d -h mail_version 2>/dev/null);" \
    "node $(node --version); $(php --version | head -n 1 | cut -d' ' -f1-2);" \
    "phpmailer $(dpkg-query -W -f='${Version}' libphp-phpmailer); $(ruby --version | cut -d' ' -f1-2);" \
    "ruby-mail $(dpkg-query -W -f='${Version}' ruby-mail); $(s-nail -V | head -n 1 | cut -d, -f1)"
