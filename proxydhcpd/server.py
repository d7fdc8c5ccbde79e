"""The proxyDHCP server loop: sockets on 67 and 4011, interface-aware receive and send.

Both sockets are bound to the wildcard address (a unicast-bound socket never sees the clients'
broadcasts) with IP_PKTINFO, which tells for each request the interface it arrived on; the
reply is sent with an IP_PKTINFO control message naming that interface and our address on it, so
a server on several segments answers each from the right address (what pixiecore does with
golang.org/x/net/ipv4 control messages).

Each request takes the fast path (fastpath.py: a lean scan of the options, the outcome cached per
kind of request, the reply filled in from the request's bytes), unless the log is at DEBUG or
the packet has overloaded or split options: then the full path (packet.parse, decide.decide,
ReplyBuilder.build) answers it and logs every step. The two differ only in how they reach a
decision; what follows it is one path that both take: the arrival interface (Interfaces filter,
our address there: _arrival, _refuse), an ignored request counted and logged (_ignore), and a
reply sent (_send: where it goes is destination.reply_destination, the RFC 2131 section 4.1
rule; then the counters). So both count and send the same (tests/unit/proxydhcpd/
test_fastpath.py holds them to it). One receive wakeup reads up to RECV_BURST datagrams;
recvmmsg through ctypes measured slower per datagram than socket.recvmsg here (filling and
reading its structures from Python costs more than the system calls it saves), so there is none.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from typing import Any, NamedTuple

import psutil

from . import packet
from .config import Settings
from .decide import Ignore, ProxyReply, decide
from .destination import reply_destination
from .fastpath import FastPath
from .reply import ReplyBuilder
from .status import ProxyCounters

log = logging.getLogger("preboot.proxydhcpd")

IP_PKTINFO = 8                    # linux/in.h
RECV_BURST = 256                  # datagrams per wakeup: a lab powering on arrives in bursts
RCVBUF_BYTES = 8 << 20
ADDRESS_CACHE_S = 10.0
RECV_SIZE = packet.MAX_LEN + 1    # one more than the longest packet: longer ones are rejected
CMSG_SIZE = socket.CMSG_SPACE(12)  # struct in_pktinfo
_IPPROTO_IP = socket.IPPROTO_IP
_IFINDEX = struct.Struct("=i")


class InterfaceAddresses:
    """ifindex -> (name, IPv4 address), re-read at most every ADDRESS_CACHE_S seconds."""

    def __init__(self) -> None:
        self._by_index: dict[int, tuple[str, str | None]] = {}
        self._read_at = 0.0

    def lookup(self, ifindex: int) -> tuple[str, str | None]:
        now = time.monotonic()
        if ifindex not in self._by_index or now - self._read_at > ADDRESS_CACHE_S:
            self._refresh()
            self._read_at = now
        return self._by_index.get(ifindex, (f"if{ifindex}", None))

    def _refresh(self) -> None:
        table: dict[int, tuple[str, str | None]] = {}
        for name, addresses in psutil.net_if_addrs().items():
            try:
                index = socket.if_nametoindex(name)
            except OSError:
                continue
            ipv4 = next((a.address for a in addresses if a.family == socket.AF_INET), None)
            table[index] = (name, ipv4)
        self._by_index = table


def _pktinfo(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The arrival interface from recvmsg's IP_PKTINFO control message (struct in_pktinfo)."""
    for level, kind, data in ancillary:
        if kind == IP_PKTINFO and level == _IPPROTO_IP and len(data) >= 12:
            return _IFINDEX.unpack_from(data)[0]
    return None


class Arrival(NamedTuple):
    """Where a request came in and how to answer there."""

    name: str                  # the interface, for log lines
    server: str | None         # our address to answer from; None: do not answer
    control: tuple | None      # sendmsg's IP_PKTINFO message; None: Interfaces leaves the
                               # interface out, (): it has no IPv4 address


class ProxyDhcpServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stats = ProxyCounters()
        self.replies = ReplyBuilder()
        self._fast = FastPath(settings.policy, settings.next_server, self.replies)
        self.addresses = InterfaceAddresses()
        self._sockets: dict[int, socket.socket] = {}   # port -> socket
        self._pktinfo_cache: dict[tuple[int, str], tuple[int, int, bytes]] = {}
        self._arrivals: dict[int | None, Arrival] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle (common.runner.Service) ----------------------------------------------

    def bind(self) -> list[socket.socket]:
        ports = []
        if self.settings.listen_67:
            ports.append(self.settings.dhcp_port)
        if self.settings.listen_4011:
            ports.append(self.settings.boot_server_port)
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as exc:
                sock.close()
                hint = ""
                if exc.errno == errno.EADDRINUSE and port == self.settings.dhcp_port:
                    hint = " (a DHCP server on this host? use ListenPort67 = NO, the co-located mode)"
                elif exc.errno == errno.EACCES:
                    hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
                raise OSError(f"port {port}/udp: {exc.strerror}{hint}") from None
            sock.setblocking(False)
            self._sockets[port] = sock
        return list(self._sockets.values())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for port, sock in self._sockets.items():
            self._loop.add_reader(sock.fileno(), self._on_readable, sock, port)
        log.info("proxyDHCP answering on ports %s%s", sorted(self._sockets),
                 f" on {', '.join(self.settings.interfaces)}" if self.settings.interfaces
                 else " on every interface")

    async def apply(self, settings: Settings) -> list[str]:
        warnings = []
        if (settings.listen_67, settings.listen_4011, settings.dhcp_port,
                settings.boot_server_port) != (self.settings.listen_67, self.settings.listen_4011,
                                               self.settings.dhcp_port,
                                               self.settings.boot_server_port):
            warnings.append("port changes need a restart; kept the old ports")
        self.settings = settings
        self._fast = FastPath(settings.policy, settings.next_server, self.replies)
        self._arrivals.clear()
        return warnings

    async def stop(self) -> None:
        for sock in self._sockets.values():
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

    def listen(self) -> list[dict[str, Any]]:
        return [{"proto": "udp", "address": "0.0.0.0", "port": sock.getsockname()[1]}
                for sock in self._sockets.values()]

    def counters(self) -> dict[str, Any]:
        return self.stats.snapshot()

    # ---- requests -----------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket, port: int) -> None:
        recvmsg = sock.recvmsg
        unpack_ifindex = _IFINDEX.unpack_from
        # At DEBUG every request is logged with its decision: the full path does that.
        handle = self._on_request_full if log.isEnabledFor(logging.DEBUG) else self._on_request
        self._arrivals.clear()   # interface facts are kept for one batch at most
        for _ in range(RECV_BURST):
            try:
                datagram, ancillary, _flags, source = recvmsg(RECV_SIZE, CMSG_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("receive on port %d: %s", port, exc)
                return
            ifindex = None
            for level, kind, data in ancillary:  # _pktinfo(ancillary), inlined
                if kind == IP_PKTINFO and level == _IPPROTO_IP and len(data) >= 12:
                    ifindex = unpack_ifindex(data)[0]
                    break
            try:
                handle(sock, port, datagram, source, ifindex)
            except Exception:  # one bad packet never stops the server
                self.stats.malformed += 1
                log.exception("internal error on a packet from %s:%d", *source)

    def _on_request(self, sock: socket.socket, port: int, datagram: bytes,
                    source: tuple[str, int], ifindex: int | None) -> None:
        """The fast path (fastpath.py): same outcome, counters and log lines above DEBUG as
        _on_request_full, without parsing the whole request or deciding again for each."""
        try:
            scanned = self._fast.scan(datagram)
        except packet.MalformedPacket as exc:
            self.stats.malformed += 1
            log.debug("malformed packet from %s:%d: %s", *source, exc)
            return
        if scanned is None:  # overload or options in pieces: only the full parser reads those
            self._on_request_full(sock, port, datagram, source, ifindex)
            return
        # The batch's memo first, then _arrival: a method call per packet shows on this path.
        arrival = self._arrivals.get(ifindex) or self._arrival(ifindex)
        _, server, control = arrival
        if server is None:
            self._refuse(arrival, datagram)
            return
        port_role = 67 if port == self.settings.dhcp_port else 4011
        outcome, reply = self._fast.answer(datagram, scanned, port_role, server)
        self.stats.requests[outcome.kind] += 1
        if reply is None:
            self._ignore(outcome.kind, outcome.ignore, datagram, source)
            return
        self._send(sock, reply, outcome.plan, datagram, port_role, source, control)

    def _on_request_full(self, sock: socket.socket, port: int, datagram: bytes,
                         source: tuple[str, int], ifindex: int | None) -> None:
        """The reference path: parse everything, decide, build, log each step at DEBUG."""
        settings = self.settings
        try:
            request = packet.parse(datagram)
        except packet.MalformedPacket as exc:
            self.stats.malformed += 1
            log.debug("malformed packet from %s:%d: %s", *source, exc)
            return
        arrival = self._arrival(ifindex)
        name, server, control = arrival
        if server is None:
            self._refuse(arrival, datagram)
            return
        kind = packet.MESSAGE_NAMES.get(request.message_type or 0, "other")
        self.stats.requests[kind] += 1
        port_role = 67 if port == settings.dhcp_port else 4011
        plan = decide(request, port_role, settings.policy, server)
        if isinstance(plan, Ignore):
            self._ignore(kind, plan, datagram, source)
            return
        next_server = settings.next_server if settings.next_server != "0.0.0.0" else server
        if plan.to_boot_server:
            next_server = server
        reply = self.replies.build(plan, request, server, next_server)
        destination = self._send(sock, reply, plan, datagram, port_role, source, control)
        if destination is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("%s to %s via %s:%d on %s: %s, file %r",
                      packet.MESSAGE_NAMES[plan.message_type], request.mac_text, *destination,
                      name, plan.reason, plan.boot_file)

    # ---- after the decision: one path for both --------------------------------------------

    def _arrival(self, ifindex: int | None) -> Arrival:
        """How to answer a request that came in on `ifindex`, kept for one batch of datagrams
        (_on_readable clears it): reading the interface table per packet would cost more than
        deciding."""
        arrival = self._arrivals.get(ifindex)
        if arrival is None:
            arrival = self._arrivals[ifindex] = self._read_arrival(ifindex)
        return arrival

    def _read_arrival(self, ifindex: int | None) -> Arrival:
        settings = self.settings
        name, interface_address = self.addresses.lookup(ifindex) if ifindex else ("?", None)
        if settings.interfaces and name not in settings.interfaces:
            return Arrival(name, None, None)
        # A fixed IPAddress wins; otherwise each segment is answered from our address on it.
        server = settings.ip_address if settings.ip_address != "0.0.0.0" else interface_address
        if server is None:
            return Arrival(name, None, ())
        return Arrival(name, server, (self._pktinfo(ifindex or 0, server),))

    def _refuse(self, arrival: Arrival, datagram: bytes) -> None:
        """A request we do not answer because of where it came in."""
        self.stats.ignored_other += 1
        if arrival.control is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("ignored %s: interface %s is not in Interfaces",
                          packet.format_mac(datagram), arrival.name)
        else:  # an interface we should serve but cannot answer from: the admin must know
            log.warning("no IPv4 address on %s to answer %s from", arrival.name,
                        packet.format_mac(datagram))

    def _ignore(self, kind: str, ignore: Ignore, datagram: bytes,
                source: tuple[str, int]) -> None:
        """A request the decision ignores: its counter, and a log line. A missing boot file is
        a configuration gap, so it shows at INFO; the other reasons are normal traffic."""
        stats = self.stats
        setattr(stats, ignore.counter, getattr(stats, ignore.counter) + 1)
        level = logging.INFO if ignore.counter == "no_boot_file" else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "ignored %s from %s (%s:%d): %s", kind, packet.format_mac(datagram),
                    *source, ignore.reason)

    def _send(self, sock: socket.socket, reply: bytes, plan: ProxyReply, datagram: bytes,
              port_role: int, source: tuple[str, int],
              control: tuple) -> tuple[str, int] | None:
        """Send `reply` to where RFC 2131 section 4.1 says (destination.py), from our address on
        the arrival interface (`control`: Arrival.control), and count it. Returns where it went,
        or None when the send failed."""
        stats = self.stats
        stats.architectures[plan.firmware] += 1
        settings = self.settings
        destination = reply_destination(datagram, port_role, source, settings.dhcp_port,
                                        settings.client_port)
        try:
            sock.sendmsg((reply,), control, 0, destination)
        except OSError as exc:
            stats.send_errors += 1
            log.warning("cannot send to %s:%d for %s: %s", *destination,
                        packet.format_mac(datagram), exc)
            return None
        if plan.message_type == packet.OFFER:
            stats.offers_sent += 1
        else:
            stats.acks_sent += 1
        return destination

    def _pktinfo(self, ifindex: int, server: str) -> tuple[int, int, bytes]:
        """The IP_PKTINFO control message choosing interface and source address, cached."""
        key = (ifindex, server)
        message = self._pktinfo_cache.get(key)
        if message is None:
            if len(self._pktinfo_cache) > 1024:
                self._pktinfo_cache.clear()
            message = (socket.IPPROTO_IP, IP_PKTINFO,
                       struct.pack("=i4s4s", ifindex, socket.inet_aton(server), bytes(4)))
            self._pktinfo_cache[key] = message
        return message
