#!/bin/bash
# Start (default), stop or show the whole Preboot Services stack on its embedded default
# configuration (packaging/dev/*.conf): the TFTP daemon, serving samples/tftproot on
# 127.0.0.1:69, the imaging server (127.0.0.1:998, images in /var/lib/preboot/images), the
# policy service (HTTP for iPXE on 127.0.0.1:8090, embedded SQLite directory
# in /var/lib/preboot; these start at install and boot in the original) and, only when asked (it
# is optional per segment, as in the original), the proxyDHCP. Installs what it needs first.
# Run as root (ports 67/69, /run/preboot).
#   bash scripts/stack.sh [start|stop|status]
#   PREBOOT_ADDRESS=192.0.2.10 bash scripts/stack.sh    # listen on another local address
#   PREBOOT_PROXYDHCP=1 bash scripts/stack.sh           # also start the proxyDHCP
#   PREBOOT_IMAGING_ENV=0 bash scripts/stack.sh         # do not build the imaging environment
# The boot programs (iPXE, and shim + the signed network GRUB for Secure Boot) are placed in
# samples/tftproot by packaging/bootfiles/place-bootfiles.sh from the distribution's packages
# (the signed ones fetched with apt-get download into /var/cache/preboot/bootfiles, never
# installed). The imaging environment (packaging/imaging-env/build.sh: kernel + initrd, cached)
# is put where policyd's default ImagingKernel/ImagingInitrd look: samples/tftproot/preboot/,
# which policyd serves over HTTP (BootFilesRoot) and tftpd over TFTP.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
action=${1:-start}
DAEMONS=(tftpd policyd imgsrvd)
[ "${PREBOOT_PROXYDHCP:-0}" = 1 ] && DAEMONS+=(proxydhcpd)
conf_dir=packaging/dev
# The Python package of a daemon, where it differs from the daemon's name.
module_of() {
  case "$1" in
    policyd) echo prebootpolicyd ;;
    *) echo "$1" ;;
  esac
}
if [ -n "${PREBOOT_ADDRESS:-}" ]; then
  # A generated copy with the address swapped in; relative paths still resolve from the repo.
  conf_dir=/run/preboot/stack-conf
  mkdir -p "$conf_dir"
  for d in "${DAEMONS[@]}"; do
    sed -e "s|^IPAddress = .*|IPAddress = ${PREBOOT_ADDRESS}|" \
        -e "s|^Root = \.\./\.\./|Root = ${repo}/|" \
        -e "s|^BootFilesRoot = \.\./\.\./|BootFilesRoot = ${repo}/|" \
        "packaging/dev/$d.conf" >"$conf_dir/$d.conf"
  done
fi

case "$action" in
  start)
    bash scripts/install-deps.sh
    # Best effort: without network access the signed files may be missing; the rest still runs.
    bash packaging/bootfiles/place-bootfiles.sh --download samples/tftproot \
      || echo "stack: some boot programs could not be placed (above); starting anyway" >&2
    if [ "${PREBOOT_IMAGING_ENV:-1}" = 1 ]; then
      # Best effort: without it everything else works; a PXE client told to image gets
      # "cannot load the imaging environment" and boots its disk.
      if bash packaging/imaging-env/build.sh --out /var/cache/preboot/imaging-env; then
        mkdir -p samples/tftproot/preboot
        cp /var/cache/preboot/imaging-env/linux /var/cache/preboot/imaging-env/initrd \
          samples/tftproot/preboot/
      else
        echo "stack: the imaging environment could not be built; starting without it" >&2
      fi
    fi
    # The daemons never create the directory (a missing one is an error, not an empty
    # policy): make the embedded one empty on first start, as the packages do.
    PYTHONPATH="$repo" python3 -m common.dircli --config "$conf_dir/policyd.conf" init
    for d in "${DAEMONS[@]}"; do
      PREBOOT_CONFIG="$conf_dir/$d.conf" PREBOOT_DAEMON="python3 -m $(module_of "$d")" \
        PYTHONPATH="$repo" PREBOOT_NO_SYSTEMCTL=1 sh "packaging/init.d/preboot-$d" start
    done
    python3 -m zmgmcast -status || true
    ;;
  stop)
    [ -e /run/preboot/proxydhcpd.pid ] && DAEMONS+=(proxydhcpd)
    for d in "${DAEMONS[@]}"; do
      PREBOOT_CONFIG="$conf_dir/$d.conf" PREBOOT_DAEMON="python3 -m $(module_of "$d")" \
        PYTHONPATH="$repo" PREBOOT_NO_SYSTEMCTL=1 sh "packaging/init.d/preboot-$d" stop
    done
    ;;
  status)
    python3 -m zmgmcast -status
    ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
