#!/usr/bin/env bash
# Install consumerd as a systemd service on a Debian/Ubuntu host. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh [--wheel PATH] [--key PATH] [--prefix /opt/consumerd] [--no-reload]
#   (PYTHON=/path/to/python3.11+ to choose the interpreter; default /usr/bin/python3)
#
# - a venv under PREFIX with consumerd from this checkout (or --wheel PATH), its dependencies at the
#   versions of deploy/requirements.lock (hashes checked)
# - the unit files into /etc/systemd/system (consumerd.service and the consumerd@.service template)
# - /etc/consumerd.toml from config/consumerd.toml, only if there is none (never overwritten)
# - with --key PATH: the service-account key to /etc/consumerd/gcp-key.json (root-only, 0600) and a
#   drop-in that hands it to the service with LoadCredential= (it reads $CREDENTIALS_DIRECTORY)
# - the service runs as a DynamicUser: no account to create; `systemctl daemon-reload`
set -euo pipefail

PREFIX=/opt/consumerd
WHEEL=""
KEY=""
RELOAD=1
UNIT_DIR=/etc/systemd/system
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix|--wheel|--key) [ $# -ge 2 ] || { echo "install.sh: $1 needs a value" >&2; exit 64; }
      case "$1" in --prefix) PREFIX=$2 ;; --wheel) WHEEL=$2 ;; --key) KEY=$2 ;; esac; shift 2 ;;
    --no-reload) RELOAD=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 64 ;;
  esac
done
# The prefix goes into the unit files with sed and is removed by uninstall.sh: keep it plain.
if ! [[ "$PREFIX" =~ ^/[A-Za-z0-9._/-]+$ ]] || [[ "$PREFIX" =~ (^|/)\.\.?(/|$) ]]; then
  echo "install.sh: --prefix must be an absolute path of letters, digits, '.', '_', '-' and '/', got '$PREFIX'" >&2
  exit 64
fi
case "$PREFIX" in
  /|/usr|/usr/local|/etc|/var|/opt|/bin|/sbin|/lib|/lib64|/home|/root|/boot|/srv|/tmp)
    echo "install.sh: refusing --prefix $PREFIX (a system directory): use a directory of its own, e.g. /opt/consumerd" >&2; exit 64 ;;
esac
if [ -e "$PREFIX" ] && [ -n "$(ls -A "$PREFIX" 2>/dev/null)" ] && ! [ -f "$PREFIX/pyvenv.cfg" ]; then
  echo "install.sh: $PREFIX exists and is not a consumerd venv: refusing to install into it" >&2
  exit 65
fi
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 77; }
SRC=$(cd "$(dirname "$0")/.." && pwd)

step() { printf '==> %s\n' "$*"; }

# The system's Python, not a per-user one: the unit's ProtectHome= hides /root and /home.
PYTHON=${PYTHON:-/usr/bin/python3}
step "python venv in $PREFIX (from $PYTHON)"
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "install.sh: consumerd needs Python >= 3.11 ($PYTHON)" >&2; exit 69; }
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
if [ -z "$WHEEL" ]; then
  # Build from a copy: the checkout may be read-only, and a build writes into its source tree.
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  tar -C "$SRC" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=build --exclude=dist -cf - . | tar -C "$BUILD" -xf -
fi
# The versions the project was tested with, every download checked against its hash; then
# consumerd itself, without resolving anything again.
"$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$SRC/deploy/requirements.lock"
"$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade "${WHEEL:-$BUILD}"
"$PREFIX/bin/consumerd" --version
install -d -m 0755 "$PREFIX/share/doc/consumerd"
install -m 0644 "$SRC/README.md" "$PREFIX/share/doc/consumerd/README.md"  # the units' Documentation=
# On PATH for operators (`consumerd status`, `consumerd check-config`); uninstall.sh removes it.
ln -sfn "$PREFIX/bin/consumerd" /usr/local/bin/consumerd

step "unit files in $UNIT_DIR"
install -m 0644 "$SRC/systemd/consumerd.service" "$UNIT_DIR/consumerd.service"
install -m 0644 "$SRC/systemd/consumerd@.service" "$UNIT_DIR/consumerd@.service"
if [ "$PREFIX" != /opt/consumerd ]; then
  sed -i "s|/opt/consumerd|$PREFIX|g" "$UNIT_DIR/consumerd.service" "$UNIT_DIR/consumerd@.service"
fi

step "configuration"
install -d -m 0755 /etc/consumerd
if [ -e /etc/consumerd.toml ]; then
  echo "    /etc/consumerd.toml exists: left as it is"
else
  install -m 0644 "$SRC/config/consumerd.toml" /etc/consumerd.toml
  echo "    wrote /etc/consumerd.toml (an example: set pubsub.project, pubsub.subscription, tasks.modules)"
fi

if [ -n "$KEY" ]; then
  step "service-account key"
  install -m 0600 -o root -g root "$KEY" /etc/consumerd/gcp-key.json
  for unit in consumerd.service consumerd@.service; do
    install -d -m 0755 "$UNIT_DIR/$unit.d"
    printf '[Service]\nLoadCredential=gcp-key.json:/etc/consumerd/gcp-key.json\n' > "$UNIT_DIR/$unit.d/credentials.conf"
  done
  echo "    set credentials_file = \"gcp-key.json\" in [pubsub]: it is read from \$CREDENTIALS_DIRECTORY"
fi

if [ "$RELOAD" = 1 ] && [ -d /run/systemd/system ]; then
  step "systemctl daemon-reload"
  systemctl daemon-reload
fi

cat <<NEXT

consumerd is installed. Next:
  1. edit /etc/consumerd.toml (subscription, project, your task modules; install them into $PREFIX:
     $PREFIX/bin/pip install yourpackage)
  2. consumerd check-config:      $PREFIX/bin/consumerd check-config --config /etc/consumerd.toml
  3. start it at boot and now:    systemctl enable --now consumerd
  4. watch it:                    systemctl status consumerd; journalctl -u consumerd -f
  5. apply config changes:        systemctl reload consumerd
NEXT
