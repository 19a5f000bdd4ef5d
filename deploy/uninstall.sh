#!/usr/bin/env bash
# Remove what deploy/install.sh added: the units, their drop-ins, the venv and the installed key.
# The operator's configuration (/etc/consumerd.toml, /etc/consumerd/*.toml) is never removed.
#
#   sudo deploy/uninstall.sh [--prefix /opt/consumerd]
set -euo pipefail
PREFIX=/opt/consumerd
[ "${1:-}" = --prefix ] && PREFIX=$2
[ "$(id -u)" = 0 ] || { echo "uninstall.sh: run as root" >&2; exit 77; }
UNIT_DIR=/etc/systemd/system
if [ -d /run/systemd/system ]; then
  systemctl disable --now consumerd.service 2>/dev/null || true
  systemctl stop 'consumerd@*.service' 2>/dev/null || true
fi
rm -f "$UNIT_DIR/consumerd.service" "$UNIT_DIR/consumerd@.service"
rm -rf "$UNIT_DIR/consumerd.service.d" "$UNIT_DIR/consumerd@.service.d"
rm -f /etc/consumerd/gcp-key.json
rm -rf "$PREFIX"
[ -d /run/systemd/system ] && systemctl daemon-reload
echo "consumerd removed; configuration kept in /etc/consumerd.toml and /etc/consumerd/"
