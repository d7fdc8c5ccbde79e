"""End to end: real firmware PXE-boots from a plain site DHCP server and downloads from OUR tftpd.

Topology (netlab.build_pxe_topology), all inside namespaces created and deleted by the test::

    [dhcp ns] dnsmasq 192.168.77.1: pool + next-server 192.168.77.2 + boot file (no DNS, no TFTP)
    [srv ns ] br0 192.168.77.2: python -m tftpd (port 69), radvd, tap0 -- qemu (TCG)

Boot chain:
  bios: SeaBIOS + qemu's iPXE NIC ROM (e1000, already iPXE) -> DHCP (user class iPXE)
        -> boot.ipxe (TFTP) -> second.ipxe (TFTP) -> blob (several MiB, TFTP) -> marker
  uefi: OVMF's own PXE client (virtio-net, NIC ROM disabled, arch 7) -> ipxe.efi (TFTP)
        -> DHCP as iPXE -> boot.ipxe -> second.ipxe -> blob -> marker

The marker `PREBOOT-E2E-OK <token>` carries a token made by this run, so a stale log cannot pass.
Afterwards the daemon's status socket must show the transfers and bytes it served.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

import pytest

import netlab

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

DATA = Path(__file__).resolve().parent / "data"
BLOB_NAME = "blob.bin"
BLOB_SIZE = 3 * 1024 * 1024 + 777  # several MiB, last block partial
TIMEOUT = float(os.environ.get("PREBOOT_E2E_TIMEOUT", "120"))
TFTP_SERVER = os.environ.get("PREBOOT_E2E_TFTPD", "ours")

VMS = {
    "bios": netlab.VmSpec("bios", nic="e1000"),
    "uefi": netlab.VmSpec("uefi", nic="virtio-net-pci", nic_rom=False),
}
# files each boot must fetch from the TFTP server, in order
FETCHED = {
    "bios": ["boot.ipxe", "second.ipxe", BLOB_NAME],
    "uefi": ["ipxe.efi", "boot.ipxe", "second.ipxe", BLOB_NAME],
}


def make_tftp_root(root: Path, token: str) -> dict[str, Path]:
    """iPXE binaries, the two scripts (token and blob name filled in) and a random blob."""
    netlab.stage_ipxe_binaries(root)
    (root / "boot.ipxe").write_text((DATA / "boot.ipxe").read_text())
    second = (DATA / "second.ipxe").read_text()
    (root / "second.ipxe").write_text(second.replace("@BLOB@", BLOB_NAME).replace("@TOKEN@", token))
    (root / BLOB_NAME).write_bytes(os.urandom(BLOB_SIZE))
    return {p.name: p for p in root.iterdir()}


def start_tftp_server(lab: netlab.Lab, topo: netlab.PxeTopology, root: Path):
    """Our tftpd (default) or tftpd-hpa as a reference; returns the Daemon or None for hpa."""
    if TFTP_SERVER == "hpa":
        lab.spawn("in.tftpd", topo.srv_ns,
                  ["in.tftpd", "-L", "-vvv", "-s", str(root), "-a", f"{topo.srv_ip}:69"])
        assert netlab.wait_for(lambda: netlab.udp_listening(topo.srv_ns, 69), 10), "in.tftpd"
        return None
    if not (netlab.REPO_ROOT / "tftpd" / "__main__.py").exists():
        pytest.fail("tftpd/__main__.py does not exist yet (set PREBOOT_E2E_TFTPD=hpa to test "
                    "the harness with tftpd-hpa)")
    return netlab.start_preboot_daemon(lab, topo.srv_ns, "tftpd", {
        "IPAddress": topo.srv_ip,
        "Port": 69,
        "Root": root,
    })


def diagnostics(lab: netlab.Lab, result: netlab.BootResult | None, daemon) -> str:
    """Tails of every log that explains a failed boot, for the assertion message."""
    wd = lab.workdir
    parts = [f"artifacts: {wd}"]
    if result is not None:
        parts.append(f"boot: {result.reason} ({result.elapsed:.1f} s after qemu started)")
        parts.append(f"--- serial console (tail) ---\n{netlab.tail(result.serial_log, 60)}")
        parts.append(f"--- qemu output ---\n{netlab.tail(result.qemu_out, 10)}")
    parts.append(f"--- site dnsmasq log (tail) ---\n{netlab.tail(wd / 'dnsmasq.log', 40)}")
    if daemon is not None:
        parts.append(f"--- tftpd log (tail) ---\n{netlab.tail(daemon.log, 40)}")
        parts.append(f"--- tftpd output (tail) ---\n{netlab.tail(daemon.proc.log, 20)}")
        try:
            parts.append(f"--- tftpd status ---\n{daemon.status()}")
        except (OSError, ValueError) as exc:
            parts.append(f"--- tftpd status: unavailable ({exc}) ---")
    else:
        parts.append(f"--- in.tftpd output ---\n{netlab.tail(wd / 'in.tftpd.out', 20)}")
    return "\n".join(parts)


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_pxe_boot_fetches_ipxe_and_scripts_from_our_tftpd(
    firmware: str,
    lab: netlab.Lab,
    pxe_topology: netlab.PxeTopology,
    tmp_path: Path,
    record_boot_time,
) -> None:
    spec = VMS[firmware]
    missing = netlab.missing_prerequisites(files=[
        *netlab.firmware_files(spec.firmware),
        *(netlab.IPXE_DIR / name for name in netlab.IPXE_BINARIES)])
    if missing:
        pytest.skip(f"e2e {firmware}: " + "; ".join(missing))
    topo = pxe_topology
    token = secrets.token_hex(8)
    files = make_tftp_root(tmp_path / "tftproot", token)

    netlab.start_site_dhcp(lab, topo.dhcp_ns, topo.dhcp_iface, netlab.SiteDhcp(
        range_start=str(topo.network[100]), range_end=str(topo.network[150]),
        boot=netlab.BootRules(next_server=topo.srv_ip),
    ))
    netlab.start_radvd(lab, topo.srv_ns, topo.bridge)
    daemon = start_tftp_server(lab, topo, tmp_path / "tftproot")
    if daemon is not None:
        before = daemon.counters()
        assert before.get("transfers_completed") == 0, f"counters must start at zero: {before}"

    marker = re.compile(r"PREBOOT-E2E-OK (?P<token>[0-9a-f]{16})\b")
    result = netlab.boot_vm(lab, topo.srv_ns, spec, marker, timeout=TIMEOUT)
    diag = diagnostics(lab, result, daemon)
    assert result.ok, f"{firmware}: no marker on the serial console\n{diag}"
    assert result.match["token"] == token, f"stale marker {result.match[0]!r}\n{diag}"
    served = sum(files[name].stat().st_size for name in FETCHED[firmware])
    counters = daemon.wait_counters(
        lambda c: netlab.tftp_delivered(c) >= len(FETCHED[firmware])
        and c.get("bytes_sent", 0) >= served,
        timeout=netlab.TFTP_SETTLE_S) if daemon is not None else {}
    shown = {k: counters[k] for k in ("transfers_started", "transfers_completed",
                                      "transfers_unconfirmed", "bytes_sent")
             if k in counters}
    record_boot_time(result.elapsed, f"({firmware}, tftp={TFTP_SERVER}) {shown}")

    serial = result.serial_text()
    platform = "efi" if firmware == "uefi" else "pcbios"
    assert f"stage=boot.ipxe platform={platform}" in serial, f"boot.ipxe did not run\n{diag}"
    assert f"next-server={topo.srv_ip}" in serial, f"wrong next-server\n{diag}"
    assert "stage=second.ipxe" in serial, f"second.ipxe did not run\n{diag}"
    size = re.search(r"blob : (\d+) bytes", serial)
    assert size and int(size[1]) == BLOB_SIZE, f"iPXE got the wrong blob size\n{diag}"
    sha1 = re.search(r"\b([0-9a-f]{40})\s+blob\b", serial)
    if sha1:  # iPXE builds with DIGEST_CMD print "<sha1>  blob"
        want = hashlib.sha1(files[BLOB_NAME].read_bytes()).hexdigest()
        assert sha1[1] == want, f"blob corrupted in transfer: {sha1[1]} != {want}\n{diag}"

    if daemon is None:
        return
    assert counters.get("transfers_completed", 0) >= 1, f"counters: {counters}\n{diag}"
    assert netlab.tftp_delivered(counters) >= len(FETCHED[firmware]), (
        f"expected at least {len(FETCHED[firmware])} delivered transfers "
        f"({', '.join(FETCHED[firmware])}): {counters}\n{diag}")
    assert counters.get("bytes_sent", 0) >= served, (
        f"bytes_sent {counters.get('bytes_sent')} < {served} (sizes of "
        f"{', '.join(FETCHED[firmware])})\n{diag}")

    # SIGTERM: the contract says exit 0 within 5 s, status socket and pidfile removed
    code = lab.stop(daemon.proc, timeout=10)
    assert code == 0, f"tftpd exited with {code} on SIGTERM\n{diag}"
    assert not daemon.status_socket.exists(), f"status socket left behind\n{diag}"
    assert not daemon.pid_file.exists(), f"pidfile left behind\n{diag}"
