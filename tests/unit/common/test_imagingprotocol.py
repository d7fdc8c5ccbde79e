"""common.imaging.protocol: image paths (traversal, referrals), request bodies, work answers."""

import pytest

from common.policy.model import Action, ActionKind, WorkAssignment
from common.imaging.protocol import (BadPath, BadRequest, LocalPath, RemotePath, clean_relative,
                                     parse_image_path, parse_result, parse_work_request,
                                     path_from_url, upload_allowed, work_answer, work_fileset)


@pytest.mark.parametrize("text, expected", [
    ("a.img", "a.img"), ("lab/base.img", "lab/base.img"), ("lab//./base.img", "lab/base.img"),
    ("lab/base.img/", "lab/base.img"), ("ü/ñ.img", "ü/ñ.img"),
])
def test_clean_relative(text, expected):
    assert clean_relative(text) == expected


@pytest.mark.parametrize("text", [
    "", "/", "/etc/passwd", "../x", "a/../../x", "a/..", "..", "a\\b", "a\x00b", "a\nb",
    "a/\x7f", ".hidden", "a/.x.img.part-0123456789abcdef", "./.", "x" * 2000, "a/" + "y" * 300,
])
def test_clean_relative_refuses(text):
    with pytest.raises(BadPath):
        clean_relative(text)


def test_referral_paths():
    assert parse_image_path("//other.example/img/x.img") == RemotePath("other.example",
                                                                        "img/x.img")
    assert parse_image_path("//other:998/x.img") == RemotePath("other:998", "x.img")
    assert parse_image_path("//[::1]:998/x.img") == RemotePath("[::1]:998", "x.img")
    assert parse_image_path("//ME/x.img", ("me",)) == LocalPath("x.img")
    assert str(RemotePath("s", "a/b")) == "//s/a/b"
    for bad in ("//", "///x", "//srv", "//srv/", "//srv/../x", "//bad name/x", "//a;b/x"):
        with pytest.raises(BadPath):
            parse_image_path(bad)


@pytest.mark.parametrize("raw, expected", [
    ("/v1/images/lab/a.img", LocalPath("lab/a.img")),
    ("/v1/images/lab%2Fa.img?x=1", LocalPath("lab/a.img")),
    ("/v1/images/%C3%BC.img", LocalPath("ü.img")),
    ("/v1/images//srv/a.img", RemotePath("srv", "a.img")),
    ("/v1/images/%2F%2Fsrv%2Fa.img", RemotePath("srv", "a.img")),
])
def test_path_from_url(raw, expected):
    assert path_from_url(raw) == expected


@pytest.mark.parametrize("raw", [
    "/v1/images/%2E%2E/x", "/v1/images/a/%2e%2e/%2e%2e/x", "/v1/images/%2Fetc%2Fpasswd",
    "/v1/images/a%00", "/v1/images/%FF.img", "/v2/x", "/v1/images/",
])
def test_path_from_url_refuses(raw):
    with pytest.raises(BadPath):
        path_from_url(raw)


def test_upload_allowed():
    assert upload_allowed("x/y.img", ())
    assert upload_allowed("lab/y.img", ("lab",))
    assert upload_allowed("lab/deep/y.img", ("lab",))
    assert not upload_allowed("labx/y.img", ("lab",))
    assert not upload_allowed("y.img", ("lab",))
    assert upload_allowed("y.img", ("",))


def test_work_request():
    request = parse_work_request({"mac": "52:54:00:12:34:56", "ram_mb": 8192, "disk_mb": "100",
                                  "manufacturer": "Dell Inc.", "mode": "manual"})
    assert request.mode == "manual"
    assert (request.facts.mac, request.facts.ram_mb, request.facts.disk_mb) == \
        ("525400123456", 8192, 100)
    assert parse_work_request({"mac": "525400123456"}).mode == "auto"
    for bad in ([], {"ram_mb": 1}, {"mac": "x"}, {"mac": "525400123456", "mode": "x"},
                {"mac": "525400123456", "colour": "red"}, {"mac": "525400123456", "ram_mb": 1.5},
                {"mac": "525400123456", "ram_mb": True}, {"mac": "525400123456", "ram_mb": "a"}):
        with pytest.raises(BadRequest):
            parse_work_request(bad)


def test_result():
    report = parse_result({"mac": "52-54-00-12-34-56", "operation": "download",
                           "status": "success", "image_path": "a.img"})
    assert (report.workstation, report.mac, report.image_type) == \
        ("525400123456", "525400123456", "base")
    for bad in ({}, {"workstation": "w", "operation": "x", "status": "success"},
                {"workstation": "w", "operation": "upload", "status": "ok"},
                {"workstation": "w", "operation": "upload", "status": "success", "x": 1},
                {"workstation": 1, "operation": "upload", "status": "success"},
                {"workstation": "w", "operation": "upload", "status": "success",
                 "image_type": "x"}):
        with pytest.raises(BadRequest):
            parse_result(bad)


def _assignment(image: str, kind=ActionKind.RESTORE) -> WorkAssignment:
    return WorkAssignment(Action(kind, image), "rule 'r'", "because", "r")


def test_work_answer_local_and_referral():
    answer, remote = work_answer(_assignment("a.img"), "auto")
    assert remote is None
    assert answer == {"work": "restore", "image": "a.img", "addons": [], "shrink": False,
                      "fileset": 1, "session": "", "reason": "because", "rule": "r"}
    subset = WorkAssignment(Action(ActionKind.RESTORE, "a.img", fileset=3), "rule 'r'",
                            "because", "r")
    assert work_answer(subset, "auto")[0]["fileset"] == 3
    shrinking = WorkAssignment(Action(ActionKind.RESTORE, "a.img", shrink=True), "rule 'r'",
                               "because", "r")
    assert work_answer(shrinking, "auto")[0]["shrink"] is True
    answer, remote = work_answer(_assignment("//other/b.img", ActionKind.MAKE), "auto")
    assert remote == RemotePath("other", "b.img")
    assert (answer["work"], answer["action"], answer["server"], answer["path"]) == \
        ("referral", "make", "other", "b.img")
    answer, remote = work_answer(_assignment("//me/b.img"), "manual", ("me",))
    assert (answer["work"], answer["image"], remote) == ("restore", "b.img", None)
    with pytest.raises(BadPath, match="manual imaging mode"):
        work_answer(_assignment("//other/b.img"), "manual")
    answer, remote = work_answer(WorkAssignment(Action(), "policy", "none"), "manual")
    assert (answer["work"], remote) == ("none", None)


@pytest.mark.parametrize("message, expected", [
    ("plain reason", "plain reason"),
    ("two\nlines\r\n", "two?lines??"),
    ("caf\u00e9 \u2603", "caf? ?"),
    ("x" * 600, "x" * 512),
])
def test_error_header_value_is_one_printable_ascii_line(message, expected):
    from common.imaging.protocol import error_header_value
    assert error_header_value(message) == expected


@pytest.mark.parametrize("answer, expected", [
    ({}, 1), ({"fileset": 1}, 1), ({"fileset": 10}, 10), ({"fileset": 4}, 4),
])
def test_work_fileset_reads_the_answer(answer, expected):
    assert work_fileset(answer) == expected


@pytest.mark.parametrize("value", [0, 11, -1, True, "2", 2.0, None, [2], 1 << 70])
def test_work_fileset_refuses_anything_but_1_to_10(value):
    with pytest.raises(ValueError, match="fileset: .* is not a file set number 1 to 10"):
        work_fileset({"fileset": value})
