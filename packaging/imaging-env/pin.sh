#!/bin/bash
# Pin the Debian packages the imaging environment is built from (packages.lock, next to this
# script): for each line, the version apt offers now, the SHA-256 of its .deb and its path on
# a Debian mirror (debian/pool/... or debian-security/pool/...), as `apt-get download --print-uris` reports them (nothing is
# downloaded).
#
#   packaging/imaging-env/pin.sh            pin the lines that have only a name (a new package)
#   packaging/imaging-env/pin.sh --all      re-pin every line to apt's current version (updates)
#   packaging/imaging-env/pin.sh --check    exit 1 when apt offers other versions than the lock
#
# The kernel's line (linux-image-<abi>-amd64) follows linux-image-amd64: with --all it becomes
# the versioned package the metapackage depends on now. Needs Debian's apt with bookworm's
# package lists (`apt-get update`). After --all, build and boot-test the environment
# (docs/imaging-environment.md "Updating the pins") and commit packages.lock.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOCK=${PREBOOT_IMGENV_LOCK:-$HERE/packages.lock}
MODE=new
case "${1:-}" in
  "") ;;
  --all) MODE=all ;;
  --check) MODE=check ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

log() { echo "pin: $*" >&2; }
die() { log "$*"; exit 1; }

# "name version sha256 pool-path" for the version apt would download now.
resolve() {
  local name=$1 line url sum version
  line=$(timeout 120 apt-get download --print-uris -q "$name" 2>/dev/null | grep "^'" | head -1) \
    || die "apt knows no package $name (apt-get update?)"
  [ -n "$line" ] || die "apt knows no package $name (apt-get update?)"
  read -r url _ _ sum <<<"$line"
  url=${url//\'/}
  sum=${sum#SHA256:}
  [ ${#sum} -eq 64 ] || die "apt gave no SHA-256 for $name"
  version=$(timeout 60 apt-cache show --no-all-versions "$name" | awk '/^Version:/ {print $2; exit}')
  # archive/pool/... (debian/ or debian-security/), relative to the mirror's host, with the
  # URL's escapes undone (%2b is +, %3a is :)
  local path=${url#*://*/}
  path=$(printf '%b' "${path//%/\\x}")
  echo "$name $version $sum $path"
}

# The kernel package linux-image-amd64 points at now.
current_kernel() {
  timeout 60 apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}'
}

main() {
  [ -f "$LOCK" ] || die "no $LOCK"
  local changed=0 line name version rest
  OUT_TMP=$(mktemp); local out=$OUT_TMP
  trap 'rm -f "$OUT_TMP"' EXIT
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) echo "$line" >>"$out"; continue ;; esac
    read -r name version rest <<<"$line"
    if [ "$MODE" != new ] && [[ $name =~ ^linux-image-[0-9].*-amd64$ ]]; then
      local k; k=$(current_kernel)
      [ -n "$k" ] || die "cannot tell the current kernel (apt-cache depends linux-image-amd64)"
      name=$k
    fi
    if [ "$MODE" = new ] && [ -n "${version:-}" ]; then echo "$line" >>"$out"; continue; fi
    local pinned; pinned=$(resolve "$name")
    if [ "$pinned" != "$line" ]; then
      changed=1
      [ "$MODE" = check ] && log "differs: lock '${line}' / apt '${pinned}'"
    fi
    echo "$pinned" >>"$out"
  done <"$LOCK"
  if [ "$MODE" = check ]; then
    [ "$changed" = 0 ] && log "the lock matches apt" || exit 1
    return 0
  fi
  [ "$changed" = 0 ] && { log "nothing to change"; return 0; }
  cp "$out" "$LOCK"
  log "updated $LOCK"
}

main "$@"
