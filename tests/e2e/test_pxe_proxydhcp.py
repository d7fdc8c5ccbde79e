"""End to end: real firmware boots through OUR proxyDHCP and OUR tftpd, beside a site DHCP server
that gives addresses only (no next-server, no file, no PXE options).

Layouts (netlab), all inside namespaces the test creates and deletes::

  flat       [dhcp ns] dnsmasq 192.168.77.1: pool only
             [srv ns ] br0 192.168.77.2: proxydhcpd (67 + 4011), tftpd (69), radvd, tap0 -- qemu
  colocated  [srv ns ] br0 192.168.77.2: dnsmasq (pool + option 60 "PXEClient"), proxydhcpd on
                       4011 only (ListenPort67 = NO), tftpd, radvd, tap0 -- qemu
  relay      [dhcp ns] dnsmasq 192.168.77.1: pools for 192.168.77.0/24 and 192.168.78.0/24
             [srv ns ] br0 192.168.77.2: proxydhcpd, tftpd
             [rtr ns ] 192.168.77.254 | br1 192.168.78.1: dnsmasq --dhcp-relay to .1 and .2,
                       IPv4 forwarding, radvd, tap0 -- qemu

Boot chains:
  bios  SeaBIOS + qemu's iPXE NIC ROM (already iPXE: user class "iPXE", arch 0) -> our ProxyDHCP
        offer names IPXEScriptURL (boot.ipxe on our tftpd) -> marker
  uefi  OVMF's own PXE (NIC ROM disabled, arch 7) -> our offer (UEFIVia4011 = YES: no option 43,
        so OVMF asks again on port 4011 and our ACK names ipxe.efi; NO: ipxe.efi in the offer)
        -> ipxe.efi from our tftpd -> iPXE (user class "iPXE") -> our offer names boot.ipxe -> marker

The marker `PREBOOT-E2E-OK <token>` carries a token made by this run (so a stale log cannot
pass). Afterwards proxydhcpd's status counters (offers, acks, firmware seen) and tftpd's
completed transfers must show that OUR daemons did the work. Every run captures the DHCP traffic
(tcpdump) into the lab's workdir; a failure message decodes it.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import netlab

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

TIMEOUT = float(os.environ.get("PREBOOT_E2E_TIMEOUT", "120"))
MARKER = re.compile(r"PREBOOT-E2E-OK (?P<token>[0-9a-f]{16})\b")
HTTP_PORT = 8080

BIOS_E1000 = netlab.VmSpec("bios", nic="e1000")
BIOS_VIRTIO = netlab.VmSpec("bios", nic="virtio-net-pci")
UEFI_OVMF_PXE = netlab.VmSpec("uefi", nic="virtio-net-pci", nic_rom=False)


@dataclass(frozen=True)
class Case:
    """One boot: VM, layout, proxydhcpd config overrides, and what our daemons must report."""

    vm: netlab.VmSpec
    layout: netlab.ProxyLayout = "flat"
    proxy: dict = field(default_factory=dict)
    fetched: tuple[str, ...] = ("boot.ipxe",)   # files our tftpd must have sent, in order
    offers: int = 1                             # at least this many ProxyDHCPOFFERs ...
    acks: int = 0                               # ... and 4011 ACKs
    max_acks: int | None = None                 # at most this many 4011 ACKs (None: any)
    # proxydhcpd "architectures" counter: at least this many replies per client kind
    firmware: dict = field(default_factory=lambda: {"ipxe": 1})
    http: bool = False                          # IPXEScriptURL is an http:// URL


UEFI_FETCHED = ("ipxe.efi", "boot.ipxe")
EFI_THEN_IPXE = {"efi-x64": 1, "ipxe": 1}
CASES = {
    # (a), (b): qemu's iPXE ROM asks with user class iPXE; the offer names the script directly
    # (siaddr + file: iPXE needs no ProxyDHCPREQUEST on 4011)
    "bios-e1000": Case(BIOS_E1000, max_acks=0),
    "bios-virtio": Case(BIOS_VIRTIO, max_acks=0),
    # (c) OVMF's PXE: offer without option 43 -> REQUEST on 4011 -> ACK ipxe.efi; then iPXE
    "uefi-via-4011": Case(UEFI_OVMF_PXE, proxy={"UEFIVia4011": True}, fetched=UEFI_FETCHED,
                          offers=2, acks=1, firmware={"efi-x64": 2, "ipxe": 1}),
    # (d) the same with the boot file in the offer: OVMF boots from the offer, no 4011
    "uefi-offer": Case(UEFI_OVMF_PXE, proxy={"UEFIVia4011": False}, fetched=UEFI_FETCHED,
                       offers=2, max_acks=0, firmware=EFI_THEN_IPXE),
    # (e) co-located: the site DHCP server sends option 60 PXEClient, we listen on 4011 only;
    #     OVMF and iPXE both ask the DHCP server's address on port 4011 (PXE 2.1 section 2.2.4)
    "colocated-uefi": Case(UEFI_OVMF_PXE, layout="colocated", proxy={"ListenPort67": False},
                           fetched=UEFI_FETCHED, offers=0, acks=2, firmware=EFI_THEN_IPXE),
    "colocated-bios": Case(BIOS_E1000, layout="colocated", proxy={"ListenPort67": False},
                           offers=0, acks=1),
    # (f) relayed segment: requests arrive with giaddr, our replies go back via the relay;
    #     OVMF's 4011 request and all TFTP are routed through the router namespace
    "relay-bios": Case(BIOS_E1000, layout="relay", max_acks=0),
    "relay-uefi": Case(UEFI_OVMF_PXE, layout="relay", fetched=UEFI_FETCHED, offers=2, acks=1,
                       firmware={"efi-x64": 2, "ipxe": 1}),
    # IPXEScriptURL as an http:// URL with {server}: iPXE fetches the script over HTTP
    "bios-http-script": Case(BIOS_E1000, proxy={
        "IPXEScriptURL": f"http://{{server}}:{HTTP_PORT}/boot.ipxe"}, fetched=(), http=True),
}
# BIOS boots first: they take seconds, UEFI ones tens of seconds
CASES = dict(sorted(CASES.items(), key=lambda item: item[1].vm.firmware != "bios"))
# Known daemon defects: case id -> reason (strict xfail: the test fails once they are fixed).
# (The relay cases found one: a relayed offer without the broadcast flag, which the relay sent
# to yiaddr 0.0.0.0; proxydhcpd now sets the flag on every offer.)
XFAIL: dict[str, str] = {}


def diagnostics(lab: netlab.Lab, setup: netlab.ProxyLab | None,
                result: netlab.BootResult | None) -> str:
    """Tails of every log that explains a failed boot, and the DHCP traffic decoded."""
    parts = [f"artifacts: {lab.workdir}"]
    if result is not None:
        parts.append(f"boot: {result.reason} ({result.elapsed:.1f} s after qemu started)")
        parts.append(f"--- serial console (tail) ---\n{netlab.tail(result.serial_log, 50)}")
        parts.append(f"--- qemu output ---\n{netlab.tail(result.qemu_out, 10)}")
    if setup is None:
        return "\n".join(parts)
    for where, capture in setup.captures.items():
        parts.append(f"--- DHCP seen on the {where} segment ({capture.name}) ---\n"
                     f"{netlab.summarize_dhcp_pcap(capture)}")
    for log in setup.logs:
        parts.append(f"--- {log.name} (tail) ---\n{netlab.tail(log, 30)}")
    for daemon in (setup.proxy, setup.tftpd):
        parts.append(f"--- {daemon.package} log (tail) ---\n{netlab.tail(daemon.log, 40)}")
        try:
            parts.append(f"--- {daemon.package} counters ---\n{daemon.counters()}")
        except (OSError, ValueError) as exc:
            parts.append(f"--- {daemon.package} status unavailable: {exc} ---")
    return "\n".join(parts)


def _params():
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else []
        yield pytest.param(name, case, id=name, marks=marks)


@pytest.mark.parametrize(("name", "case"), list(_params()))
def test_pxe_boot_through_our_proxydhcp(name: str, case: Case, lab: netlab.Lab, tmp_path: Path,
                                        record_boot_time) -> None:
    missing = netlab.missing_prerequisites(
        tools=("ip", "qemu-system-x86_64", "dnsmasq", "tcpdump"),
        files=[*netlab.firmware_files(case.vm.firmware),
               *(netlab.IPXE_DIR / n for n in netlab.IPXE_BINARIES)])
    if missing:
        pytest.skip(f"e2e {name}: " + "; ".join(missing))
    token = secrets.token_hex(8)
    files = netlab.make_proxy_root(tmp_path / "tftproot", token)
    setup = None
    try:
        setup = netlab.build_proxy_lab(lab, case.layout, tmp_path / "tftproot", case.proxy,
                                       http_port=HTTP_PORT if case.http else None)
        for daemon in (setup.proxy, setup.tftpd):
            zero = {k: v for k, v in daemon.counters().items() if v not in (0, {})}
            assert not zero, f"{daemon.package} counters must start at zero: {zero}"
        result = netlab.boot_vm(lab, setup.vm_ns, case.vm, MARKER, timeout=TIMEOUT)
    except Exception:
        print(diagnostics(lab, setup, None))
        raise
    netlab.stop_captures(lab)  # flush the captures for the diagnostics
    diag = diagnostics(lab, setup, result)
    assert result.ok, f"{name}: no marker on the serial console\n{diag}"
    assert result.match["token"] == token, f"stale marker {result.match[0]!r}\n{diag}"
    serial = result.serial_text()
    assert "stage=proxy-boot" in serial, f"our boot.ipxe did not run\n{diag}"

    proxy = setup.proxy.wait_counters(lambda c: c.get("offers_sent", 0) >= case.offers
                                      and c.get("acks_sent", 0) >= case.acks)
    served = sum(files[n].stat().st_size for n in case.fetched)
    tftp = setup.tftpd.wait_counters(
        lambda c: netlab.tftp_delivered(c) >= len(case.fetched)
        and c.get("bytes_sent", 0) >= served, timeout=netlab.TFTP_SETTLE_S)
    arches = proxy.get("architectures", {})
    record_boot_time(result.elapsed, f"({name}) offers={proxy.get('offers_sent')} "
                     f"acks={proxy.get('acks_sent')} arch={arches} "
                     f"tftp={tftp.get('transfers_completed')}")

    assert proxy.get("offers_sent", 0) >= case.offers, f"proxydhcpd: {proxy}\n{diag}"
    assert proxy.get("acks_sent", 0) >= case.acks, f"proxydhcpd: {proxy}\n{diag}"
    if case.offers == 0:
        assert proxy.get("offers_sent", 0) == 0, f"offers with ListenPort67 = NO: {proxy}\n{diag}"
    if case.max_acks is not None:
        assert proxy.get("acks_sent", 0) <= case.max_acks, f"4011 ACKs: {proxy}\n{diag}"
    for firmware, count in case.firmware.items():
        assert arches.get(firmware, 0) >= count, (
            f"expected {count}+ replies to {firmware} clients: {proxy}\n{diag}")
    assert proxy.get("malformed", 0) == 0 and proxy.get("send_errors", 0) == 0, (
        f"proxydhcpd: {proxy}\n{diag}")
    assert netlab.tftp_delivered(tftp) >= len(case.fetched), (
        f"tftpd must have sent {', '.join(case.fetched) or 'nothing'}: {tftp}\n{diag}")
    assert tftp.get("bytes_sent", 0) >= served, f"tftpd: {tftp}\n{diag}"
    # iPXE's autoboot prints the next server and file it chose, from our proxy's reply
    script_url = (f"http://{setup.server_ip}:{HTTP_PORT}/boot.ipxe" if case.http
                  else f"tftp://{setup.server_ip}/boot.ipxe")
    assert f"{script_url}... ok" in serial, f"iPXE did not fetch {script_url}\n{diag}"
    assert f"proxy={setup.server_ip}" in serial, f"wrong proxydhcp/next-server\n{diag}"
    want_file = script_url if case.http else "boot.ipxe"
    assert f"proxy-file={want_file}" in serial, f"wrong proxydhcp/filename\n{diag}"
    platform = "efi" if case.vm.firmware == "uefi" else "pcbios"
    assert f"platform={platform}" in serial, f"wrong platform\n{diag}"
    if not case.vm.nic_rom:  # OVMF's own PXE client says what it was told
        assert f"Server IP address is {setup.server_ip}" in serial, f"OVMF: server\n{diag}"
        assert "NBP filename is ipxe.efi" in serial, f"OVMF: boot file\n{diag}"

    code = lab.stop(setup.proxy.proc, timeout=10)
    assert code == 0, f"proxydhcpd exited with {code} on SIGTERM\n{diag}"
    assert not setup.proxy.status_socket.exists(), f"status socket left behind\n{diag}"
