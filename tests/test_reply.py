"""`reply.latest_reply` answers what mail-parser-reply's `parse_reply` answers, on every text of
the corpus and on generated replies, while searching only as far as it must."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailparser_reply import EmailReplyParser
from mailparser_reply.parser import EmailMessage

from gateway.mail import reply

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
LANGUAGES = reply.DEFAULT_LANGUAGES


def library(text: str, languages: tuple[str, ...] = LANGUAGES) -> str:
    return EmailReplyParser(languages=list(languages)).parse_reply(text) or ""


def corpus_texts() -> list[str]:
    texts = []
    for path in sorted(CORPUS.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        for part in message.walk():
            if part.get_content_maintype() == "text":
                try:
                    texts.append(str(part.get_content()))
                except Exception:  # a hostile part that does not decode: not a reply text
                    continue
    return texts


@pytest.mark.parametrize("text", corpus_texts())
def test_the_corpus_texts_give_the_librarys_answer(text: str) -> None:
    assert reply.latest_reply(text, LANGUAGES) == library(text)


LINES = [
    "Hello, the printer is broken again.",
    "",
    "On Mon, 2 Nov 2026 at 09:00, Support <support@example.org> wrote:",
    "Am 02.11.2026 um 09:00 schrieb Support <support@example.org>:",
    "Le lun. 2 nov. 2026 à 09:00, Support <support@example.org> a écrit :",
    "Op ma 2 nov. 2026 om 09:00 schreef Support <support@example.org>:",
    "> the quoted question",
    ">> an older quote",
    "-----Original Message-----",
    "From: Support <support@example.org>",
    "Sent: Monday, November 2, 2026 09:00",
    "To: Dr A <gp@practice.example>",
    "Subject: RE: [ECR-000001] Printer",
    "________________________________",
    "Best regards,",
    "Dr A",
    "Sent from my iPhone",
    "-- ",
    "This e-mail is confidential and intended for the addressee only.",
    "Printer, scanner, login: all broken.",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(LINES), max_size=30),
    st.sampled_from([LANGUAGES, ("en",), ("de", "fr")]),
)
def test_generated_replies_give_the_librarys_answer(
    lines: list[str], languages: tuple[str, ...]
) -> None:
    text = "\n".join(lines)
    assert reply.latest_reply(text, languages) == library(text, languages)


def test_the_header_pattern_has_several_groups_as_the_shortcut_assumes() -> None:
    # With a single group the library's findall would hand back strings, not tuples of groups.
    assert EmailMessage(text="", languages=list(LANGUAGES)).HEADER_REGEX.groups > 1
    # and the pattern built once per language set is the one a message builds for itself
    for languages in (LANGUAGES, ("en",), ("de", "fr")):
        built = EmailMessage(text="x", languages=list(languages)).HEADER_REGEX
        assert reply._header_pattern(languages).pattern == built.pattern


def test_a_long_quoted_history_after_the_reply_leaves_its_own_words() -> None:
    text = "Still broken.\n\nOn Mon, 2 Nov 2026, Support wrote:\n" + "> old words\n" * 50_000
    assert reply.latest_reply(text, LANGUAGES) == "Still broken."
