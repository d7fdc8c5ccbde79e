"""What a work answer's capability allows (imgsrvd/access.py)."""

import pytest

from imgsrvd.access import work_grant


@pytest.mark.parametrize("answer, grant", [
    ({"work": "restore", "image": "lab/base.img", "addons": ["lab/a.add", "//srv2/lab/b.add"]},
     (("retrieve", "result"), ("lab/base.img", "lab/a.add", "lab/b.add"))),
    ({"work": "make", "image": "lab/new.img", "addons": []},
     (("store", "result"), ("lab/new.img",))),
    ({"work": "referral", "action": "restore", "server": "srv2", "path": "lab/base.img",
      "image": "//srv2/lab/base.img", "addons": []},
     (("retrieve", "result"), ("lab/base.img",))),
    ({"work": "multicast", "session": "room-101", "image": "lab/base.img", "addons": []},
     (("retrieve", "result"), ("lab/base.img",))),
    ({"work": "none", "image": ""}, None),
    ({"work": "maintenance", "image": ""}, None),
])
def test_work_grant(answer, grant):
    assert work_grant(answer) == grant
