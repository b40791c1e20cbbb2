#!/usr/bin/env bash
# `make sbom`: a CycloneDX SBOM (JSON, spec 1.6) of the Python environment
# inside the image poststack-relay:VERSION (the venv /opt/poststack-relay:
# the relay and every dependency, as installed), written beside the image as
# dist/poststack-relay-VERSION.cdx.json.  Usage: deploy/image/sbom.sh VERSION
#
# The tool (cyclonedx-bom, pinned) is installed on the host into a temporary
# directory, mounted read-only into a container of the image, and run there
# by the image's own Python against that Python: the SBOM lists what the
# image holds, read from the installed packages' metadata, not from this
# tree.  The tool is on sys.path only of the process that runs it, never of
# the interpreter it inspects, so it does not list itself.  The container
# runs as the image's user, read-only, without a network.
# The base image's Debian packages are not in it (a scanner of the image
# lists those).
set -euo pipefail
cd "$(dirname "$0")/../.."
version="${1:?usage: sbom.sh VERSION}"
cyclonedx_bom=7.5.0
# shellcheck source=deploy/image/podman.sh
. deploy/image/podman.sh
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts \
    --target "$work/cdx" "cyclonedx-bom==$cyclonedx_bom"
chmod -R a+rX "$work"
mkdir -p dist
out="dist/poststack-relay-$version.cdx.json"
podman_ run --rm --network none --read-only "${PODMAN_ULIMITS[@]}" --no-healthcheck \
    --volume "$work/cdx:/opt/cyclonedx-bom:ro" \
    --entrypoint /opt/poststack-relay/bin/python "poststack-relay:$version" \
    -c 'import runpy, sys
sys.path.insert(0, "/opt/cyclonedx-bom")
sys.argv = ["cyclonedx-py", *sys.argv[1:]]
runpy.run_path("/opt/cyclonedx-bom/bin/cyclonedx-py", run_name="__main__")' \
    environment --output-format JSON --spec-version 1.6 --output-file - \
    /opt/poststack-relay/bin/python >"$out.tmp"
mv "$out.tmp" "$out"
python3 -c 'import json, sys
bom = json.load(open(sys.argv[1]))
names = sorted(c["name"] for c in bom.get("components", []))
print("sbom:", sys.argv[1] + ":", len(names), "components:", " ".join(names))' "$out"
