"""img against imgsrvd, counted as the original counts (issue 13, item 4): four operations
(a make, a restore, and `img auto`'s work query and restore) are four Update Requests and four
results log entries; before, every Range request was an Update Request (16 for 4 operations)
and each store or restore left the server's entry, the engine's report, and an entry for the
range that happened to complete the image."""

from __future__ import annotations

from tests.integration.test_img_server_modes import (  # noqa: F401 - fixtures
    blank, check_restored, img, imgsrvd_factory, pytestmark, source_disk, wait_for)
from common.policy.model import Action, ActionKind, Rule


def test_four_operations_are_four_update_requests_and_four_entries(imgsrvd_factory,
                                                                  source_disk, tmp_path):
    server = imgsrvd_factory()
    img("make", "--disk", str(source_disk), "--server", server.address, "lab/base.img")
    size = (server.root / "lab" / "base.img").stat().st_size
    restored = img("restore", "--disk", str(blank(tmp_path / "one.disk")), "--server",
                   server.address, "lab/base.img")
    assert " requests in " in restored.stdout
    server.set_policy(Rule.from_text("all", "", Action(ActionKind.RESTORE, "lab/base.img")))
    auto = blank(tmp_path / "auto.disk")
    img("auto", "--disk", str(auto), "--server", server.address,
        "--fact", "mac=52:54:00:00:00:07")
    check_restored(auto, tmp_path)
    counters = server.counters()
    assert {k: counters[k] for k in ("update_requests", "images_sent", "images_received",
                                     "results_logged")} == {
        "update_requests": 4, "images_sent": 2, "images_received": 1, "results_logged": 3}
    assert wait_for(lambda: len(server.results()) == 4)
    made, restore, work, auto_restore = server.results()
    assert (made.operation, made.status, made.bytes) == ("upload", "success", size)
    assert (work.operation, work.status, work.image_path) == \
        ("download", "assigned", "lab/base.img")
    for entry in (restore, auto_restore):
        assert (entry.operation, entry.status, entry.image_path) == \
            ("download", "success", "lab/base.img")
        assert entry.bytes >= size             # the whole retrieve, header probe included
