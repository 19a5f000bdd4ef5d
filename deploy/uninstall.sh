#!/usr/bin/env bash
# Remove what deploy/install.sh added: the units (and every consumerd@ instance), their drop-ins, the
# venv and the installed key. The operator's configuration (/etc/consumerd.toml, /etc/consumerd/*.toml)
# is never removed.
#
#   sudo deploy/uninstall.sh [--prefix /opt/consumerd]
#
# The prefix is removed only if it is a consumerd installation (a venv with bin/consumerd and
# pyvenv.cfg); anything else, or an unknown option, stops the script before it changes anything.
set -euo pipefail
PREFIX=/opt/consumerd
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || { echo "uninstall.sh: --prefix needs a path" >&2; exit 64; }; PREFIX=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "uninstall.sh: run as root" >&2; exit 77; }
case "$PREFIX" in
  /*) ;;
  *) echo "uninstall.sh: --prefix must be an absolute path, got '$PREFIX'" >&2; exit 64 ;;
esac
PREFIX=$(realpath -m "$PREFIX")
if [ -e "$PREFIX" ] && ! { [ -x "$PREFIX/bin/consumerd" ] && [ -f "$PREFIX/pyvenv.cfg" ]; }; then
  echo "uninstall.sh: $PREFIX is not a consumerd installation (no bin/consumerd and pyvenv.cfg): refusing to remove it" >&2
  exit 65
fi
UNIT_DIR=/etc/systemd/system
if [ -d /run/systemd/system ]; then
  systemctl disable --now consumerd.service 2>/dev/null || true
  # Every instance of the template, running or only enabled.
  instances=$( {
    systemctl list-units --all --plain --no-legend 'consumerd@*.service' 2>/dev/null | awk '{print $1}'
    find "$UNIT_DIR" -path '*.wants/consumerd@*.service' -printf '%f\n' 2>/dev/null
  } | sort -u)
  for unit in $instances; do
    systemctl disable --now "$unit" 2>/dev/null || true
  done
fi
rm -f "$UNIT_DIR/consumerd.service" "$UNIT_DIR/consumerd@.service"
rm -rf "$UNIT_DIR/consumerd.service.d" "$UNIT_DIR/consumerd@.service.d"
rm -f /etc/consumerd/gcp-key.json
if [ "$(readlink /usr/local/bin/consumerd 2>/dev/null)" = "$PREFIX/bin/consumerd" ]; then
  rm -f /usr/local/bin/consumerd
fi
[ -e "$PREFIX" ] && rm -rf -- "$PREFIX"
[ -d /run/systemd/system ] && systemctl daemon-reload
echo "consumerd removed; configuration kept in /etc/consumerd.toml and /etc/consumerd/"
