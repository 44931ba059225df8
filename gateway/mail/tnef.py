"""winmail.dat (Outlook's TNEF) -> the files inside it; the only module that imports tnefparse."""

from __future__ import annotations

from tnefparse import TNEF

TNEF_TYPES = ("application/ms-tnef", "application/vnd.ms-tnef")


def is_tnef(content_type: str, filename: str | None) -> bool:
    return content_type in TNEF_TYPES or (filename or "").lower() == "winmail.dat"


def unpack(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, bytes) of each attachment, or None when the blob is not readable TNEF."""
    try:
        blob = TNEF(data)
        return [(_name(a), bytes(a.data)) for a in blob.attachments]
    except Exception:  # tnefparse raises bare ValueError/struct.error/IndexError on junk
        return None


def _name(attachment: object) -> str:
    name = getattr(attachment, "long_filename", None)
    value = name() if callable(name) else getattr(attachment, "name", "")
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value or "").rstrip("\x00")
