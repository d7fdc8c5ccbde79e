"""imgsrvd.transfers: the size of each watched sendfile piece."""

import pytest

from imgsrvd.transfers import ProgressWatch

MiB = 1 << 20
BASE = 16384 * 120 // 4                      # a quarter of the window's minimum


@pytest.mark.parametrize("moved, seconds, expected", [
    (BASE, 0.001, 16 * MiB),                 # a fast client: the largest pieces
    (BASE, 60.0, BASE),                      # a slow one (8 KiB/s) keeps the base piece
    (100 * 1024, 1.0, 3_072_000),            # 100 KiB/s: what a quarter window takes
    (BASE, 0.0, 16 * MiB),                   # no measurable time: as fast as it gets
])
def test_next_piece_follows_the_rate_the_client_showed(moved, seconds, expected):
    watch = ProgressWatch(120.0, 16384, 43200.0, clock=lambda: 0.0)
    assert watch.piece_bytes == BASE
    assert watch.next_piece_bytes(moved, seconds) == expected
