"""The per-packet fast path: raw request bytes in, the reply bytes (or the reason to ignore) out.

Pure: no sockets, no clock, no logging. What the daemon answers is still decided by
decide.decide and shaped by reply.py (scapy builds each template once); this module only avoids
redoing that work for every packet of a lab powering on, where thousands of clients of a few
kinds send the same request but for their own xid, MAC and GUID:

- packet.scan finds, in one pass over the options, just the fields decide.decide reads (op,
  options 53, 60, 77, 93, 175, 43) and where option 97 is, with the same checks as packet.parse
  (a packet one rejects the other rejects with the same reason). Packets it cannot take whole
  (option overload, a wanted option split in pieces) go to the full parser instead.
- Those fields, the port, the server address and whether the MAC passes the allow/deny lists
  are the key of a bounded cache of outcomes: the decision (its reason and counters) and, for a
  reply, the template cut around the per-client fields, so that a reply is the template with
  htype/hlen, xid, flags, ciaddr, giaddr, chaddr and option 97 copied from the request bytes
  at their RFC 2131 offsets (the same bytes reply.ReplyBuilder.build writes; a test holds them
  equal on the golden captures and on generated packets).
"""

from __future__ import annotations

from typing import NamedTuple

from . import packet
from .decide import Ignore, Policy, ProxyReply, decide
from .reply import MIN_REPLY_LEN, ReplyBuilder

MAX_OUTCOMES = 4096            # request kinds x servers are few; bound the cache anyway
MAX_LAYOUTS = 64
_BROADCAST = b"\x00\x00\x80\x00"    # secs 0 + flags: broadcast (every offer, see reply.py)
_UNICAST = b"\x00\x00\x00\x00"      # secs 0 + flags: none
_OP = b"\x02"                        # BOOTREPLY; htype and hlen follow from the request
_HOPS = b"\x00"
_END = b"\xff"


class Outcome(NamedTuple):
    """What to do with every request of one kind (everything but the per-client fields)."""

    kind: str                      # the request's message name, for the requests counter
    ignore: Ignore | None          # set: count it under ignore.counter, send nothing
    plan: ProxyReply | None        # set: the reply plan (firmware, message type, reason)
    middle: bytes                  # template bytes 16..24 (yiaddr, siaddr)
    tail: bytes                    # template bytes 44.. (sname, file, options), no END
    offer: bool                    # an OFFER: the broadcast flag is always set


# END + n zero bytes, the end of a reply padded to MIN_REPLY_LEN
_ENDS = [_END + bytes(n) for n in range(MIN_REPLY_LEN + 1)]


class FastPath:
    """Answers raw requests for one policy; make a new one when the settings change."""

    def __init__(self, policy: Policy, next_server: str,
                 replies: ReplyBuilder | None = None) -> None:
        self.policy = policy
        self.next_server = next_server           # "0.0.0.0": the answering server
        self.replies = replies or ReplyBuilder()
        self._outcomes: dict[tuple, tuple[Outcome, int]] = {}
        self._layouts: dict[int, tuple] = {}     # request length -> last layout seen (scan)
        self._denied = policy.denied_macs
        self._allowed = policy.allowed_macs
        self.hits = 0
        self.misses = 0

    def mac_ok(self, datagram: bytes) -> bool:
        if not self._denied and not self._allowed:
            return True
        hlen = datagram[2]
        mac = datagram[28:28 + (hlen if hlen < 16 else 16)]
        if mac in self._denied:
            return False
        return not self._allowed or mac in self._allowed

    def secure_boot(self, datagram: bytes) -> tuple[bool, bytes] | None:
        """What decide() reads to give a client the Secure Boot chain and the template leaves
        out (part of the cache key): whether its MAC is named, and the relay address when
        networks are named (our own address is in the key already). None: nobody takes it."""
        secure = self.policy.secure_boot
        if not secure.anyone:
            return None
        hlen = datagram[2]
        mac = datagram[28:28 + (hlen if hlen < 16 else 16)]
        return mac in secure.macs, datagram[24:28] if secure.networks else b""

    def scan(self, datagram: bytes) -> tuple[tuple, bytes | None] | None:
        """packet.scan(datagram), remembering the layout of the last request of each length:
        clients of one kind send the same options but for option 97's value, so when the bytes
        from the cookie up to that value, and from its end on, equal those of the remembered
        request, the options walk would find exactly what it found then (same framing, same
        values) and is skipped. Anything else goes through packet.scan."""
        n = len(datagram)
        layout = self._layouts.get(n)
        if layout is not None:
            start, end, before, after, op, key, has_guid = layout
            if (datagram[packet.HEADER_LEN:start] == before and datagram[end:] == after
                    and datagram[0] == op and datagram[2] <= 16):
                return key, (datagram[start - 2:end] if has_guid else None)
        scanned = packet.scan_at(datagram)
        if scanned is None:
            return None
        key, at = scanned
        if at is None:
            start = end = n
            guid = None
        else:
            start, end = at + 2, at + 2 + datagram[at + 1]
            guid = datagram[at:end]
        if len(self._layouts) >= MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[n] = (start, end, datagram[packet.HEADER_LEN:start], datagram[end:],
                            key[0], key, at is not None)
        return key, guid

    def answer(self, datagram: bytes, scanned: tuple[tuple, bytes | None], port: int,
               server: str) -> tuple[Outcome, bytes | None]:
        """(outcome, reply bytes or None when ignored) for `datagram`, which came in on `port`
        (67 or 4011, the role), to be answered from `server`; `scanned` is what self.scan or
        packet.scan returned for it (when they return None, only the full path answers it)."""
        key, guid = scanned
        key = (port, server, self.mac_ok(datagram), self.secure_boot(datagram), key)
        found = self._outcomes.get(key)
        if found is None:
            self.misses += 1
            found = self._outcome(packet.parse(datagram), port, server)
            if len(self._outcomes) >= MAX_OUTCOMES:
                self._outcomes.clear()
            self._outcomes[key] = found
        else:
            self.hits += 1
        outcome, short = found   # short: bytes to pad before option 97 and END
        if outcome.plan is None:
            return outcome, None
        d = datagram
        flags = _BROADCAST if outcome.offer or d[10] & 0x80 else _UNICAST
        if guid is None:
            end = _ENDS[short if short > 0 else 0]
            guid = b""
        else:
            pad = short - len(guid)
            end = _ENDS[pad if pad > 0 else 0]
        return outcome, b"".join((_OP, d[1:3], _HOPS, d[4:8], flags, d[12:16],
                                  outcome.middle, d[24:44], outcome.tail, guid, end))

    def _outcome(self, request: packet.DhcpPacket, port: int,
                 server: str) -> tuple[Outcome, int]:
        kind = packet.MESSAGE_NAMES.get(request.message_type or 0, "other")
        plan = decide(request, port, self.policy, server)
        if isinstance(plan, Ignore):
            return Outcome(kind, plan, None, b"", b"", False), 0
        next_server = self.next_server if self.next_server != "0.0.0.0" else server
        if plan.to_boot_server:
            next_server = server
        template = self.replies.template_for(plan, server, next_server)
        if template[0:1] != _OP or template[3:4] != _HOPS or template[8:10] != bytes(2):
            raise ValueError("reply template: op, hops or secs not as answer() writes them")
        tail = template[44:]
        return (Outcome(kind, None, plan, template[16:24], tail,
                        plan.message_type == packet.OFFER), MIN_REPLY_LEN - 44 - len(tail) - 1)
