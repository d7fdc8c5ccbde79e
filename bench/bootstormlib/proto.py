"""What a simulated PXE client says and reads (pure: bytes and text in, bytes and decisions out).

DHCP (PXE 2.1, RFC 2131/4578): the DHCPDISCOVER a PXE ROM broadcasts (option 60
"PXEClient:Arch:0000X:UNDI:002001", 93 the architecture: 0 BIOS or 7 x64 UEFI, 94, 97 the
GUID), the one iPXE broadcasts once it runs (the same plus user class 77 "iPXE" and option 175),
and the boot server DHCPREQUEST a client sends to port 4011. `parse_reply` reads an offer or
ack; `pxe_next` is the PXE ROM's choice after the proxy's offer, and iPXE's too (its autoboot
shows a proxy's PXE boot menu and asks the boot server, pxe_menu.c / pxebs):

* option 43 with discovery control bit 3 (0x08, "use the boot file in the offer") and a file
  name: TFTP that file from siaddr (else option 54), no boot server step;
* option 43 with a boot menu (sub-option 9): take the first item and ask for it with a
  DHCPREQUEST to port 4011, at the boot server list's address for that type (sub-option 8),
  else siaddr, else option 54, carrying the item in sub-option 71;
* no option 43: the request to port 4011 at siaddr (else option 54), without an item: what
  EDK2 does ("ProxyBinl", PxeBcRetryBinlOffer), so what UEFI firmware does.

iPXE scripts: `script_urls` follows what iPXE would run: `chain URL` (with ${...} settings
expanded from the client's facts) or the `kernel URL` and `initrd URL` lines, options skipped
(`--name X` takes a value). TFTP: RRQ/ACK packets and the OACK. URLs: tftp:// and http://.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

COOKIE = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, ACK = 1, 2, 3, 5
ARCH_BIOS, ARCH_EFI64 = 0, 7
PARAMS = bytes((1, 2, 3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50,
                51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135, 175))
# iPXE's option 175 (encapsulated): a few feature flags it announces (HTTP, DNS, PXE ext., ...).
IPXE_FEATURES = bytes((0x13, 1, 1, 0x11, 1, 1, 0x10, 1, 2, 0x17, 1, 1))


def _opt(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def vendor_class(arch: int) -> bytes:
    return f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode()


def guid_of(index: int) -> bytes:
    return bytes(range(0x40, 0x4c)) + index.to_bytes(4, "big")


def mac_of(index: int, tag: int = 0x42) -> bytes:
    """A locally administered MAC per client: 02:42:<run tag>:<index, 3 bytes>."""
    return bytes((0x02, tag & 0xFF)) + (index & 0xFFFFFFFF).to_bytes(4, "big")


def _header(xid: int, mac: bytes, ciaddr: bytes = bytes(4), broadcast: bool = True,
            secs: int = 4) -> bytearray:
    h = bytearray(236)
    h[0:4] = bytes((1, 1, 6, 0))
    struct.pack_into("!IHH", h, 4, xid, secs, 0x8000 if broadcast else 0)
    h[12:16] = ciaddr
    h[28:28 + len(mac)] = mac
    return h


def discover(xid: int, mac: bytes, arch: int, guid: bytes, ipxe: bool = False) -> bytes:
    """The DHCPDISCOVER of a PXE ROM (ipxe=False) or of iPXE (user class "iPXE", option 175)."""
    opts = (_opt(53, bytes((DISCOVER,))) + _opt(57, struct.pack("!H", 1472 if ipxe else 1260))
            + _opt(93, struct.pack("!H", arch)) + _opt(94, b"\x01\x02\x01")
            + _opt(97, b"\x00" + guid) + _opt(60, vendor_class(arch)) + _opt(55, PARAMS))
    if ipxe:
        opts += _opt(77, b"iPXE") + _opt(175, IPXE_FEATURES)
    return bytes(_header(xid, mac)) + COOKIE + opts + b"\xff"


def bootserver_request(xid: int, mac: bytes, arch: int, guid: bytes, ciaddr: str,
                       item: bytes | None, ipxe: bool = False) -> bytes:
    """The DHCPREQUEST to a boot server on port 4011 (PXE 2.1 section 2.2.5); `item`: the
    4 bytes of option 43 sub-option 71 (type + layer), None when the offer had no menu."""
    opts = (_opt(53, bytes((REQUEST,))) + _opt(57, struct.pack("!H", 1260))
            + _opt(93, struct.pack("!H", arch)) + _opt(94, b"\x01\x02\x01")
            + _opt(97, b"\x00" + guid) + _opt(60, vendor_class(arch)) + _opt(55, PARAMS))
    if item is not None:
        opts += _opt(43, _opt(71, item) + b"\xff")
    if ipxe:
        opts += _opt(77, b"iPXE") + _opt(175, IPXE_FEATURES)
    return bytes(_header(xid, mac, _aton(ciaddr), broadcast=False)) + COOKIE + opts + b"\xff"


def _aton(text: str) -> bytes:
    return bytes(int(p) for p in text.split("."))


def _ntoa(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def parse_options(data: bytes, start: int = 0) -> dict[int, bytes]:
    """code -> value (repeated codes concatenated, RFC 3396); stops at 255 or a short option."""
    out: dict[int, bytes] = {}
    i, n = start, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= n:
            break
        length = data[i + 1]
        if i + 2 + length > n:
            break
        out[code] = out.get(code, b"") + data[i + 2:i + 2 + length]
        i += 2 + length
    return out


@dataclass
class Reply:
    """A BOOTREPLY read by parse_reply."""
    xid: int
    mac: bytes
    message_type: int
    siaddr: str
    file: str
    options: dict[int, bytes]
    pxe: dict[int, bytes] = field(default_factory=dict)   # option 43 sub-options

    @property
    def server_id(self) -> str:
        raw = self.options.get(54, b"")
        return _ntoa(raw) if len(raw) == 4 else ""

    @property
    def vendor_class(self) -> bytes:
        return self.options.get(60, b"")

    def next_server(self, fallback: str = "") -> str:
        if self.siaddr != "0.0.0.0":
            return self.siaddr
        return self.server_id or fallback


def parse_reply(data: bytes) -> Reply | None:
    """The reply in `data`, or None when it is not a DHCP BOOTREPLY."""
    if len(data) < 241 or data[0] != 2 or data[236:240] != COOKIE:
        return None
    opts = parse_options(data, 240)
    mtype = opts.get(53, b"\0")[0]
    file = data[108:236].split(b"\0", 1)[0].decode("ascii", "replace")
    if not file and 67 in opts:          # option 67 instead of the file field
        file = opts[67].split(b"\0", 1)[0].decode("ascii", "replace")
    pxe = parse_options(opts[43]) if 43 in opts else {}
    hlen = min(data[2], 16)
    return Reply(struct.unpack_from("!I", data, 4)[0], bytes(data[28:28 + hlen]), mtype,
                 _ntoa(data[20:24]), file, opts, pxe)


@dataclass(frozen=True)
class Step:
    kind: str            # "tftp" (server, file) or "bootserver" (server, item) or "fail" (reason)
    server: str = ""
    file: str = ""
    item: bytes | None = None
    reason: str = ""


def pxe_next(offer: Reply) -> Step:
    """What a PXE ROM does after the proxy's offer (module docstring)."""
    if not offer.vendor_class.startswith(b"PXEClient"):
        return Step("fail", reason=f"offer without option 60 PXEClient ({offer.vendor_class!r})")
    if 43 not in offer.options:
        server = offer.next_server()
        if not server:
            return Step("fail", reason="offer without option 43, siaddr or option 54")
        return Step("bootserver", server=server)
    control = offer.pxe.get(6, b"\0")[0] if offer.pxe.get(6) else 0
    if control & 0x08 and offer.file:
        return Step("tftp", server=offer.next_server(), file=offer.file)
    menu = offer.pxe.get(9, b"")
    if len(menu) >= 3:
        kind = menu[0:2]
        server = ""
        servers = offer.pxe.get(8, b"")
        i = 0
        while i + 3 <= len(servers):                  # type(2) count(1) addresses(4 x count)
            count = servers[i + 2]
            if servers[i:i + 2] == kind and count:
                server = _ntoa(servers[i + 3:i + 7])
                break
            i += 3 + 4 * count
        return Step("bootserver", server=server or offer.next_server(), item=kind + b"\0\0")
    if offer.file:
        return Step("tftp", server=offer.next_server(), file=offer.file)
    return Step("fail", reason="offer with option 43 but neither a boot file nor a menu")


# ---- TFTP ----------------------------------------------------------------------------------------

RRQ, DATA, TFTP_ACK, ERROR, OACK = 1, 3, 4, 5, 6


def rrq(filename: str, blksize: int | None = 1432, tsize: bool = True,
        windowsize: int | None = None) -> bytes:
    """A read request; WINDOWSIZE (RFC 7440) is asked for when above 1."""
    out = b"\0\x01" + filename.encode() + b"\0octet\0"
    if blksize:
        out += b"blksize\0" + str(blksize).encode() + b"\0"
    if tsize:
        out += b"tsize\0" + b"0\0"
    if windowsize and windowsize > 1:
        out += b"windowsize\0" + str(windowsize).encode() + b"\0"
    return out


def tftp_error(code: int, text: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + text.encode() + b"\0"


def tftp_ack(block: int) -> bytes:
    return struct.pack("!HH", TFTP_ACK, block & 0xFFFF)


def parse_oack(data: bytes) -> dict[str, str]:
    parts = bytes(data[2:]).split(b"\0")
    return {parts[i].decode().lower(): parts[i + 1].decode()
            for i in range(0, len(parts) - 1, 2) if parts[i]}


# ---- URLs and iPXE scripts ---------------------------------------------------------------------

@dataclass(frozen=True)
class Url:
    scheme: str          # "tftp" or "http"
    host: str
    port: int
    path: str            # TFTP: the file name as iPXE sends it; HTTP: path and query

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{self.path.lstrip('/')}"


def parse_url(text: str, tftp_server: str = "") -> Url:
    """tftp://host[:port]/path, http://host[:port]/path?query, or a bare file name (TFTP from
    `tftp_server`, as iPXE takes a proxy offer's plain file name). iPXE sends a tftp:// URL's path
    without its leading '/' (tftp.c: many servers refuse absolute names)."""
    if "://" not in text:
        if not tftp_server:
            raise ValueError(f"file name {text!r} without a TFTP server")
        return Url("tftp", tftp_server, 69, text.lstrip("/"))
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("tftp", "http"):
        raise ValueError(f"unsupported URL scheme in {text!r}")
    port = parts.port or (69 if scheme == "tftp" else 80)
    if scheme == "tftp":
        return Url(scheme, parts.hostname or "", port, parts.path.lstrip("/"))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Url(scheme, parts.hostname or "", port, path)


_SETTING = re.compile(r"\$\{([^}:]+)(?::([a-z]+))?\}")


def expand(text: str, settings: dict[str, str]) -> str:
    """iPXE's ${name} / ${name:type} expansion; unknown settings expand to nothing, :uristring
    is percent-encoded (RFC 3986 unreserved kept)."""
    def one(m: re.Match) -> str:
        value = settings.get(m.group(1), "")
        if m.group(2) == "uristring":
            return quote(value, safe="-._~")
        return value
    return _SETTING.sub(one, text)


_VALUE_OPTIONS = {"--name", "-n", "--timeout", "-t"}


def _command_words(line: str) -> list[str]:
    """One script line's command words, up to '||', '&&' or ';' and a '#' comment."""
    words = []
    for w in line.split():
        if w in ("||", "&&", ";") or w.startswith("#"):
            break
        words.append(w)
    return words


def _first_argument(words: list[str]) -> str | None:
    i = 1
    while i < len(words):
        w = words[i]
        if w in _VALUE_OPTIONS:
            i += 2
            continue
        if w.startswith("-"):
            i += 1
            continue
        return w
    return None


@dataclass(frozen=True)
class ScriptPlan:
    chain: str | None = None          # a `chain URL` to fetch and run instead
    kernel: str | None = None
    initrd: str | None = None
    answer: str = ""                  # the "preboot-answer: ..." marker, when there is one


def read_script(text: str, settings: dict[str, str]) -> ScriptPlan:
    """What iPXE does with a script: the first `chain` (before any kernel) or the first
    `kernel`/`imgexec` and `initrd`/`imgfetch`/`module` URLs; ${...} expanded."""
    if not text.startswith("#!ipxe"):
        raise ValueError(f"not an iPXE script: {text[:40]!r}")
    kernel = initrd = None
    answer = ""
    for raw in text.splitlines()[1:]:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            if kernel:        # a label after the kernel: the rest is the failure path
                break
            continue
        words = _command_words(line)
        if not words:
            continue
        cmd = words[0]
        if cmd == "echo" and "preboot-answer:" in line and not answer:
            answer = line.split("preboot-answer:", 1)[1].split()[0]
        arg = _first_argument(words)
        if arg is None:
            continue
        if cmd == "chain" and kernel is None:
            return ScriptPlan(chain=expand_all(arg, settings), answer=answer)
        if cmd in ("kernel", "imgexec", "imgselect") and kernel is None:
            kernel = expand_all(arg, settings)
        elif cmd in ("initrd", "imgfetch", "module") and initrd is None:
            initrd = expand_all(arg, settings)
    return ScriptPlan(kernel=kernel, initrd=initrd, answer=answer)


def ipxe_settings(mac: bytes, ip: str, arch: int, guid: bytes, serial: str) -> dict[str, str]:
    """The iPXE settings a script may expand, for one simulated machine."""
    uuid = guid.hex()
    return {"netX/mac": ":".join(f"{b:02x}" for b in mac),
            "net0/mac": ":".join(f"{b:02x}" for b in mac),
            "mac": ":".join(f"{b:02x}" for b in mac),
            "netX/ip": ip, "net0/ip": ip, "ip": ip,
            "uuid": f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}",
            "platform": "pcbios" if arch == ARCH_BIOS else "efi",
            "buildarch": "i386" if arch == ARCH_BIOS else "x86_64",
            "memsize": "4096", "manufacturer": "Bench", "product": "Boot Storm",
            "serial": serial, "asset": "", "hostname": ""}


_HEXHYP = re.compile(r"\$\{(netX/mac|net0/mac|mac):hexhyp\}")


def expand_all(text: str, settings: dict[str, str]) -> str:
    """expand(), with ${netX/mac:hexhyp} (iPXE's hyphenated MAC) first."""
    text = _HEXHYP.sub(lambda m: settings.get(m.group(1), "").replace(":", "-"), text)
    return expand(text, settings)
