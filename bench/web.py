"""Web throughput and search latency on a store of 100,000 ECRs.

Figures:
- requests/s for `GET /api/ecrs?status=active` (the first page, 100 ECRs, authenticated),
  beside a route of the same app that returns a constant JSON body, measured in the same run:
  the framework's floor. Target: at least 0.5 x the floor. Repeated, that page is served from
  the per-connection answer cache (gateway/web/fresh.py) while nothing commits; the second
  line cycles through 300 different pages, so every answer is computed: the cost of a page of
  100 ECRs after any change.
- the median time of a search by contact name, `GET /api/ecrs?contact=<surname>`, over the
  same store, one request at a time. Target: at most 50 ms. (Full-text `q=` shown too.)

The server runs in its own process (uvicorn, as `serve` runs it), the client is a small raw
HTTP/1.1 keep-alive client on asyncio, so the client's own cost stays out of the figures. The
store is seeded with SQL (contacts, ECRs, participants; the FTS triggers index them as the
pipeline's inserts would): this measures reads, not ingestion. Run by hand: `make bench`.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.responses import Response

from gateway.config import Settings, load_settings
from gateway.store.db import Database
from gateway.web.server import bind, build_server

N = 100_000
TOKEN = "bench-token-0123456789abcdef"
CONNECTIONS = 8
SECONDS = 5.0
SEARCHES = 200
FIRST = ["Anna", "Ben", "Carla", "David", "Eva", "Frank", "Grace", "Hugo", "Ida", "Jonas"]
SURNAMES = [
    f"{s}{suffix}"
    for s in (
        "Smith",
        "Meyer",
        "Jones",
        "Brown",
        "Novak",
        "Rossi",
        "Dubois",
        "Jansen",
        "Kowalski",
        "Silva",
    )
    for suffix in ("", "son", "er", "ini", "ova", "ström", "ley", "field", "ton", "berg")
]
STATUSES = ["active"] * 40 + ["pending"] * 20 + ["resolved"] * 35 + ["reactivated"] * 5
TYPES = ["General", "LV", "PCS", "Billing", "Network"]


def settings(data: Path) -> Settings:
    env = {
        "ECR_GATEWAY_GATEWAY__DATA_DIR": str(data),
        "ECR_GATEWAY_HTTP__API_TOKENS": json.dumps({"bench": TOKEN}),
    }
    return load_settings(None, env)


def seed(data: Path) -> None:
    """N ECRs, each with its own requester; surnames repeat, so a name matches ~1,000."""
    db = Database(data / "gateway.db")
    rng = random.Random(7)
    now = "2026-11-02T09:00:00Z"
    with db.write():
        for n in range(1, N + 1):
            name = f"{rng.choice(FIRST)} {rng.choice(SURNAMES)}"
            email = f"gp{n}@practice{n % 500}.example"
            db.execute("INSERT INTO contacts (id, email, name) VALUES (?, ?, ?)", [n, email, name])
            db.execute(
                "INSERT INTO ecrs (id, subject, status, problem_type, requester_id, created_at, "
                "updated_at, people) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    n,
                    f"Problem {n} with the label printer",
                    rng.choice(STATUSES),
                    rng.choice(TYPES),
                    n,
                    now,
                    now,
                    f"{name} {email}",
                ],
            )
            db.execute("INSERT INTO participants VALUES (?, ?, 'requester', ?)", [n, n, now])
    db.execute("ANALYZE")
    db.close()


def run_server(data: str, port_out: Any) -> None:
    """The child: our app under uvicorn, plus the constant route the floor is measured on."""
    web = build_server(settings(Path(data)), sock=bind("127.0.0.1", 0))

    async def floor() -> Response:
        return Response(b'{"ok": true}', media_type="application/json")

    web.server.config.app.add_api_route("/bench/floor", floor)
    port_out.put(web.address[1])
    asyncio.run(web.serve())


async def fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return status


def request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()


async def throughput(port: int, *paths: str) -> float:
    """Requests/s over CONNECTIONS keep-alive connections for SECONDS, after a warm-up; each
    connection cycles through `paths`."""
    raws = [request(p) for p in paths]
    counts = [0] * CONNECTIONS

    async def worker(i: int, until: float, counting: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = i
        try:
            while time.perf_counter() < until:
                assert await fetch(reader, writer, raws[n % len(raws)]) == 200, paths
                n += 1
                if counting:
                    counts[i] += 1
        finally:
            writer.close()

    warm = time.perf_counter() + 1.0
    await asyncio.gather(*(worker(i, warm, False) for i in range(CONNECTIONS)))
    start = time.perf_counter()
    await asyncio.gather(*(worker(i, start + SECONDS, True) for i in range(CONNECTIONS)))
    return sum(counts) / (time.perf_counter() - start)


async def latency(port: int, paths: list[str]) -> float:
    """Median ms of one request at a time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    try:
        for path in paths:
            began = time.perf_counter()
            assert await fetch(reader, writer, request(path)) == 200, path
            times.append((time.perf_counter() - began) * 1000)
    finally:
        writer.close()
    return statistics.median(times)


async def measure(port: int) -> dict[str, float]:
    rng = random.Random(11)
    names = [rng.choice(SURNAMES) for _ in range(SEARCHES)]
    return {
        "floor": await throughput(port, "/bench/floor"),
        "list": await throughput(port, "/api/ecrs?status=active"),
        # 300 different pages in turn: more than are kept, so every answer is computed.
        "pages": await throughput(
            port, *(f"/api/ecrs?status=active&offset={n * 100}" for n in range(300))
        ),
        "contact": await latency(port, [f"/api/ecrs?contact={quote(n)}" for n in names]),
        "q": await latency(port, [f"/api/ecrs?q={quote(n)}" for n in names]),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        Database(data / "gateway.db").close()  # migrated before seeding
        began = time.perf_counter()
        seed(data)
        print(f"seeded {N} ECRs in {time.perf_counter() - began:.1f}s", flush=True)
        context = multiprocessing.get_context("spawn")
        ports = context.SimpleQueue()
        server = context.Process(target=run_server, args=(str(data), ports), daemon=True)
        server.start()
        try:
            port = int(ports.get())
            time.sleep(0.5)
            got = asyncio.run(measure(port))
        finally:
            server.terminate()
            server.join(10)
    floor, listed = got["floor"], got["list"]
    print(f"{'benchmark':<50}{'figure':>10}{'floor':>10}{'ratio':>8}{'target':>10}")
    print(
        f"{'web: GET /api/ecrs?status=active (100k), req/s':<50}{listed:>10.0f}{floor:>10.0f}"
        f"{listed / floor:>8.2f}{'>=0.50':>10}"
    )
    print(
        f"{'  the same, every page computed (no reuse), req/s':<50}{got['pages']:>10.0f}"
        f"{floor:>10.0f}{got['pages'] / floor:>8.2f}"
    )
    print(
        f"{'web: search by contact name (100k), p50 ms':<50}{got['contact']:>10.2f}"
        f"{'':>18}{'<=50':>10}"
    )
    print(f"{'web: full-text search q= (100k), p50 ms':<50}{got['q']:>10.2f}")


if __name__ == "__main__":
    main()
