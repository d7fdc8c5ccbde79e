#!/usr/bin/env bash
# The Preboot Services demo, one command, as root: makes an image of a small sample disk, then
# PXE-boots a BIOS VM and a UEFI VM with Secure Boot on through the whole stack, each restores
# the image and then boots the restored disk. Every step is printed with its time; everything
# runs in network namespaces and a temporary folder, removed at the end (--keep keeps the logs).
# scripts/demo.py says what each step does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo: run it as root (network namespaces, qemu taps, loop devices)" >&2
  exit 2
fi
bash scripts/install-deps.sh >/dev/null
exec python3 scripts/demo.py "$@"
