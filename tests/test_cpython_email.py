"""CPython's own email test messages (Lib/test/test_email/data/msg_*.txt): decades of odd mail
that the standard library's authors collected. Each one must end as a recorded outcome.

The files ship with the interpreter's test package, which some distributions leave out; then
the test is skipped, saying so."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

import pytest

from gateway.app import App
from gateway.model import Outcome
from tests.conftest import ingest


def email_test_data() -> Path | None:
    """The interpreter's test_email/data folder, found without importing the test package."""
    candidates = [Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"]
    try:
        spec = importlib.util.find_spec("test.test_email")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "data")
    return next((c for c in candidates if any(c.glob("msg_*.txt"))), None)


DATA = email_test_data()
MESSAGES = sorted(DATA.glob("msg_*.txt")) if DATA else []
SKIP_REASON = (
    "CPython's email test data (test/test_email/data/msg_*.txt) is not installed with this "
    "interpreter (the distribution leaves out the test package)"
)


@pytest.mark.parametrize(
    "path",
    MESSAGES or [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))],
    ids=[p.name for p in MESSAGES] or ["missing"],
)
def test_cpython_email_message_ends_as_a_recorded_outcome(path: Path, app: App) -> None:
    result = ingest(app, path.read_bytes())  # a fresh database: no mail is a duplicate here
    row = app.records.inbound(result.inbound_id)
    assert row is not None
    assert row["state"] in ("done", "quarantined")
    assert row["outcome"] == str(result.outcome)
    assert result.outcome in set(Outcome) - {Outcome.DUPLICATE}
    # A parse bound may quarantine, but never a crash: the parser does not raise for bad mail.
    assert (row["failed_step"], row["error"]) == (None, None), row["error"]
    if result.outcome in (Outcome.CREATED, Outcome.UPDATED):
        assert result.ref is not None
        assert app.db.value("SELECT COUNT(*) FROM updates WHERE inbound_id = ?",
                            [result.inbound_id]) == 1


def test_the_cpython_corpus_was_found_or_its_absence_reported() -> None:
    """Guards the glob: when the folder exists, it must yield the messages it holds."""
    if DATA is None:
        pytest.skip(SKIP_REASON)
    assert len(MESSAGES) >= 40
