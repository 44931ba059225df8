"""The `ecr-gateway` command: thin click commands over the app; errors are one line."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from gateway.app import App, build_app
from gateway.config import ConfigError, load_settings
from gateway.inbound import files
from gateway.model import Envelope, Status
from gateway.notify.render import TemplateProblem
from gateway.staff import StaffError
from gateway.store.db import NotDurable

EX_USAGE = 64  # sysexits.h: the MTA-facing exit codes of `ingest`
EX_TEMPFAIL = 75

log = logging.getLogger("gateway")


class Failure(click.ClickException):
    """A clear one-line error with its own exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]


@contextmanager
def opened(ctx: click.Context) -> Iterator[App]:
    try:
        settings = load_settings(ctx.obj["config"], os.environ)
    except ConfigError as exc:
        raise Failure(f"configuration: {exc}", ctx.obj.get("config_error_code", 78)) from None
    app = build_app(settings, environ=os.environ)
    try:
        yield app
    finally:
        app.close()


def emit(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    envvar="ECR_GATEWAY_CONFIG",
    help="TOML config file (default: embedded defaults).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every mail's outcome to stderr.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """Email gateway for ECR incidents.

    \b
    Example:
      ecr-gateway --config gateway.toml ecr list --status active
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = {"config": config}


@cli.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the gateway: SMTP, IMAP and HTTP listeners, spool processor and outbox sender.

    Runs until SIGTERM or SIGINT, then stops the listeners first and finishes what they
    accepted.

    Every template is rendered once first: a broken override stops it with one line.

    \b
    Example:
      ecr-gateway serve
      ECR_GATEWAY_SMTP__PORT=2626 ecr-gateway serve
    """
    logging.getLogger().setLevel(logging.INFO)
    try:
        settings = load_settings(ctx.obj["config"], os.environ)
    except ConfigError as exc:
        raise Failure(f"configuration: {exc}", 78) from None
    # Imported here: the listeners' libraries (uvicorn, FastAPI, imapclient) would add a
    # quarter of a second to every `ingest` an MTA starts, one per mail.
    from gateway import service

    try:
        service.run(settings, os.environ)
    except ConfigError as exc:  # an IMAP mailbox table, an API token file
        raise Failure(f"configuration: {exc}", 78) from None
    except (TemplateProblem, service.ServiceError) as exc:
        raise Failure(str(exc), 78) from None
    except sqlite3.OperationalError as exc:  # e.g. another process held the write lock
        raise Failure(f"cannot start: the database: {exc}", 71) from None
    except OSError as exc:  # e.g. the SMTP port is taken, the spool not writable
        raise Failure(f"cannot start: {exc}", 71) from None


@cli.command()
@click.argument("file", default="-", type=click.Path(allow_dash=True, dir_okay=False))
@click.option("--sender", default="", help="Envelope sender (MAIL FROM), e.g. from the MTA.")
@click.option("--recipient", "recipients", multiple=True, help="Envelope recipient; repeatable.")
@click.pass_context
def ingest(ctx: click.Context, file: str, sender: str, recipients: tuple[str, ...]) -> None:
    """Accept one raw mail and process it; prints one JSON line.

    Exit 0 once the mail is accepted (whatever its outcome), 75 when it could not be
    accepted (the MTA should retry), 64 for usage errors.

    \b
    Example:
      ecr-gateway ingest --recipient support@example.org message.eml
      cat message.eml | ecr-gateway ingest -
    """
    ctx.obj["config_error_code"] = EX_TEMPFAIL
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise Failure(f"cannot read {file}: {exc.strerror}", EX_USAGE) from None
    with opened(ctx) as app:
        envelope = Envelope(raw, "ingest", sender, recipients)
        try:
            accepted = app.pipeline.accept(envelope)
        except Exception as exc:
            raise not_accepted(exc) from None
        try:
            result = app.pipeline.finish(accepted, raw)
        except NotDurable as exc:  # the acceptance's flush, made while processing, failed
            raise not_accepted(exc) from None
        emit(result.as_json())


def not_accepted(exc: Exception) -> Failure:
    return Failure(f"not accepted, try later: {type(exc).__name__}: {exc}", EX_TEMPFAIL)


@cli.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--workers", type=int, default=None, help="Parsing processes (default: one per core)."
)
@click.pass_context
def import_(ctx: click.Context, path: Path, workers: int | None) -> None:
    """Import an mbox, a maildir or a folder of .eml files, with a progress bar and a summary.

    \b
    Example:
      ecr-gateway import old-support.mbox
    """
    with opened(ctx) as app:
        try:
            total = files.count(path)
        except files.SourceError as exc:
            raise Failure(str(exc), EX_USAGE) from None
        with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
            outcomes = files.run_import(app.pipeline, path, bar.update, workers=workers)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())) or "nothing"
        click.echo(f"{sum(outcomes.values())} mails: {summary}")


@cli.group()
def ecr() -> None:
    """List, show, search and re-status ECRs."""


@ecr.command("list")
@click.option("--status", type=click.Choice([s.value for s in Status]))
@click.option("--contact", help="Part of a contact's name or address.")
@click.option("--problem-type", help="Problem type, e.g. LV.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def ecr_list(
    ctx: click.Context,
    status: str | None,
    contact: str | None,
    problem_type: str | None,
    as_json: bool,
) -> None:
    """List ECRs.

    \b
    Example:
      ecr-gateway ecr list --status pending --json
    """
    with opened(ctx) as app:
        _print_ecrs(app.queries.listing(status, contact, problem_type, limit=1_000_000), as_json)


@ecr.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON object.")
@click.pass_context
def ecr_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show one ECR with its updates and events.

    \b
    Example:
      ecr-gateway ecr show ECR-000123 --json
    """
    with opened(ctx) as app:
        data = app.queries.ecr(_ecr_id(app, ref))
        if as_json:
            emit(data)
            return
        assert data is not None
        _print_ecrs([data], False)
        for u in data["updates"]:
            flag = " (automatic)" if u["automatic"] else ""
            click.echo(f"\n--- {u['created_at']} {u['author'] or '?'}{flag}\n{u['text']}")
            for a in u["attachments"]:
                click.echo(f"    [{a['filename']}, {a['content_type']}, {a['size']} bytes]")
        click.echo("")
        for e in data["events"]:
            change = f"{e['from'] or '-'} -> {e['to']}" if e["to"] else e["kind"]
            click.echo(f"{e['at']} {change} by {e['by']}: {e['note']}")


@ecr.command("search")
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def ecr_search(ctx: click.Context, text: str, as_json: bool) -> None:
    """Search reference, contact name/address, problem type, subject and text.

    \b
    Example:
      ecr-gateway ecr search "printer offline"
    """
    with opened(ctx) as app:
        _print_ecrs(app.queries.search(text), as_json)


@ecr.command("set-status")
@click.argument("ref")
@click.argument("status", type=click.Choice(["active", "pending", "resolved"]))
@click.option("--note", default="", help="Required for pending (what is needed) and resolved.")
@click.pass_context
def ecr_set_status(ctx: click.Context, ref: str, status: str, note: str) -> None:
    """Move an ECR to active, pending or resolved; recorded as an event by staff:cli.

    \b
    Example:
      ecr-gateway ecr set-status ECR-000123 pending --note "Please send the error log"
    """
    with opened(ctx) as app:
        ecr_id = _ecr_id(app, ref)
        try:
            queued = app.staff.set_status(ecr_id, Status(status), note, "staff:cli")
        except StaffError as exc:
            raise Failure(str(exc), EX_USAGE) from None
        click.echo(f"{app.queries.ref(ecr_id)} is {status}; {queued} notification(s) queued")


@cli.group()
def outbox() -> None:
    """Notification mails: list them, nudge one to be sent now."""


@outbox.command("list")
@click.option("--state", type=click.Choice(["queued", "sent", "failed", "bounced"]))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def outbox_list(ctx: click.Context, state: str | None, as_json: bool) -> None:
    """List notification mails, newest first.

    \b
    Example:
      ecr-gateway outbox list --state queued
    """
    with opened(ctx) as app:
        rows = app.outbox.listing(state)
        if as_json:
            emit(rows)
            return
        for r in rows:
            click.echo(
                f"{r['id']}\t{r['state']}\t{r['template']}\t{r['recipient']}\t"
                f"attempts {r['attempts']}\t{r['last_error'] or ''}"
            )


@outbox.command("retry")
@click.argument("outbox_id", type=int)
@click.pass_context
def outbox_retry(ctx: click.Context, outbox_id: int) -> None:
    """Send a queued or failed notification at the next turn of the sender.

    \b
    Example:
      ecr-gateway outbox retry 12
    """
    with opened(ctx) as app:
        if not app.outbox.retry_now(outbox_id, app.clock()):
            raise Failure(f"no queued or failed notification {outbox_id}")
        click.echo(f"notification {outbox_id} will be sent at the next turn")


@cli.group()
def contact() -> None:
    """Contacts: clear an undeliverable mark."""


@contact.command("clear-bounce")
@click.argument("address")
@click.pass_context
def contact_clear_bounce(ctx: click.Context, address: str) -> None:
    """Send notifications to ADDRESS again after its mails bounced.

    \b
    Example:
      ecr-gateway contact clear-bounce gp@practice.example
    """
    with opened(ctx) as app:
        if not app.outbox.clear_bounce(address):
            raise Failure(f"{address} is not marked undeliverable")
        click.echo(f"{address} will receive notifications again")


@cli.command()
@click.argument("ident")
@click.option("--json", "as_json", is_flag=True, help="Print the inbound row as JSON.")
@click.pass_context
def why(ctx: click.Context, ident: str, as_json: bool) -> None:
    """What became of an inbound mail, and why (inbound id or Message-ID).

    \b
    Example:
      ecr-gateway why 42
      ecr-gateway why '<CAF1234@mail.example>'
    """
    with opened(ctx) as app:
        row = _inbound(app, ident)
        if as_json:
            emit(row)
            return
        click.echo(_explain(row))


@cli.group()
def quarantine() -> None:
    """Mails that could not be processed: list, show, replay."""


@quarantine.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def quarantine_list(ctx: click.Context, as_json: bool) -> None:
    """List quarantined mails.

    \b
    Example:
      ecr-gateway quarantine list
    """
    with opened(ctx) as app:
        rows = app.queries.quarantined()
        if as_json:
            emit(rows)
            return
        for r in rows:
            click.echo(
                f"{r['inbound_id']}\t{r['received_at']}\t{r['sender'] or r['mail_from'] or '?'}"
                f"\t{r['reason']}"
            )


@quarantine.command("show")
@click.argument("ident")
@click.pass_context
def quarantine_show(ctx: click.Context, ident: str) -> None:
    """Show why a mail was quarantined (the raw mail stays in the spool).

    \b
    Example:
      ecr-gateway quarantine show 42
    """
    with opened(ctx) as app:
        row = _inbound(app, ident)
        click.echo(_explain(row))


@quarantine.command("replay")
@click.argument("ident", required=False)
@click.option("--all", "replay_all", is_flag=True, help="Replay every quarantined mail.")
@click.pass_context
def quarantine_replay(ctx: click.Context, ident: str | None, replay_all: bool) -> None:
    """Run a quarantined mail (or all of them) through the pipeline again.

    \b
    Example:
      ecr-gateway quarantine replay 42
      ecr-gateway quarantine replay --all
    """
    if bool(ident) == replay_all:
        raise Failure("give one ID or --all", EX_USAGE)
    with opened(ctx) as app:
        ids = (
            [r["inbound_id"] for r in app.queries.quarantined()]
            if replay_all
            else [_inbound(app, str(ident))["inbound_id"]]
        )
        for inbound_id in ids:
            if not app.records.release(inbound_id):
                raise Failure(f"inbound {inbound_id} is not quarantined")
            emit(app.pipeline.process(inbound_id).as_json())


@cli.command()
@click.option("--since", help="First day, e.g. 2026-10-01 (default: 30 days before --until).")
@click.option("--until", help="Day after the last, exclusive (default: now).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    help="Output format.",
)
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw ECRs created over time by problem type into this PNG file.",
)
@click.pass_context
def report(
    ctx: click.Context, since: str | None, until: str | None, fmt: str, chart: Path | None
) -> None:
    """ECRs created in a period: by problem type and status, median time to first response
    and to resolution, reactivation rate, average score and score count.

    \b
    Example:
      ecr-gateway report --since 2026-10-01 --until 2026-11-01
      ecr-gateway report --format csv > october.csv
      ecr-gateway report --since 2026-01-01 --chart types.png
    """
    from gateway import reports
    from gateway.store.reports import facts

    with opened(ctx) as app:
        try:
            start, end = reports.period(since, until, app.clock())
        except ValueError as exc:
            raise Failure(str(exc), EX_USAGE) from None
        found = facts(app.db, start, end)
    result = reports.compute(found, start, end)
    if fmt == "json":
        emit(reports.as_json(result))
    else:
        click.echo(reports.as_csv(result) if fmt == "csv" else reports.as_table(result), nl=False)
    if chart:
        title = f"ECRs created by problem type, {start:%Y-%m-%d} to {end:%Y-%m-%d}"
        _draw(reports.timeline(found, start, end), chart, title)


def _draw(timeline: Any, path: Path, title: str) -> None:
    from gateway import chart  # matplotlib takes a while to import: only when asked

    try:
        chart.draw(timeline, path, title)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"chart written to {path}", err=True)


def _ecr_id(app: App, ref: str) -> int:
    ecr_id = app.queries.ecr_id(ref)
    if ecr_id is None:
        raise Failure(f"no ECR {ref}")
    return ecr_id


def _inbound(app: App, ident: str) -> dict[str, Any]:
    inbound_id = app.queries.inbound_id(ident)
    row = app.queries.inbound(inbound_id) if inbound_id is not None else None
    if row is None:
        raise Failure(f"no inbound mail {ident}")
    return row


def _print_ecrs(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        emit(rows)
        return
    for r in rows:
        who = (r["requester"] or {}).get("email", "?")
        click.echo(f"{r['ref']}\t{r['status']}\t{r['problem_type']}\t{who}\t{r['subject']}")


def _explain(row: dict[str, Any]) -> str:
    lines = [
        f"inbound {row['inbound_id']}: {row['outcome'] or row['state']}"
        + (f" {row['ref']}" if row["ref"] else "")
        + (f" via {row['rung']}" if row["rung"] else ""),
        f"  reason: {row['reason'] or '-'}",
        f"  from {row['sender'] or row['mail_from'] or '?'} via {row['source']}"
        f" at {row['received_at']}",
        f"  message-id: {row['message_id'] or '(none)'}",
    ]
    if row["classification"]:
        lines.append(
            f"  classified {row['classification']['kind']}: {row['classification']['reason']}"
        )
    lines += [f"  match: {step}" for step in row["trace"]]
    if row["duplicate_of"]:
        lines.append(f"  duplicate of inbound {row['duplicate_of']}")
    if row["error"]:
        lines.append(
            f"  failed at {row['failed_step']} after {row['attempts']} attempts: {row['error']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> NoReturn:
    sys.exit(run(argv))


def run(argv: list[str] | None = None, entry: click.Group = cli) -> int:
    """Map every error to one line on stderr and an exit code; never a traceback."""
    try:
        entry.main(args=argv, prog_name="ecr-gateway", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        click.echo(f"ecr-gateway: {exc.format_message()}", err=True)
        return EX_USAGE
    except click.ClickException as exc:
        click.echo(f"ecr-gateway: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.Abort:
        return 130
    except Exception as exc:  # a bug: still one line, and the MTA-safe code for ingest
        click.echo(f"ecr-gateway: internal error: {type(exc).__name__}: {exc}", err=True)
        return EX_TEMPFAIL if "ingest" in (argv if argv is not None else sys.argv) else 1
    return 0
