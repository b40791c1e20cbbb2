#!/usr/bin/env bash
# `make image`: build poststack-relay:VERSION from the unchanged Containerfile
# with podman.  Usage: deploy/image/build.sh VERSION
#
# Step 1 exists only because no registry serves base images to this machine:
# it builds python:3.11-slim-bookworm itself from Debian's bookworm packages
# (mmdebstrap: python3.11, venv, ca-certificates) and imports it into podman
# under the base's own short name.  Elsewhere, skip it: podman or docker pulls
# the real base image.  Set POSTSTACK_IMAGE_BASE=pull to skip it here too.
set -euo pipefail
cd "$(dirname "$0")/../.."
version="${1:?usage: build.sh VERSION}"
base=python:3.11-slim-bookworm
# shellcheck source=deploy/image/podman.sh
. deploy/image/podman.sh

if [ "${POSTSTACK_IMAGE_BASE:-local}" != pull ] && ! podman_ image exists "$base"; then
    echo "image: building the base $base from Debian's packages (no registry here)"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # The host's own apt sources (its Debian mirror) serve the packages.
    sources=/etc/apt/sources.list.d/debian.sources
    [ -f "$sources" ] || sources=/etc/apt/sources.list
    mmdebstrap --quiet --variant=minbase \
        --include=python3.11,python3.11-venv,python3-venv,python-is-python3,ca-certificates \
        --aptopt='Acquire::Retries "3"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$work/base.tar" "$sources"
    podman_ import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$work/base.tar" "$base" >/dev/null
fi

# pip in the build stage checks the index's certificate against the trust
# store (Debian's pip, in this base, uses /etc/ssl/certs/ca-certificates.crt).
# This machine's egress passes through its own CA, so the host's bundle is
# mounted over the base's for the build only: an existing file, so no layer
# keeps it or a mount point, and the Containerfile does not know about it.
trap '[ -z "${work:-}" ] || rm -rf "$work"' EXIT
source_url="${POSTSTACK_IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo poststack-relay)}"
podman_ build --format docker --pull=never --network host "${PODMAN_ULIMITS[@]}" \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg VERSION="$version" --build-arg SOURCE="$source_url" \
    --tag "poststack-relay:$version" --tag poststack-relay:latest \
    --file Containerfile .
podman_ image inspect --format 'image: {{.RepoTags}} {{.Size}} bytes' "poststack-relay:$version"
