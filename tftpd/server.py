"""The TFTP server loop: the request socket on port 69 and one socket per transfer.

Every socket is non-blocking and watched with the asyncio loop's add_reader (epoll on Linux),
so thousands of transfers need neither a thread each nor select()'s 1,024-descriptor limit.
tftpy's own server selects over every session socket on each turn and cannot be stopped from
outside its loop; this loop replaces it, and uses tftpy only as the request codec (packet.py).

Each transfer gets its own socket bound to the address the request was sent to (learned with
IP_PKTINFO, so a multi-homed server answers from the right address). It is deliberately not
connect()ed: a connected UDP socket turns the client's ICMP "port unreachable" into socket
errors, which libuv (uvloop) treats as fatal for the watcher, and which can hide a final ACK
already queued behind them. Instead every datagram's source is checked against the client's
TID, and a stranger gets ERROR 5 without disturbing the transfer (RFC 1350 section 4).
A transfer's one timer fires every `timeout_s`; it resends only when no progress was made since.

Lock-step downloads (RRQ without windowsize: every PXE ROM's first download) of more than
`LOCKSTEP_MIN_BLOCKS` blocks are the exception: up to `LOCKSTEP_WORKERS` of them at once send
their blocks from a worker with a blocking loop (lockstep.py): a thread per transfer when
the loop's C half (_lockstep.c) is built, since it runs without the GIL, else a forked child
per transfer (lockchild.py), which halves the work per block and, as processes, uses every
core. This loop still accepts them and counts them, and takes each
back when its last block is out, to wait for the final ACK here like any transfer. Beyond that
bound, and for small files (a worker costs more than it saves on a few blocks), they run here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from . import packet, paths
from .config import Settings
from . import lockchild, lockstep
from .lockstep import LockstepRunner
from .gateway import GatewayError, GatewayRequest, PolicyGateway, base_url, gateway_request
from .netascii import encode as netascii_encode
from .options import Limits, Negotiated, negotiate
from .status import TftpCounters
from .transfer import (FileBlocks, MemoryBlocks, ReadTransfer, Transfer, TransferFailed,
                       WriteTransfer)
from .upload import AtomicUpload

log = logging.getLogger("preboot.tftpd")

IP_PKTINFO = 8                       # linux/in.h; not exported by Python's socket module
RECV_BURST = 64                      # datagrams handled per wakeup before yielding to the loop
NETASCII_MAX_BYTES = 16 * 1024 * 1024
TRANSFER_RCVBUF = 1 << 20
LOCKSTEP_PROCESSES = 64              # lock-step downloads served by forked workers at once
LOCKSTEP_THREADS = 512               # ... by threads (the C loop: each costs a thread and at most
                                     # 64 KiB of read-ahead, _lockstep.c), bounded by MaxTransfers
# Where a lock-step worker runs: with the C loop (lockstep.native), which sends and receives
# with the GIL released, threads use every core without a fork per transfer (less CPU, no
# copy-on-write of the daemon's heap: bench/RESULTS.md); the pure-Python loop needs processes
# for that. PREBOOT_TFTP_LOCKSTEP=process|thread overrides.
LOCKSTEP_MODE = os.environ.get("PREBOOT_TFTP_LOCKSTEP",
                               "thread" if lockstep.native is not None else "process")
LOCKSTEP_WORKERS = LOCKSTEP_THREADS if LOCKSTEP_MODE == "thread" else LOCKSTEP_PROCESSES
LOCKSTEP_MIN_BLOCKS = 16             # smaller files stay on the loop
STOP_WAIT_S = 3.0                    # how long stop() waits for those threads to end


@dataclass
class ActiveTransfer:
    key: tuple[str, int]
    sock: socket.socket
    transfer: Transfer
    filename: str
    timer: asyncio.TimerHandle | None = None
    last_progress: float = 0.0
    recorded: bool = False
    runner: LockstepRunner | None = None    # set: a lock-step worker serves it (lockstep.py)
    child: lockchild.Child | None = None    # ... in a child process (lockchild.py)


class TftpServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stats = TftpCounters()
        self.active: dict[tuple[str, int], ActiveTransfer] = {}
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gateway = PolicyGateway()
        self._asking: dict[tuple[str, int], asyncio.Task] = {}   # clients whose file policyd makes
        self._threads = 0                                         # lock-step threads running
        self._stopping = False

    # ---- lifecycle (common.daemon.runner.Service) ---------------------------------------

    def bind(self) -> list[socket.socket]:
        if ":" in self.settings.ip_address:
            raise OSError("IPv6 IPAddress is not supported yet")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # No SO_REUSEADDR: on UDP it would let a second instance share the port.
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((self.settings.ip_address, self.settings.port))
        sock.setblocking(False)
        self._listener = sock
        return [sock]

    async def start(self) -> None:
        assert self._listener is not None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._listener.fileno(), self._on_listener_readable)
        address, port = self._listener.getsockname()
        log.info("serving %s on %s:%d (windowsize up to %d, blksize up to %d, writes %s)",
                 self.settings.root, address, port, self.settings.max_windowsize,
                 self.settings.max_blksize, "allowed" if self.settings.allow_write else "refused")

    async def apply(self, settings: Settings) -> list[str]:
        warnings = []
        if (settings.ip_address, settings.port) != (self.settings.ip_address, self.settings.port):
            warnings.append("IPAddress and Port changes need a restart; kept the old ones")
        self.settings = settings
        return warnings

    async def stop(self) -> None:
        self._stopping = True
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
        for active in list(self.active.values()):
            if active.runner is not None:
                active.runner.stop()        # its thread says goodbye to the client and ends
                continue
            active.transfer.fail("shutdown", "Server shutting down", packet.ERR_UNDEFINED)
            self._end(active)
        await self._stop_threads()
        for task in list(self._asking.values()):
            task.cancel()
        await asyncio.gather(*self._asking.values(), return_exceptions=True)
        await self._gateway.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _stop_threads(self) -> None:
        """Wait (at most STOP_WAIT_S) for lock-step threads woken by stop(); each reports its
        end through the loop (_thread_ended). One that does not is recorded and closed here."""
        deadline = time.monotonic() + STOP_WAIT_S
        while any(a.runner is not None for a in self.active.values()) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for active in list(self.active.values()):
            if active.runner is not None:
                log.warning("the lock-step worker for %s:%d did not end in time", *active.key)
                if active.child is not None:
                    self._child_gone(active)
                if active.transfer.failure is None and not active.transfer.done:
                    active.transfer.failure = TransferFailed("shutdown", "Server shutting down")
                self._threads -= 1
                self._end(active)

    def listen(self) -> list[dict[str, Any]]:
        if self._listener is None:
            return []
        address, port = self._listener.getsockname()
        return [{"proto": "udp", "address": address, "port": port}]

    def counters(self) -> dict[str, Any]:
        for active in list(self.active.values()):
            if active.runner is not None and active.child is None and active.runner.ended:
                self._thread_ended(active)       # its callback may still be queued
        return self.stats.snapshot(len(self.active))

    # ---- requests on the listening socket ------------------------------------------------

    def _on_listener_readable(self) -> None:
        assert self._listener is not None
        for _ in range(RECV_BURST):
            try:
                datagram, ancillary, _flags, client = self._listener.recvmsg(
                    packet.MAX_REQUEST_BYTES + 1, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("request socket: %s", exc)
                return
            try:
                self._on_request(datagram, client, _local_address(ancillary))
            except Exception:  # one bad request never stops the server
                self.stats.error("internal")
                log.exception("internal error handling a request from %s:%d", *client)

    def _on_request(self, datagram: bytes, client: tuple[str, int], local: str | None) -> None:
        opcode = packet.opcode_of(datagram)
        if opcode not in (packet.OP_RRQ, packet.OP_WRQ):
            self.stats.malformed_packets += 1
            log.debug("dropped a %d-byte datagram from %s:%d: not a request (opcode %s)",
                      len(datagram), *client, opcode)
            return
        try:
            request = packet.decode_request(datagram)
        except packet.MalformedPacket as exc:
            self.stats.malformed_packets += 1
            log.info("malformed request from %s:%d: %s", *client, exc)
            self._reply_once(client, local, packet.encode_error(packet.ERR_ILLEGAL,
                                                                f"Malformed request: {exc}"))
            return
        if client in self.active or client in self._asking:
            self.stats.duplicate_requests += 1  # a retransmitted request: already serving it
            return
        if len(self.active) >= self.settings.max_transfers:
            self.stats.refused_busy += 1
            log.warning("busy (%d transfers): dropped a request from %s:%d; it will retry",
                        len(self.active), *client)
            return
        if request.is_write:
            self.stats.requests_write += 1
            self._start_write(request, client, local)
        else:
            self.stats.requests_read += 1
            self._start_read(request, client, local)

    def _limits(self) -> Limits:
        return Limits(self.settings.max_blksize, self.settings.max_windowsize,
                      self.settings.timeout_s)

    def _refuse(self, client: tuple[str, int], local: str | None, request: packet.Request,
                refusal: paths.Refusal, kind: str) -> None:
        if refusal.escape:
            self.stats.refused_paths += 1
            log.warning("refused %s of %r from %s:%d: %s", "write" if request.is_write else "read",
                        request.filename, *client, refusal.message)
        else:
            log.info("%s: %r from %s:%d", refusal.message, request.filename, *client)
        self.stats.error(kind)
        self._reply_once(client, local, packet.encode_error(refusal.code, refusal.message))

    def _start_read(self, request: packet.Request, client: tuple[str, int],
                    local: str | None) -> None:
        asked = gateway_request(request.filename) if self.settings.policy_gateway else None
        if asked is not None:
            self._ask_gateway(request, client, local, asked)
            return
        root = self.settings.root
        resolved = paths.resolve_read(root, request.filename, self.settings.case_insensitive)
        opened = resolved if isinstance(resolved, paths.Refusal) else paths.open_for_read(
            root, resolved)
        if isinstance(opened, paths.Refusal):
            kind = "file_not_found" if opened.code == packet.ERR_NOT_FOUND else "access_violation"
            self._refuse(client, local, request, opened, kind)
            return
        size = os.fstat(opened).st_size
        if request.mode == "netascii":
            if size > NETASCII_MAX_BYTES:
                os.close(opened)
                self._refuse(client, local, request, paths.Refusal(
                    packet.ERR_UNDEFINED, "File too large for netascii mode; use octet", False),
                    "netascii_too_large")
                return
            with os.fdopen(opened, "rb") as handle:
                source: Any = MemoryBlocks(netascii_encode(handle.read()))
            known_size = None
        else:
            source = FileBlocks(opened, size)
            known_size = size
        opts = negotiate(request.options, self._limits(), known_size, is_write=False)
        self._launch(client, local, request, opts, lambda send, oack: ReadTransfer(
            source, opts, self.settings.retries, self.stats, send, oack),
            on_socket_error=source.close)

    def _ask_gateway(self, request: packet.Request, client: tuple[str, int], local: str | None,
                     asked: GatewayRequest) -> None:
        """A file policyd makes (gateway.py): fetched in a task, then sent as any file."""
        if self._gateway.full:
            self.stats.refused_busy += 1
            log.warning("busy (%d policy answers being fetched): dropped a request from %s:%d; "
                        "it will retry", self._gateway.in_flight, *client)
            return
        url = asked.url(base_url(self.settings.policy_gateway,
                                 local or self.settings.ip_address))
        assert self._loop is not None
        task = self._loop.create_task(self._serve_gateway(request, client, local, url))
        self._asking[client] = task
        task.add_done_callback(lambda _t: self._asking.pop(client, None))

    async def _serve_gateway(self, request: packet.Request, client: tuple[str, int],
                             local: str | None, url: str) -> None:
        try:
            content = await self._gateway.fetch(url)
        except GatewayError as exc:
            self.stats.gateway_failures += 1
            log.warning("%r for %s:%d: %s (%s)", request.filename, *client, exc, url)
            self._refuse(client, local, request, paths.Refusal(
                packet.ERR_NOT_FOUND, f"Preboot policy: {exc}", False), "gateway")
            return
        self.stats.gateway_answers += 1
        self._asking.pop(client, None)          # the transfer takes over from here
        if request.mode == "netascii":
            content = netascii_encode(content)
        source = MemoryBlocks(content)
        opts = negotiate(request.options, self._limits(), source.size, is_write=False)
        self._launch(client, local, request, opts, lambda send, oack: ReadTransfer(
            source, opts, self.settings.retries, self.stats, send, oack),
            on_socket_error=source.close)

    def _start_write(self, request: packet.Request, client: tuple[str, int],
                     local: str | None) -> None:
        settings = self.settings
        if not settings.allow_write:
            self._refuse(client, local, request, paths.Refusal(
                packet.ERR_ACCESS, "Access violation: writes are disabled", False), "write_refused")
            return
        target = paths.resolve_write(settings.root, settings.upload_dir, request.filename)
        if isinstance(target, paths.Refusal):
            self._refuse(client, local, request, target, "write_refused")
            return
        if os.path.lexists(target) and not settings.allow_overwrite:
            self._refuse(client, local, request, paths.Refusal(
                packet.ERR_EXISTS, "File already exists", False), "file_exists")
            return
        opts = negotiate(request.options, self._limits(), None, is_write=True)
        if settings.max_upload_bytes and opts.tsize and opts.tsize > settings.max_upload_bytes:
            self._refuse(client, local, request, paths.Refusal(
                packet.ERR_DISK_FULL, "Upload exceeds the allowed size", False), "disk_full")
            return
        try:
            sink = AtomicUpload(target, settings.allow_overwrite, request.mode == "netascii")
        except OSError as exc:
            self._refuse(client, local, request, paths.Refusal(
                packet.ERR_ACCESS, f"Access violation: {exc.strerror}", False), "write_refused")
            return
        self._launch(client, local, request, opts, lambda send, oack: WriteTransfer(
            sink, opts, settings.retries, self.stats, send, oack, settings.max_upload_bytes),
            on_socket_error=sink.abort)

    # ---- transfers ----------------------------------------------------------------------

    def _transfer_socket(self, client: tuple[str, int], local: str | None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TRANSFER_RCVBUF)
        sock.bind((local or self.settings.ip_address, 0))
        sock.setblocking(False)
        return sock

    def _reply_once(self, client: tuple[str, int], local: str | None, datagram: bytes) -> None:
        """An error for a refused request, from a fresh TID as a transfer's first reply would."""
        try:
            with self._transfer_socket(client, local) as sock:
                sock.sendto(datagram, client)
        except OSError as exc:
            log.debug("could not send an error to %s:%d: %s", *client, exc)

    def _launch(self, client: tuple[str, int], local: str | None, request: packet.Request,
                opts: Negotiated, build, on_socket_error) -> None:
        try:
            sock = self._transfer_socket(client, local)
        except OSError as exc:
            on_socket_error()
            self.stats.error("socket")
            log.error("cannot open a transfer socket for %s:%d: %s", *client, exc)
            return
        if opts.windowsize > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                            min(opts.windowsize * (opts.blksize + 32) * 2, 8 << 20))
        oack = packet.encode_oack(opts.acknowledged) if opts.acknowledged else None

        def send(datagram: bytes, _sendto=sock.sendto, _client=client) -> int:
            return _sendto(datagram, _client)

        transfer = build(send, oack)
        active = ActiveTransfer(client, sock, transfer, request.filename,
                                last_progress=time.monotonic())
        self.active[client] = active
        self.stats.transfers_started += 1
        log.debug("%s %r for %s:%d mode %s options asked %s granted %s ignored %s",
                  "WRQ" if request.is_write else "RRQ", request.filename, *client, request.mode,
                  request.options, opts.acknowledged, list(opts.ignored))
        assert self._loop is not None
        if isinstance(transfer, ReadTransfer) and transfer.window == 1 \
                and transfer.last_block > LOCKSTEP_MIN_BLOCKS and self._threads < LOCKSTEP_WORKERS:
            self._start_thread(active)
            return
        self._watch(active)

    def _watch(self, active: ActiveTransfer, started: bool = False) -> None:
        """Serve a transfer on the event loop: its socket watched, its timer set; `started`:
        a lock-step thread sent its blocks, the final ACK is all that is left."""
        assert self._loop is not None
        transfer = active.transfer
        self._loop.add_reader(active.sock.fileno(), self._on_transfer_readable, active)
        if not started:
            try:
                transfer.start()
            except OSError as exc:
                transfer.fail("io_error", f"send failed: {exc.strerror}")
        active.timer = self._loop.call_later(
            max(active.last_progress + transfer.opts.timeout_s - time.monotonic(), 0),
            self._on_timer, active)
        if transfer.finished:
            self._end(active)

    # ---- lock-step transfers in threads (lockstep.py) -------------------------------------

    def _start_thread(self, active: ActiveTransfer) -> None:
        loop = self._loop
        assert loop is not None

        def in_loop(callback, *args) -> None:      # from the thread to the loop thread
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:
                pass                                # the loop is closed: the daemon is gone

        active.runner = LockstepRunner(
            active.transfer, active.sock, active.key,
            report=lambda counts: counts and in_loop(self._add_counts, counts),
            stranger=lambda source: in_loop(self._stranger_counted, active, source),
            on_end=lambda: in_loop(self._thread_ended, active))
        self._threads += 1
        if LOCKSTEP_MODE == "process":
            try:
                active.sock.setblocking(True)
                active.child = lockchild.fork(active.runner, [self._listener.fileno()]
                                              if self._listener is not None else [])
                loop.add_reader(active.child.fd, self._on_child, active)
                return
            except OSError as exc:
                active.sock.setblocking(False)
                log.warning("cannot fork for a lock-step transfer (%s); a thread serves it", exc)
        try:
            active.runner.start()
        except RuntimeError as exc:                 # no thread to be had: serve it here instead
            self._threads -= 1
            active.runner = None
            log.warning("no thread for a lock-step transfer (%s); the event loop serves it", exc)
            self._watch(active)

    def _add_counts(self, counts: dict[str, int]) -> None:
        for name, value in counts.items():
            if name == "internal_errors":
                self.stats.errors["internal"] += value
            else:
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _stranger_counted(self, active: ActiveTransfer, source: tuple[str, int]) -> None:
        self.stats.error("unknown_tid")
        log.info("datagram from %s:%d on the transfer of %r to %s:%d: unknown transfer ID",
                 *source, active.filename, *active.key)

    def _on_child(self, active: ActiveTransfer) -> None:
        """A lock-step child reported (lockchild.py): counts, a stranger, or its end."""
        child = active.child
        assert child is not None and self._loop is not None
        try:
            data = os.read(child.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        for message in child.messages(data):
            kind = message.get("t")
            if kind == "c":
                self._add_counts(message["counts"])
            elif kind == "s":
                self._stranger_counted(active, tuple(message["source"]))
            elif kind == "x":
                self.stats.error("internal")
                log.error("%s", message.get("text"))
            elif kind == "e":
                lockchild.apply_state(active.transfer, message)
                active.runner.last_progress = message["last_progress"]
                self._add_counts(message["counts"])
                self._child_gone(active)
                self._thread_ended(active)
                return
        if not data:                                # the child died without its report
            self._child_gone(active)
            transfer = active.transfer
            if not transfer.finished:
                transfer.failure = TransferFailed(
                    "shutdown" if self._stopping else "internal", "lock-step child died")
                transfer.release()
            self._thread_ended(active)

    def _child_gone(self, active: ActiveTransfer) -> None:
        child = active.child
        active.child = None
        assert child is not None and self._loop is not None
        self._loop.remove_reader(child.fd)
        os.close(child.fd)
        self._reap(child.pid, 0)

    def _reap(self, pid: int, tries: int) -> None:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return                                  # already reaped
        if not done and tries < 200 and self._loop is not None:
            self._loop.call_later(0.01, self._reap, pid, tries + 1)

    def _thread_ended(self, active: ActiveTransfer) -> None:
        """A lock-step worker is done: the transfer ended, or its last block is out and the
        final ACK is awaited here."""
        runner = active.runner
        if runner is None or active.child is not None or self.active.get(active.key) is not active:
            return
        self._threads -= 1
        active.runner = None
        transfer = active.transfer
        self._add_counts(runner.counts.take())
        transfer.counters = self.stats
        if self._stopping and not transfer.finished:
            transfer.fail("shutdown", "Server shutting down", packet.ERR_UNDEFINED)
        if transfer.finished:
            self._end(active)
            return
        active.sock.setblocking(False)
        active.last_progress = runner.last_progress
        self._watch(active, started=True)

    # ---- transfers on the event loop ---------------------------------------------------

    def _on_transfer_readable(self, active: ActiveTransfer) -> None:
        # One datagram per wakeup: the client sends one ACK per window, so a second recv()
        # would almost always fail with EAGAIN, and the level-triggered poll calls us again
        # if more is queued.
        transfer = active.transfer
        try:
            datagram, source = active.sock.recvfrom(65536)
            if source != active.key:
                self._unknown_tid(active, source)
                return
            if transfer.on_datagram(datagram):
                active.last_progress = time.monotonic()
        except (BlockingIOError, InterruptedError):
            return
        except Exception:  # a bug in one transfer must not stop the others
            self.stats.error("internal")
            log.exception("internal error in the transfer of %r to %s:%d", active.filename,
                          *active.key)
            transfer.fail("internal", "Internal error", packet.ERR_UNDEFINED)
        if transfer.finished:
            self._finish(active)

    def _unknown_tid(self, active: ActiveTransfer, source: tuple[str, int]) -> None:
        self.stats.error("unknown_tid")
        log.info("datagram from %s:%d on the transfer of %r to %s:%d: unknown transfer ID",
                 *source, active.filename, *active.key)
        try:
            active.sock.sendto(packet.encode_error(packet.ERR_UNKNOWN_TID, "Unknown transfer ID"),
                               source)
        except OSError:
            pass

    def _on_timer(self, active: ActiveTransfer) -> None:
        transfer = active.transfer
        if transfer.finished:
            self._end(active)
            return
        timeout_s = transfer.opts.timeout_s
        idle_s = time.monotonic() - active.last_progress
        if idle_s < timeout_s:
            active.timer = self._loop.call_later(timeout_s - idle_s, self._on_timer, active)
            return
        try:
            transfer.on_timeout()
        except Exception:
            log.exception("internal error resending to %s:%d", *active.key)
            transfer.fail("internal", "Internal error", packet.ERR_UNDEFINED)
        active.last_progress = time.monotonic()
        if transfer.finished:
            self._finish(active)
        else:
            active.timer = self._loop.call_later(timeout_s, self._on_timer, active)

    def _finish(self, active: ActiveTransfer) -> None:
        """Account for a finished transfer; a completed upload lingers to re-ACK (dally)."""
        transfer = active.transfer
        if transfer.failure is None and isinstance(transfer, WriteTransfer):
            if active.timer is not None:
                active.timer.cancel()
            # Keep answering a repeated last block for one timeout, then close (RFC 1350 sec. 6).
            self._record(active)
            active.timer = self._loop.call_later(transfer.opts.timeout_s, self._end, active)
            return
        self._record(active)
        self._end(active)

    def _record(self, active: ActiveTransfer) -> None:
        transfer = active.transfer
        if active.recorded:
            return
        active.recorded = True
        if transfer.failure is not None and transfer.failure.kind == "size_probe":
            self.stats.size_probes += 1
            log.debug("size probe of %r by %s:%d", active.filename, *active.key)
        elif transfer.failure is not None and transfer.failure.kind == "unconfirmed":
            self.stats.transfers_unconfirmed += 1
            log.info("sent %r to %s:%d, but its final ACK never came: the client may have it",
                     active.filename, *active.key)
        elif transfer.failure is None:
            self.stats.transfers_completed += 1
            log.info("sent %r to %s:%d" if isinstance(transfer, ReadTransfer)
                     else "received %r from %s:%d", active.filename, *active.key)
        else:
            self.stats.transfers_failed += 1
            self.stats.error(transfer.failure.kind)
            log.info("transfer of %r with %s:%d failed: %s", active.filename, *active.key,
                     transfer.failure)

    def _end(self, active: ActiveTransfer) -> None:
        if self.active.get(active.key) is not active:
            return
        self._record(active)
        del self.active[active.key]
        if active.timer is not None:
            active.timer.cancel()
        if active.runner is not None:
            active.runner = None                    # its thread was given up (stop)
        elif self._loop is not None:
            self._loop.remove_reader(active.sock.fileno())
        active.sock.close()


def _local_address(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    """The destination address of a request, from its IP_PKTINFO (struct in_pktinfo)."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntoa(data[8:12])
    return None
