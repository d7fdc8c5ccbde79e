"""The simulated clients: worker processes in the client namespace, each running many clients
on one event loop (uvloop when installed).

Each client does what a PXE ROM and then iPXE do, in order (phases as reported):

  dhcp       DHCPDISCOVER broadcast from port 68 (retries after 4, 8, 16, 32 s as PXE 2.1
             says), the proxy's offer, and when the offer says so (proto.pxe_next) the
             DHCPREQUEST to the boot server on port 4011 from the client's own address, port 68
             (retries after 1, 2, 4, 8 s), whose ack names the boot program;
  bootfile   TFTP of the boot program: a BIOS ROM asks blksize 1432 and tsize and reads
             lock-step; a UEFI one (UefiTftp) as EDK2 does, a size query then blksize 1468
             windowsize 4 (RFC 7440), lock-step where the server does not grant windowsize;
  ipxe_dhcp  iPXE's own DHCPDISCOVER (user class "iPXE", option 175): the offer's file name is
             the script to run (a URL, or a TFTP file name from siaddr);
  script     the script and what it chains to (`chain URL` with ${...} expanded), until one
             names a kernel and an initrd;
  kernel, initrd   those two files, over tftp:// or http:// as the script says.

The "site DHCP" is simulated: every client already owns its address in the client namespace
(added by the runner), as if the site server had answered; nothing else of that exchange is
simulated (the same for both stacks).

Every file is verified while it arrives: its size and sha256 against the file the bench put in
the served root (looked up by the URL's last path component). A client that has not got every
file verified within --timeout (from its first DISCOVER) fails, with the phase and the reason.

Transfers are callback driven: the socket's readable callback drains the socket into one
per-worker buffer, hashes, and (TFTP) sends the next ACK before returning, so no coroutine
switch happens per packet and the client costs little CPU per block. Each worker reports its
own CPU time (getrusage) with its results.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing as mp
import resource
import socket
import time
from dataclasses import dataclass

from . import proto

SO_BINDTODEVICE = 25
SO_RCVBUFFORCE = 33
DHCP_RETRIES = (4.0, 8.0, 16.0, 32.0)          # PXE 2.1: DISCOVER timeouts
BOOTSERVER_RETRIES = (1.0, 2.0, 4.0, 8.0)
TFTP_TIMEOUT, TFTP_MAX_TIMEOUT, TFTP_RETRIES = 1.0, 8.0, 8
HTTP_IDLE_TIMEOUT = 30.0
TEXT_LIMIT = 1 << 16

_ctx = mp.get_context("fork")


class ClientFailure(Exception):
    pass


@dataclass
class ClientSpec:
    index: int
    ip: str
    arch: int
    mac: bytes
    guid: bytes


# ---- callback-driven transfers -------------------------------------------------------------------

class _Transfer:
    """Common parts: a non-blocking socket, a readable callback, a no-progress watchdog."""

    def __init__(self, loop: asyncio.AbstractEventLoop, buf: bytearray, keep_text: bool):
        self.loop = loop
        self.buf = buf
        self.mv = memoryview(buf)
        self.keep_text = keep_text
        self.text = bytearray()
        self.hash = hashlib.sha256()
        self.size = 0
        self.fut: asyncio.Future = loop.create_future()
        self.sock: socket.socket | None = None
        self.last_rx = loop.time()
        self._timer = None

    def _take(self, view) -> None:
        self.hash.update(view)
        self.size += len(view)
        if self.keep_text and len(self.text) < TEXT_LIMIT:
            self.text += view

    def _finish(self, exc: BaseException | None = None) -> None:
        if self.fut.done():
            return
        if exc is None:
            self.fut.set_result(None)
        else:
            self.fut.set_exception(exc)

    def _cleanup(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.sock is not None:
            try:
                self.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self.sock.close()
            self.sock = None


class TftpGet(_Transfer):
    """One TFTP read. Lock-step (WINDOWSIZE 1) as a PXE ROM or iPXE reads: every block ACKed,
    a duplicate left to the watchdog. With WINDOWSIZE > 1 it asks for windowsize (RFC 7440)
    and, where the server grants it, reads as EDK2's Mtftp4 does (Mtftp4RrqHandleData): an
    ACK after every window of blocks in order and after the last, and at once for the last
    block in order when a block comes out of order. SIZE_QUERY is EDK2's first request for a
    boot file (PxeBcTftpGetFileSize): the same options plus tsize, ended by an ERROR once the
    OACK told the size."""

    def __init__(self, loop, buf, local_ip: str, server: str, port: int, filename: str,
                 blksize: int, keep_text: bool = False, windowsize: int = 1,
                 size_query: bool = False):
        super().__init__(loop, buf, keep_text)
        self.server, self.port, self.filename = server, port, filename
        self.blksize_asked = blksize
        self.blksize = 512
        self.window = 1               # blocks per ACK: 1 until an OACK grants more
        self.unacked = 0              # blocks taken in order since the last ACK
        self.size_query = size_query
        self.expected = 1
        self.connected = False
        self.timeout = TFTP_TIMEOUT
        self.retries = 0
        self.resent = 0           # re-sends after a silence, over the whole transfer
        self.rrq_resent = 0       # of which the request, before any answer
        self.local_ip = local_ip
        # EDK2 asks tsize only in its size query; a lock-step reader (iPXE) in every request
        self.last = proto.rrq(filename, blksize, tsize=size_query or windowsize <= 1,
                              windowsize=windowsize)
        self.tsize: int | None = None

    async def run(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock = s
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
            s.bind((self.local_ip, 0))
            s.setblocking(False)
            s.sendto(self.last, (self.server, self.port))
            self.last_rx = self.loop.time()
            self.loop.add_reader(s.fileno(), self._readable)
            self._timer = self.loop.call_later(0.25, self._watch)
            await self.fut
        finally:
            self._cleanup()

    def _ack(self, block: int) -> None:
        self.last = proto.tftp_ack(block)
        self.unacked = 0
        try:
            self.sock.send(self.last)
        except OSError:
            pass

    def _abort_query(self) -> None:
        """The size is known: end the transfer as EDK2 does, with an ERROR."""
        try:
            self.sock.send(proto.tftp_error(8, "User aborted the transfer"))
        except OSError:
            pass
        self._finish()

    def _send_last(self) -> None:
        if self.connected:
            self.sock.send(self.last)
        else:
            self.sock.sendto(self.last, (self.server, self.port))

    def _watch(self) -> None:
        if self.fut.done() or self.sock is None:
            return
        now = self.loop.time()
        if now - self.last_rx >= self.timeout:
            self.retries += 1
            self.resent += 1
            self.rrq_resent += not self.connected
            if self.retries > TFTP_RETRIES:
                self._finish(ClientFailure(
                    f"TFTP {self.filename}: no answer after {TFTP_RETRIES} retries "
                    f"(block {self.expected}, {self.size} bytes)"))
                return
            try:
                self._send_last()
            except OSError:
                pass
            self.last_rx = now
            self.timeout = min(self.timeout * 2, TFTP_MAX_TIMEOUT)
        self._timer = self.loop.call_later(0.25, self._watch)

    def _readable(self) -> None:
        sock, buf, mv = self.sock, self.buf, self.mv
        if sock is None:
            return
        while True:
            try:
                if self.connected:
                    n = sock.recv_into(buf)
                else:
                    n, addr = sock.recvfrom_into(buf)
                    if addr[0] != self.server:
                        continue
                    sock.connect(addr)
                    self.connected = True
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._finish(ClientFailure(f"TFTP {self.filename}: {exc}"))
                return
            if n < 4:
                continue
            op = buf[1]
            if op == proto.DATA:
                if self.size_query:                   # no OACK: the server ignored options
                    self._abort_query()
                    return
                block = (buf[2] << 8) | buf[3]
                if block != (self.expected & 0xFFFF):
                    if self.window > 1:               # EDK2: ACK the last block in order now
                        self._ack(self.expected - 1)
                    continue          # lock-step: the watchdog re-sends our ACK if needed
                last = n - 4 < self.blksize
                self.unacked += 1
                if last or self.unacked >= self.window:
                    self._ack(block)              # before the hashing: the server goes on
                self.last_rx = self.loop.time()
                self.timeout = TFTP_TIMEOUT
                self.retries = 0
                self._take(mv[4:n])
                self.expected += 1
                if last:
                    self._finish()
                    return
            elif op == proto.OACK and self.expected == 1:
                opts = proto.parse_oack(bytes(mv[:n]))
                self.blksize = int(opts.get("blksize", 512))
                self.window = int(opts.get("windowsize", 1))
                if "tsize" in opts:
                    self.tsize = int(opts["tsize"])
                self.last_rx = self.loop.time()
                if self.size_query:
                    self._abort_query()
                    return
                self._ack(0)
            elif op == proto.ERROR:
                msg = bytes(mv[4:n]).split(b"\0", 1)[0].decode("ascii", "replace")
                code = (buf[2] << 8) | buf[3]
                self._finish(ClientFailure(f"TFTP {self.filename}: error {code} {msg}"))
                return


class HttpGet(_Transfer):
    """One GET. With `keepalive` it asks, as iPXE does, for the connection to stay open, and
    may be given one kept from an earlier GET to the same server (`pooled`); afterwards
    `reusable` says whether the connection can carry the next GET (then it is left open for
    the caller, see Worker.fetch)."""

    def __init__(self, loop, buf, local_ip: str, host: str, port: int, path: str,
                 keep_text: bool = False, keepalive: bool = False,
                 pooled: socket.socket | None = None):
        super().__init__(loop, buf, keep_text)
        self.local_ip, self.host, self.port, self.path = local_ip, host, port, path
        self.keepalive = keepalive
        self.pooled = pooled
        self.reusable = False
        self.kept: socket.socket | None = None     # the connection, when reusable
        self.server_closes = False
        self.head = bytearray()
        self.in_body = False
        self.length: int | None = None
        self.status = 0

    async def run(self) -> None:
        s = self.pooled
        if s is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock = s
        try:
            if self.pooled is None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.bind((self.local_ip, 0))
                s.setblocking(False)
                await self.loop.sock_connect(s, (self.host, self.port))
            connection = "keep-alive" if self.keepalive else "close"
            req = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"User-Agent: iPXE/1.21.1+ (bench)\r\nConnection: {connection}\r\n\r\n"
                   ).encode()
            await self.loop.sock_sendall(s, req)
            self.last_rx = self.loop.time()
            self.loop.add_reader(s.fileno(), self._readable)
            self._timer = self.loop.call_later(1.0, self._watch)
            await self.fut
        except OSError as exc:
            raise ClientFailure(f"HTTP {self.host}:{self.port}{self.path}: {exc}") from None
        finally:
            self.reusable = (self.keepalive and self.fut.done() and not self.fut.cancelled()
                             and self.fut.exception() is None and self.length is not None
                             and self.size == self.length and not self.server_closes)
            if self.reusable:                # the caller keeps it for the next GET
                if self._timer is not None:
                    self._timer.cancel()
                self.loop.remove_reader(s.fileno())
                self.kept, self.sock = s, None
            else:
                self._cleanup()
        if self.status != 200:
            raise ClientFailure(f"HTTP {self.path}: status {self.status}")

    def _watch(self) -> None:
        if self.fut.done() or self.sock is None:
            return
        if self.loop.time() - self.last_rx > HTTP_IDLE_TIMEOUT:
            self._finish(ClientFailure(f"HTTP {self.path}: nothing for {HTTP_IDLE_TIMEOUT:g} s"))
            return
        self._timer = self.loop.call_later(1.0, self._watch)

    def _readable(self) -> None:
        sock, buf, mv = self.sock, self.buf, self.mv
        if sock is None:
            return
        while True:
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._finish(ClientFailure(f"HTTP {self.path}: {exc}"))
                return
            self.last_rx = self.loop.time()
            if n == 0:
                if not self.in_body:
                    self._finish(ClientFailure(f"HTTP {self.path}: closed before the headers"))
                elif self.length is not None and self.size != self.length:
                    self._finish(ClientFailure(f"HTTP {self.path}: closed after {self.size} of "
                                               f"{self.length} bytes"))
                else:
                    self._finish()
                return
            if self.in_body:
                self._take(mv[:n])
            else:
                self.head += mv[:n]
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > 65536:
                        self._finish(ClientFailure(f"HTTP {self.path}: headers too long"))
                        return
                    continue
                self._parse_head(bytes(self.head[:end]))
                rest = self.head[end + 4:]
                self.in_body = True
                self.head = bytearray()
                if rest:
                    self._take(memoryview(rest))
            if self.length is not None and self.size >= self.length:
                self._finish()
                return

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                self.length = int(v.strip())
            elif k.strip().lower() == "connection" and v.strip().lower() == "close":
                self.server_closes = True


# ---- DHCP ------------------------------------------------------------------------------------------

class DhcpPort:
    """The worker's one socket on 0.0.0.0:68 (broadcast offers reach every such socket);
    replies are handed to the waiting client by xid."""

    def __init__(self, loop, ifname: str):
        self.loop = loop
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            pass
        s.bind(("0.0.0.0", 68))
        s.setblocking(False)
        self.sock = s
        self.waiters: dict[int, tuple[asyncio.Future, bytes]] = {}
        loop.add_reader(s.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) < 240:
                continue
            w = self.waiters.get(int.from_bytes(data[4:8], "big"))
            if w is None or w[0].done():
                continue
            reply = proto.parse_reply(data)
            if reply is None or reply.message_type != proto.OFFER or reply.mac[:6] != w[1]:
                continue
            if not reply.vendor_class.startswith(b"PXEClient"):
                continue          # a site DHCP's plain offer: not the proxy's
            w[0].set_result(reply)

    async def discover(self, xid: int, mac: bytes, packet: bytes) -> proto.Reply:
        fut = self.loop.create_future()
        self.waiters[xid] = (fut, mac)
        try:
            for wait in DHCP_RETRIES:
                try:
                    self.sock.sendto(packet, ("255.255.255.255", 67))
                except OSError:
                    pass
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), wait)
                except asyncio.TimeoutError:
                    continue
            raise ClientFailure(f"no proxy offer after {len(DHCP_RETRIES)} DISCOVERs "
                                f"({sum(DHCP_RETRIES):g} s)")
        finally:
            self.waiters.pop(xid, None)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def bootserver(loop, ip: str, server: str, xid: int, mac: bytes, packet: bytes
                     ) -> proto.Reply:
    """DHCPREQUEST to server:4011 from ip:68, the ack back to ip:68."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fut = loop.create_future()

    def readable() -> None:
        while True:
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            reply = proto.parse_reply(data)
            if (reply is not None and reply.xid == xid and reply.mac[:6] == mac
                    and reply.message_type == proto.ACK and not fut.done()):
                fut.set_result(reply)

    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, 68))
        s.setblocking(False)
        loop.add_reader(s.fileno(), readable)
        for wait in BOOTSERVER_RETRIES:
            try:
                s.sendto(packet, (server, 4011))
            except OSError:
                pass
            try:
                return await asyncio.wait_for(asyncio.shield(fut), wait)
            except asyncio.TimeoutError:
                continue
        raise ClientFailure(f"no ack from the boot server {server}:4011 after "
                            f"{len(BOOTSERVER_RETRIES)} requests")
    finally:
        try:
            loop.remove_reader(s.fileno())
        except (ValueError, OSError):
            pass
        s.close()


# ---- one client --------------------------------------------------------------------------------

@dataclass(frozen=True)
class UefiTftp:
    """How a UEFI firmware's PXE reads its boot program. EDK2 (OVMF 2022.11, captured here)
    first asks the size (RRQ tsize 0 blksize 1468 windowsize 4, ended with an ERROR after the
    OACK), then reads with blksize 1468 windowsize 4 (PcdPxeTftpWindowSize, default 4)."""
    blksize: int = 1468
    windowsize: int = 4
    size_query: bool = True


class Worker:
    def __init__(self, ifname: str, expected: dict[str, tuple[int, str]], blksize: int,
                 timeout: float, run_tag: int, keepalive: bool = True,
                 uefi: UefiTftp | None = UefiTftp()):
        self.uefi = uefi                    # None: UEFI ROMs read lock-step as BIOS ones
        self.ifname = ifname
        self.keepalive = keepalive          # HTTP: iPXE's pooled connections, or one per GET
        self.expected = expected
        self.blksize = blksize
        self.timeout = timeout
        self.run_tag = run_tag
        self.loop: asyncio.AbstractEventLoop | None = None
        self.buf = bytearray(1 << 20)
        self.dhcp: DhcpPort | None = None

    async def rom_fetch(self, c: ClientSpec, url: proto.Url) -> _Transfer:
        """The boot program, read as the client's firmware reads it."""
        uefi = self.uefi
        if url.scheme != "tftp" or uefi is None or c.arch not in (7, 9):
            return await self.fetch(c, url, text=False)
        resent = rrq_resent = 0
        for size_query in (True, False) if uefi.size_query else (False,):
            t = TftpGet(self.loop, self.buf, c.ip, url.host, url.port, url.path, uefi.blksize,
                        windowsize=uefi.windowsize, size_query=size_query)
            await t.run()
            resent, rrq_resent = resent + t.resent, rrq_resent + t.rrq_resent
        t.resent, t.rrq_resent = resent, rrq_resent
        return t

    async def fetch(self, c: ClientSpec, url: proto.Url, text: bool,
                    pool: dict | None = None) -> _Transfer:
        """One download. POOL (the client's kept HTTP connections, by server) makes HTTP
        GETs reuse a connection as iPXE's connection pool does; a kept connection the server
        has closed meanwhile is replaced by a new one, once (iPXE reopens it too)."""
        if url.scheme == "tftp":
            t = TftpGet(self.loop, self.buf, c.ip, url.host, url.port, url.path, self.blksize,
                        keep_text=text)
            await t.run()
            return t
        key = (url.host, url.port)
        pooled = pool.pop(key, None) if pool is not None else None
        t = HttpGet(self.loop, self.buf, c.ip, url.host, url.port, url.path, keep_text=text,
                    keepalive=pool is not None, pooled=pooled)
        try:
            await t.run()
        except ClientFailure:
            if pooled is None or t.in_body:
                raise
            t = HttpGet(self.loop, self.buf, c.ip, url.host, url.port, url.path,
                        keep_text=text, keepalive=True)
            await t.run()
        if t.reusable and pool is not None:
            pool[key] = t.kept
        return t

    def verify(self, url: proto.Url, t: _Transfer) -> str:
        name = url.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        want = self.expected.get(name)
        if want is None:
            raise ClientFailure(f"{url}: not a file the bench served ({name!r})")
        digest = t.hash.hexdigest()
        if t.size != want[0] or digest != want[1]:
            raise ClientFailure(f"{url}: got {t.size} bytes sha256 {digest[:12]}, want "
                                f"{want[0]} bytes {want[1][:12]}")
        return name

    async def client(self, c: ClientSpec, rec: dict) -> None:
        loop = self.loop
        phases = rec["phases"]
        rec["phase"] = "dhcp"
        t = time.monotonic()
        rec["t_start"] = t
        xid = (self.run_tag << 24 | c.index) & 0xFFFFFFFF
        offer = await self.dhcp.discover(xid, c.mac, proto.discover(xid, c.mac, c.arch, c.guid))
        step = proto.pxe_next(offer)
        if step.kind == "fail":
            raise ClientFailure(step.reason)
        server, file = step.server, step.file
        if step.kind == "bootserver":
            rec["via_4011"] = True
            req = proto.bootserver_request(xid, c.mac, c.arch, c.guid, c.ip, step.item)
            ack = await bootserver(loop, c.ip, step.server, xid, c.mac, req)
            server, file = ack.next_server(step.server), ack.file
            if not file:
                raise ClientFailure("the boot server's ack names no boot file")
        phases["dhcp"] = time.monotonic() - t

        rec["phase"] = "bootfile"
        t = time.monotonic()
        url = proto.parse_url(file, server)
        tr = await self.rom_fetch(c, url)
        rec["files"].append(self.verify(url, tr))
        rec["bytes"] += tr.size
        rec["tftp_resent"] = getattr(tr, "resent", 0)
        rec["tftp_rrq_resent"] = getattr(tr, "rrq_resent", 0)
        phases["bootfile"] = time.monotonic() - t

        rec["phase"] = "ipxe_dhcp"
        t = time.monotonic()
        xid2 = (xid + 0x800000) & 0xFFFFFFFF
        offer = await self.dhcp.discover(xid2, c.mac,
                                         proto.discover(xid2, c.mac, c.arch, c.guid, ipxe=True))
        step = proto.pxe_next(offer)
        if step.kind == "fail":
            raise ClientFailure(f"iPXE: {step.reason}")
        server, file = step.server, step.file
        if step.kind == "bootserver":
            rec["ipxe_via_4011"] = True
            req = proto.bootserver_request(xid2, c.mac, c.arch, c.guid, c.ip, step.item,
                                           ipxe=True)
            ack = await bootserver(loop, c.ip, step.server, xid2, c.mac, req)
            server, file = ack.next_server(step.server), ack.file
        if not file:
            raise ClientFailure("the proxy's answer to iPXE names no script")
        script_url = proto.parse_url(file, server)
        phases["ipxe_dhcp"] = time.monotonic() - t

        rec["phase"] = "script"
        t = time.monotonic()
        pool: dict | None = {} if self.keepalive else None
        try:
            await self._scripts_and_files(c, rec, script_url, pool)
        finally:
            for sock in (pool or {}).values():
                sock.close()

    async def _scripts_and_files(self, c: ClientSpec, rec: dict, script_url: proto.Url,
                                 pool: dict | None) -> None:
        phases = rec["phases"]
        t = time.monotonic()
        settings = proto.ipxe_settings(c.mac, c.ip, c.arch, c.guid, f"SN{c.index:06d}")
        plan = None
        for _depth in range(5):
            tr = await self.fetch(c, script_url, text=True, pool=pool)
            rec["bytes"] += tr.size
            try:
                plan = proto.read_script(tr.text.decode("utf-8", "replace"), settings)
            except ValueError as exc:
                raise ClientFailure(f"{script_url}: {exc}") from None
            if plan.chain is None:
                break
            script_url = proto.parse_url(plan.chain, script_url.host)
        if plan is None or plan.chain is not None:
            raise ClientFailure("scripts chain more than 5 deep")
        if not plan.kernel or not plan.initrd:
            raise ClientFailure(f"the script boots no kernel + initrd (answer "
                                f"{plan.answer or '?'}: {tr.text[:80]!r})")
        rec["answer"] = plan.answer
        rec["kernel_url"], rec["initrd_url"] = plan.kernel, plan.initrd
        phases["script"] = time.monotonic() - t

        for phase, link in (("kernel", plan.kernel), ("initrd", plan.initrd)):
            rec["phase"] = phase
            t = time.monotonic()
            url = proto.parse_url(link, script_url.host)
            tr = await self.fetch(c, url, text=False, pool=pool)
            rec["files"].append(self.verify(url, tr))
            rec["bytes"] += tr.size
            phases[phase] = time.monotonic() - t
        rec["phase"] = "done"

    async def one(self, c: ClientSpec, start_at: float) -> dict:
        rec = {"index": c.index, "ip": c.ip, "arch": c.arch, "ok": False, "phases": {},
               "files": [], "bytes": 0, "via_4011": False}
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(self.client(c, rec), self.timeout)
            rec["ok"] = True
        except asyncio.TimeoutError:
            rec["reason"] = f"not done within {self.timeout:g} s (in phase {rec['phase']})"
        except ClientFailure as exc:
            rec["reason"] = f"{rec['phase']}: {exc}"
        except Exception as exc:        # a bench bug must show, not vanish
            rec["reason"] = f"{rec['phase']}: {type(exc).__name__}: {exc}"
        rec["t_end"] = time.monotonic()
        return rec

    async def run(self, clients: list[ClientSpec], starts: list[float]) -> list[dict]:
        self.loop = asyncio.get_running_loop()
        self.dhcp = DhcpPort(self.loop, self.ifname)
        try:
            return list(await asyncio.gather(*(self.one(c, s) for c, s in zip(clients, starts))))
        finally:
            self.dhcp.close()


def _event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
        return "uvloop"
    except ImportError:
        return "asyncio"


def _worker_main(conn, ns: str, ifname: str, expected, blksize: int, timeout: float,
                 run_tag: int, clients: list[ClientSpec], keepalive: bool,
                 uefi: UefiTftp | None) -> None:
    from proxylib.netns import enter
    enter(ns)
    loop_name = _event_loop_name()
    if loop_name == "uvloop":
        import uvloop  # noqa: F401,F811
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    conn.send(("ready", loop_name))
    cmd = conn.recv()
    if cmd[0] != "go":
        return
    starts = cmd[1]
    worker = Worker(ifname, expected, blksize, timeout, run_tag, keepalive, uefi)
    results = asyncio.run(worker.run(clients, starts))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(("done", results, ru.ru_utime + ru.ru_stime))


class ClientPool:
    """`workers` forked processes in namespace `ns`, the clients dealt round-robin."""

    def __init__(self, ns: str, ifname: str, clients: list[ClientSpec],
                 expected: dict[str, tuple[int, str]], workers: int, blksize: int,
                 timeout: float, run_tag: int, keepalive: bool = True,
                 uefi: UefiTftp | None = UefiTftp()):
        self.procs, self.conns, self.shares = [], [], []
        self.loop_name = "?"
        for w in range(workers):
            share = clients[w::workers]
            if not share:
                continue
            parent, child = _ctx.Pipe()
            p = _ctx.Process(target=_worker_main, daemon=True, name=f"bootstorm-client-{w}",
                             args=(child, ns, ifname, expected, blksize, timeout, run_tag,
                                   share, keepalive, uefi))
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
            self.shares.append(share)
        for conn in self.conns:
            if not conn.poll(20):
                raise RuntimeError("a client worker did not start")
            self.loop_name = conn.recv()[1]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def go(self, t0: float, spread: float, order: list[int]) -> None:
        """Start at monotonic time t0; client k (in `order` of all indexes) starts at
        t0 + spread * k / N."""
        n = len(order)
        at = {idx: t0 + (spread * k / n if n else 0) for k, idx in enumerate(order)}
        for conn, share in zip(self.conns, self.shares):
            conn.send(("go", [at[c.index] for c in share]))

    def results(self, timeout: float) -> tuple[list[dict], float, list[str]]:
        """(client records, client CPU seconds, problems)."""
        out, cpu, problems = [], 0.0, []
        deadline = time.monotonic() + timeout
        for conn, share, proc in zip(self.conns, self.shares, self.procs):
            left = max(0.1, deadline - time.monotonic())
            if conn.poll(left):
                _, recs, c = conn.recv()
                out.extend(recs)
                cpu += c
            else:
                problems.append(f"worker {proc.pid} did not report within the timeout")
                for c in share:
                    out.append({"index": c.index, "ip": c.ip, "arch": c.arch, "ok": False,
                                "phases": {}, "files": [], "bytes": 0,
                                "reason": "its worker did not report (bench timeout)"})
        return out, cpu, problems

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
