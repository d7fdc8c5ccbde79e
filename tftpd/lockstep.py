"""Lock-step downloads (RRQ without windowsize) served by a blocking loop: the loop itself, run
in a worker of its own (a forked child, lockchild.py, by default; or a thread, as written below).

A lock-step transfer is a chain of round trips: the client's ACK n, our DATA n+1, its ACK n+1.
On the event loop every link of that chain costs an epoll wakeup, the loop's callback dispatch,
a recvfrom and a sendto, plus the state machine's per-block bookkeeping, and the client waits
for all of it. Here one thread blocks in recvfrom() on the transfer's own socket; when the
expected ACK arrives from the client's TID it sends the DATA block prepared while the client
was busy, and only then prepares the one after it and does the bookkeeping. That is two system
calls per block (recvfrom, sendto) and a few lines of Python. The receive timeout is the
kernel's (SO_RCVTIMEO), so waiting costs no extra poll() call.

Anything else (a stranger's datagram, a duplicate or stale ACK, an ERROR, a timeout, the OACK
phase) leaves the fast path and goes to the transfer's own state machine
(transfer.ReadTransfer), which stays the one authority on the protocol: RFC behaviour is the
same as on the event loop. The fast path writes its progress back into it first.

Once the last block is out, the thread hands the transfer back to the event loop, which waits
for the final ACK (or resends the last block, and counts the transfer completed, unconfirmed or
failed) exactly as for any other transfer. So the end of every transfer is seen in the loop
thread, in the order the datagrams came: a status query sent after a client's final ACK finds
that transfer counted, as before.

The socket stays unconnected, as on the event loop (server.py's note): a connected UDP socket
would make the kernel answer a stranger with ICMP port unreachable instead of our ERROR 5
(RFC 1350 section 4), and would turn the ICMP of a client that already exited into
ECONNREFUSED on our next call. Every datagram's source is compared with the client's TID.

Threads share nothing with the event loop but the transfer they own: counters are kept in a
`LocalCounts` and handed to the loop thread (`report`) in batches; the end is reported with
loop.call_soon_threadsafe, and from the moment `ended` is set the loop thread owns the transfer
and its remaining counts, accounts for it and closes its socket. A stop
sets `stopping` and shuts the socket's receive side down, which wakes a blocked recvfrom at once
(Linux does this even for unconnected UDP sockets), so a stop ends every thread within
milliseconds, whatever timeout the client asked for.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import _thread
import time
import traceback
from typing import Callable

from . import packet
from .transfer import LOSS_ERRNOS, FileBlocks, MemoryBlocks, ReadTransfer

try:    # the same hot loop in C (tftpd/_lockstep.c, built by setup.py); pure Python without it
    from . import _lockstep as native
except ImportError:  # pragma: no cover - depends on the build
    native = None
if os.environ.get("PREBOOT_TFTP_NATIVE", "1") == "0":
    native = None       # the pure-Python loop on demand: the tests run both, bench/ compares

log = logging.getLogger("preboot.tftpd")

RECV_BYTES = 2048        # an ACK is 4 bytes; an ERROR's text is cut to 512 by RFC 1350
READ_AHEAD = 256 * 1024  # bytes read from the file at once (pread), sliced into blocks
FLUSH_EVERY = 1024       # blocks between two counter hand-overs to the loop thread
STOP_POLL_S = 1.0        # longest single wait: a safety net should the wake-up ever not come

_SENT_ALL = object()
_ACK = struct.Struct("!HH")
_DATA = struct.Struct("!HH")


class LocalCounts:
    """The counters a transfer touches (transfer.py), private to its thread."""

    __slots__ = ("bytes_sent", "bytes_received", "blocks_resent", "malformed_packets",
                 "internal_errors")

    def __init__(self) -> None:
        self.bytes_sent = self.bytes_received = self.blocks_resent = 0
        self.malformed_packets = self.internal_errors = 0

    def take(self) -> dict[str, int]:
        """The counts since the last take, as deltas; zero afterwards."""
        out = {name: getattr(self, name) for name in self.__slots__ if getattr(self, name)}
        for name in out:
            setattr(self, name, 0)
        return out


class LockstepRunner:
    """Runs one lock-step ReadTransfer on `sock` in a thread; `on_end` is called in that thread
    when it is over (the server passes a function that hands over to its loop thread)."""

    def __init__(self, transfer: ReadTransfer, sock: socket.socket, client: tuple[str, int],
                 report: Callable[[dict[str, int]], None], stranger: Callable[[tuple], None],
                 on_end: Callable[[], None]):
        self.transfer = transfer
        self.sock = sock
        self.client = client
        self.counts = LocalCounts()
        transfer.counters = self.counts  # type: ignore[assignment]
        self._report = report
        self._stranger = stranger
        self._on_end = on_end
        self.stopping = False
        self.ended = False       # set last by the thread: from then on the loop thread owns all
        self.last_progress = 0.0  # when the last block went out (for the loop's timer)
        self._rcvtimeo = -1.0

    def start(self) -> None:
        """Run the transfer in a thread of its own. Not threading.Thread.start(): that waits
        until the new thread has been scheduled and taken the GIL, which on a busy machine
        held the event loop for milliseconds per transfer (a boot storm starts hundreds at
        once). The thread owes no one a join: it reports its end through on_end."""
        self.sock.setblocking(True)
        _thread.start_new_thread(self._run, ())

    def stop(self) -> None:
        """Ask the thread to end the transfer (the client gets ERROR 0) and wake it now."""
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # ENOTCONN on an unconnected socket; Linux has still woken the reader

    # ---- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        transfer = self.transfer
        try:
            try:
                transfer.start()
            except OSError as exc:
                if exc.errno not in LOSS_ERRNOS:
                    transfer.fail("io_error", f"send failed: {exc.strerror}")
            self._serve()
        except Exception:  # a bug here must not leave the transfer open forever
            self._error(f"internal error in the lock-step transfer to {self.client[0]}:"
                        f"{self.client[1]}\n{traceback.format_exc()}")
            self.counts.internal_errors += 1
            transfer.fail("internal", "Internal error", packet.ERR_UNDEFINED)
        finally:
            # The final counts stay in self.counts for the loop thread to take (server.py
            # _thread_ended), along with the transfer: finished, or every block sent and the
            # final ACK still to come.
            self.ended = True
            self._on_end()

    def _chunk(self, block: int) -> tuple[bytes, int, int]:
        """Blocks from `block` on, as (bytes, first block, how many blocks they hold)."""
        source, blksize = self.transfer.source, self.transfer.blksize
        if isinstance(source, MemoryBlocks):
            return source.content, 1, self.transfer.last_block
        if isinstance(source, FileBlocks):
            count = max(READ_AHEAD // blksize, 1)
            return os.pread(source.fd, count * blksize, (block - 1) * blksize), block, count
        return source.block(block, blksize), block, 1

    @staticmethod
    def _error(text: str) -> None:
        log.error("%s", text)

    def _wait(self, seconds: float) -> None:
        seconds = min(max(seconds, 0.001), STOP_POLL_S)
        if seconds != self._rcvtimeo:
            whole = int(seconds)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 struct.pack("@ll", whole, int((seconds - whole) * 1e6)))
            self._rcvtimeo = seconds

    def _serve(self) -> None:
        transfer, client = self.transfer, self.client
        recvfrom, timeout_s = self.sock.recvfrom, transfer.opts.timeout_s
        monotonic = time.monotonic
        last_progress = monotonic()
        fresh = True        # the last event was progress: a whole timeout_s lies ahead
        while not transfer.finished:
            if self.stopping:
                transfer.fail("shutdown", "Server shutting down", packet.ERR_UNDEFINED)
                return
            if transfer.sent_last_block:
                self.last_progress = last_progress
                return          # the event loop waits for the final ACK (see the top)
            self._wait(last_progress + timeout_s - monotonic())
            if (fresh and not transfer.waiting_oack_ack and transfer.next == transfer.acked + 2
                    and transfer.next <= transfer.last_block):
                progressed, got, when = self._fast()
                if progressed:
                    last_progress = when
                if got is _SENT_ALL:
                    continue
            else:
                got = self._receive(recvfrom)
            # Whatever comes now is not the expected ACK: wait out the rest of the timeout
            # from the last progress, however many other datagrams arrive meanwhile (a
            # client repeating an old ACK must not put our retransmission off).
            fresh = False
            if self.stopping:
                continue
            if got is None:                       # nothing came within the wait
                if monotonic() - last_progress >= timeout_s - 0.001:
                    transfer.on_timeout()
                    last_progress, fresh = monotonic(), True
                continue
            data, source = got
            if source != client:
                if source is None:                # woken by stop()'s shutdown (maybe in the
                    self.stopping = True          # parent process: lockchild.py)
                else:
                    self._unknown_tid(source)
                continue
            if transfer.on_datagram(data):
                last_progress, fresh = monotonic(), True

    def _fast(self):
        """The hot path: the C loop where it is built and the source is a file or memory."""
        source = self.transfer.source
        if native is not None and isinstance(source, (FileBlocks, MemoryBlocks)):
            return self._fast_native(source)
        return self._fast_python()

    def _fast_native(self, source):
        """_fast_python's loop in C (tftpd/_lockstep.c), `FLUSH_EVERY` blocks per call so the
        counters are handed over as often; the state machine's fields are written back here,
        the same way."""
        transfer, client = self.transfer, self.client
        if isinstance(source, FileBlocks):
            file_fd, content = source.fd, None
        else:
            file_fd, content = -1, source.content
        start = cur = transfer.next - 1
        send_errno, when, got = 0, 0.0, None
        try:
            while True:
                cur, send_errno, sent, at, why, got = native.run(
                    self.sock.fileno(), client, file_fd, content, transfer.blksize, cur,
                    transfer.last_block, FLUSH_EVERY)
                self.counts.bytes_sent += sent
                when = at or when
                if why != native.WHY_BUDGET:
                    break
                self._report(self.counts.take())
        finally:
            if cur != start or send_errno:
                transfer.retries_left = transfer.max_retries
            if send_errno:                          # ACK cur came; cur + 1 is not out
                transfer.acked, transfer.next = cur, cur + 1
            elif cur != start:                      # ACK cur - 1 came; cur is out
                transfer.acked, transfer.next = cur - 1, cur + 1
                transfer.sent_last_block |= cur >= transfer.last_block
        if send_errno and send_errno not in LOSS_ERRNOS:
            transfer.fail("io_error", f"Read or send error: {os.strerror(send_errno)}",
                          packet.ERR_UNDEFINED)
        if why == native.WHY_SENT_ALL:
            got = _SENT_ALL
        return bool(send_errno) or cur != start, got, when

    def _fast_python(self):
        """The hot path: block `cur` is in flight; each expected ACK sends the next block.

        Returns (progressed, got, when): got is what came instead of the expected ACK, as
        (data, source), None when nothing came within the wait, or _SENT_ALL once the last
        block is out; when is the time of the last progress. The state machine's fields are
        brought up to date before returning. Every name the loop uses is a local, and the
        blocks are sliced here from a read-ahead chunk: attribute look-ups and method calls
        are what a Python loop pays for, per block."""
        transfer, client = self.transfer, self.client
        blksize, last = transfer.blksize, transfer.last_block
        sendto, recvfrom, monotonic = self.sock.sendto, self.sock.recvfrom, time.monotonic
        pack_data, pack_ack, op_data, op_ack = _DATA.pack, _ACK.pack, packet.OP_DATA, packet.OP_ACK
        refill = self._chunk
        start = cur = transfer.next - 1             # the block in flight, awaiting its ACK
        unsent = False                              # True: block cur + 1 failed to go out
        sent = 0                                    # payload bytes sent, for the counters
        want = pack_ack(op_ack, cur & 0xFFFF)
        chunk, first, count = refill(cur + 1)      # blocks first .. first + count - 1
        offset = (cur + 1 - first) * blksize
        nxt = pack_data(op_data, (cur + 1) & 0xFFFF) + chunk[offset:offset + blksize]
        got = None
        when = 0.0
        try:
            while True:
                try:
                    got = recvfrom(RECV_BYTES)
                except (BlockingIOError, InterruptedError, socket.timeout):
                    got = None
                    break
                if got[0] != want or got[1] != client:
                    break                           # not the expected ACK
                try:
                    sendto(nxt, client)             # first the next block, then the rest
                except OSError as exc:
                    when = monotonic()
                    # as in ReadTransfer._send_window: a lost block is resent on timeout
                    unsent, got = True, None
                    if exc.errno not in LOSS_ERRNOS:
                        transfer.fail("io_error", f"Read or send error: {exc.strerror}",
                                      packet.ERR_UNDEFINED)
                    break
                when = monotonic()
                cur += 1
                sent += len(nxt) - 4
                if cur >= last:
                    got = _SENT_ALL                 # the final ACK is the event loop's
                    break
                want = pack_ack(op_ack, cur & 0xFFFF)
                if cur + 1 - first >= count:
                    chunk, first, count = refill(cur + 1)
                offset = (cur + 1 - first) * blksize
                nxt = pack_data(op_data, (cur + 1) & 0xFFFF) + chunk[offset:offset + blksize]
                if not cur & (FLUSH_EVERY - 1):
                    self.counts.bytes_sent += sent
                    sent = 0
                    self._report(self.counts.take())
        finally:
            self.counts.bytes_sent += sent
            if unsent:                              # ACK cur came; cur + 1 is not out
                transfer.acked, transfer.next = cur, cur + 1
            elif cur != start:                      # ACK cur - 1 came; cur is out
                transfer.acked, transfer.next = cur - 1, cur + 1
                transfer.sent_last_block |= cur >= last
            if unsent or cur != start:
                transfer.retries_left = transfer.max_retries
        return unsent or cur != start, got, when

    def _unknown_tid(self, source: tuple[str, int]) -> None:
        """RFC 1350 section 4: ERROR 5 to the stranger; the transfer goes on undisturbed."""
        try:
            self.sock.sendto(packet.encode_error(packet.ERR_UNKNOWN_TID, "Unknown transfer ID"),
                             source)
        except OSError:
            pass
        self._stranger(source)

    @staticmethod
    def _receive(recvfrom):
        try:
            return recvfrom(RECV_BYTES)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return None


__all__ = ["LockstepRunner", "LocalCounts"]
