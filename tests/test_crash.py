"""Crash test for the durability contract (PRODUCT §2.1): kill -9 at many points, then check.

Real `python -m gateway ingest -` and `import PATH` processes are killed with SIGKILL at seeded
random moments and retried until they exit 0, as an MTA retries a delivery whose pipe died.
Then the recovery runs (a few `serve` processes, themselves killed while recovering, and finally
`app.pipeline.recover()` in this process) and the data directory must show: every mail has
exactly one non-duplicate inbound row with a final outcome, no ECR was created twice, no update
was applied twice, every reply updated its parent's ECR (a crash must not let a reply overtake
its parent), no row is left `accepted`, no `*.tmp` file remains, and every raw mail and every
attachment is on disk, intact.

Why the mail goes in on stdin (the MTA pipe form of `ingest`): the child blocks reading it once
the interpreter has started, so the kill clock starts when the mail is handed over and the
delays, spread over the measured length of one ingest (about 30 ms), land in the gateway's
steps rather than in Python's start-up. An import's clock starts when it opens the database.

Two lanes of mail run side by side, as an MTA delivers concurrently; each lane is sequential, so
a reply is sent after its parent's ingest exited 0. The seed is random per run and printed in
every assertion message; ECR_CRASH_SEED=<n> replays a run's choices (never its exact timing).
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.app import build_app
from gateway.store.files import Spool, span
from tests.conftest import ROOT, TEST_KEY, mail, make_settings

SEED_ENV = "ECR_CRASH_SEED"
MIN_KILLS = 50  # of ingest and import processes, per run
LANES = 2
MAILS_PER_LANE = 40  # at least; a lane goes on (up to 3x) until MIN_KILLS kills have landed
KILL_CHANCE = 0.6  # per attempt; a mail is retried until an attempt is left alone
MAX_ATTEMPTS = 30
IMPORT_EVERY = 6  # every 6th step of a lane imports a small mbox, folder or maildir
SERVE_KILLS = 3  # `serve` processes killed while recovering, before the final recovery
ATTACHMENT_SHARE = 0.12  # of mails with 64 KB - 2 MB
BIG_SHARE = 0.04  # of mails with 8 - 16 MB
READ_SYSCALL = {"x86_64": 0, "aarch64": 63}.get(platform.machine())
FINAL = {"created", "updated", "automatic", "loop"}
MID_BATCH = "mid-acceptance of a batch"  # must never happen: an import batch commits whole
TOPICS = ["printer offline", "login fails", "scanner jams", "lab results missing", "slow PC"]
WORDS = ["the", "printer", "in", "room", "is", "broken", "again", "please", "help", "log"]

# --- the world: data directory, children's environment, database reads ---------------------


@dataclass(eq=False)  # identity equality: "is this parent in the same import file?"
class Mail:
    """One generated mail and what must become of it."""

    lane: int
    message_id: str  # normalised (no brackets, lower case), as the gateway stores it
    raw: bytes
    kind: str  # "new", "thread" (In-Reply-To) or "subject" ([ECR-n] in the subject)
    subject: str
    conversation: int
    # The mail this one answers, whose ECR it must update: the parent's delivery exited 0
    # before this one began (or the parent is earlier in the same import file), so even when
    # the parent's processing was cut short, it must be finished before this mail is matched.
    parent: Mail | None = None


@dataclass
class Lane:
    """A run of conversations with its own senders and its own seeded choices."""

    number: int
    rng: random.Random
    mails: list[Mail] = field(default_factory=list)
    roots: list[Mail] = field(default_factory=list)  # each conversation's first mail


@dataclass
class Outcome:
    code: int
    stderr: bytes
    seconds: float  # from hand-over (ingest) or database open (import) to exit
    pid: int


Run = Callable[[float | None], Outcome]


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    kills: Counter[str] = field(default_factory=Counter)  # by the phase they interrupted
    runs: Counter[str] = field(default_factory=Counter)

    def landed(self) -> int:
        """Kills of ingest and import processes (the contract's subject; serve is extra)."""
        with self.lock:
            return sum(n for k, n in self.kills.items() if not k.startswith("serve"))

    def count(self, what: str, phase: str | None) -> None:
        with self.lock:
            self.runs[what] += 1
            if phase:
                self.kills[phase] += 1


class World:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.data = root / "data"
        self.seed = seed
        self.stats = Stats()
        self.children: set[subprocess.Popen[bytes]] = set()
        self.env = {**os.environ, "ECR_GATEWAY_GATEWAY__DATA_DIR": str(self.data)}
        self.env.pop("ECR_GATEWAY_CONFIG", None)
        # `serve` listens too: on ports the OS picks, so that nothing else can be in the way.
        self.env.update(ECR_GATEWAY_SMTP__PORT="0", ECR_GATEWAY_HTTP__PORT="0")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get(
            "PYTHONPATH")]))
        # Seconds an unkilled run takes, replaced by the calibration: a fixed part per run and
        # a part per byte, so that kills on a mail with a big attachment spread over all of it.
        self.base = {"ingest": 0.03, "import": 0.3}
        self.per_byte = 0.0
        self.small = 0  # size of the calibration's small mails
        self.started = time.monotonic()

    def span(self, what: str, size: int) -> float:
        """How long after the hand-over a kill may come: a little past a whole run."""
        return 1.2 * (self.base[what] + self.per_byte * max(0, size - self.small))

    def tag(self) -> str:
        return f"[seed {self.seed}; replay the choices with {SEED_ENV}={self.seed}]"

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # Own read-only connection per call: lanes read while children write (WAL readers).
        uri = f"file:{self.data / 'gateway.db'}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=60)) as conn:
            return list(conn.execute(sql, params))

    def inbound(self, message_id: str) -> list[tuple[Any, ...]]:
        """(id, state, duplicate_of, ecr_id, outcome) of every row of one Message-ID."""
        return self.rows(
            "SELECT id, state, duplicate_of, ecr_id, outcome FROM inbound "
            "WHERE message_id = ? ORDER BY id",
            (message_id,),
        )

    def done_ecr(self, m: Mail) -> int | None:
        """The ECR of a mail whose original row is processed; None while it waits."""
        for _, state, dup, ecr_id, _ in self.inbound(m.message_id):
            if dup is None and state == "done" and ecr_id is not None:
                return int(ecr_id)
        return None

    def summary(self) -> str:
        kills = ", ".join(f"{n} {k}" for k, n in sorted(self.stats.kills.items()))
        runs = ", ".join(f"{n} {k}" for k, n in sorted(self.stats.runs.items()))
        return (
            f"{self.tag()} runs: {runs}; kills: {kills}; calibrated: ingest "
            f"{self.base['ingest'] * 1000:.0f} ms, import {self.base['import'] * 1000:.0f} ms, "
            f"{self.per_byte * 1e9:.1f} ms/MB; "
            f"{time.monotonic() - self.started:.1f} s"
        )


# --- the mails ------------------------------------------------------------------------------


def make_mail(
    world: World, lane: Lane, kind: str, parent: Mail | None, ref: int = 0, size: int = -1
) -> Mail:
    """A new mail, a reply by In-Reply-To to `parent`, or a reply naming ECR `ref`; with an
    attachment of `size` bytes (0: none; -1: a seeded choice)."""
    rng = lane.rng
    conv = parent.conversation if parent else len(lane.roots)
    mid = f"crash-{world.seed}-{lane.number}-{len(lane.mails)}@lane{lane.number}.example"
    topic = f"Lane {lane.number} case {conv}: {TOPICS[conv % len(TOPICS)]}"
    subject = {"new": topic, "thread": f"Re: {topic}", "subject": f"Re: [ECR-{ref:06d}] {topic}"}
    size = attachment_size(rng) if size < 0 else size
    attachments = [("log.bin", "application/octet-stream", rng.randbytes(size))] if size else []
    raw = mail(
        subject=subject[kind],
        body=" ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 60))) + "\n",
        sender=f"Dr {lane.number}-{conv} <gp{conv}@lane{lane.number}.example>",
        message_id=f"<{mid}>",
        in_reply_to=f"<{parent.message_id}>" if kind == "thread" and parent else "",
        attachments=attachments,
    )
    m = Mail(lane.number, mid, raw, kind, subject[kind], conv, parent)
    lane.mails.append(m)
    if kind == "new":
        lane.roots.append(m)
    return m


def attachment_size(rng: random.Random) -> int:
    """Some small and a few large (up to 16 MB), so that kills land in the blob writes too."""
    roll = rng.random()
    if roll < BIG_SHARE:
        return rng.randrange(8 << 20, 16 << 20)
    if roll < BIG_SHARE + ATTACHMENT_SHARE:
        return rng.randrange(64 << 10, 2 << 20)
    return 0


def next_mail(world: World, lane: Lane) -> Mail:
    """A seeded choice of what comes next; replies come from the conversation's requester."""
    rng = lane.rng
    roll = rng.random()
    if len(lane.roots) < 3 or roll < 0.45:
        return make_mail(world, lane, "new", None)
    if roll < 0.8:
        return make_mail(world, lane, "thread", rng.choice(lane.mails))
    root = rng.choice(lane.roots)
    ecr_id = world.done_ecr(root)
    if ecr_id is None:  # its ECR is not there yet, so there is no number to name: use a thread
        return make_mail(world, lane, "thread", root)
    return make_mail(world, lane, "subject", root, ecr_id)


def write_source(root: Path, mails: list[Mail], form: str) -> Path:
    """An mbox, a folder of .eml files or a maildir holding `mails` in this order."""
    root.mkdir(parents=True)
    if form == "mbox":
        path = root / "import.mbox"
        # mboxrd by hand: the mail builder never writes a body line starting with "From ".
        path.write_bytes(b"".join(b"From import@localhost Mon Nov  2 09:00:00 2026\n"
                                  + m.raw.replace(b"\r\n", b"\n") + b"\n" for m in mails))
        return path
    if form == "maildir":
        for sub in ("cur", "new", "tmp"):
            (root / sub).mkdir()
        # Our own names sort in order; an MTA's `time.M<usec>P<pid>` names do not (see report).
        for i, m in enumerate(mails):
            (root / "new" / f"1700000000.M{i:06d}P1.crash").write_bytes(m.raw)
        return root
    for i, m in enumerate(mails):
        (root / f"{i:04d}.eml").write_bytes(m.raw)
    return root


# --- the children ---------------------------------------------------------------------------


def spawn(world: World, args: list[str], stdin: int) -> subprocess.Popen[bytes]:
    """A real `ecr-gateway` child in its own process group (an import's parser pool with it)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=world.env,
        cwd=world.root,
        start_new_session=True,
    )
    world.children.add(child)
    return child


def wait_until(child: subprocess.Popen[bytes], ready: Callable[[int], bool]) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end and child.poll() is None and not ready(child.pid):
        time.sleep(0.0005)


def reading_stdin(pid: int) -> bool:
    """Blocked in read(0, ...): start-up is over and the child waits for its mail."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == str(READ_SYSCALL) and fields[1] == "0x0"


def db_open(pid: int) -> bool:
    """The child has opened the database: start-up is over, the gateway's work begins."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("gateway.db"):
                return True
        except OSError:
            continue
    return False


def finish(world: World, child: subprocess.Popen[bytes], kill_after: float | None) -> Outcome:
    """SIGKILL the child's group `kill_after` seconds from now, or let it finish."""
    start = time.monotonic()
    if kill_after is not None:
        time.sleep(kill_after)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    _, err = child.communicate(timeout=120)
    world.children.discard(child)
    return Outcome(child.returncode, err, time.monotonic() - start, child.pid)


def run_ingest(world: World, raw: bytes, kill_after: float | None) -> Outcome:
    child = spawn(world, ["ingest", "-"], subprocess.PIPE)
    if READ_SYSCALL is not None:
        wait_until(child, reading_stdin)
    else:  # no syscall number for this machine: start-up takes ~0.15 s
        time.sleep(0.3)
    assert child.stdin is not None
    child.stdin.write(raw)
    child.stdin.close()
    child.stdin = None  # handed over: communicate() must not flush it again
    return finish(world, child, kill_after)


def run_after_db_open(world: World, args: list[str], kill_after: float | None) -> Outcome:
    child = spawn(world, args, subprocess.DEVNULL)
    wait_until(child, db_open)
    return finish(world, child, kill_after)


def kill_phase(world: World, mails: list[Mail], before: dict[str, int], pid: int) -> str:
    """What the killed attempt had achieved, read from the rows and temporary files it left."""
    new = [r for m in mails for r in world.inbound(m.message_id) if r[0] > before[m.message_id]]
    if any((world.data / "attachments" / "tmp").glob(f"{pid}-*.tmp")):
        return "accepted, writing an attachment"
    if any((world.data / "spool" / "tmp").glob(f"{pid}-*.tmp")):
        return "writing the raw mail to the spool"
    if not new:
        return "before acceptance"
    if len(new) < len(mails):
        return MID_BATCH
    if any(r[1] == "accepted" for r in new):
        return "accepted, not processed"
    if all(r[2] is not None for r in new):
        return "after recording duplicates"
    return "after processing"


def last_ids(world: World, mails: list[Mail]) -> dict[str, int]:
    return {m.message_id: max([r[0] for r in world.inbound(m.message_id)] or [0]) for m in mails}


def deliver(world: World, rng: random.Random, mails: list[Mail], run: Run, what: str) -> None:
    """Retry until an attempt exits 0, as an MTA does; a seeded share is killed part-way."""
    span = world.span(what, sum(len(m.raw) for m in mails))
    for _ in range(MAX_ATTEMPTS):
        delay = rng.uniform(0, span) if rng.random() < KILL_CHANCE else None
        before = last_ids(world, mails)
        result = run(delay)
        killed = result.code == -signal.SIGKILL
        world.stats.count(what, kill_phase(world, mails, before, result.pid) if killed else None)
        if result.code == 0:
            return
        if not killed and result.code != 75:  # 75 = try later: legal; anything else is a bug
            pytest.fail(f"{world.tag()} {what} exit {result.code}: {result.stderr[-800:]!r}")
    pytest.fail(f"{world.tag()} {mails[0].message_id} not accepted in {MAX_ATTEMPTS} tries")


def ingest_one(world: World, lane: Lane, m: Mail) -> None:
    deliver(world, lane.rng, [m], lambda d: run_ingest(world, m.raw, d), "ingest")


def import_batch(world: World, lane: Lane, step: int) -> None:
    batch: list[Mail] = []
    for _ in range(lane.rng.randrange(4, 9)):
        batch.append(next_mail(world, lane))
    form = ("mbox", "folder", "maildir")[step % 3]
    path = write_source(world.root / f"import-{lane.number}-{step}", batch, form)
    args = ["import", "--workers", "2", str(path)]
    deliver(world, lane.rng, batch, lambda d: run_after_db_open(world, args, d), "import")


def run_lane(world: World, lane: Lane) -> None:
    step = 0
    while len(lane.mails) < MAILS_PER_LANE or (
        world.stats.landed() < MIN_KILLS and len(lane.mails) < 3 * MAILS_PER_LANE
    ):
        step += 1
        if step % IMPORT_EVERY == lane.number:
            import_batch(world, lane, step)
        else:
            ingest_one(world, lane, next_mail(world, lane))


def calibrate(world: World, lane: Lane) -> None:
    """Time unkilled runs, so that kill delays spread over a whole run on this machine."""
    small = [timed_ingest(world, make_mail(world, lane, "new", None, size=0)) for _ in range(3)]
    big = make_mail(world, lane, "new", None, size=8 << 20)
    world.small = len(lane.mails[0].raw)
    world.base["ingest"] = statistics.median(small)
    world.per_byte = max(0.0, (timed_ingest(world, big) - world.base["ingest"])) / len(big.raw)
    batch = [make_mail(world, lane, "new", None, size=0) for _ in range(4)]
    path = write_source(world.root / "import-calibration", batch, "mbox")
    result = run_after_db_open(world, ["import", "--workers", "2", str(path)], None)
    assert result.code == 0, f"{world.tag()} calibration import: {result.stderr!r}"
    world.base["import"] = result.seconds


def timed_ingest(world: World, m: Mail) -> float:
    result = run_ingest(world, m.raw, None)
    assert result.code == 0, f"{world.tag()} calibration ingest: {result.stderr!r}"
    return result.seconds


def recover(world: World, rng: random.Random) -> None:
    """`serve` recovers on start: kill a few of those part-way, then recover for good here."""
    for _ in range(SERVE_KILLS):
        waiting = len(world.rows("SELECT id FROM inbound WHERE state = 'accepted'"))
        span = max(0.05, waiting * world.base["ingest"] / 3)
        result = run_after_db_open(world, ["serve"], rng.uniform(0, span))
        assert result.code == -signal.SIGKILL, f"{world.tag()} serve: {result.stderr[-800:]!r}"
        world.stats.count("serve", "serve: while recovering")
    app = build_app(make_settings(world.data))
    try:
        app.pipeline.recover()
    finally:
        app.close()


# --- the checks -----------------------------------------------------------------------------


def check_rows(world: World, mails: list[Mail]) -> list[str]:
    """One original row per mail with a final outcome; every other row a duplicate of it."""
    problems = []
    by_mid = {m.message_id: m for m in mails}
    rows = world.rows("SELECT id, message_id, state, outcome, duplicate_of, reason FROM inbound")
    for rid, mid, state, *_ in rows:
        if state == "accepted":
            problems.append(f"inbound {rid} ({mid}) still accepted after recovery")
        if mid not in by_mid:
            problems.append(f"inbound {rid}: unknown Message-ID {mid!r}")
    for m in mails:
        mine = [r for r in rows if r[1] == m.message_id]
        originals = [r for r in mine if r[4] is None]
        if len(originals) != 1:
            problems.append(f"{m.message_id}: {len(originals)} non-duplicate rows, want 1")
            continue
        first = originals[0]
        if first[3] not in FINAL:
            problems.append(f"{m.message_id}: inbound {first[0]} ended {first[3]}: {first[5]}")
        problems += [
            f"{m.message_id}: inbound {r[0]} is {r[3]}, duplicate_of {r[4]} (want {first[0]})"
            for r in mine
            if r[4] is not None and (r[3] != "duplicate" or r[4] != first[0])
        ]
    return problems


def check_ecrs(world: World, mails: list[Mail]) -> list[str]:
    """New mails made one ECR each, nothing made two, no update was applied twice, and every
    reply updated its parent's ECR: a crash must not let a reply overtake its parent."""
    problems = []
    final = {
        mid: (outcome, ecr_id, rid)
        for rid, mid, outcome, ecr_id in world.rows(
            "SELECT id, message_id, outcome, ecr_id FROM inbound WHERE duplicate_of IS NULL"
        )
    }
    updates = Counter(
        (mid, iid) for mid, iid in world.rows("SELECT message_id, inbound_id FROM updates")
    )
    for m in mails:
        outcome, ecr_id, rid = final.get(m.message_id, (None, None, None))
        if outcome in ("created", "updated") and updates[(m.message_id, rid)] != 1:
            problems.append(f"{m.message_id}: {updates[(m.message_id, rid)]} update rows")
        n = world.rows("SELECT COUNT(*) FROM ecrs WHERE subject = ?", (m.subject,))[0][0]
        if m.kind == "new" and (outcome != "created" or n != 1):
            problems.append(f"{m.message_id}: new mail ended {outcome} with {n} ECRs")
        if m.parent is not None:
            want = final.get(m.parent.message_id, (None, None, None))[1]
            if (outcome, ecr_id) != ("updated", want):
                problems.append(
                    f"{m.message_id}: reply {outcome} on ECR {ecr_id}, want an update of "
                    f"its parent's ECR {want} (did it overtake a parent left waiting?)"
                )
    stray = sum(n for (mid, _), n in updates.items() if mid not in final)
    if stray or sum(updates.values()) != sum(
        1 for o, _, _ in final.values() if o in ("created", "updated")
    ):
        problems.append(f"{sum(updates.values())} update rows do not match the outcomes")
    problems += [
        f"ECR {e} has {n} creation events" for e, n in world.rows(
            "SELECT e.id, COUNT(v.id) FROM ecrs e LEFT JOIN events v ON v.ecr_id = e.id "
            "AND v.kind = 'status' AND v.from_status IS NULL GROUP BY e.id HAVING COUNT(v.id) != 1"
        )
    ]
    created = world.rows("SELECT COUNT(*) FROM inbound WHERE outcome = 'created'")[0][0]
    ecrs = world.rows("SELECT COUNT(*) FROM ecrs")[0][0]
    if created != ecrs:
        problems.append(f"{ecrs} ECRs but {created} inbound rows created one")
    return problems


def check_files(world: World) -> list[str]:
    """No temporary file anywhere; every raw mail and every attachment present and intact."""
    problems = [
        f"temporary file left: {p.relative_to(world.data)}" for p in world.data.rglob("*.tmp")
    ]
    spool = Spool(world.data / "spool")
    for rid, name, size in world.rows("SELECT id, spool_path, size FROM inbound"):
        if not spool.exists(name) or len(spool.read(name)) != size:
            problems.append(f"inbound {rid}: raw mail {name} missing from the spool")
    for (sha,) in world.rows("SELECT DISTINCT sha256 FROM attachments"):
        blob = world.data / "attachments" / sha[:2] / sha[2:4] / sha
        if not blob.is_file() or hashlib.sha256(blob.read_bytes()).hexdigest() != sha:
            problems.append(f"attachment {sha[:12]}… missing or not intact")
    return problems


def orphans(world: World) -> int:
    """Spooled raw mails with no row: killed between the rename and the commit (harmless)."""
    known = {span(s)[0] for (s,) in world.rows("SELECT spool_path FROM inbound")}
    return sum(1 for f in Spool(world.data / "spool").files() if f not in known)


# --- the test -------------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))
    w = World(tmp_path, seed)
    w.data.mkdir()
    (w.data / "secret.key").write_text(TEST_KEY + "\n")
    build_app(make_settings(w.data)).close()  # schema and instance id, as a first start would
    yield w
    for child in list(w.children):  # a failed assertion must not leave children behind
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
@pytest.mark.timeout(300)
def test_kill_9_anywhere_loses_and_duplicates_nothing(world: World) -> None:
    print(world.tag())
    rng = random.Random(world.seed)
    calibration = Lane(LANES, random.Random(f"{world.seed}-calibration"))
    calibrate(world, calibration)
    lanes = [Lane(n, random.Random(f"{world.seed}-{n}")) for n in range(LANES)]
    with ThreadPoolExecutor(LANES) as pool:
        for done in [pool.submit(run_lane, world, lane) for lane in lanes]:
            done.result()
    recover(world, rng)

    mails = [m for lane in lanes for m in lane.mails] + calibration.mails
    problems = check_rows(world, mails)
    problems += check_ecrs(world, mails) + check_files(world)
    summary = f"{world.summary()}; {len(mails)} mails; {orphans(world)} orphan spool files"
    print(summary)
    assert not problems, f"{len(problems)} problems, e.g.\n" + "\n".join(problems[:25]) + (
        f"\n{summary}"
    )
    kills, landed = world.stats.kills, world.stats.landed()
    assert landed >= MIN_KILLS, f"only {landed} kills landed: {summary}"
    for phase in ("before acceptance", "accepted, not processed"):
        assert kills[phase] > 0, f"no kill landed {phase}: {summary}"
    assert kills[MID_BATCH] == 0, f"an import batch was accepted in part: {summary}"
