"""RFC 1350 section 4: a datagram from a stranger on a transfer's port gets ERROR 5
(unknown transfer ID) and does not disturb the transfer."""

import os
import socket

from tftpd import packet


def test_stranger_gets_error_5_and_the_transfer_goes_on(tftpd, tftp_root):
    content = os.urandom(3 * 512 + 10)
    (tftp_root / "f.bin").write_bytes(content)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    stranger.settimeout(5)
    try:
        client.sendto(packet.encode_request(packet.OP_RRQ, "f.bin"), ("127.0.0.1", tftpd.port))
        first, tid = client.recvfrom(1024)
        assert packet.decode(first) == packet.Data(1, content[:512])
        stranger.sendto(packet.encode_ack(1), tid)
        error, source = stranger.recvfrom(1024)
        assert source == tid
        assert packet.decode(error) == packet.Error(5, "Unknown transfer ID")
        received = first[4:]
        for block in (1, 2, 3):
            client.sendto(packet.encode_ack(block), tid)
            data, _ = client.recvfrom(1024)
            assert packet.decode(data).block == block + 1
            received += data[4:]
        client.sendto(packet.encode_ack(4), tid)
    finally:
        client.close()
        stranger.close()
    assert received == content
    counters = tftpd.counters()
    assert counters["errors"].get("unknown_tid") == 1
