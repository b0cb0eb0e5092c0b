"""The worker's memory budget: MAIL and transfers refused past it, finished messages never."""

from mta.smtp import replies
from tests.mta.smtp.transcript import new_app
from workers.inbound.budget import MemoryBudget

ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@local.test>\r\n"


def test_mail_is_refused_when_spent_or_when_the_declared_size_does_not_fit() -> None:
    budget = MemoryBudget(1000)
    assert budget.check_mail(None) is None
    budget.report(0, 600)
    assert budget.check_mail(200) is None  # a message costs twice its size (the commit copies it)
    assert budget.check_mail(201) is replies.MEMORY_BUSY
    assert budget.check_mail(None) is None
    budget.report(600, 1000)
    assert budget.check_mail(None) is replies.MEMORY_BUSY
    budget.report(1000, 0)
    assert budget.held == 0 and budget.check_mail(500) is None


def test_the_transfer_whose_input_crosses_the_budget_is_refused() -> None:
    budget = MemoryBudget(10_000)
    other = budget.report(0, 2000)  # another session holds 2000
    app, _ = new_app()
    app.feed(ENVELOPE + b"DATA\r\n")
    held = budget.report(0, budget.cost(app.conn))
    app.conn.receive_data(b"x" * 3000 + b"\r\n")
    assert budget.cost(app.conn) == 2 * app.conn.held_bytes  # content counts twice
    assert budget.admit(app.conn, held)  # 2000 + 2 x ~3000: fits
    app.pump()
    held = budget.report(held, budget.cost(app.conn))
    app.conn.receive_data(b"x" * 3000 + b"\r\n")
    assert not budget.admit(app.conn, held)  # 2000 + 2 x ~6000: past 10_000, refused now
    assert app.conn.held_bytes <= 4
    app.conn.receive_data(b"x" * 3000 + b"\r\n")
    assert budget.admit(app.conn, held)  # already dropped: not refused (nor counted) twice
    app.pump()
    budget.report(held, budget.cost(app.conn))
    assert budget.held <= other + 8
    assert app.feed(b".\r\n").startswith(b"451 4.3.1 ")


def test_input_outside_a_transfer_is_never_refused() -> None:
    budget = MemoryBudget(100)
    app, _ = new_app()
    app.conn.receive_data(b"EHLO c.test\r\n" + b"NOOP\r\n" * 50)
    assert budget.admit(app.conn, 0)  # over the budget, but no transfer to refuse
