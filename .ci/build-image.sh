#!/usr/bin/env bash
# Builds the repository's Dockerfile with buildah, for tests/test_container.py (run by .ci/run).
#
# No container registry is reachable in CI, so the Dockerfile's base (ARG BASE, by default
# python:3.11-slim-bookworm) is made here from Debian packages: debootstrap --variant=minbase of
# Debian bookworm with python3 and pip, imported as the local image $BASE_IMAGE. Then
#   buildah bud --isolation chroot --build-arg BASE=$BASE_IMAGE -t $IMAGE .
# builds the Dockerfile unchanged. Its RUN steps reach PyPI through this machine's network, the
# way pip does here: the CA bundle (this network inspects TLS) and pip's configuration (local
# wheel folders, file:// indexes, constraints) are bind-mounted read-only into the RUN steps
# (buildah bud -v), so they are used by pip but are not part of the image.
#
# Needs root and apt-get (for debootstrap, buildah, and podman, which imports the tree). Everything it makes can be
# remade by running it again: $WORK (debootstrap tree, build log) and the two local images.
# Exit status 0 when the image was built; otherwise the reason is in $WORK/build.log.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${BIDS_GROUP_CI_WORK:-/var/tmp/bids-group-ci}
IMAGE=${BIDS_GROUP_IMAGE:-localhost/bids-group:ci}
BASE_IMAGE=localhost/bids-group-base:bookworm
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

mkdir -p "$WORK"
LOG="$WORK/build.log"
: > "$LOG"
step() { echo "== $(date -u +%T) $*" | tee -a "$LOG" >&2; }
run() { # run a command, its output to the log; on failure say which command failed
  if ! "$@" >> "$LOG" 2>&1; then
    echo "FAILED: $*" | tee -a "$LOG" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
}
start=$SECONDS

if ! dpkg -s buildah podman netavark debootstrap > /dev/null 2>&1; then
  step "apt-get install buildah podman debootstrap"
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    buildah podman netavark debootstrap
fi

if ! buildah inspect --type image "$BASE_IMAGE" > /dev/null 2>&1; then
  rootfs="$WORK/rootfs"
  if [ ! -e "$WORK/rootfs.done" ]; then # left by a run that failed after this step
    rm -rf "$rootfs"
    step "debootstrap --variant=minbase $SUITE (python3, pip) into $rootfs"
    run debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
      "$SUITE" "$rootfs" "$MIRROR"
    touch "$WORK/rootfs.done"
  fi
  # As in the official python images: `python` and `pip` on PATH, pip may install system-wide.
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf python3 "$rootfs/usr/bin/python"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  step "import it as $BASE_IMAGE"
  run bash -o pipefail -c 'tar -C "$1" -cf - . | podman import --change "ENV LANG=C.UTF-8" \
    --change "CMD [\"python3\"]" - "$2"' sh "$rootfs" "$BASE_IMAGE"
  rm -rf "$rootfs" "$WORK/rootfs.done"
fi

step "buildah bud --isolation chroot --build-arg BASE=$BASE_IMAGE -t $IMAGE ."
volumes=()
for path in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf /etc/xdg/pip \
  /opt/wheels /opt/pypi /opt/pypi-more; do
  [ -e "$path" ] && volumes+=(-v "$path:$path:ro")
done
previous=$(buildah images --quiet --no-trunc "$IMAGE" 2> /dev/null || true)
run buildah bud --isolation chroot "${volumes[@]}" --build-arg "BASE=$BASE_IMAGE" -t "$IMAGE" .
if [ -n "$previous" ] && [ "$previous" != "$(buildah images --quiet --no-trunc "$IMAGE")" ]; then
  buildah rmi "$previous" > /dev/null 2>&1 || true # the image this build replaced, if unused
fi
size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)
step "built $IMAGE ($size) in $((SECONDS - start)) s"
