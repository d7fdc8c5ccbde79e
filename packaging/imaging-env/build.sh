#!/bin/bash
# Build the imaging environment: a Linux kernel (`linux`) and an initramfs (`initrd`, gzip cpio)
# that the Preboot Policy Service boots on a machine to image it (docs/imaging-environment.md).
#
#   packaging/imaging-env/build.sh [--out DIR] [--cache DIR] [--force]
#
# This script owns what goes into the environment:
#   - Debian's stock kernel (linux-image-amd64's current image, `apt-get download`, never
#     installed) and only the modules a PC or VM needs to image a disk: NICs (virtio-net, e1000,
#     e1000e), disks (virtio-blk, ata_piix, ahci, sd), loop, ext4, fuse, xfs and btrfs for
#     add-on images;
#   - busybox (busybox-static) with every applet linked, and the host's util-linux losetup,
#     mount, umount, mtools and ntfs-3g (what img runs for add-on images);
#   - the host's e2fsck, resize2fs, ntfsresize, ntfsfix, fatresize and fsck.fat (what
#     `img restore --shrink` runs);
#   - libhivex (libhivex0), which img loads with ctypes to edit a restored Windows' registry
#     hive when it applies a machine's identity (img/hive.py);
#   - partclone's programs for ext2/3/4, FAT, NTFS, XFS and btrfs (what img runs to learn a
#     partition's used blocks when it makes an image);
#   - the host's Debian /usr/bin/python3.11 with its shared libraries and a pruned stdlib (with
#     the __pycache__ Debian compiled: nothing is compiled under emulation at boot);
#   - Debian's python3-zstandard for that interpreter;
#   - our imaging engine `img` (and /usr/bin/img to run it) and the `common` modules it
#     imports (no daemons);
#   - /init (the file `init` next to this script) and udhcpc's script.
# Outputs DIR/linux, DIR/initrd and DIR/manifest.txt. A build key (hash of every input) is kept in
# DIR/.build-key: when it matches, the script says "up to date" and exits in a few seconds.
# Needs (Debian): busybox-static cpio python3.11 apt (for the downloads), run as root or with a
# writable cache. Every command that may hang has a timeout.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Where img and common are: the source tree this script is in (packaging/imaging-env/), or,
# installed by the RPM (/usr/lib/preboot/imaging-env/), the private prefix next to it.
if [ -d "$HERE/../../img" ]; then
  REPO=$(cd "$HERE/../.." && pwd)
else
  REPO=$(cd "$HERE/../python" && pwd)
fi
OUT=/var/cache/preboot/imaging-env
CACHE=""
FORCE=0
PYTHON=/usr/bin/python3.11
PYVER=3.11
BUSYBOX=/bin/busybox
# Modules loaded at boot (dependencies are added from modules.dep): NICs, disks, raw packet
# sockets, loop + ext4 (+ the crc32c it asks the crypto API for) to apply add-on images, and fuse
# so that /dev/fuse exists for ntfs-3g (NTFS add-on targets).
MODULES=(af_packet virtio_pci virtio_net e1000 e1000e virtio_blk virtio_scsi ata_piix ahci sd_mod
         loop ext4 crc32c_generic fuse)
# Installed but loaded only when img mounts one (the kernel asks /sbin/modprobe for the fs-xfs
# alias): the other add-on targets. btrfs's RAID6 self-benchmark would slow every boot.
ONDEMAND_MODULES=(xfs btrfs)
# Where in the kernel package the modules and their dependencies are (tar wildcards under kernel/).
MODULE_GLOBS=('drivers/ata/*' 'drivers/block/*' 'drivers/net/*' 'drivers/scsi/*' 'drivers/virtio/*'
              'net/core/*' 'net/packet/*' 'lib/*' 'fs/ext4/*' 'fs/jbd2/*' 'fs/mbcache.ko'
              'fs/fuse/*' 'fs/xfs/*' 'fs/btrfs/*' 'crypto/*')
# Host programs img runs to apply add-on images (busybox's losetup and umount lack the options
# it uses): util-linux's losetup, mount, umount, mtools for FAT and ntfs-3g for NTFS. Copied with
# their libraries when present, at the same path in the initramfs.
HOST_TOOLS=(/usr/sbin/losetup /usr/bin/mount /usr/bin/umount /usr/bin/mtools /usr/bin/ntfs-3g)
# What `img restore --shrink`, `--grow` and `--fileset` run (img/shrink.py, img/grow.py,
# img/filesets.py): e2fsprogs, ntfs-3g's ntfsresize and ntfsfix, fatresize, dosfstools'
# fsck.fat, xfs_growfs, xfs_repair and btrfs.
SHRINK_TOOLS=(/usr/sbin/e2fsck /usr/sbin/resize2fs /usr/sbin/ntfsresize /usr/bin/ntfsfix
              /usr/sbin/fatresize /usr/sbin/fsck.fat /usr/sbin/xfs_growfs /usr/sbin/xfs_repair
              /usr/bin/btrfs)
MTOOLS_LINKS=(mcopy mmd mdir mattrib mdel mdeltree)
# Libraries img loads itself (ctypes, so ldd of a program does not list them): libhivex, with
# which img/hive.py edits the SYSTEM hive of a restored Windows (img/identity_windows.py).
DLOPEN_LIBS=(/usr/lib/x86_64-linux-gnu/libhivex.so.0)
# libhivex converts key and value names with iconv (UTF-16LE, LATIN1): glibc loads those
# converters as gconv modules at run time, and without them every key lookup fails (EBADF).
GCONV_DIR=/usr/lib/x86_64-linux-gnu/gconv
GCONV_FILES=(gconv-modules gconv-modules.cache UTF-16.so ISO8859-1.so)
# partclone's programs for the filesystems whose used blocks img maps (img/usedblocks.py), so an
# image made in the environment stores used blocks only, not whole partitions; and the names
# Debian links to them (link:program).
PARTCLONE_TOOLS=(/usr/sbin/partclone.extfs /usr/sbin/partclone.fat /usr/sbin/partclone.ntfs
                 /usr/sbin/partclone.xfs /usr/sbin/partclone.btrfs)
PARTCLONE_LINKS=(partclone.ext2:partclone.extfs partclone.ext3:partclone.extfs
                 partclone.ext4:partclone.extfs partclone.vfat:partclone.fat)
# stdlib parts the engine never uses (and the big ones): left out of the initramfs.
STDLIB_EXCLUDES=(test idlelib tkinter turtledemo ensurepip lib2to3 pydoc_data distutils unittest
                 'config-3.11-*' site-packages dist-packages sqlite3 curses dbm venv
                 '*.opt-1.pyc' '*.opt-2.pyc')
# Extension modules left out: test modules, and those needing libraries we do not ship. _ssl
# stays (with libssl and libcrypto): img talks TLS to an imaging server that has a certificate.
DYNLOAD_EXCLUDES='^(_test|_ctypes_test|_xx|xxlimited|_curses|_dbm|_sqlite3|_hashlib|nis'
DYNLOAD_EXCLUDES+='|ossaudiodev|readline|audioop|_tkinter)'

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 2; }
log() { echo "imaging-env: $*" >&2; }
die() { log "$*"; exit 1; }

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --out) OUT=$2; shift 2 ;;
      --cache) CACHE=$2; shift 2 ;;
      --force) FORCE=1; shift ;;
      -h|--help) usage ;;
      *) log "unknown argument $1"; usage ;;
    esac
  done
  OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
  # Downloads and the extracted kernel live beside the outputs unless told otherwise.
  CACHE=${CACHE:-$OUT/.cache}
  mkdir -p "$CACHE"
}

check_tools() {
  local missing=()
  for tool in "$PYTHON" "$BUSYBOX" cpio gzip dpkg-deb dpkg-query tar sha256sum; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (scripts/install-deps.sh installs them)"
  # A dynamically linked busybox would need its libraries in the initramfs too.
  if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is not static (install busybox-static)"; fi
}

# ---------------------------------------------------------------------------------- downloads

# The .deb of PACKAGE in the cache, downloaded if absent. Prints its path.
fetch_deb() {
  local package=$1 found
  found=$(ls "$CACHE/${package}"_*.deb 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$found" ]; then
    log "downloading $package"
    # apt-get download writes into the current folder; _apt cannot always read the cache folder
    # (the "unsandboxed" warning is harmless).
    (cd "$CACHE" && timeout 600 apt-get download -q "$package" >/dev/null 2>"$CACHE/apt.err") \
      || { cat "$CACHE/apt.err" >&2; die "apt-get download $package failed"; }
    found=$(ls "$CACHE/${package}"_*.deb | sort -V | tail -1)
  fi
  echo "$found"
}

# The versioned kernel package linux-image-amd64 points at now (e.g. linux-image-6.1.0-56-amd64);
# when apt knows nothing (offline), the newest one already in the cache.
kernel_package() {
  local name
  name=$(timeout 60 apt-cache depends linux-image-amd64 2>/dev/null \
         | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}' || true)
  if [ -z "$name" ]; then
    name=$(ls "$CACHE"/linux-image-[0-9]*.deb 2>/dev/null | sort -V | tail -1 \
           | sed 's|.*/||; s|_.*||' || true)
  fi
  [ -n "$name" ] || die "cannot tell which kernel package to use (apt-cache depends linux-image-amd64)"
  echo "$name"
}

# ---------------------------------------------------------------------------------- build key

# The engine's modules: every img module, and the common modules they import (measured with
# -X importtime under the target interpreter, so nothing else of the project is copied).
engine_modules() {
  local zdir=$1 imports trace
  imports=$(cd "$REPO" && ls img/*.py | sed 's|/|.|; s|\.py$||; s|\.__init__$||' | paste -sd, -)
  trace=$(cd "$REPO" && PYTHONPATH="$REPO:$zdir" timeout 60 "$PYTHON" -X importtime \
            -c "import ${imports//,/; import }" 2>&1 >/dev/null) \
    || die "$PYTHON cannot import the engine: $(echo "$trace" | grep -v '^import time:' | tail -3)"
  echo "$trace" | awk -F'|' '/^import time:/{gsub(/ /, "", $3); print $3}' \
    | grep -E '^(img|common)(\.|$)' | sort -u
}

# Module name (img.client) -> file relative to the repository (img/client.py or .../__init__.py).
module_file() {
  local path=${1//.//}
  if [ -d "$REPO/$path" ]; then echo "$path/__init__.py"; else echo "$path.py"; fi
}

build_key() {
  {
    sha256sum "$HERE/build.sh" "$HERE/init" "$PYTHON" "$BUSYBOX"
    (cd "$REPO" && sha256sum "${ENGINE_FILES[@]}")
    dpkg-query -W python3.11 libpython3.11-stdlib libpython3.11-minimal libc6 busybox-static \
      util-linux mount mtools partclone ntfs-3g e2fsprogs fatresize dosfstools libhivex0 2>/dev/null || true
    basename "$KERNEL_DEB"; basename "$ZSTD_DEB"
  } | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------------------------- pieces

# Extract the kernel image and the module folders once per kernel package (cached).
extract_kernel() {
  local dir patterns=()
  dir=$CACHE/kernel-$(basename "$KERNEL_DEB" .deb)
  patterns=('./boot/vmlinuz-*' './lib/modules/*/modules.builtin' './lib/modules/*/modules.order')
  for g in "${MODULE_GLOBS[@]}"; do patterns+=("./lib/modules/*/kernel/$g"); done
  # .complete records what was extracted: another module list extracts again
  if [ "$(cat "$dir/.complete" 2>/dev/null)" != "${patterns[*]}" ]; then
    log "extracting $(basename "$KERNEL_DEB")"
    rm -rf "$dir"; mkdir -p "$dir"
    dpkg-deb --fsys-tarfile "$KERNEL_DEB" | timeout 300 tar -x -C "$dir" --wildcards "${patterns[@]}"
    KVER=$(ls "$dir/lib/modules" | sort -V | tail -1)
    timeout 120 "$BUSYBOX" depmod -b "$dir" "$KVER"
    echo "${patterns[*]}" >"$dir/.complete"
  fi
  KDIR=$dir
  KVER=$(ls "$dir/lib/modules" | sort -V | tail -1)
}

# Copy MODULES and everything they depend on (modules.dep lists dependencies transitively),
# then index them for busybox modprobe.
install_modules() {
  local root=$1 mdir=$KDIR/lib/modules/$KVER want=() boot=() files
  for m in "${MODULES[@]}" "${ONDEMAND_MODULES[@]}"; do
    if grep -qE "/$m\.ko$" "$mdir/modules.builtin"; then continue; fi   # built into the kernel
    want+=("$m")
  done
  for m in "${MODULES[@]}"; do
    grep -qE "/$m\.ko$" "$mdir/modules.builtin" || boot+=("$m")
  done
  files=$(for m in "${want[@]}"; do
            grep -E "(^|/)$m\.ko:" "$mdir/modules.dep" || die "module $m not in the kernel package"
          done | tr -d ':' | tr ' ' '\n' | sort -u)
  for f in $files; do
    mkdir -p "$root/lib/modules/$KVER/$(dirname "$f")"
    cp "$mdir/$f" "$root/lib/modules/$KVER/$f"
  done
  cp "$mdir/modules.builtin" "$mdir/modules.order" "$root/lib/modules/$KVER/"
  timeout 60 "$BUSYBOX" depmod -b "$root" "$KVER"
  echo "${boot[*]}" >"$root/etc/preboot-modules"
}

install_busybox() {
  local root=$1
  cp "$BUSYBOX" "$root/bin/busybox"
  # Links made here: `busybox --install` needs /proc at boot, and udhcpc needs /bin/sh early.
  for applet in $("$BUSYBOX" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  # the kernel runs /sbin/modprobe when a driver asks for another module
  ln -s ../bin/busybox "$root/sbin/modprobe"
}

install_host_tools() {
  local root=$1 tool
  for tool in "${HOST_TOOLS[@]}"; do
    install_tool "$root" "$tool" "add-on images that need it will fail"
  done
  for tool in "${SHRINK_TOOLS[@]}"; do
    install_tool "$root" "$tool" "img restore --shrink and --grow will refuse that filesystem"
  done
  if [ -x "$root/usr/bin/mtools" ]; then
    for tool in "${MTOOLS_LINKS[@]}"; do ln -s mtools "$root/usr/bin/$tool"; done
  fi
  for tool in "${PARTCLONE_TOOLS[@]}"; do
    install_tool "$root" "$tool" "images made in the environment store that filesystem whole"
  done
  # glibc loads libgcc_s at run time (dlopen, so ldd does not list it) for pthread_exit and
  # thread cancellation; partclone's threads end that way, and abort without it.
  local gcc_s
  # (awk reads to the end: with pipefail, a reader that exits early fails the build with
  # SIGPIPE, 141, whenever ldconfig has more to write)
  gcc_s=$(ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ && !n++ {print $NF}')
  if [ -n "$gcc_s" ]; then
    mkdir -p "$root$(dirname "$gcc_s")"
    cp -L "$gcc_s" "$root$gcc_s"
    copy_libs "$root" "$gcc_s"
  else
    log "warning: libgcc_s.so.1 not found: partclone will abort when its threads end"
  fi
  local lib
  for lib in "${DLOPEN_LIBS[@]}"; do
    if [ -e "$lib" ]; then
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
      copy_libs "$root" "$lib"
    else
      log "warning: $lib missing: img cannot apply an identity to Windows (install libhivex0)"
    fi
  done
  mkdir -p "$root$GCONV_DIR"
  for lib in "${GCONV_FILES[@]}"; do
    if [ -e "$GCONV_DIR/$lib" ]; then cp -L "$GCONV_DIR/$lib" "$root$GCONV_DIR/$lib"
    else log "warning: $GCONV_DIR/$lib missing: libhivex cannot read key names"; fi
  done
  local link
  for link in "${PARTCLONE_LINKS[@]}"; do
    [ -x "$root/usr/sbin/${link#*:}" ] && ln -s "${link#*:}" "$root/usr/sbin/${link%%:*}"
  done
  return 0
}

# Copy the program TOOL and its libraries into ROOT at the same path, or warn with CONSEQUENCE.
install_tool() {
  local root=$1 tool=$2 consequence=$3
  if [ ! -x "$tool" ]; then log "warning: $tool missing: $consequence"; return 0; fi
  mkdir -p "$root$(dirname "$tool")"
  cp "$tool" "$root$tool"
  chmod 755 "$root$tool"
  copy_libs "$root" "$tool"
}

# Copy the shared libraries FILE needs (ldd) into ROOT at the same paths.
copy_libs() {
  local root=$1 file=$2 lib
  for lib in $(ldd "$file" 2>/dev/null | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\/lib/ {print $1}'); do
    [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
  done
}

install_python() {
  local root=$1 lib=/usr/lib/python$PYVER excludes=() so
  cp "$PYTHON" "$root/usr/bin/python$PYVER"
  ln -s "python$PYVER" "$root/usr/bin/python3"
  copy_libs "$root" "$PYTHON"
  for pattern in "${STDLIB_EXCLUDES[@]}"; do excludes+=(--exclude="$pattern"); done
  # tar keeps modification times, which the __pycache__ files are checked against.
  tar -C / -cf - "${excludes[@]}" "${lib#/}" | tar -C "$root" -xf -
  for so in "$root$lib"/lib-dynload/*.so; do
    if [[ $(basename "$so") =~ $DYNLOAD_EXCLUDES ]]; then rm -f "$so"; else copy_libs "$root" "$so"; fi
  done
}

install_zstandard() {
  local root=$1 zdir=$2
  local dest=$root/usr/lib/python3/dist-packages
  mkdir -p "$dest"
  cp -a "$zdir/usr/lib/python3/dist-packages/zstandard" "$dest/"
  # The C backend is the one used; the cffi one would need _cffi_backend.
  rm -f "$dest"/zstandard/_cffi.*.so "$dest/zstandard/backend_cffi.py" "$dest/zstandard/__init__.pyi"
  copy_libs "$root" "$(ls "$dest"/zstandard/backend_c.*.so)"
}

install_engine() {
  local root=$1 f
  local dest=$root/usr/lib/preboot
  for f in "${ENGINE_FILES[@]}"; do
    mkdir -p "$dest/$(dirname "$f")"
    cp -p "$REPO/$f" "$dest/$f"
  done
}

install_init() {
  local root=$1
  cp "$HERE/init" "$root/init"
  chmod 755 "$root/init"
  # `img` at the maintenance shell, as the original's imaging environment has it
  mkdir -p "$root/usr/bin"
  printf '#!/bin/sh\nexec python3 -m img "$@"\n' >"$root/usr/bin/img"
  chmod 755 "$root/usr/bin/img"
  mkdir -p "$root/usr/share/udhcpc"
  # udhcpc's hook: configure the address and default route it got, and remember them for /init.
  cat >"$root/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface" 2>/dev/null
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    [ -n "$hostname" ] && hostname "$hostname"
    echo "ip=$ip mask=$mask router=$router serverid=$serverid" >/run/dhcp-lease ;;
esac
exit 0
EOF
  chmod 755 "$root/usr/share/udhcpc/default.script"
}

# Bytecode for the files we added (Debian's stdlib already has its own): compiled here, by the
# same interpreter, so nothing is compiled under emulation at boot.
compile_added() {
  local root=$1
  timeout 120 "$PYTHON" -m compileall -q -j 0 "$root/usr/lib/preboot" \
    "$root/usr/lib/python3/dist-packages/zstandard" >/dev/null
}

# The interpreter inside the tree must start, find its stdlib and import the engine.
self_test() {
  local root=$1
  if [ "$(id -u)" = 0 ]; then
    # e2fsprogs and ntfsresize refuse to work without /etc/mtab (-> /proc/mounts), as in the VM
    mount -t proc proc "$root/proc" || die "cannot mount /proc in the initramfs tree"
    self_test_tools "$root"
    umount "$root/proc" || die "cannot unmount $root/proc"
  else
    log "not root: skipping the chroot import check"
  fi
}

# The self-test proper, run as root with /proc mounted in the tree.
self_test_tools() {
  local root=$1
  local imports
  imports=$(printf '%s, ' "${ENGINE_MODULES[@]}")
  timeout 60 chroot "$root" /usr/bin/python3 -c "import sys; sys.path.insert(0, '/usr/lib/preboot')
import zstandard, hashlib, ctypes, ssl, ${imports%, }; hashlib.blake2b(b''); ssl.create_default_context()" \
    || die "python in the initramfs cannot import the engine"
  if [ -x "$root/usr/sbin/losetup" ]; then
    timeout 30 chroot "$root" /usr/sbin/losetup --version >/dev/null \
      || die "losetup in the initramfs does not start"
  fi
  local tool
  for tool in "$root"/usr/sbin/partclone.*; do
    [ -e "$tool" ] || continue
    timeout 30 chroot "$root" "${tool#$root}" -v >/dev/null \
      || die "${tool#$root} in the initramfs does not start"
  done
  # A real map, as img makes one: partclone's threads must be able to end (libgcc_s).
  if [ -x "$root/usr/sbin/partclone.extfs" ] && command -v mkfs.ext4 >/dev/null; then
    mkdir -p "$root/tmp"
    truncate -s 4M "$root/tmp/self-test.ext4"
    timeout 60 mkfs.ext4 -q -F "$root/tmp/self-test.ext4"
    timeout 60 chroot "$root" /usr/sbin/partclone.extfs -D -s /tmp/self-test.ext4 \
        -o /tmp/self-test.domain -L /tmp/self-test.log -q >/dev/null 2>&1 \
      || die "partclone.extfs in the initramfs cannot map an ext4: $(tail -2 "$root/tmp/self-test.log" 2>/dev/null)"
    # What --shrink runs on an ext4: a forced check and the minimum size.
    if [ -x "$root/usr/sbin/resize2fs" ]; then
      in_chroot "$root" "e2fsck cannot check an ext4" /usr/sbin/e2fsck -fn /tmp/self-test.ext4
      in_chroot "$root" "resize2fs cannot size an ext4" /usr/sbin/resize2fs -P /tmp/self-test.ext4
    fi
    rm -f "$root"/tmp/self-test.*
  fi
  if [ -x "$root/usr/sbin/ntfsresize" ] && command -v mkntfs >/dev/null; then
    truncate -s 8M "$root/tmp/self-test.ntfs"
    timeout 60 mkntfs -q -F -Q "$root/tmp/self-test.ntfs" >/dev/null 2>&1
    in_chroot "$root" "ntfsresize cannot size an NTFS" \
      /usr/sbin/ntfsresize --info --no-progress-bar /tmp/self-test.ntfs
    in_chroot "$root" "ntfsfix cannot read an NTFS" /usr/bin/ntfsfix -n /tmp/self-test.ntfs
    rm -f "$root"/tmp/self-test.*
  fi
  if [ -x "$root/usr/sbin/fsck.fat" ] && command -v mkfs.vfat >/dev/null; then
    truncate -s 8M "$root/tmp/self-test.fat"
    timeout 60 mkfs.vfat "$root/tmp/self-test.fat" >/dev/null
    in_chroot "$root" "fsck.fat cannot check a FAT" /usr/sbin/fsck.fat -n /tmp/self-test.fat
    rm -f "$root"/tmp/self-test.*
  fi
  # libhivex edits a hive as img does: a key added, a value set, written, found again by name
  # (which needs the gconv modules), read back; and a file that is not a hive refused.
  if [ -e "$root/usr/lib/x86_64-linux-gnu/libhivex.so.0" ]; then
    echo "not a hive" >"$root/tmp/self-test.nohive"
    in_chroot "$root" "img cannot edit a registry hive with libhivex" /usr/bin/python3 -c "import sys
sys.path.insert(0, '/usr/lib/preboot')
from img.hive import Hive, HiveError, empty_hive
from img.regvalue import REG_SZ, encode_sz
open('/tmp/self-test.hive', 'wb').write(empty_hive())
with Hive('/tmp/self-test.hive', writable=True) as hive:
    hive.set_value(hive.ensure_key(('ControlSet001', 'Control')), 'Name', REG_SZ, encode_sz('PC-1'))
    hive.commit()
with Hive('/tmp/self-test.hive') as hive:
    assert hive.value(hive.key(('controlset001', 'CONTROL')), 'Name') == 'PC-1'
try:
    Hive('/tmp/self-test.nohive')
except HiveError as exc:
    assert 'not a registry hive' in str(exc), exc
else:
    raise SystemExit('libhivex opened a file that is not a hive')"
    rm -f "$root"/tmp/self-test.*
  fi
  for tool in /usr/bin/ntfs-3g /usr/sbin/fatresize; do
    [ -x "$root$tool" ] && in_chroot "$root" "$tool does not start" "$tool" --version
  done
}

# Run a command inside ROOT (output kept only for the message), or die saying WHAT.
in_chroot() {
  local root=$1 what=$2 output
  shift 2
  output=$(timeout 60 chroot "$root" "$@" 2>&1) || die "in the initramfs, $what: $(echo "$output" | tail -2)"
}

make_initrd() {
  local root=$1 out=$2
  # newc, owned by root, in a stable order; gzip -6: the kernel unpacks it at the same speed.
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | timeout 300 cpio -o -H newc -R 0:0 --quiet) \
    | gzip -6 >"$out"
}

write_manifest() {
  local root=$1 file=$2
  {
    echo "kernel: $(basename "$KERNEL_DEB") ($KVER)"
    echo "modules: $(cat "$root/etc/preboot-modules")"
    echo "python: $("$PYTHON" -V 2>&1) ($(dpkg-query -W -f='${Version}' python3.11 2>/dev/null))"
    echo "zstandard: $(basename "$ZSTD_DEB")"
    echo "busybox: $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null)"
    echo "partclone: $(dpkg-query -W -f='${Version}' partclone 2>/dev/null)" \
      "($(cd "$root/usr/sbin" && ls partclone.* 2>/dev/null | tr '\n' ' '))"
    echo "on demand: ${ONDEMAND_MODULES[*]}"
    echo "libraries img loads: $(for l in "${DLOPEN_LIBS[@]}"; do
      [ -e "$root$l" ] && printf '%s ' "$(basename "$l")"; done)"
    echo "add-on and shrink tools: $(for t in "${HOST_TOOLS[@]}" "${SHRINK_TOOLS[@]}"; do
      [ -x "$root$t" ] && printf '%s ' "$(basename "$t")"; done)"
    echo "engine: ${ENGINE_FILES[*]}"
    echo "tree: $(du -sh "$root" | cut -f1)"
  } >"$file"
}

# Downloads and extractions of packages other than the ones just used (an older kernel after a
# security update) are removed: the cache keeps one set.
prune_cache() {
  local keep_k keep_z entry
  keep_k=$(basename "$KERNEL_DEB" .deb); keep_z=$(basename "$ZSTD_DEB" .deb)
  for entry in "$CACHE"/linux-image-*.deb "$CACHE"/kernel-* "$CACHE"/python3-zstandard_*.deb \
               "$CACHE"/zstandard-*; do
    [ -e "$entry" ] || continue
    case "$(basename "$entry" .deb)" in
      "$keep_k"|"kernel-$keep_k"|"$keep_z"|"zstandard-$keep_z") ;;
      *) log "removing the outdated $(basename "$entry")"; rm -rf "$entry" ;;
    esac
  done
}

# ---------------------------------------------------------------------------------- main

main() {
  parse_args "$@"
  check_tools
  local t0=$SECONDS
  KERNEL_DEB=$(fetch_deb "$(kernel_package)")
  ZSTD_DEB=$(fetch_deb python3-zstandard)
  local zdir
  zdir=$CACHE/zstandard-$(basename "$ZSTD_DEB" .deb)
  if [ ! -d "$zdir" ]; then
    rm -rf "$zdir.tmp" && dpkg-deb -x "$ZSTD_DEB" "$zdir.tmp" && mv "$zdir.tmp" "$zdir"
  fi
  local modules
  modules=$(engine_modules "$zdir/usr/lib/python3/dist-packages") || exit 1
  mapfile -t ENGINE_MODULES <<<"$modules"
  ENGINE_FILES=()
  for m in "${ENGINE_MODULES[@]}"; do ENGINE_FILES+=("$(module_file "$m")"); done
  local key; key=$(build_key)
  if [ "$FORCE" = 0 ] && [ -s "$OUT/linux" ] && [ -s "$OUT/initrd" ] \
     && [ "$(cat "$OUT/.build-key" 2>/dev/null)" = "$key" ]; then
    log "up to date: $OUT/linux $OUT/initrd"
    return 0
  fi
  extract_kernel
  WORK=$(mktemp -d "$CACHE/build.XXXXXX")
  # --one-file-system: never into a /proc the self-test left mounted
  trap 'umount "$WORK/root/proc" 2>/dev/null || true; rm -rf --one-file-system "$WORK"' EXIT
  local work=$WORK root=$WORK/root
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,mnt,root}
  ln -s /proc/mounts "$root/etc/mtab"
  install_busybox "$root"
  install_host_tools "$root"
  install_modules "$root"
  install_python "$root"
  install_zstandard "$root" "$zdir"
  install_engine "$root"
  install_init "$root"
  compile_added "$root"
  self_test "$root"
  cp "$KDIR/boot/vmlinuz-$KVER" "$work/linux"
  make_initrd "$root" "$work/initrd"
  write_manifest "$root" "$work/manifest.txt"
  # Replace the outputs only when everything is built (a failed build keeps the old ones).
  mv "$work/linux" "$OUT/linux.new" && mv "$OUT/linux.new" "$OUT/linux"
  mv "$work/initrd" "$OUT/initrd.new" && mv "$OUT/initrd.new" "$OUT/initrd"
  mv "$work/manifest.txt" "$OUT/manifest.txt"
  echo "$key" >"$OUT/.build-key"
  prune_cache
  log "built in $((SECONDS - t0)) s: linux $(du -h "$OUT/linux" | cut -f1), initrd" \
      "$(du -h "$OUT/initrd" | cut -f1) (unpacked $(du -sh "$root" | cut -f1)) in $OUT"
}

main "$@"
