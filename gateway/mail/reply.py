"""A reply's own words: quoted history and signature stripped; the only user of mail-parser-reply.

mail-parser-reply knows the attribution and separator lines of Outlook, Gmail, Apple Mail and
Thunderbird in many languages, for top-posted replies. We add what it leaves: bottom-posted
replies, the `-- ` signature delimiter, mobile "Sent from my ..." lines, and a guard that keeps
an interleaved reply (answers between quoted lines) whole, since any cut would lose answers.
"""

from __future__ import annotations

import functools
import re

from mailparser_reply.constants import MAIL_LANGUAGES
from mailparser_reply.parser import EmailMessage

# Each language costs one pass of the library's patterns over the text: list only those the
# practices write in (gateway.reply_languages).
DEFAULT_LANGUAGES = ("en", "de", "fr", "nl")
# The library's patterns are slow on long texts; a reply's own words come first, so only this
# much is searched for where the quote begins (after it, the text is kept whole).
HEAD = 32 * 1024

SIGNATURE = re.compile(r"^-- ?$")
MOBILE = re.compile(
    r"^(sent from my \w+|sent from (outlook|mail) for \w+|get outlook for \w+|"
    r"von meinem \w+ gesendet)\b",
    re.IGNORECASE,
)
# A rule line that introduced the quote (Outlook's underscores) and survived the cut: when a
# footer such as "Get Outlook for iOS" sits directly above it, the library keeps it.
SEPARATOR = re.compile(r"^\s*(_{5,}|-{5,}|={5,})\s*$")
ATTRIBUTION = re.compile(
    r"(wrote|schrieb|a écrit|escribió|heeft geschreven|skrev|napisał)\s*:\s*$", re.I
)


def new_text(body: str, languages: tuple[str, ...] = DEFAULT_LANGUAGES) -> str:
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if _interleaved(text):
        return text.strip()
    text = _after_quotes(text) if _bottom_posted(text) else _top_posted(text, languages)
    return _drop_trailing_separators(_strip_signature(text)).strip()


# Anything the library could act on: a quote marker, a rule or a "Header:" line at the start
# of a line, or an attribution, sign-off or disclaimer word. A text with none of these is
# returned as it is, without running the library's patterns (most new mails).
LINE_HINTS = re.compile(r"^(?:\s*>|\s*[-_=*]{4,}|[ *]*[\w ]{1,20}:\s)", re.MULTILINE)
WORD_HINTS = (
    "wrote",
    "schrieb",
    "crit",
    "geschreven",
    "regards",
    "grüße",
    "grüsse",
    "cordialement",
    "groet",
    "best,",
    "thanks,",
    "thank you,",
    "all the best",
    "disclaimer",
    "confidential",
    "caution",
    "warning",
    "privileged",
    "sensitive",
    "important",
    "sent from",
    "get outlook",
    "gesendet",
    "envoy",
    "verzonden",
)


def _hints(text: str) -> bool:
    lower = text.lower()
    return any(w in lower for w in WORD_HINTS) or bool(LINE_HINTS.search(text))


def _top_posted(text: str, languages: tuple[str, ...]) -> str:
    head = text[:HEAD]
    if not _hints(head):
        return text
    try:
        reply = latest_reply(head, languages)
    except Exception:  # a regex library failure must not lose the mail; keep it whole
        return text.strip()
    found_quote = len(reply.strip()) < len(head.strip())
    return reply if found_quote or len(text) <= HEAD else text


def latest_reply(text: str, languages: tuple[str, ...]) -> str:
    """What the library's `parse_reply` answers, found with its own patterns but without its
    pass over the whole text: it splits the text at every header (attribution, separator)
    it finds and looks for signatures and disclaimers in every piece, then returns only the
    first non-empty piece. Here the header pattern is searched only as far as the header that
    ends that piece (a reply's quoted history, often most of it, is never searched). The same
    steps as the library's `EmailMessage.read`, and tested against `parse_reply`."""
    body: str = EmailMessage(text=text, languages=list(languages)).text  # its normalising
    start = 0
    for found in _header_pattern(languages).finditer(body):
        for header in filter(None, found.groups()):  # each non-empty group, as findall's
            end = body.find(header, start + 1 if start > 0 else start)
            piece = body[start:end].strip()  # as the library slices: to -1 when not found
            start = end if end >= 0 else 0
            if piece:
                return piece
    return body[start:].strip()


@functools.lru_cache(maxsize=8)
def _header_pattern(languages: tuple[str, ...]) -> re.Pattern[str]:
    """The library's header pattern for these languages, built once (it joins every language's
    patterns into one each time a message asks)."""
    pattern: re.Pattern[str] = EmailMessage(text="", languages=list(languages)).HEADER_REGEX
    return pattern


def known_languages() -> frozenset[str]:
    return frozenset(MAIL_LANGUAGES)


def _shape(text: str) -> str:
    """Runs of Quote / Text lines, blank lines ignored: 'TQ' is top-posted, 'QT' bottom."""
    shape = ""
    for line in text.split("\n"):
        if not line.strip():
            continue
        kind = "Q" if line.lstrip().startswith(">") else "T"
        if not shape or shape[-1] != kind:
            shape += kind
    return shape


def _interleaved(text: str) -> bool:
    shape = _shape(text)
    return "QTQ" in shape


def _bottom_posted(text: str) -> bool:
    return _shape(text).endswith("QT") and _shape(text).count("Q") == 1


def _after_quotes(text: str) -> str:
    lines = text.split("\n")
    last_quote = max(i for i, line in enumerate(lines) if line.lstrip().startswith(">"))
    before = "\n".join(line for line in lines[:last_quote] if not line.lstrip().startswith(">"))
    before = "\n".join(line for line in before.split("\n") if not ATTRIBUTION.search(line))
    after = "\n".join(lines[last_quote + 1 :])
    return (before.strip() + "\n\n" + after.strip()).strip()


def _strip_signature(text: str) -> str:
    kept: list[str] = []
    for line in text.split("\n"):
        if SIGNATURE.match(line.rstrip()):
            break
        if MOBILE.match(line.strip()):
            continue
        kept.append(line)
    return "\n".join(kept)


def _drop_trailing_separators(text: str) -> str:
    lines = text.rstrip().split("\n")
    while lines and (not lines[-1].strip() or SEPARATOR.match(lines[-1])):
        lines.pop()
    return "\n".join(lines)
