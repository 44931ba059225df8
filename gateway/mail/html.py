"""HTML body -> plain text; the only module that imports inscriptis.

inscriptis renders layout (tables, lists, line breaks) the way a reader sees it, which keeps
quote markers and "On ... wrote:" lines on lines of their own for the reply stripper.
"""

from __future__ import annotations

import logging

from inscriptis import get_text

log = logging.getLogger(__name__)


def to_text(markup: str) -> str:
    if not markup.strip():
        return ""
    try:
        return str(get_text(markup))
    except Exception:  # lxml gives up on some byte soup; the tags then stay in the text
        log.warning("HTML body could not be converted; kept as markup")
        return markup
