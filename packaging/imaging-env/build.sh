#!/bin/bash
# Build the imaging environment: a Linux kernel (`linux`) and an initramfs (`initrd`, gzip cpio)
# that the Preboot Policy Service boots on a machine to image it (docs/imaging-environment.md).
#
#   packaging/imaging-env/build.sh [--out DIR] [--cache DIR] [--force] [--fetch-only]
#
# Everything in it comes from the Debian packages pinned in packages.lock (name, version,
# SHA-256 of the .deb), downloaded from a Debian mirror (PREBOOT_DEBIAN_MIRROR, default
# https://deb.debian.org) or found in the cache, checked against the lock and unpacked into a
# private root (never installed): nothing is taken from the host, so any Linux host (x86-64)
# with bash, tar, xz, sha256sum and dpkg-deb or ar builds the same bytes. In it:
#   - Debian's kernel and only the modules a PC or VM needs to image a disk: NICs (virtio-net,
#     e1000, e1000e), disks (virtio-blk, ata_piix, ahci, sd), loop, ext4, fuse, xfs and btrfs
#     for add-on images;
#   - busybox (busybox-static) with every applet linked, util-linux's losetup, mount, umount,
#     mtools and ntfs-3g (what img runs for add-on images);
#   - e2fsck, resize2fs, ntfsresize, ntfsfix, fatresize and fsck.fat (what `img restore
#     --shrink` runs), xfs_growfs and btrfs (--grow);
#   - libhivex (libhivex0), which img loads with ctypes to edit a restored Windows' registry
#     hive when it applies a machine's identity (img/hive.py), and glibc's gconv modules it needs;
#   - partclone's programs for ext2/3/4, FAT, NTFS, XFS and btrfs (what img runs to learn a
#     partition's used blocks when it makes an image);
#   - Debian's python3.11 with a pruned stdlib, compiled here (hash-based .pyc: nothing is
#     compiled under emulation at boot), and python3-zstandard;
#   - our imaging engine `img` (and /usr/bin/img to run it) and the `common` modules it
#     imports (no daemons);
#   - /init (the file `init` next to this script) and udhcpc's script.
# The shared libraries of every program come from the same packages; one that is in none of
# them stops the build with its name (add its package to packages.lock: pin.sh).
# The initrd is reproducible: mkinitrd.py writes sorted entries owned by 0:0 with one mtime
# (SOURCE_DATE_EPOCH, default FALLBACK_EPOCH below), gzip without name or time.
# Outputs DIR/linux, DIR/initrd, DIR/modules (the kernel modules inside) and DIR/manifest.txt
# (inputs and the outputs' SHA-256). A build key (hash of every input) is kept in
# DIR/.build-key: when it matches, the script says "up to date" and exits in a few seconds.
# --fetch-only downloads and checks the packages into the cache and stops (then build offline,
# e.g. in rpmbuild, with the same --cache). Run as root, the build also runs a self-test in a
# chroot of the tree; as another user it skips that. Every command that may hang has a timeout.
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
FETCH_ONLY=0
LOCK=${PREBOOT_IMGENV_LOCK:-$HERE/packages.lock}
MIRROR=${PREBOOT_DEBIAN_MIRROR:-https://deb.debian.org}
# The entries' time when SOURCE_DATE_EPOCH is not set: the day the packages were first pinned
# (2025-12-07). Any fixed value gives fixed bytes; the manifest records the one used.
FALLBACK_EPOCH=1765065600
EPOCH=${SOURCE_DATE_EPOCH:-$FALLBACK_EPOCH}
PYVER=3.11
MULTIARCH=x86_64-linux-gnu
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
# Programs img runs to apply add-on images (busybox's losetup and umount lack the options it
# uses): util-linux's losetup, mount, umount, mtools for FAT and ntfs-3g for NTFS. Copied from
# the pinned packages with their libraries, at the same path in the initramfs.
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
      --fetch-only) FETCH_ONLY=1; shift ;;
      -h|--help) usage ;;
      *) log "unknown argument $1"; usage ;;
    esac
  done
  OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
  # Downloads and the extracted packages live beside the outputs unless told otherwise.
  CACHE=${CACHE:-$OUT/.cache}
  mkdir -p "$CACHE/debs"
  CACHE=$(cd "$CACHE" && pwd)
  [[ $EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH=$EPOCH is not a number of seconds"
}

check_tools() {
  local missing=()
  for tool in tar xz sha256sum find sort timeout; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  command -v dpkg-deb >/dev/null || command -v ar >/dev/null || missing+=("dpkg-deb or ar")
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (scripts/install-deps.sh installs them)"
  [ "$(uname -m)" = x86_64 ] || die "the pinned packages are amd64: build on an x86-64 host"
}

# ---------------------------------------------------------------------------------- packages

# The lock's entries ("name version sha256 path"), comments and blank lines left out; a line
# without all four fields (a package added but not pinned) stops the build.
read_lock() {
  [ -f "$LOCK" ] || die "no package lock $LOCK"
  LOCK_LINES=()
  local line name version sum path extra
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; esac
    read -r name version sum path extra <<<"$line"
    [ -n "${path:-}" ] && [ -z "${extra:-}" ] && [[ $sum =~ ^[0-9a-f]{64}$ ]] \
      || die "$LOCK: '$line' is not 'name version sha256 path' (run pin.sh for a new package)"
    LOCK_LINES+=("$name $version $sum $path")
  done <"$LOCK"
  [ ${#LOCK_LINES[@]} -gt 0 ] || die "$LOCK pins no package"
}

# The cached .deb of a lock entry, downloaded if absent, verified against the lock either way.
# Prints its path.
fetch_deb() {
  local name=$1 sum=$3 path=$4 file
  file=$CACHE/debs/$(basename "$path")
  # the layout before the lock kept the .debs in the cache folder itself
  [ -f "$file" ] || [ ! -f "$CACHE/$(basename "$path")" ] || mv "$CACHE/$(basename "$path")" "$file"
  if [ ! -f "$file" ]; then
    log "downloading $name"
    download "$MIRROR/$path" "$file.part" || die "cannot download $MIRROR/$path"
    mv "$file.part" "$file"
  fi
  if [ "$(sha256sum <"$file" | cut -d' ' -f1)" != "$sum" ]; then
    mv "$file" "$file.bad"
    die "$(basename "$file") does not match packages.lock (SHA-256 differs; kept as .bad)"
  fi
  echo "$file"
}

download() {
  local url=$1 dest=$2
  if [[ $url == file://* ]]; then cp "${url#file://}" "$dest"; return; fi
  if command -v curl >/dev/null; then
    timeout 900 curl -fsSL --retry 3 -o "$dest" "$url"
  elif command -v wget >/dev/null; then
    timeout 900 wget -q -O "$dest" "$url"
  else
    die "neither curl nor wget to download $url (or put the .deb into $CACHE/debs)"
  fi
}

# The uncompressed data tar of a .deb on stdout: dpkg-deb when there is one, else ar and the
# decompressor of the member (a .deb is an ar archive: debian-binary, control, data.tar.*).
deb_data() {
  local deb=$1 member
  if command -v dpkg-deb >/dev/null; then dpkg-deb --fsys-tarfile "$deb"; return; fi
  member=$(ar t "$deb" | grep '^data\.tar') || die "$deb has no data.tar member"
  case "$member" in
    *.xz) ar p "$deb" "$member" | xz -dc ;;
    *.zst) ar p "$deb" "$member" | zstd -dc ;;
    *.gz) ar p "$deb" "$member" | gzip -dc ;;
    *.tar) ar p "$deb" "$member" ;;
    *) die "$deb: unknown member $member" ;;
  esac
}

# Every pinned package but the kernel, unpacked into one root ($SYS), once per lock: the files
# the environment is made of. Its folders are merged into /usr as on an installed Debian 12
# (/bin -> usr/bin ...) and absolute links made relative, so paths resolve inside it.
make_sysroot() {
  local key entry name deb
  key=$(printf '%s\n' "${LOCK_LINES[@]}" | grep -v '^linux-image-' | sha256sum | cut -c1-16)
  SYS=$CACHE/sysroot-$key
  [ -f "$SYS/.complete" ] && return 0
  log "unpacking the pinned packages"
  rm -rf "$SYS"; mkdir -p "$SYS"
  for entry in "${LOCK_LINES[@]}"; do
    read -r name _ <<<"$entry"
    [[ $name == linux-image-* ]] && continue
    deb=$(fetch_deb $entry) || exit 1
    deb_data "$deb" | timeout 300 tar -x -C "$SYS" || die "cannot unpack $(basename "$deb")"
  done
  local d
  for d in bin sbin lib lib64; do
    [ -d "$SYS/$d" ] && [ ! -L "$SYS/$d" ] || continue
    mkdir -p "$SYS/usr/$d"
    cp -a "$SYS/$d/." "$SYS/usr/$d/" && rm -rf "${SYS:?}/$d"
    ln -s "usr/$d" "$SYS/$d"
  done
  local link target
  while IFS= read -r -d '' link; do
    target=$(readlink "$link")
    ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$SYS$target")" "$link"
  done < <(find "$SYS" -type l -lname '/*' -print0)
  touch "$SYS/.complete"
}

# The kernel's lock entry.
kernel_entry() {
  printf '%s\n' "${LOCK_LINES[@]}" | grep '^linux-image-' | head -1 | grep . \
    || die "packages.lock pins no kernel (a linux-image-<abi>-amd64 line)"
}

# The pinned interpreter, run from $SYS through its own loader and libraries (no chroot, no
# root): the build needs no Python on the host. Fixed hash seed: frozenset constants are
# marshalled in hash order. A command (array), so that timeout can run it.
set_sys_python() {
  SYS_PYTHON=(env PYTHONHOME="$SYS/usr" PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1
              SOURCE_DATE_EPOCH="$EPOCH" "$SYS/lib64/ld-linux-x86-64.so.2"
              --library-path "$SYS/lib/$MULTIARCH" "$SYS/usr/bin/python$PYVER" -s)
}

# ---------------------------------------------------------------------------------- build key

# The engine's modules: every img module, and the common modules they import (measured with
# -X importtime under the pinned interpreter, so nothing else of the project is copied).
engine_modules() {
  local imports trace
  imports=$(cd "$REPO" && ls img/*.py | sed 's|/|.|; s|\.py$||; s|\.__init__$||' | paste -sd, -)
  trace=$(cd "$REPO" && PYTHONPATH="$REPO" timeout 120 "${SYS_PYTHON[@]}" -X importtime \
            -c "import ${imports//,/; import }" 2>&1 >/dev/null) \
    || die "the pinned python cannot import the engine: $(echo "$trace" | grep -v '^import time:' | tail -3)"
  echo "$trace" | awk -F'|' '/^import time:/{gsub(/ /, "", $3); print $3}' \
    | grep -E '^(img|common)(\.|$)' | LC_ALL=C sort -u
}

# Module name (img.client) -> file relative to the repository (img/client.py or .../__init__.py).
module_file() {
  local path=${1//.//}
  if [ -d "$REPO/$path" ]; then echo "$path/__init__.py"; else echo "$path.py"; fi
}

build_key() {
  {
    sha256sum "$HERE/build.sh" "$HERE/init" "$HERE/mkinitrd.py" "$LOCK"
    (cd "$REPO" && sha256sum "${ENGINE_FILES[@]}")
    echo "epoch $EPOCH"
  } | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------------------------- pieces

# Extract the kernel image and the module folders once per kernel package (cached).
extract_kernel() {
  local dir patterns=() deb
  local entry; entry=$(kernel_entry)
  # shellcheck disable=SC2086 # the entry is four words, the arguments of fetch_deb
  deb=$(fetch_deb $entry) || exit 1
  dir=$CACHE/kernel-$(basename "$deb" .deb)
  patterns=('./boot/vmlinuz-*' './lib/modules/*/modules.builtin' './lib/modules/*/modules.order')
  for g in "${MODULE_GLOBS[@]}"; do patterns+=("./lib/modules/*/kernel/$g"); done
  # .complete records what was extracted: another module list extracts again
  if [ "$(cat "$dir/.complete" 2>/dev/null)" != "${patterns[*]}" ]; then
    log "extracting $(basename "$deb")"
    rm -rf "$dir"; mkdir -p "$dir"
    deb_data "$deb" | timeout 300 tar -x -C "$dir" --wildcards "${patterns[@]}"
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
  depmod_sorted "$KDIR"
  files=$(for m in "${want[@]}"; do
            grep -E "(^|/)$m\.ko:" "$mdir/modules.dep" || die "module $m not in the kernel package"
          done | tr -d ':' | tr ' ' '\n' | sort -u)
  for f in $files; do
    mkdir -p "$root/lib/modules/$KVER/$(dirname "$f")"
    cp "$mdir/$f" "$root/lib/modules/$KVER/$f"
  done
  cp "$mdir/modules.builtin" "$mdir/modules.order" "$root/lib/modules/$KVER/"
  depmod_sorted "$root"
  echo "${boot[*]}" >"$root/etc/preboot-modules"
}

# busybox depmod over ROOT's modules, its files sorted: it lists modules in the order the file
# system returns them, which differs between file systems; modprobe reads the whole files.
depmod_sorted() {
  local root=$1 f
  timeout 120 "$SYS/bin/busybox" depmod -b "$root" "$KVER" || die "depmod failed in $root"
  for f in modules.dep modules.alias modules.symbols; do
    [ -f "$root/lib/modules/$KVER/$f" ] || continue
    LC_ALL=C sort -o "$root/lib/modules/$KVER/$f" "$root/lib/modules/$KVER/$f"
  done
}

install_busybox() {
  local root=$1
  cp "$SYS/bin/busybox" "$root/bin/busybox"
  # Links made here: `busybox --install` needs /proc at boot, and udhcpc needs /bin/sh early.
  for applet in $("$SYS/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  # the kernel runs /sbin/modprobe when a driver asks for another module
  ln -s ../bin/busybox "$root/sbin/modprobe"
}

install_host_tools() {
  local root=$1 tool
  for tool in "${HOST_TOOLS[@]}" "${SHRINK_TOOLS[@]}" "${PARTCLONE_TOOLS[@]}"; do
    install_tool "$root" "$tool"
  done
  for tool in "${MTOOLS_LINKS[@]}"; do ln -s mtools "$root/usr/bin/$tool"; done
  # glibc loads libgcc_s at run time (dlopen, so ld.so --list does not show it) for
  # pthread_exit and thread cancellation; partclone's threads end that way, and abort without it.
  local gcc_s=/lib/$MULTIARCH/libgcc_s.so.1
  [ -f "$SYS$gcc_s" ] || die "libgcc_s.so.1 is not in the pinned packages (libgcc-s1)"
  mkdir -p "$root$(dirname "$gcc_s")"
  cp -L "$SYS$gcc_s" "$root$gcc_s"
  copy_libs "$root" "$gcc_s"
  local lib
  for lib in "${DLOPEN_LIBS[@]}"; do
    [ -e "$SYS$lib" ] || die "$lib is in none of the pinned packages (libhivex0)"
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$SYS$lib" "$root$lib"
    copy_libs "$root" "$lib"
  done
  mkdir -p "$root$GCONV_DIR"
  for lib in "${GCONV_FILES[@]}"; do
    [ -e "$SYS$GCONV_DIR/$lib" ] || die "$GCONV_DIR/$lib is not in the pinned libc6"
    cp -L "$SYS$GCONV_DIR/$lib" "$root$GCONV_DIR/$lib"
  done
  local link
  for link in "${PARTCLONE_LINKS[@]}"; do
    ln -s "${link#*:}" "$root/usr/sbin/${link%%:*}"
  done
}

# Copy the program TOOL (a path in the pinned packages) and its libraries into ROOT.
install_tool() {
  local root=$1 tool=$2
  [ -x "$SYS$tool" ] || die "$tool is in none of the pinned packages (packages.lock)"
  mkdir -p "$root$(dirname "$tool")"
  cp -L "$SYS$tool" "$root$tool"
  chmod 755 "$root$tool"
  copy_libs "$root" "$tool"
}

# Copy the shared libraries FILE (a path in the pinned packages) needs into ROOT, same paths.
copy_libs() {
  local root=$1 file=$2 listing lib
  # The pinned loader lists what FILE loads, searched in the pinned libraries only
  # (--inhibit-cache: never the host's ld.so.cache).
  listing=$(timeout 30 "$SYS/lib64/ld-linux-x86-64.so.2" --inhibit-cache \
              --library-path "$SYS/lib/$MULTIARCH" --list "$SYS$file" 2>&1) \
    || die "cannot list the libraries of $file: $(echo "$listing" | tail -1)"
  if grep -q 'not found' <<<"$listing"; then
    die "$file needs $(grep 'not found' <<<"$listing" | awk '{print $1}' | paste -sd' ' -), in none of the pinned packages: add its package to packages.lock"
  fi
  for lib in $(awk '/=>/ && $3 ~ /^\// {print $3}' <<<"$listing"); do
    [[ $lib == "$SYS"/* ]] || die "$file: $lib is not from the pinned packages"
    lib=${lib#"$SYS"}
    [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$SYS$lib" "$root$lib"; }
  done
  # the loader itself (PT_INTERP), as the program names it
  [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || {
    mkdir -p "$root/lib64"; cp -L "$SYS/lib64/ld-linux-x86-64.so.2" "$root/lib64/"; }
}

install_python() {
  local root=$1 lib=/usr/lib/python$PYVER excludes=() so
  cp "$SYS/usr/bin/python$PYVER" "$root/usr/bin/python$PYVER"
  ln -s "python$PYVER" "$root/usr/bin/python3"
  copy_libs "$root" "/usr/bin/python$PYVER"
  for pattern in "${STDLIB_EXCLUDES[@]}"; do excludes+=(--exclude="$pattern"); done
  tar -C "$SYS" -cf - "${excludes[@]}" "${lib#/}" | tar -C "$root" -xf -
  for so in "$root$lib"/lib-dynload/*.so; do
    if [[ $(basename "$so") =~ $DYNLOAD_EXCLUDES ]]; then rm -f "$so"; else copy_libs "$root" "${so#"$root"}"; fi
  done
}

install_zstandard() {
  local root=$1
  local dest=$root/usr/lib/python3/dist-packages
  mkdir -p "$dest"
  cp -a "$SYS/usr/lib/python3/dist-packages/zstandard" "$dest/"
  # The C backend is the one used; the cffi one would need _cffi_backend.
  rm -f "$dest"/zstandard/_cffi.*.so "$dest/zstandard/backend_cffi.py" "$dest/zstandard/__init__.pyi"
  local so; so=$(ls "$dest"/zstandard/backend_c.*.so)
  copy_libs "$root" "${so#"$root"}"
}

install_engine() {
  local root=$1 f
  local dest=$root/usr/lib/preboot
  for f in "${ENGINE_FILES[@]}"; do
    mkdir -p "$dest/$(dirname "$f")"
    cp "$REPO/$f" "$dest/$f"
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

# Bytecode for every Python file (Debian compiles its stdlib at install time, so the .debs have
# none): compiled here, by the pinned interpreter, so nothing is compiled under emulation at boot.
compile_added() {
  local root=$1 output
  # unchecked-hash: no source mtime in the .pyc (reproducible) and no check at boot; -s/-p: the
  # path each .pyc records is the one in the initramfs, not the build folder. One process:
  # the same order of compilation gives the same marshalled bytes.
  output=$(timeout 600 "${SYS_PYTHON[@]}" -m compileall -q \
             -j 1 --invalidation-mode unchecked-hash -s "$root" -p / \
             "$root/usr/lib/python$PYVER" "$root/usr/lib/preboot" \
             "$root/usr/lib/python3/dist-packages/zstandard" 2>&1) \
    || die "compiling the Python files failed: $(echo "$output" | tail -5)"
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
  timeout 600 "${SYS_PYTHON[@]}" "$HERE/mkinitrd.py" --epoch "$EPOCH" "$root" "$out" \
    || die "cannot write the initrd"
}

write_manifest() {
  local root=$1 file=$2 entry
  {
    echo "# preboot imaging environment: its inputs (packages.lock) and outputs (SHA-256)"
    echo "kernel-version: $KVER"
    echo "source-date-epoch: $EPOCH"
    echo "boot-modules: $(cat "$root/etc/preboot-modules")"
    echo "on-demand-modules: ${ONDEMAND_MODULES[*]}"
    echo "libraries-img-loads: ${DLOPEN_LIBS[*]}"
    for entry in "${LOCK_LINES[@]}"; do
      read -r name version sum _ <<<"$entry"
      echo "package: $name $version $sum"
    done
    for f in "${ENGINE_FILES[@]}"; do echo "engine: $(cd "$REPO" && sha256sum "$f" | awk '{print $2, $1}')"; done
    echo "tree: $(find "$root" | wc -l) entries, $(find "$root" -type f -printf '%s\n' | awk '{s+=$1} END {print s}') bytes"
    (cd "$(dirname "$file")" && for f in linux initrd modules; do echo "output: $f $(sha256sum <"$f" | cut -d' ' -f1)"; done)
  } >"$file"
}

# Downloads and unpacked trees of packages the lock no longer pins (an older kernel after a
# security update) are removed: the cache keeps one set.
prune_cache() {
  local keep=() entry base
  for entry in "${LOCK_LINES[@]}"; do keep+=("$(basename "${entry##* }")"); done
  for entry in "$CACHE"/debs/*.deb "$CACHE"/*.deb "$CACHE"/kernel-* "$CACHE"/sysroot-* \
               "$CACHE"/zstandard-*; do
    [ -e "$entry" ] || continue
    base=$(basename "$entry")
    case "$entry" in
      "$SYS"|"$KDIR") continue ;;
      "$CACHE"/debs/*) [[ " ${keep[*]} " == *" $base "* ]] && continue ;;
    esac
    log "removing the outdated $base"; rm -rf "$entry"
  done
}

# ---------------------------------------------------------------------------------- main

main() {
  parse_args "$@"
  check_tools
  read_lock
  local t0=$SECONDS entry
  if [ "$FETCH_ONLY" = 1 ]; then
    for entry in "${LOCK_LINES[@]}"; do fetch_deb $entry >/dev/null; done
    log "every pinned package is in $CACHE/debs and matches the lock"
    return 0
  fi
  make_sysroot
  set_sys_python
  local modules
  modules=$(engine_modules) || exit 1
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
  install_zstandard "$root"
  install_engine "$root"
  install_init "$root"
  compile_added "$root"
  cp "$KDIR/boot/vmlinuz-$KVER" "$work/linux"
  make_initrd "$root" "$work/initrd"
  (cd "$root/lib/modules/$KVER" && find kernel -name '*.ko' | LC_ALL=C sort) >"$work/modules"
  write_manifest "$root" "$work/manifest.txt"
  # after the initrd is written: nothing the self-test leaves in the tree gets into it
  self_test "$root"
  # Replace the outputs only when everything is built (a failed build keeps the old ones).
  local f
  for f in linux initrd modules manifest.txt; do
    mv "$work/$f" "$OUT/$f.new" && mv "$OUT/$f.new" "$OUT/$f"
  done
  echo "$key" >"$OUT/.build-key"
  prune_cache
  log "built in $((SECONDS - t0)) s: linux $(du -h "$OUT/linux" | cut -f1), initrd" \
      "$(du -h "$OUT/initrd" | cut -f1) (initrd sha256 $(sha256sum <"$OUT/initrd" | cut -c1-16)) in $OUT"
}

main "$@"
