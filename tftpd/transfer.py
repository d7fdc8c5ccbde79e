"""One TFTP transfer as a state machine: datagrams and timeouts in, datagrams out.

No sockets and no clock: the server calls `on_datagram` for every packet from the client's
transfer ID and `on_timeout` when `timeout_s` passed without progress; packets leave through the
`send` callable it injects. That keeps the protocol logic unit-testable.

Sending (RRQ), RFC 1350 section 2 and RFC 7440 section 4: up to `windowsize` DATA blocks are in
flight; an ACK for block n acknowledges everything up to n. Block numbers are 16 bits on the wire
and roll over from 65535 to 0 (what iPXE, tftp-hpa and curl expect for files above 32 MiB at
blksize 512), so an ACK is mapped to the one absolute block inside the current window that has
that wire number. A duplicate ACK is ignored rather than answered, which avoids the Sorcerer's
Apprentice syndrome (RFC 1123 section 4.2.3.1); lost blocks are recovered by our timeout or by a
partial ACK, after which the window restarts from the block after it (RFC 7440 section 4).

Receiving (WRQ): the mirror image. An ACK goes out after every `windowsize` in-order blocks and
after the last (short) block; an out-of-order or repeated block is answered with an ACK of the
last in-order block, which tells the sender where to restart.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Protocol

from . import packet
from .options import Negotiated
from .status import TftpCounters

Send = Callable[[bytes], object]

# send() errors that mean "this datagram did not go out", not "this transfer is broken".
LOSS_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EPERM, errno.ECONNREFUSED,
                         errno.EHOSTUNREACH, errno.ENETUNREACH})


class BlockSource(Protocol):
    size: int

    def block(self, index: int, blksize: int) -> bytes: ...
    def close(self) -> None: ...


class FileBlocks:
    """Octet mode: blocks sliced from a read-ahead buffer that is refilled with pread, so any
    block can be read again for a retransmission and a lock-step transfer costs one read
    system call per READ_AHEAD bytes instead of one per block."""

    READ_AHEAD = 256 * 1024

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self._start = 0
        self._buffer = b""

    def block(self, index: int, blksize: int) -> bytes:
        offset = (index - 1) * blksize
        start = offset - self._start
        if start < 0 or start + blksize > len(self._buffer) and \
                self._start + len(self._buffer) < self.size:
            chunk = max(self.READ_AHEAD // blksize, 1) * blksize
            self._buffer = os.pread(self.fd, chunk, offset)
            self._start = offset
            start = 0
        return self._buffer[start:start + blksize]

    def close(self) -> None:
        os.close(self.fd)
        self._buffer = b""


class MemoryBlocks:
    """netascii mode: the converted file is held in memory (text files only; bounded by caller)."""

    def __init__(self, content: bytes):
        self.content = content
        self.size = len(content)

    def block(self, index: int, blksize: int) -> bytes:
        start = (index - 1) * blksize
        return self.content[start:start + blksize]

    def close(self) -> None:
        self.content = b""


class TransferFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Transfer:
    """What the server needs of either direction."""

    def __init__(self, opts: Negotiated, retries: int, counters: TftpCounters, send: Send,
                 oack: bytes | None):
        self.opts = opts
        self.max_retries = retries
        self.retries_left = retries
        self.counters = counters
        self.send = send
        self.oack = oack
        self.done = False
        self.failure: TransferFailed | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.failure is not None

    def fail(self, kind: str, message: str, code: int | None = None) -> None:
        """End the transfer; `code` set means the client is told with an ERROR packet."""
        if self.finished:
            return
        self.failure = TransferFailed(kind, message)
        try:
            if code is not None:
                self.send(packet.encode_error(code, message))
        except OSError:
            pass  # best effort: the client may be gone; the files are released regardless
        finally:
            self.release()

    def release(self) -> None:
        """Free files; called once when the transfer ends either way."""

    def _other_packet(self, datagram: bytes) -> None:
        """Anything that is not the expected ACK/DATA: an ERROR ends quietly, the rest loudly."""
        opcode = packet.opcode_of(datagram)
        if opcode == packet.OP_ERROR:
            try:
                error = packet.decode_error(datagram)
                message = f"client sent error {error.code}: {error.message}"
            except packet.MalformedPacket:
                message = "client sent a malformed error"
            self.fail(self._client_error_kind(), message)
            return
        if opcode not in range(1, 7):
            self.counters.malformed_packets += 1
        self.fail("illegal_operation", "Illegal TFTP operation", packet.ERR_ILLEGAL)

    def _client_error_kind(self) -> str:
        return "client_error"

    def on_timeout(self) -> None:
        if self.finished:
            return
        self.retries_left -= 1
        if self.retries_left < 0:
            self.fail(self._timeout_kind(), "Timeout: no answer from the client",
                      packet.ERR_UNDEFINED)
            return
        self.resend()

    def _timeout_kind(self) -> str:
        return "timeout"

    def resend(self) -> None:
        raise NotImplementedError


class ReadTransfer(Transfer):
    """Serve a file (RRQ)."""

    def __init__(self, source: BlockSource, opts: Negotiated, retries: int,
                 counters: TftpCounters, send: Send, oack: bytes | None):
        super().__init__(opts, retries, counters, send, oack)
        self.source = source
        self.blksize = opts.blksize
        self.window = opts.windowsize
        self.last_block = source.size // opts.blksize + 1  # a short (maybe empty) block ends it
        self.acked = 0
        self.next = 1
        self.sent_last_block = False
        self.waiting_oack_ack = oack is not None

    def start(self) -> None:
        if self.oack is not None:
            self.send(self.oack)
        else:
            self._send_window()

    def _client_error_kind(self) -> str:
        # UEFI firmware asks for tsize, reads the OACK and cancels (error 8) before it
        # downloads for real: a size probe, not a failed transfer.
        return "size_probe" if self.waiting_oack_ack else "client_error"

    def _timeout_kind(self) -> str:
        # Every block went out and only the final ACK is missing. A client that got the last
        # block may exit without waiting for a repeat (tftp-hpa and atftp do), so a lost final
        # ACK looks exactly like this: the file may well have arrived (RFC 1350 section 6).
        return "unconfirmed" if self.sent_last_block else "timeout"

    def on_datagram(self, datagram: bytes) -> bool:
        """Handle one packet; True when it moved the transfer forward."""
        if len(datagram) >= 4 and datagram[0] == 0 and datagram[1] == packet.OP_ACK:
            return self._on_ack((datagram[2] << 8) | datagram[3])
        self._other_packet(datagram)
        return False

    def _on_ack(self, wire_block: int) -> bool:
        if self.finished:
            return False
        if self.waiting_oack_ack:
            if wire_block != 0:
                return False
            self.waiting_oack_ack = False
            self.retries_left = self.max_retries
            self._send_window()
            return True
        delta = (wire_block - self.acked) & 0xFFFF
        acked = self.acked + delta
        if delta == 0 or acked >= self.next:
            return False  # duplicate or stale ACK: never answer it (Sorcerer's Apprentice)
        self.acked = acked
        self.retries_left = self.max_retries
        if acked == self.last_block:
            self.done = True
            self.release()
            return True
        if acked < self.next - 1:
            # The client lost a block inside the window: restart after it. The blocks already
            # sent that this window sends again are resent blocks, as after a timeout.
            end = min(acked + self.window, self.last_block)
            self.counters.blocks_resent += min(self.next - 1, end) - acked
            self.next = acked + 1
        self._send_window()
        return True

    def _send_window(self) -> None:
        end = min(self.acked + self.window, self.last_block)
        block, blksize, source, send = self.next, self.blksize, self.source, self.send
        sent_bytes = 0
        try:
            while block <= end:
                payload = source.block(block, blksize)
                send(packet.data_header(block) + payload)
                sent_bytes += len(payload)
                block += 1
        except OSError as exc:
            if exc.errno not in LOSS_ERRNOS:
                self.next = block
                self.sent_last_block |= block > self.last_block
                self.counters.bytes_sent += sent_bytes
                self.fail("io_error", f"Read or send error: {exc.strerror}",
                          packet.ERR_UNDEFINED)
                return
            # A full socket buffer, a local firewall drop or a pending ICMP error: the block
            # is lost like any other, and the next ACK or the timeout sends it again.
        self.next = block
        self.sent_last_block |= block > self.last_block
        self.counters.bytes_sent += sent_bytes

    def resend(self) -> None:
        if self.waiting_oack_ack:
            self.send(self.oack)  # type: ignore[arg-type]
            return
        self.counters.blocks_resent += min(self.next - 1 - self.acked, self.window)
        self.next = self.acked + 1
        self._send_window()

    def release(self) -> None:
        self.source.close()


class UploadSink(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class WriteTransfer(Transfer):
    """Receive a file (WRQ) into an UploadSink, which makes it visible only when complete."""

    def __init__(self, sink: UploadSink, opts: Negotiated, retries: int,
                 counters: TftpCounters, send: Send, oack: bytes | None, max_bytes: int):
        super().__init__(opts, retries, counters, send, oack)
        self.sink = sink
        self.blksize = opts.blksize
        self.window = opts.windowsize
        self.max_bytes = max_bytes
        self.received = 0        # absolute number of the last in-order block
        self.in_window = 0
        self.total = 0
        self._last_reply = oack if oack is not None else packet.encode_ack(0)
        self._committed = False

    def start(self) -> None:
        self.send(self._last_reply)

    def on_datagram(self, datagram: bytes) -> bool:
        if len(datagram) >= 4 and datagram[0] == 0 and datagram[1] == packet.OP_DATA:
            return self._on_data((datagram[2] << 8) | datagram[3], datagram[4:])
        self._other_packet(datagram)
        return False

    def _ack(self) -> None:
        self._last_reply = packet.encode_ack(self.received)
        self.send(self._last_reply)
        self.in_window = 0

    def _on_data(self, wire_block: int, payload: bytes) -> bool:
        if self.done:
            if wire_block == self.received & 0xFFFF:
                self.send(self._last_reply)  # our final ACK was lost: say it again (dally)
            return False
        if self.finished:
            return False
        if wire_block != (self.received + 1) & 0xFFFF:
            self._ack()  # out of order or repeated: tell the sender where we are
            return False
        if len(payload) > self.blksize:
            self.fail("illegal_operation", "DATA larger than the block size",
                      packet.ERR_ILLEGAL)
            return False
        self.total += len(payload)
        if self.max_bytes and self.total > self.max_bytes:
            self.fail("disk_full", "Upload exceeds the allowed size", packet.ERR_DISK_FULL)
            return False
        try:
            self.sink.write(payload)
        except OSError as exc:
            self.fail("disk_full" if exc.errno == 28 else "io_error",
                      "Disk full or allocation exceeded" if exc.errno == 28
                      else f"Write error: {exc.strerror}", packet.ERR_DISK_FULL)
            return False
        self.received += 1
        self.in_window += 1
        self.counters.bytes_received += len(payload)
        self.retries_left = self.max_retries
        if len(payload) < self.blksize:
            return self._finish()
        if self.in_window >= self.window:
            self._ack()
        return True

    def _finish(self) -> bool:
        try:
            self.sink.commit()
        except FileExistsError:
            self.fail("file_exists", "File already exists", packet.ERR_EXISTS)
            return False
        except OSError as exc:
            self.fail("disk_full" if exc.errno == 28 else "io_error",
                      f"Cannot store the file: {exc.strerror}", packet.ERR_DISK_FULL)
            return False
        self._committed = True
        self._ack()
        self.done = True
        return True

    def resend(self) -> None:
        self.send(self._last_reply)

    def release(self) -> None:
        if not self._committed:
            self.sink.abort()
