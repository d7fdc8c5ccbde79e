"""Images Sent counts a ranged download once, when its ranges cover the whole file."""

from imgsrvd.downloads import DownloadTracker


def test_a_trailer_read_alone_is_not_an_image_sent():
    tracker = DownloadTracker()
    assert not tracker.served("10.0.0.5", "a.img", 1000, 968, 1000)     # trailer
    assert not tracker.served("10.0.0.5", "a.img", 1000, 0, 100)        # header
    assert not tracker.served("10.0.0.5", "a.img", 1000, 500, 968)      # some chunks
    assert tracker.served("10.0.0.5", "a.img", 1000, 100, 500)          # the rest: complete
    assert len(tracker) == 0


def test_overlapping_and_repeated_ranges_and_other_clients():
    tracker = DownloadTracker()
    assert not tracker.served("a", "x.img", 100, 0, 60)
    assert not tracker.served("b", "x.img", 100, 40, 100)    # another client: its own coverage
    assert not tracker.served("a", "x.img", 100, 10, 50)
    assert tracker.served("a", "x.img", 100, 50, 100)
    assert tracker.served("c", "x.img", 100, 0, 100)         # a whole read at once


def test_the_table_is_bounded_and_entries_expire():
    now = [0.0]
    tracker = DownloadTracker(max_tracked=3, expire_s=10, clock=lambda: now[0])
    for client in "abcde":
        tracker.served(client, "x.img", 100, 0, 10)
    assert len(tracker) == 3
    now[0] = 11
    tracker.served("z", "y.img", 100, 0, 10)
    assert len(tracker) == 1
