"""Whatever bytes arrive, `ingest` returns and leaves exactly one recorded outcome.

One app per test function, built before hypothesis runs: examples share its database, which is
fine because each example only adds rows, and the assertions count rows before and after."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import App, build_app
from gateway.model import Outcome
from tests.conftest import TEST_KEY, Clock, ingest, mail, make_settings

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fresh_app(tmp_path: Path) -> App:
    d = tmp_path / "data"
    d.mkdir()
    (d / "secret.key").write_text(TEST_KEY + "\n")
    return build_app(make_settings(d), clock=Clock())


def inbound_count(app: App) -> int:
    return int(app.db.value("SELECT COUNT(*) FROM inbound"))


def assert_one_outcome(app: App, raw: bytes) -> None:
    before = inbound_count(app)
    result = ingest(app, raw)  # raising here fails the property
    assert inbound_count(app) == before + 1
    row = app.records.inbound(result.inbound_id)
    assert row is not None
    assert result.inbound_id > before
    assert row["state"] in ("done", "quarantined")
    assert row["outcome"] in {str(o) for o in Outcome}
    assert row["outcome"] == str(result.outcome)
    assert (row["state"] == "quarantined") == (result.outcome is Outcome.QUARANTINED)
    if result.outcome is Outcome.QUARANTINED:
        assert result.reason
    # Bad mail is rejected by a named bound or processed; nothing raises for it. A duplicate
    # (a shrinking replay of the same bytes is one) answers for the row that was processed.
    decided = app.records.inbound(row["duplicate_of"]) if row["duplicate_of"] else row
    assert decided is not None
    assert (decided["failed_step"], decided["error"]) == (None, None), decided["error"]


def test_arbitrary_bytes_end_as_one_recorded_outcome(tmp_path: Path) -> None:
    app = fresh_app(tmp_path)

    @FAST
    @given(st.binary(max_size=4000))
    def check(raw: bytes) -> None:
        assert_one_outcome(app, raw)

    try:
        check()
    finally:
        app.close()


# --- mutations of well-formed mails -------------------------------------------------------------
# The bases are byte-for-byte the same in every example (fixed Message-ID placeholder, fixed
# boundary), so hypothesis can replay its draws; the placeholder is swapped for a new id of the
# same length only after all drawing, so each mail is really parsed, not a duplicate.

PLACEHOLDER = b"prop-000000"
BOUNDARY = b"==BOUNDARY-FIXED=="


def base(**kw: object) -> bytes:
    raw = mail(message_id=f"<{PLACEHOLDER.decode()}@practice.example>", **kw)  # type: ignore[arg-type]
    return re.sub(rb"={15}\d+==", BOUNDARY, raw)


BASES: list[bytes] = [
    base(),
    base(
        subject="Re: [ECR-000001] Printer",
        body="Still broken.\n\nOn Mon, Dr A wrote:\n> The printer is broken.\n",
        in_reply_to="<seed@practice.example>",
        cc="Practice Manager <pm@practice.example>",
    ),
    base(
        subject="Scan attached",
        body="See the scan.",
        attachments=[
            ("scan.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(range(256)) * 4),
            ("notes.txt", "text/plain", "Grüße, café\n".encode()),
        ],
    ),
    base(
        subject="Automatic reply: away",
        body="I am away.",
        headers={"Auto-Submitted": "auto-replied"},
    ),
]
SERIAL = iter(range(1, 10**6))


def unique(raw: bytes) -> bytes:
    return raw.replace(PLACEHOLDER, b"prop-%06d" % next(SERIAL))


def flip_bytes(data: st.DataObject, raw: bytes) -> bytes:
    if not raw:  # truncated to nothing: one arbitrary byte
        return bytes([data.draw(st.integers(0, 255), label="byte")])
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 20), label="flips")):
        i = data.draw(st.integers(0, len(out) - 1), label="at")
        out[i] = data.draw(st.integers(0, 255), label="byte")
    return bytes(out)


def truncate(data: st.DataObject, raw: bytes) -> bytes:
    return raw[: data.draw(st.integers(0, len(raw)), label="cut")]


def duplicate_header(data: st.DataObject, raw: bytes) -> bytes:
    head, sep, body = raw.partition(b"\n\n")
    lines = head.split(b"\n")
    i = data.draw(st.integers(0, len(lines) - 1), label="header")
    times = data.draw(st.integers(1, 5), label="times")
    where = data.draw(st.integers(0, len(lines)), label="where")
    lines[where:where] = [lines[i]] * times
    return b"\n".join(lines) + sep + body


def damage_boundary(data: st.DataObject, raw: bytes) -> bytes:
    found = re.search(rb'boundary="([^"]+)"', raw)
    if not found:
        return flip_bytes(data, raw)
    boundary = found.group(1)
    how = data.draw(st.sampled_from(["drop-close", "drop-all", "rename", "cut-one"]), label="how")
    if how == "drop-close":
        return raw.replace(b"--" + boundary + b"--", b"")
    if how == "drop-all":
        return raw.replace(b"--" + boundary, b"")
    if how == "rename":
        return raw.replace(b'boundary="' + boundary, b'boundary="x' + boundary)
    cut = data.draw(st.integers(0, len(boundary) - 1), label="cut")
    return raw.replace(b"--" + boundary + b"\n", b"--" + boundary[:cut] + b"\n", 1)


def splice(data: st.DataObject, raw: bytes) -> bytes:
    at = data.draw(st.integers(0, len(raw)), label="at")
    junk = data.draw(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from([b"\x00", b"\r", b"\n\n", b"=?utf-8?b?", b"=?x-unknown?q?=FF?=",
                             b"Content-Type: multipart/mixed\n", b"\n--", b"\xff\xfe"]),
        ),
        label="junk",
    )
    return raw[:at] + junk + raw[at:]


MUTATIONS = [flip_bytes, truncate, duplicate_header, damage_boundary, splice]


def mutated(data: st.DataObject) -> bytes:
    """One of the base mails after one to three mutations."""
    raw = data.draw(st.sampled_from(BASES), label="base")
    for _ in range(data.draw(st.integers(1, 3), label="rounds")):
        raw = data.draw(st.sampled_from(MUTATIONS), label="mutation")(data, raw)
    return raw


def test_mutated_mails_end_as_one_recorded_outcome(tmp_path: Path) -> None:
    app = fresh_app(tmp_path)

    @FAST
    @given(st.data())
    def check(data: st.DataObject) -> None:
        assert_one_outcome(app, unique(mutated(data)))

    try:
        check()
    finally:
        app.close()
