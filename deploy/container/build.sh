#!/usr/bin/env bash
# `make image`: the consumerd OCI image, built with Debian's podman and no image registry.
#
#   1. a base root from Debian packages (mmdebstrap), imported as localhost/consumerd-base:bookworm;
#      built only if missing (`podman rmi localhost/consumerd-base:bookworm` to take the day's fixes)
#   2. a wheelhouse from deploy/requirements.lock, every file checked by its hash (wheelhouse.py)
#   3. `podman build --pull=never --network=none` from deploy/container/Containerfile
#   4. `podman save --format oci-archive` to dist/consumerd_VERSION.oci.tar
#
# Needs root, podman and mmdebstrap (`make container-tools`) and PY, a Python with pip (the venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/container/containers.conf}"
PY=${PY:-.venv/bin/python}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE=localhost/consumerd-base:bookworm
IMAGE=localhost/consumerd:$VERSION
OUT=dist/consumerd_$VERSION.oci.tar
CONTEXT=build/image/context
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
started=$SECONDS

step() { printf '==> %s\n' "$*"; }

if podman image exists "$BASE"; then
  step "base $BASE: present (podman rmi it to rebuild)"
else
  step "base $BASE from Debian bookworm (+ updates, security)"
  # Merged /usr set up as debootstrap does (the hook), not by the usrmerge package, which would pull
  # in perl (~50 MB). Documentation, man pages and locales are left out (the copyright files stay);
  # apt's lists and caches are removed by mmdebstrap itself.
  mkdir -p build/image
  # Its hooks talk on stderr: kept in a log, shown if the build fails.
  if ! mmdebstrap --variant=apt --quiet --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=python3,python3-venv,ca-certificates,tini \
    --aptopt='APT::Install-Recommends "false"' --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    bookworm - \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main" \
    2>build/image/mmdebstrap.log \
    | podman import --quiet --message "mmdebstrap --variant=apt bookworm: python3 python3-venv ca-certificates tini" - "$BASE" >/dev/null; then
    cat build/image/mmdebstrap.log >&2
    podman rmi --force "$BASE" >/dev/null 2>&1 || true  # never a half-imported base
    exit 1
  fi
fi

step "wheelhouse"
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT"
"$PY" deploy/container/wheelhouse.py build/image/wheels
cp -r build/image/wheels "$CONTEXT/wheels"
rm -f "$CONTEXT"/wheels/deps.sha256 "$CONTEXT"/wheels/deps.txt  # the cache keys, not for the image
cp deploy/container/consumerd.toml "$CONTEXT/"

step "podman build $IMAGE"
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --quiet --pull=never --network=none --layers \
  --build-arg BASE="$BASE" --build-arg VERSION="$VERSION" \
  -f deploy/container/Containerfile -t "$IMAGE" -t localhost/consumerd:latest "$CONTEXT" >/dev/null
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
# Only our own leftovers, no system-wide prune: the image the tags moved away from, and the build
# stage (labelled; rebuilt each time, which keeps the storage from growing with every change).
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then podman rmi "$previous" >/dev/null 2>&1 || true; fi
podman image prune -f --filter label=org.consumerd.stage=build >/dev/null

step "podman save $OUT"
mkdir -p dist
rm -f "$OUT"
podman save --quiet --format oci-archive -o "$OUT" "$IMAGE"
size=$(stat -c %s "$OUT")
unpacked=$(podman image inspect --format '{{.Size}}' "$IMAGE")
printf '%s: %s MB (image %s MB unpacked), built in %s s\n' "$OUT" "$((size / 1000000))" "$((unpacked / 1000000))" "$((SECONDS - started))"
