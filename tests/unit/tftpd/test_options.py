"""tftpd.options: RFC 2347/2348/2349/7440 negotiation."""

import pytest

from tftpd.options import Limits, negotiate

LIMITS = Limits(max_blksize=8192, max_windowsize=16, default_timeout_s=2.0)


def test_no_options_means_rfc1350_defaults_and_no_oack():
    agreed = negotiate({}, LIMITS, 1000, is_write=False)
    assert (agreed.blksize, agreed.windowsize, agreed.timeout_s) == (512, 1, 2.0)
    assert agreed.acknowledged == {}


def test_all_options_for_a_read():
    agreed = negotiate({"blksize": "1468", "windowsize": "8", "timeout": "3", "tsize": "0"},
                       LIMITS, 123456, is_write=False)
    assert (agreed.blksize, agreed.windowsize, agreed.timeout_s, agreed.tsize) == (1468, 8, 3.0,
                                                                                   123456)
    assert agreed.acknowledged == {"blksize": "1468", "windowsize": "8", "timeout": "3",
                                   "tsize": "123456"}


def test_values_above_our_limits_are_lowered():
    agreed = negotiate({"blksize": "65464", "windowsize": "64"}, LIMITS, 1, is_write=False)
    assert agreed.acknowledged == {"blksize": "8192", "windowsize": "16"}


@pytest.mark.parametrize("name,value", [("blksize", "7"), ("blksize", "abc"), ("blksize", "-1"),
                                        ("timeout", "0"), ("timeout", "256"),
                                        ("windowsize", "0"), ("multicast", ""),
                                        ("tsize", "x")])
def test_invalid_or_unknown_options_are_ignored(name, value):
    agreed = negotiate({name: value}, LIMITS, 10, is_write=False)
    assert name not in agreed.acknowledged
    assert name in agreed.ignored


def test_write_tsize_is_the_clients_size():
    agreed = negotiate({"tsize": "4096"}, LIMITS, None, is_write=True)
    assert agreed.tsize == 4096 and agreed.acknowledged == {"tsize": "4096"}


def test_netascii_read_does_not_promise_a_size():
    assert "tsize" not in negotiate({"tsize": "0"}, LIMITS, None, is_write=False).acknowledged
