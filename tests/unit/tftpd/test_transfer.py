"""tftpd.transfer: windows, rollover, Sorcerer's Apprentice, retries, uploads (no sockets)."""

import pytest

from tftpd import packet
from tftpd.options import Negotiated
from tftpd.status import TftpCounters
from tftpd.transfer import MemoryBlocks, ReadTransfer, WriteTransfer


def data_blocks(sent):
    return [(p[2] << 8 | p[3], p[4:]) for p in sent if p[:2] == b"\x00\x03"]


def make_read(content: bytes, blksize=4, window=1, oack=None, retries=2):
    sent = []
    transfer = ReadTransfer(MemoryBlocks(content), Negotiated(blksize, window), retries,
                            TftpCounters(), sent.append, oack)
    transfer.start()
    return transfer, sent


def test_lock_step_download_with_final_short_block():
    transfer, sent = make_read(b"abcdefghij")
    assert data_blocks(sent) == [(1, b"abcd")]
    for block in (1, 2):
        assert transfer.on_datagram(packet.encode_ack(block))
    assert data_blocks(sent) == [(1, b"abcd"), (2, b"efgh"), (3, b"ij")]
    assert transfer.on_datagram(packet.encode_ack(3)) and transfer.done
    assert transfer.counters.bytes_sent == 10


def test_exact_multiple_ends_with_an_empty_block():
    transfer, sent = make_read(b"abcd")
    transfer.on_datagram(packet.encode_ack(1))
    assert data_blocks(sent)[-1] == (2, b"")


def test_duplicate_ack_is_not_answered():
    transfer, sent = make_read(b"abcdefghij")
    transfer.on_datagram(packet.encode_ack(1))
    count = len(sent)
    assert not transfer.on_datagram(packet.encode_ack(1))
    assert len(sent) == count  # no Sorcerer's Apprentice


def test_window_and_partial_ack_restart():
    transfer, sent = make_read(bytes(range(40)), window=4)
    assert [b for b, _ in data_blocks(sent)] == [1, 2, 3, 4]
    sent.clear()
    transfer.on_datagram(packet.encode_ack(2))  # the client lost block 3
    assert [b for b, _ in data_blocks(sent)] == [3, 4, 5, 6]
    assert transfer.counters.blocks_resent == 2     # 3 and 4 went twice; 5 and 6 are new
    sent.clear()
    transfer.on_datagram(packet.encode_ack(6))      # the whole window arrived: nothing resent
    assert [b for b, _ in data_blocks(sent)] == [7, 8, 9, 10]
    assert transfer.counters.blocks_resent == 2


def test_oack_then_ack_zero_starts_the_data():
    transfer, sent = make_read(b"abcdefgh", oack=b"\x00\x06blksize\x004\x00")
    assert sent == [b"\x00\x06blksize\x004\x00"]
    assert not transfer.on_datagram(packet.encode_ack(5))
    assert transfer.on_datagram(packet.encode_ack(0))
    assert data_blocks(sent) == [(1, b"abcd")]


def test_block_numbers_roll_over_after_65535():
    content = bytes(70000)  # blksize 1: 70,001 blocks
    transfer, sent = make_read(content, blksize=1, window=8)
    acked = 0
    while not transfer.done:
        last = data_blocks(sent)[-1][0]
        sent.clear()
        transfer.on_datagram(packet.encode_ack(last))
        acked += 1
    assert transfer.acked == 70001
    assert transfer.counters.bytes_sent == 70000


def test_timeout_resends_then_gives_up():
    transfer, sent = make_read(b"abcdefghij", retries=2)
    transfer.on_timeout()
    transfer.on_timeout()
    assert [b for b, _ in data_blocks(sent)] == [1, 1, 1]
    transfer.on_timeout()
    assert transfer.failure is not None and transfer.failure.kind == "timeout"
    assert sent[-1][:2] == b"\x00\x05"


@pytest.mark.parametrize("window", [1, 4])
def test_silence_after_the_last_block_is_unconfirmed_not_a_timeout(window):
    """A lost final ACK: the client may have exited with the whole file."""
    transfer, sent = make_read(b"abcdefghij", window=window, retries=1)
    if window == 1:
        transfer.on_datagram(packet.encode_ack(1))
        transfer.on_datagram(packet.encode_ack(2))
    assert data_blocks(sent)[-1] == (3, b"ij")
    transfer.on_timeout()
    transfer.on_timeout()
    assert transfer.failure is not None and transfer.failure.kind == "unconfirmed"


def test_silence_before_the_last_block_went_out_is_a_timeout():
    transfer, sent = make_read(b"abcdefghij", retries=1)
    transfer.on_datagram(packet.encode_ack(1))
    transfer.on_timeout()
    transfer.on_timeout()
    assert transfer.failure.kind == "timeout"


def test_client_error_ends_quietly_and_garbage_gets_an_error():
    transfer, sent = make_read(b"abcdefghij")
    transfer.on_datagram(packet.encode_error(0, "cancelled"))
    assert transfer.failure.kind == "client_error" and sent[-1][:2] == b"\x00\x03"
    transfer, sent = make_read(b"abcdefghij")
    transfer.on_datagram(b"\x00\x03\x00\x01xx")
    assert transfer.failure.kind == "illegal_operation" and sent[-1][:4] == b"\x00\x05\x00\x04"


class ListSink:
    def __init__(self):
        self.data, self.committed, self.aborted = b"", False, False

    def write(self, data):
        self.data += data

    def commit(self):
        self.committed = True

    def abort(self):
        self.aborted = True


def make_write(blksize=4, window=1, max_bytes=0):
    sent, sink = [], ListSink()
    transfer = WriteTransfer(sink, Negotiated(blksize, window), 2, TftpCounters(), sent.append,
                             None, max_bytes)
    transfer.start()
    return transfer, sink, sent


def test_upload_lock_step_with_repeated_block_and_final_dally():
    transfer, sink, sent = make_write()
    assert sent == [packet.encode_ack(0)]
    transfer.on_datagram(packet.encode_data(1, b"abcd"))
    transfer.on_datagram(packet.encode_data(1, b"abcd"))  # our ACK was lost: re-ACK, no rewrite
    transfer.on_datagram(packet.encode_data(2, b"ef"))
    assert sink.data == b"abcdef" and sink.committed and transfer.done
    transfer.on_datagram(packet.encode_data(2, b"ef"))  # final ACK lost: say it again
    assert sent == [packet.encode_ack(n) for n in (0, 1, 1, 2, 2)]


def test_upload_window_acks_every_window_and_on_gaps():
    transfer, sink, sent = make_write(window=2)
    sent.clear()
    transfer.on_datagram(packet.encode_data(1, b"aaaa"))
    transfer.on_datagram(packet.encode_data(2, b"bbbb"))
    assert sent == [packet.encode_ack(2)]
    transfer.on_datagram(packet.encode_data(4, b"dddd"))  # block 3 lost
    assert sent[-1] == packet.encode_ack(2)


def test_upload_over_the_size_limit_is_refused_and_aborted():
    transfer, sink, sent = make_write(max_bytes=6)
    transfer.on_datagram(packet.encode_data(1, b"abcd"))
    transfer.on_datagram(packet.encode_data(2, b"efgh"))
    assert transfer.failure.kind == "disk_full" and sink.aborted
    assert sent[-1][:4] == b"\x00\x05\x00\x03"


def test_cancel_right_after_the_oack_is_a_size_probe():
    transfer, sent = make_read(b"abcdefgh", oack=b"\x00\x06tsize\x008\x00")
    transfer.on_datagram(packet.encode_error(8, "User aborted the transfer"))
    assert transfer.failure.kind == "size_probe"
