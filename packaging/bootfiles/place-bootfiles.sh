#!/bin/bash
# preboot-bootfiles: put the boot programs proxydhcpd names into a TFTP root, copied from the
# distribution's packages (never built or committed here), and say what came from where.
#
#   preboot-bootfiles [--force] [--download] [--cache DIR] [--family debian|suse] ROOT
#
# What lands in ROOT (the names proxydhcpd's defaults and docs/boot-programs.md use):
#   undionly.kpxe   iPXE for BIOS PXE ROMs                    (BootFileBIOS)       required
#   ipxe.efi        iPXE for x64 UEFI                          (BootFileUEFI64)     required
#   snponly.efi     iPXE for x64 UEFI, the firmware's network driver only          required
#   shimx64.efi     shim signed by the Microsoft UEFI CA: Secure Boot's first stage required
#   grubx64.efi     the distribution-signed network GRUB shim loads (beside shim)   required
#   ipxe-arm64.efi  iPXE for ARM64 UEFI (BootFileARM64)         when the distribution ships one
#
# Sources: installed packages first; else, on Debian, packages fetched with `apt-get download`
# into the cache (--download; never installed: shim-signed's and grub-efi-amd64-signed's
# scripts would touch this machine's EFI system partition) and unpacked there with dpkg-deb -x.
#
# Files are copied (a symlink in ROOT is never followed, nothing links out of ROOT), mode 0644,
# through a temporary name and a rename. ROOT/.preboot-bootfiles records the SHA-256 of each file
# placed, so a later run replaces its own files (a distribution update) but refuses a file an
# administrator put there that differs (kept, reported, exit 1) unless --force.
#
# Options:
#   --force          replace a file in ROOT that this command did not place and that differs
#   --download       fetch what is not installed with apt-get download (Debian only)
#   --cache DIR      where --download keeps the packages (default /var/cache/preboot/bootfiles)
#   --family debian|suse
#                    the distribution's package names and paths (default: the one running)
#   -h, --help       show this text and exit
#
# Exit: 0 every required file is in place; 1 something required is missing or was refused
# (each named on stderr, with the package to install); 2 usage.
# Test hooks: PREBOOT_BOOTFILES_SYSROOT (where installed files are looked for; default /).
set -uo pipefail

usage() {
  echo "usage: preboot-bootfiles [--force] [--download] [--cache DIR] [--family debian|suse] ROOT" >&2
  exit 2
}

force=0 download=0 cache=/var/cache/preboot/bootfiles family="" root=""
while [ $# -gt 0 ]; do
  case $1 in
    --force) force=1 ;;
    --download) download=1 ;;
    --cache) [ $# -ge 2 ] || usage; cache=$2; shift ;;
    --family) [ $# -ge 2 ] || usage; family=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [ -z "$root" ] || usage; root=$1 ;;
  esac
  shift
done
[ -n "$root" ] || usage
[ -d "$root" ] || { echo "preboot-bootfiles: $root is not a folder" >&2; exit 2; }
sysroot=${PREBOOT_BOOTFILES_SYSROOT:-/}
sysroot=${sysroot%/}
if [ -z "$family" ]; then
  if command -v dpkg-query >/dev/null 2>&1 && [ -e /etc/debian_version ]; then family=debian
  elif command -v rpm >/dev/null 2>&1; then family=suse
  else echo "preboot-bootfiles: neither Debian (dpkg) nor SUSE (rpm): say --family" >&2; exit 2
  fi
fi

# name|required|package|path in the package (one line each; a name may have several sources,
# tried in order). SUSE's names verified against openSUSE's ipxe.spec (bootimgs), shim-leap.spec
# and grub2.spec; SUSE ships snp-x86_64.efi (iPXE's snp.efi: every SNP device) rather than
# snponly.efi (the boot device only), placed under the name proxydhcpd's docs use.
case $family in
  debian) SOURCES="
undionly.kpxe|1|ipxe|/usr/lib/ipxe/undionly.kpxe
ipxe.efi|1|ipxe|/usr/lib/ipxe/ipxe.efi
snponly.efi|1|ipxe|/usr/lib/ipxe/snponly.efi
shimx64.efi|1|shim-signed|/usr/lib/shim/shimx64.efi.signed
grubx64.efi|1|grub-efi-amd64-signed|/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed
ipxe-arm64.efi|0|ipxe|/usr/lib/ipxe/ipxe-arm64.efi" ;;
  suse) SOURCES="
undionly.kpxe|1|ipxe-bootimgs|/usr/share/ipxe/undionly.kpxe
ipxe.efi|1|ipxe-bootimgs|/usr/share/ipxe/ipxe-x86_64.efi
snponly.efi|1|ipxe-bootimgs|/usr/share/ipxe/snp-x86_64.efi
shimx64.efi|1|shim|/usr/share/efi/x86_64/shim.efi
grubx64.efi|1|grub2-x86_64-efi|/usr/share/efi/x86_64/grub.efi
ipxe-arm64.efi|0|ipxe-bootimgs|/usr/share/ipxe/snp-arm64.efi" ;;
  *) usage ;;
esac
# Debian packages that may come from the cache (apt-get download) when not installed.
DOWNLOADABLE="shim-signed grub-efi-amd64-signed ipxe"

manifest=$root/.preboot-bootfiles
status=0

installed_version() {  # PACKAGE -> its installed version, or nothing
  [ "$sysroot" = "" ] || return 0          # a test's fake system root: no package database
  case $family in
    debian) dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null \
              | awk '$1 == "installed" {print $2}' ;;
    suse) rpm -q --qf '%{VERSION}-%{RELEASE}' "$1" 2>/dev/null | grep -v 'not installed' ;;
  esac
}

cached_deb() {  # PACKAGE -> the newest .deb in the cache, or nothing
  ls -1 "$cache/$1"/"$1"_*.deb 2>/dev/null | sort -V | tail -1
}

fetch_deb() {  # PACKAGE: the candidate version into the cache, unpacked under $cache/PKG/root
  local pkg=$1 dir=$cache/$1 candidate deb
  mkdir -p "$dir" || return 1
  candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  deb=$(cached_deb "$pkg")
  if [ -z "$deb" ] || { [ -n "$candidate" ] && [ "$candidate" != "(none)" ] && \
       [ "$(dpkg-deb -f "$deb" Version)" != "$candidate" ]; }; then
    (cd "$dir" && apt-get download -q "$pkg" >/dev/null 2>"$dir/download.log") || {
      echo "preboot-bootfiles: apt-get download $pkg failed: $(tail -1 "$dir/download.log")" >&2
      return 1; }
    deb=$(cached_deb "$pkg")
    find "$dir" -maxdepth 1 -name "${pkg}_*.deb" ! -path "$deb" -delete
  fi
  if [ ! -e "$dir/root/.unpacked-$(basename "$deb")" ]; then
    rm -rf "$dir/root" && mkdir -p "$dir/root" && dpkg-deb -x "$deb" "$dir/root" &&
      touch "$dir/root/.unpacked-$(basename "$deb")"
  fi
}

# find_source PACKAGE PATH -> "file|package version" on stdout, or nothing
find_source() {
  local pkg=$1 path=$2 version deb
  version=$(installed_version "$pkg")
  if [ -e "$sysroot$path" ] && { [ -n "$version" ] || [ -n "$sysroot" ]; }; then
    echo "$sysroot$path|$pkg ${version:-(version not recorded: files under $sysroot)}"
    return
  fi
  [ -z "$version" ] || return 0            # installed, without this file (ARM64 on Debian)
  [ "$family" = debian ] || return 0
  case " $DOWNLOADABLE " in *" $pkg "*) ;; *) return 0 ;; esac
  [ "$download" = 1 ] && fetch_deb "$pkg"
  deb=$(cached_deb "$pkg")
  if [ -n "$deb" ] && [ -e "$cache/$pkg/root$path" ]; then
    echo "$cache/$pkg/root$path|$pkg $(dpkg-deb -f "$deb" Version), downloaded"
  fi
}

recorded_sum() {  # NAME -> the SHA-256 this script recorded when it placed NAME, or nothing
  [ -f "$manifest" ] && awk -v n="$1" '$2 == n {s = $1} END {if (s) print s}' "$manifest"
}

record() {  # NAME SHA256
  local tmp=$manifest.tmp.$$
  { [ -f "$manifest" ] && awk -v n="$1" '$2 != n' "$manifest"; echo "$2 $1"; } >"$tmp" &&
    mv -f "$tmp" "$manifest"
}

place() {  # NAME SOURCE WHAT
  local name=$1 src=$2 what=$3 dest=$root/$1 new old recorded tmp
  new=$(sha256sum <"$src" | cut -d' ' -f1)
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    old=$( [ -f "$dest" ] && [ ! -L "$dest" ] && sha256sum <"$dest" | cut -d' ' -f1 )
    recorded=$(recorded_sum "$name")
    if [ -n "$old" ] && [ "$old" = "$new" ]; then
      record "$name" "$new"
      echo "unchanged $name: $what"
      return 0
    fi
    if [ "$force" != 1 ] && { [ -z "$old" ] || [ "$old" != "$recorded" ]; }; then
      echo "preboot-bootfiles: kept $dest: it differs from $what and was not placed by" \
           "preboot-bootfiles (an administrator's file); --force replaces it" >&2
      return 1
    fi
  fi
  tmp=$root/.$name.preboot-tmp.$$
  # cp -L: the package's file may be a symlink (SUSE's grub.efi); the copy never is one.
  if ! cp -L "$src" "$tmp" || ! chmod 0644 "$tmp" || ! mv -f -T "$tmp" "$dest"; then
    rm -f "$tmp"
    echo "preboot-bootfiles: cannot write $dest" >&2
    return 1
  fi
  record "$name" "$new"
  echo "placed $name: $what ($src)"
}

declare -A done_names=()
declare -A wanted=()
while IFS='|' read -r name required pkg path; do
  [ -n "$name" ] || continue
  [ "$required" = 1 ] && wanted[$name]="${wanted[$name]:-}${wanted[$name]:+ or }$pkg ($path)"
  [ -n "${done_names[$name]:-}" ] && continue
  found=$(find_source "$pkg" "$path")
  [ -n "$found" ] || continue
  done_names[$name]=1
  place "$name" "${found%%|*}" "${found#*|}" || status=1
done <<<"$SOURCES"

for name in "${!wanted[@]}"; do
  if [ -z "${done_names[$name]:-}" ]; then
    hint="install it"
    [ "$family" = debian ] && hint="install it, or run with --download (apt-get download into $cache)"
    echo "preboot-bootfiles: missing $name: from ${wanted[$name]}; $hint" >&2
    status=1
  fi
done
exit $status
