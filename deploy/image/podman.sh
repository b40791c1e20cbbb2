# Sourced by deploy/image/*.sh: podman with the flags this kind of machine
# needs (docs/deployment.md, "Containers", "Building here"): runc as the
# runtime, cgroupfs (no systemd), events to a file, and explicit ulimits (the
# defaults ask for limits the sandbox refuses: "error setting rlimit type 7").
# shellcheck shell=bash
nofile="$(ulimit -Hn)"
[ "$nofile" = unlimited ] && nofile=65536
PODMAN_GLOBAL=(--runtime runc --cgroup-manager cgroupfs --events-backend file)
PODMAN_ULIMITS=(--ulimit "nofile=${nofile}:${nofile}" --ulimit nproc=4096:4096)
podman_() { podman "${PODMAN_GLOBAL[@]}" "$@"; }
