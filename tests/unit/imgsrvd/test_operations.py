"""The operation table: retrieves that stop are settled as failures after RETRIEVE_IDLE_S,
records whose report never comes are written alone after REPORT_WAIT_S, the table is bounded."""

from imgsrvd.operations import OperationTable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock, **kwargs) -> OperationTable:
    return OperationTable(retrieve_idle_s=600, report_wait_s=1800, clock=clock, **kwargs)


def test_a_retrieve_that_stops_half_way_is_one_failure_after_the_idle_window():
    clock = Clock()
    ops = table(clock)
    op = ops.begin("address 10.0.0.1", "download", "a.img", "ws", "10.0.0.1", False, 1000)
    op.sent_bytes += 400
    assert not op.cover(0, 400)
    clock.now = 599
    assert ops.live_retrieve("address 10.0.0.1", "a.img") is op     # a resume joins it
    ops.expire()
    assert ops.take_due() == []
    clock.now = 1200
    assert ops.live_retrieve("address 10.0.0.1", "a.img") is None   # a GET now starts anew
    ops.expire()
    (due,) = ops.take_due()
    assert (due.status, due.error) == (
        "failure", "retrieve not completed: 400 bytes sent, the image has 1000")
    assert len(ops) == 0


def test_a_finished_operation_waits_for_its_report_then_is_written_alone():
    clock = Clock()
    ops = table(clock)
    op = ops.begin("session s", "upload", "m.img", "ws", "10.0.0.1", True)
    ops.finish(op, "success", stored_bytes=10)
    assert ops.take_due() == []                   # waits for the engine's report
    assert ops.report("session s", "upload", "m.img") is op
    assert ops.report("session s", "upload", "m.img") is None       # once
    other = ops.begin("session s", "upload", "n.img", "ws", "10.0.0.1", True)
    ops.finish(other, "success")
    clock.now = 1800
    ops.expire()
    assert ops.take_due() == [other]


def test_without_a_session_an_operation_is_due_when_it_ends():
    ops = table(Clock())
    op = ops.begin("address 10.0.0.1", "download", "x.img", "ws", "10.0.0.1", False, 10)
    assert op.cover(0, 10)
    ops.finish(op, "success")
    assert ops.take_due() == [op] and len(ops) == 0


def test_the_table_is_bounded():
    ops = table(Clock(), max_operations=8)
    for n in range(100):
        ops.begin(f"address 10.0.0.{n}", "download", "x.img", "", "", False, 10)
    assert len(ops) == 8
    due = ops.take_due()
    assert len(due) == 92 and all(op.status == "failure" for op in due)
