"""The load generator: sender and receiver processes in the client namespace.

Senders (one or more processes) write each client's xid and MAC into one template DISCOVER at
fixed offsets and send it from port 68 to port 67, to 255.255.255.255 (what a PXE ROM does; the
socket is bound to the veth device, which is where a limited broadcast goes) or to the server's
address. Sending is paced against the clock: at any moment the sender has sent
rate x elapsed packets; it sleeps at least 0.5 ms between wakeups and sends what fell due
meanwhile back to back (above 2,000/s packets go in small batches, not spaced one by one).
Before each sendto it takes a CLOCK_REALTIME timestamp; rate 0 sends as fast as it can (the
burst test, calibration).

The receiver owns 0.0.0.0:68 with a large receive buffer (SO_RCVBUFFORCE) and takes the
kernel's arrival timestamp of each reply (SO_TIMESTAMPNS, CLOCK_REALTIME too), so the latency
is arrival - send, and does not include the receiver's own backlog. It keeps only valid offers
(packets.offer_xid) as (xid, arrival time) and hands them over when the bench asks.

Each worker is forked from the bench and enters the client namespace with setns before it opens
a socket. Commands and results go over a multiprocessing Pipe.
"""

from __future__ import annotations

import multiprocessing as mp
import select
import socket
import struct
import time
from array import array

from . import netns, packets

SO_BINDTODEVICE = 25
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
RECEIVER_BUFFER = 64 << 20
SERVER_PORT, CLIENT_PORT = 67, 68
MIN_SLEEP = 0.0005

_ctx = mp.get_context("fork")


# ---- sender ------------------------------------------------------------------------------------

def _sender_socket(ifname: str, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    # Bound to the unicast address, this socket gets none of the broadcast replies: only the
    # receiver's 0.0.0.0:68 does.
    sock.bind((source, CLIENT_PORT))
    return sock


def paced_send(sock: socket.socket, dest: tuple[str, int], first: int, count: int,
               rate: float, t_start: float) -> tuple[array, int]:
    """Send `count` DISCOVERs (xids first..first+count-1) at `rate`/s from `t_start`
    (CLOCK_REALTIME; rate 0: as fast as possible). Returns (send stamps, send errors)."""
    template, guid_at = packets.discover_template()
    buf = bytearray(template)
    put = struct.Struct("!I").pack_into
    send = sock.sendto
    now = time.time
    sleep = time.sleep
    stamps = array("d", bytes(8 * count))
    errors = 0
    wait = t_start - now()
    if wait > 0:
        sleep(wait)
    i = 0
    if not rate:
        for i in range(count):
            x = first + i
            put(buf, 4, x)
            put(buf, 30, x)
            put(buf, guid_at, x)
            stamps[i] = now()
            try:
                send(buf, dest)
            except OSError:
                errors += 1
        return stamps, errors
    interval = 1.0 / rate
    while i < count:
        t = now()
        due = int((t - t_start) * rate) + 1
        if due > count:
            due = count
        if due <= i:
            # Nothing due: sleep till the next packet, but at least MIN_SLEEP, so that at high
            # rates the sender wakes ~2,000 times a second and sends what fell due in a batch
            # instead of spinning on a core the server needs (each packet keeps its own stamp).
            sleep(max(t_start + i * interval - t, MIN_SLEEP))
            continue
        while i < due:
            x = first + i
            put(buf, 4, x)
            put(buf, 30, x)
            put(buf, guid_at, x)
            stamps[i] = now()
            try:
                send(buf, dest)
            except OSError:
                errors += 1
            i += 1
    return stamps, errors


def _sender_main(conn, ns: str, ifname: str, source: str) -> None:
    netns.enter(ns)
    sock = _sender_socket(ifname, source)
    conn.send(("ready",))
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            break
        _, dest, first, count, rate, t_start = cmd
        stamps, errors = paced_send(sock, dest, first, count, rate, t_start)
        conn.send(("sent", stamps.tobytes(), errors))
    sock.close()


# ---- receiver ----------------------------------------------------------------------------------

def _receiver_main(conn, ns: str) -> None:
    netns.enter(ns)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVER_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVER_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(("0.0.0.0", CLIENT_PORT))
    sock.setblocking(False)
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    conn.send(("ready", rcvbuf))
    xids, times = array("I"), array("d")
    invalid = 0
    sample: bytes | None = None
    recvmsg = sock.recvmsg
    anc_size = socket.CMSG_SPACE(16)
    offer_xid = packets.offer_xid
    unpack = struct.Struct("=qq").unpack_from
    poller = select.poll()
    sfd, cfd = sock.fileno(), conn.fileno()
    poller.register(sfd, select.POLLIN)
    poller.register(cfd, select.POLLIN)
    while True:
        for fd, _ev in poller.poll(500):
            if fd == sfd:
                while True:
                    try:
                        data, anc, _flags, _addr = recvmsg(2048, anc_size)
                    except (BlockingIOError, InterruptedError):
                        break
                    ts = None
                    for level, kind, raw in anc:
                        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                            sec, nsec = unpack(raw)
                            ts = sec + nsec * 1e-9
                    if ts is None:
                        ts = time.time()
                    xid = offer_xid(data)
                    if xid is None:
                        invalid += 1
                        continue
                    xids.append(xid)
                    times.append(ts)
                    sample = data
                continue
            cmd = conn.recv()
            if cmd[0] == "stop":
                sock.close()
                return
            if cmd[0] == "flush":
                conn.send(("data", xids.tobytes(), times.tobytes(), invalid, sample))
                xids, times = array("I"), array("d")
                invalid = 0


# ---- the bench's handle on the workers ---------------------------------------------------------

class LoadGen:
    """`senders` sender processes and one receiver, all in the client namespace."""

    def __init__(self, lab: netns.Lab, senders: int = 1, broadcast: bool = True):
        self.lab = lab
        self.dest = ("255.255.255.255" if broadcast else lab.server_addr, SERVER_PORT)
        self.broadcast = broadcast
        self.procs: list = []
        self.sender_conns: list = []
        self.receiver_conn = None
        self.receiver_rcvbuf = 0
        self.next_xid = 0x00100000
        rconn, child = _ctx.Pipe()
        proc = _ctx.Process(target=_receiver_main, args=(child, lab.client_ns), daemon=True,
                            name="proxydhcp-receiver")
        proc.start()
        self.procs.append(proc)
        self.receiver_conn = rconn
        self.receiver_pid = proc.pid
        self.sender_pids: list[int] = []
        self.set_senders(senders)
        msg = self._recv(rconn, 10)
        self.receiver_rcvbuf = msg[1]

    def set_senders(self, n: int) -> None:
        while len(self.sender_conns) > n:
            conn = self.sender_conns.pop()
            conn.send(("stop",))
            self.sender_pids.pop()
        while len(self.sender_conns) < n:
            conn, child = _ctx.Pipe()
            proc = _ctx.Process(target=_sender_main, daemon=True, name="proxydhcp-sender",
                                args=(child, self.lab.client_ns, self.lab.client_if,
                                      self.lab.client_addr))
            proc.start()
            self.procs.append(proc)
            self._recv(conn, 10)
            self.sender_conns.append(conn)
            self.sender_pids.append(proc.pid)

    @staticmethod
    def _recv(conn, timeout: float):
        if not conn.poll(timeout):
            raise RuntimeError("load generator worker did not answer")
        return conn.recv()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.is_alive()]

    def send(self, count: int, rate: float, lead: float = 0.05) -> tuple[int, array, int]:
        """Send `count` new clients' DISCOVERs at `rate`/s (0: flat out) split over the senders.
        Returns (first xid, send stamps indexed by xid - first, send errors)."""
        first = self.next_xid
        self.next_xid += count
        k = len(self.sender_conns)
        t_start = time.time() + lead
        shares = [count // k + (1 if j < count % k else 0) for j in range(k)]
        offset = 0
        for j, conn in enumerate(self.sender_conns):
            conn.send(("send", self.dest, first + offset, shares[j], rate / k, t_start))
            offset += shares[j]
        stamps = array("d")
        errors = 0
        timeout = 60 + (count / rate if rate else 0)
        for conn in self.sender_conns:
            _, raw, err = self._recv(conn, timeout)
            part = array("d")
            part.frombytes(raw)
            stamps.extend(part)
            errors += err
        return first, stamps, errors

    def flush(self) -> tuple[array, array, int, bytes | None]:
        """Offers received since the last flush: (xids, arrival times, invalid count, sample)."""
        self.receiver_conn.send(("flush",))
        _, xraw, traw, invalid, sample = self._recv(self.receiver_conn, 30)
        xids, times = array("I"), array("d")
        xids.frombytes(xraw)
        times.frombytes(traw)
        return xids, times, invalid, sample

    def close(self) -> None:
        for conn in self.sender_conns + [self.receiver_conn]:
            try:
                conn.send(("stop",))
            except (OSError, AttributeError):
                pass
        for proc in self.procs:
            proc.join(timeout=3)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        self.procs.clear()
        self.sender_conns.clear()
