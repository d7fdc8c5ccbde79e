"""tftpd.netascii: CR LF / CR NUL coding across block boundaries."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd.netascii import Decoder, encode


def test_encode():
    assert encode(b"a\nb\rc") == b"a\r\nb\r\0c"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 7))
def test_decode_inverts_encode_whatever_the_block_size(text, step):
    wire = encode(text)
    decoder = Decoder()
    out = b"".join(decoder.feed(wire[i:i + step]) for i in range(0, len(wire), step))
    assert out + decoder.finish() == text
