"""A sender's attachment file name made safe to show: display metadata, never part of a path."""

from __future__ import annotations

import mimetypes
import re
import unicodedata

MAX_LENGTH = 200
# Names Windows treats as devices whatever their extension; a download called CON.txt breaks.
RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


def safe_filename(name: str, content_type: str, default_ext: str = "") -> str:
    """No path parts, no control characters, no leading dots, length-capped; never empty."""
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    name = name.strip().lstrip(".").strip()
    if RESERVED.match(name):
        name = "_" + name
    if not name:
        ext = default_ext or mimetypes.guess_extension(content_type) or ".bin"
        name = "attachment" + ext
    return _cap(name)


def _cap(name: str) -> str:
    if len(name) <= MAX_LENGTH:
        return name
    stem, dot, ext = name.rpartition(".")
    if dot and 0 < len(ext) <= 10:
        return stem[: MAX_LENGTH - len(ext) - 1] + "." + ext
    return name[:MAX_LENGTH]
