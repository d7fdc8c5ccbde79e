#!/bin/bash
# Install everything the stack and the tests need on a fresh Debian-like machine (as root):
# the Debian packages (real TFTP clients and peers, qemu PXE firmware, dnsmasq, ...) and this
# project with its Python dependencies. Idempotent and quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  tftp-hpa atftp curl            # real TFTP clients for the tests
  tftpd-hpa dnsmasq-base         # peers for bench/ and the site DHCP server of e2e tests
  iproute2 nftables tcpdump      # network namespaces, packet loss, captures
  ethtool                        # the multicast lab turns GRO on (tests/mcastlab.py)
  rpm shellcheck                 # packaging checks (rpmspec, init scripts)
  debootstrap                    # the root the RPMs are installed into (tests/rpmroot.py)
  groff-base man-db rpmlint      # the generated man pages render; rpmlint on the built RPMs
  qemu-system-x86 ipxe-qemu ipxe ovmf radvd   # real PXE firmware for e2e tests
  slapd ldap-utils               # a real OpenLDAP directory for the LDAP backend's tests
  libldap2-dev libsasl2-dev gcc python3-dev   # to build python-ldap (no wheels on PyPI)
  partclone fdisk gdisk e2fsprogs dosfstools fatresize mtools ntfs-3g xfsprogs btrfs-progs  # imaging
  libhivex0 libhivex-bin         # img edits Windows' registry hive; tests read it with hivexget
  libxml2-utils                  # xmllint: the results log must stay well-formed XML
  strace                         # proves imgsrvd sends images with sendfile(2)
  openssl                        # preboot-dir tls create and the TLS tests make certificates
  cpio xz-utils curl             # the imaging environment (build.sh unpacks pinned .debs; cpio reads initrds in tests)
  chromium                       # a real browser engine for imgsrvd's status page test
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  # Package scripts must not start the peers' own services (tftpd-hpa would grab port 69).
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/preboot-apt.log 2>&1 \
    || { tail -20 /tmp/preboot-apt.log >&2; exit 1; }
  [ "$created_policy" = 1 ] && rm -f "$policy"
fi
# The peers' packaged daemons are for bench/ only, which starts its own instances on other
# ports; policy-rc.d above keeps the packages from starting theirs on port 69.

PIP=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore)
if ! python3 -c "import configobj, validate, daemon, psutil, tftpy, scapy, uvloop, aiohttp, ldap, zstandard, pytest, hypothesis, prometheus_client, playwright" 2>/dev/null \
   || ! python3 -m pip show -q preboot-services >/dev/null 2>&1; then
  "${PIP[@]}" -e ".[test]"
fi
# tftpd's lock-step loop in C (tftpd/_lockstep.c): built in place, again whenever the source is
# newer than the module (an editable install does not rebuild it). Without it tftpd runs the
# same loop in Python, slower (bench/RESULTS.md), and test_lockstep.py fails.
if ! ls tftpd/_lockstep.*.so >/dev/null 2>&1 || [ -n "$(find tftpd/_lockstep.c setup.py -newer "$(ls tftpd/_lockstep.*.so | head -1)")" ]; then
  python3 setup.py -q build_ext --inplace >/tmp/preboot-build-ext.log 2>&1 \
    || { tail -20 /tmp/preboot-build-ext.log >&2; exit 1; }
fi
# Playwright drives Debian's chromium (executable_path, tests/integration/test_status_page.py):
# its own browser download ("playwright install") is never run.
# The minimal root tests/integration/test_rpm_install.py installs the RPMs into: debootstrapped
# once from the mirror and cached (/var/cache/preboot-tests), so the tests need no network.
if [ "$(id -u)" = 0 ]; then
  python3 tests/rpmroot.py >/dev/null
fi
