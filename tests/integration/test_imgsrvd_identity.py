"""imgsrvd hands out identities (docs/identity.md): the real daemon, a SQLite directory with an
identity policy and a pool of two addresses, and real HTTP (curl, from test_imgsrvd_http)."""

from __future__ import annotations

from common.identity import MachineIdentity, identity_to_wire
from common.policy.identitypolicy import AddressPool, IdentityPolicy, NameSource
from common.policy.model import Action, ActionKind, ImagingPolicy, Rule

from tests.integration.test_imgsrvd_http import NEVER, imgsrvd, imgsrvd_factory, wait_for, workdir  # noqa: F401

POOL = AddressPool(("10.3.0.10-10.3.0.11",), 24, "10.3.0.1", ("10.3.0.2",))
LAB = IdentityPolicy("lab", NameSource.SERIAL, "lab-", dns_suffix="lab.example", pool=POOL)


def machine(number: int, **more) -> dict:
    return {"mac": f"52:54:00:00:01:{number:02x}", "serial": f"SN{number}", "mode": "auto",
            **more}


def test_work_answers_carry_identities_and_a_dry_pool_is_refused(imgsrvd):
    with imgsrvd.directory() as directory:
        directory.replace_policy(ImagingPolicy((Rule.from_text(
            "lab", "", Action(ActionKind.RESTORE, "lab/base.img"), identity="lab"),),
            NEVER, (LAB,)))
    code, answer = imgsrvd.post("/v1/work", machine(1))
    assert code == 200, answer
    assert answer["identity_source"] == "policy"
    assert answer["identity"] == {"name": "lab-SN1", "dns_suffix": "lab.example",
                                  "workgroup": "", "ip": {
                                      "address": "10.3.0.10", "prefix_len": 24,
                                      "gateway": "10.3.0.1", "dns_servers": ["10.3.0.2"]}}
    # the same machine again (a reimage without image-safe data): its own address back
    assert imgsrvd.post("/v1/work", machine(1))[1]["identity"] == answer["identity"]
    # a machine whose disk holds its identity gets that one
    own = MachineIdentity("keeps-its-name")
    code, answer = imgsrvd.post("/v1/work", machine(2, identity=identity_to_wire(own)))
    assert (answer["identity_source"], answer["identity"]) == ("disk", identity_to_wire(own))
    assert imgsrvd.post("/v1/work", machine(3))[1]["identity"]["ip"]["address"] == "10.3.0.11"
    code, answer = imgsrvd.post("/v1/work", machine(4))
    assert code == 200 and answer["work"] == "none" and "identity" not in answer
    assert "no free address" in answer["reason"]
    code, answer = imgsrvd.post("/v1/work", machine(5, identity={"name": "bad name"}))
    assert code == 400 and answer["error"].startswith("identity.name:")
    counters = imgsrvd.counters()
    assert (counters["identities_assigned"], counters["identities_from_disk"],
            counters["pools_exhausted"]) == (2, 1, 1)
    code, text = imgsrvd.curl(path="/metrics")
    assert "identities_assigned" in text and "pools_exhausted" in text
    with imgsrvd.directory() as directory:
        log = [(a.value, a.mac) for a in directory.assignments("lab")]
    assert log == [("10.3.0.10", "525400000101"), ("10.3.0.11", "525400000103")]
    assert wait_for(lambda: "pool 'lab' hands out address 10.3.0.11" in imgsrvd.log())


def test_no_identity_policy_no_identity_fields(imgsrvd):
    with imgsrvd.directory() as directory:
        directory.replace_policy(ImagingPolicy((Rule.from_text(
            "all", "", Action(ActionKind.RESTORE, "lab/base.img")),), NEVER))
    code, answer = imgsrvd.post("/v1/work", machine(1))
    assert code == 200 and "identity" not in answer and "identity_source" not in answer


def test_result_identity_goes_to_the_results_log(imgsrvd):
    from imgsrvd.resultslog import read_entries
    applied = 'name=lab-1 ip=10.3.0.10/24 <script>"\x07'
    code, answer = imgsrvd.post("/v1/results", {
        "mac": "52:54:00:00:01:01", "operation": "download", "image_path": "lab/base.img",
        "status": "success", "identity": applied})
    assert code == 200, answer
    path = imgsrvd.workdir / "results.xml"
    assert wait_for(lambda: path.exists() and list(read_entries(path)))
    (entry,) = list(read_entries(path))
    assert entry.identity.startswith("name=lab-1 ip=10.3.0.10/24 <script>")
    assert "\x07" not in entry.identity
    assert "\\x07" in imgsrvd.log()           # escaped in the daemon log
    code, answer = imgsrvd.post("/v1/results", {
        "mac": "52:54:00:00:01:01", "operation": "download", "status": "success",
        "identity": {"name": "x"}})
    assert code == 400 and "identity" in answer["error"]
