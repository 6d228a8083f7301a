"""``gateway.console.auth``: console sessions, capped per auditor token."""

from __future__ import annotations

from gateway.auth import Principal
from gateway.console.auth import MAX_SESSIONS_PER_AUDITOR, ConsoleSessions

UNSCOPED = Principal("demo-auditor", None, "auditor")
SCOPED = Principal("acme-auditor", None, "auditor", frozenset({"acme"}))


def test_one_auditor_signing_in_repeatedly_ends_only_its_own_oldest_sessions() -> None:
    """An auditor signing in 10,001 times keeps its newest sessions and ends its oldest; another
    auditor's session lives on, where one process-wide list of 10,000 used to sign everyone out."""
    sessions = ConsoleSessions()
    victim = sessions.create(UNSCOPED)
    mine = [sessions.create(SCOPED) for _ in range(10_001)]
    assert sessions.get(victim.id) is victim
    assert all(sessions.get(s.id) is s for s in mine[-MAX_SESSIONS_PER_AUDITOR:])
    assert not any(sessions.get(s.id) for s in mine[:-MAX_SESSIONS_PER_AUDITOR])
    assert sessions.count(SCOPED) == MAX_SESSIONS_PER_AUDITOR and sessions.count(UNSCOPED) == 1


def test_signing_out_forgets_the_session() -> None:
    """A dropped session is gone and no longer counts against its auditor's cap."""
    sessions = ConsoleSessions()
    session = sessions.create(SCOPED)
    sessions.drop(session.id)
    assert sessions.get(session.id) is None and sessions.count(SCOPED) == 0
