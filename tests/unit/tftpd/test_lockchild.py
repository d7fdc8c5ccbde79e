"""tftpd.lockchild: the child's report lines, the parent applying its end state, a real fork."""

from __future__ import annotations

import os
import select
import socket

from tftpd import lockchild, packet
from tftpd.lockstep import LockstepRunner
from tftpd.options import Negotiated
from tftpd.transfer import MemoryBlocks, ReadTransfer


def test_messages_are_split_on_newlines_across_reads():
    child = lockchild.Child(pid=0, fd=-1)
    assert child.messages(b'{"t":"c","counts":{"bytes_sent":5}}\n{"t":') == [
        {"t": "c", "counts": {"bytes_sent": 5}}]
    assert child.messages(b'"e"}\n') == [{"t": "e"}]
    assert child.messages(b"garbage\n")[0]["t"] == "x"


def _transfer(content: bytes, send=lambda d: None) -> ReadTransfer:
    return ReadTransfer(MemoryBlocks(content), Negotiated(8, 1), 3, None, send,  # type: ignore[arg-type]
                        None)


def test_apply_state_all_sent_leaves_the_final_ack_to_the_parent():
    transfer = _transfer(b"x" * 100)
    lockchild.apply_state(transfer, {"acked": 12, "next": 14, "sent_last_block": True,
                                     "retries_left": 3, "done": False,
                                     "waiting_oack_ack": False, "failure": None})
    assert not transfer.finished and transfer.source.content    # file still open here
    assert transfer.on_datagram(packet.encode_ack(13)) and transfer.done


def test_apply_state_failure_releases_the_parents_copy():
    transfer = _transfer(b"x" * 100)
    lockchild.apply_state(transfer, {"acked": 3, "next": 5, "sent_last_block": False,
                                     "retries_left": 0, "done": False,
                                     "waiting_oack_ack": False,
                                     "failure": ["timeout", "no answer"]})
    assert transfer.failure.kind == "timeout" and transfer.source.content == b""


def test_a_forked_child_sends_the_blocks_and_reports_its_end():
    content = os.urandom(8 * 40 + 3)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(5)
    key = client.getsockname()
    transfer = _transfer(content, lambda d: server.sendto(d, key))
    runner = LockstepRunner(transfer, server, key, report=lambda c: None,
                            stranger=lambda s: None, on_end=lambda: None)
    server.setblocking(True)
    child = lockchild.fork(runner, [])
    try:
        got = b""
        for block in range(1, 42):
            data, _ = client.recvfrom(100)
            assert packet.decode(data).block == block
            got += data[4:]
            if block < 41:
                client.sendto(packet.encode_ack(block), server.getsockname())
        assert got == content
        messages = []
        while not any(m["t"] == "e" for m in messages):
            assert select.select([child.fd], [], [], 5)[0], "no report from the child"
            data = os.read(child.fd, 65536)
            assert data, "the child ended without its report"
            messages += child.messages(data)
        end = messages[-1]
        assert end["sent_last_block"] and end["failure"] is None
        sent = sum(m["counts"].get("bytes_sent", 0) for m in messages if "counts" in m)
        assert sent == len(content)
        lockchild.apply_state(transfer, end)
        assert transfer.on_datagram(packet.encode_ack(41)) and transfer.done
    finally:
        _, status = os.waitpid(child.pid, 0)
        os.close(child.fd)
        server.close()
        client.close()
    assert os.waitstatus_to_exitcode(status) == 0
