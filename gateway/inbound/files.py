"""Files as a transport: one raw mail, an mbox, a maildir or a folder of .eml files -> Envelopes."""

from __future__ import annotations

import mailbox
import mmap
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from gateway.mail import parse
from gateway.model import Envelope, ParsedMail, Rejection
from gateway.pipeline import Pipeline
from gateway.store.records import Accepted


class SourceError(Exception):
    """PATH is not something we can read mail from."""


def count(path: Path) -> int:
    return sum(1 for _ in _raws(path))


def envelopes(path: Path, source: str = "import") -> Iterator[Envelope]:
    for raw in _raws(path):
        yield Envelope(raw=raw, source=source)


def _raws(path: Path) -> Iterator[bytes]:
    if path.is_dir() and all((path / d).is_dir() for d in ("cur", "new", "tmp")):
        box = mailbox.Maildir(str(path), create=False)
        for key in sorted(box.iterkeys(), key=_delivery_order):
            yield box.get_bytes(key)
    elif path.is_dir():
        for file in sorted(path.rglob("*.eml")):
            yield file.read_bytes()
    elif path.is_file() and _looks_like_mbox(path):
        yield from _mbox_mails(path)
    elif path.is_file():
        yield path.read_bytes()
    else:
        raise SourceError(f"{path}: no such file or directory")


def _delivery_order(key: str) -> tuple[int, int, str]:
    """Maildir names start `<seconds>.M<microseconds>P…` with unpadded microseconds, so as
    strings M99999 sorts after M100000: order by the numbers, then the name."""
    seconds, _, rest = key.partition(".")
    micro = re.match(r"M(\d+)", rest)
    if seconds.isdigit():
        return int(seconds), int(micro.group(1)) if micro else 0, key
    return 0, 0, key


def _mbox_mails(path: Path) -> Iterator[bytes]:
    """The mails of an mbox exactly as `mailbox.mbox` gives them (`get_bytes` of each key), but
    found by one scan in C: its table of contents reads the file line by line in Python, which
    cost more than accepting the mails. A mail starts on each line beginning `From `, its body
    after that line, and ends where the next starts, less the blank line before it if any."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        starts = _from_lines(data)
        for start, end in zip(starts, [*starts[1:], len(data)], strict=True):
            blank_before = end - 2 >= start and data[end - 2 : end] == b"\n\n"
            stop = end - 1 if blank_before else end
            body = data.find(b"\n", start, stop) + 1 or stop
            yield data[min(body, stop) : stop]


def _from_lines(data: mmap.mmap) -> list[int]:
    """Where each line beginning `From ` starts (a search for the byte pair, not a regex over
    every byte)."""
    starts = [0] if data[:5] == b"From " else []
    at = data.find(b"\nFrom ")
    while at >= 0:
        starts.append(at + 1)
        at = data.find(b"\nFrom ", at + 1)
    return starts


def _looks_like_mbox(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(5) == b"From "


def run_import(
    pipeline: Pipeline,
    path: Path,
    on_progress: Callable[[int], None],
    batch: int = 200,
    workers: int | None = None,
) -> Counter[str]:
    """Accept in batches (one commit and shared fsyncs each), parse on every core, apply in
    order. Batch N is parsed by the pool while batch N-1 is applied, so the cores overlap.

    Each batch is accepted before any of it is processed, so a crash mid-import loses nothing
    that was counted, and importing the same file again only records duplicates.
    """
    outcomes: Counter[str] = Counter()
    workers = workers if workers is not None else (os.cpu_count() or 1)
    with _pool(workers) as pool:
        behind: _Parsing | None = None
        for chunk in _chunks(envelopes(path), batch):
            accepted = pipeline.accept_many(chunk)
            outcomes["duplicate"] += sum(1 for a in accepted if a.duplicate_of is not None)
            ahead = _Parsing(pipeline, pool, accepted, chunk)
            if behind:
                behind.apply(outcomes)
                on_progress(behind.size)
            else:  # mail a crash left waiting goes first: no reply overtakes its parent
                first = min(ahead.ids, default=0)
                pipeline.process_many(pipeline.earlier_than(first))
            behind = ahead
        if behind:
            behind.apply(outcomes)
            on_progress(behind.size)
    return outcomes


class _Parsing:
    """One accepted batch whose new mails are being parsed by the pool (or here)."""

    def __init__(
        self,
        pipeline: Pipeline,
        pool: ProcessPoolExecutor | None,
        accepted: list[Accepted],
        chunk: list[Envelope],
    ) -> None:
        self.pipeline = pipeline
        self.size = len(chunk)
        fresh = [
            (a.inbound_id, e.raw)
            for a, e in zip(accepted, chunk, strict=True)
            if a.duplicate_of is None
        ]
        self.ids = [i for i, _ in fresh]
        # A few mails a task, not one: each task costs the pool's thread in this process a
        # round of pickling and pipe writes, which competed with applying for this core.
        self.where: dict[int, tuple[Future[list[Parsed]], int]] = {}
        for at in range(0, len(fresh), PER_TASK):
            if pool is None:
                break
            part = fresh[at : at + PER_TASK]
            future = pool.submit(_parse_each, [raw for _, raw in part], pipeline.p.limits)
            self.where.update((i, (future, k)) for k, (i, _) in enumerate(part))

    def apply(self, outcomes: Counter[str]) -> None:
        parsed = self._parsed if self.where else None
        for result in self.pipeline.process_many(self.ids, parsed):
            outcomes[str(result.outcome)] += 1

    def _parsed(self, inbound_id: int) -> ParsedMail | Rejection:
        future, k = self.where[inbound_id]
        got = future.result()[k]
        if isinstance(got, Exception):
            raise got
        return got


PER_TASK = 20
Parsed = ParsedMail | Rejection | Exception


def _parse_each(raws: list[bytes], limits: parse.Limits) -> list[Parsed]:
    """In a worker: each mail parsed on its own; one that raises hands back its exception, so
    that its failure is its own and not its neighbours'."""
    out: list[Parsed] = []
    for raw in raws:
        try:
            out.append(parse.parse(raw, limits))
        except Exception as exc:
            out.append(exc)
    return out


@contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield pool


def _chunks(items: Iterator[Envelope], size: int) -> Iterator[list[Envelope]]:
    chunk: list[Envelope] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
