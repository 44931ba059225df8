"""Settings: every key declared once, with its default and help, and loaded once at start-up.

Sources, later wins: the embedded defaults, one TOML file, `ECR_GATEWAY_<SECTION>__<KEY>`
environment variables. Nothing else in the project reads the environment.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.mail.reply import known_languages

ENV_PREFIX = "ECR_GATEWAY_"
CONFIG_ENV = "ECR_GATEWAY_CONFIG"


class ConfigError(Exception):
    """A bad setting: the message names the key and says what is wrong."""


def setting(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        factory = type(default)
        return field(default_factory=lambda: factory(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


DEFAULT_THANKS = [
    "thanks",
    "thank you",
    "many thanks",
    "thanks a lot",
    "thank you very much",
    "thank you so much",
    "thanks so much",
    "cheers",
    "ta",
    "much appreciated",
    "great thanks",
    "perfect thanks",
]


@dataclass(frozen=True)
class GatewaySettings:
    domain: str = setting(
        "localhost", "our mail domain: support address, Message-IDs, reply addresses"
    )
    support_address: str = setting(
        "", "where practices write; the From of our mails (default support@<domain>)"
    )
    extra_addresses: list[str] = setting([], "more addresses we receive for, e.g. lv@...")
    problem_types: dict[str, str] = setting({}, "recipient address -> problem type")
    base_url: str = setting("http://127.0.0.1:8080", "start of score links")
    data_dir: str = setting("./data", "spool, database, attachments, sent/")
    instance_id: str = setting(
        "", "value of our X-ECR-Loop header (default: generated once, stored in the data dir)"
    )
    reopen_window_days: int = setting(14, "replies to resolved ECRs reactivate within this window")
    thanks_phrases: list[str] = setting(
        DEFAULT_THANKS, "replies consisting only of these do not reactivate"
    )
    staff_alert_address: str = setting("", "receives staff_update mails (unset: none)")
    ref_prefix: str = setting("ECR-", "prefix of ECR references")
    ref_width: int = setting(6, "zero-padded width of the number in a reference")
    reply_token_days: int = setting(365, "how long a signed reply address stays valid")
    max_attempts: int = setting(3, "processing attempts before a mail is quarantined")
    team_name: str = setting("Support", "how our mails sign off")
    reply_languages: list[str] = setting(
        ["en", "de", "fr", "nl"], "languages of the reply headers quote stripping knows"
    )


@dataclass(frozen=True)
class SmtpSettings:
    enabled: bool = setting(True, "run the SMTP receiver in serve")
    host: str = setting("127.0.0.1", "where the SMTP receiver listens")
    port: int = setting(2525, "SMTP port")
    max_message_size: int = setting(
        52428800, "bytes; advertised as SIZE; also the largest mail any transport accepts"
    )
    max_recipients: int = setting(100, "recipients per message")
    max_connections_per_peer: int = setting(20, "concurrent connections from one address")
    idle_timeout: int = setting(60, "seconds a client may stay silent")
    session_timeout: int = setting(600, "seconds one SMTP session may last")
    tls_cert: str = setting("", "certificate file; with tls_key enables STARTTLS")
    tls_key: str = setting("", "private key file for STARTTLS")


@dataclass(frozen=True)
class ImapSettings:
    mailboxes: list[dict[str, Any]] = setting([], "[[imap.mailboxes]] tables; see the README")


@dataclass(frozen=True)
class OutboundSettings:
    relay_host: str = setting("", "SMTP relay for our mails (unset: write them to data/sent/)")
    relay_port: int = setting(25, "relay port")
    security: str = setting("starttls", "tls / starttls / none")
    username: str = setting("", "relay login")
    password_env: str = setting("", "environment variable holding the relay password")
    bounce_address: str = setting("", "envelope sender of our mails (default bounces@<domain>)")
    ack_limit_per_hour: int = setting(5, "acknowledgements per sender address per hour")
    retry_hours: int = setting(72, "give up on 4xx after this")
    relay_timeout: int = setting(30, "seconds to wait for the relay to connect or answer")


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = setting(True, "run the web part in serve")
    host: str = setting("127.0.0.1", "where the web part listens")
    port: int = setting(8080, "HTTP port")
    api_tokens: dict[str, str] = setting({}, "name -> API bearer token")
    api_tokens_file: str = setting("", "a TOML file of name = token lines")
    score_posts_per_minute: int = setting(10, "score submissions one client address may make")
    health_outbox_max_age: int = setting(
        3600, "seconds a notification may wait unsent before /healthz reports 503"
    )
    forwarded_allow_ips: str = setting(
        "127.0.0.1", "proxies whose X-Forwarded-For names the client (comma-separated)"
    )


@dataclass(frozen=True)
class LimitsSettings:
    max_attachment_size: int = setting(26214400, "bytes per attachment")
    max_mime_depth: int = setting(50, "deepest MIME nesting parsed")
    max_parts: int = setting(1000, "most MIME parts in one mail")
    max_header_size: int = setting(1048576, "bytes of header block")
    parse_timeout: int = setting(30, "seconds one mail may take to parse")


@dataclass(frozen=True)
class TemplatesSettings:
    folder: str = setting("", "a folder whose files override ours, file by file")


@dataclass(frozen=True)
class Settings:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    imap: ImapSettings = field(default_factory=ImapSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    templates: TemplatesSettings = field(default_factory=TemplatesSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.gateway.data_dir)

    @property
    def support_address(self) -> str:
        return (self.gateway.support_address or f"support@{self.gateway.domain}").lower()

    @property
    def bounce_address(self) -> str:
        return (self.outbound.bounce_address or f"bounces@{self.gateway.domain}").lower()

    @property
    def own_addresses(self) -> frozenset[str]:
        """Every address we receive for or send from: never a participant, never notified."""
        extra = [a.lower() for a in self.gateway.extra_addresses]
        return frozenset([self.support_address, self.bounce_address, *extra])


def declared() -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every (section, field) pair: the single declaration the README and the loader share."""
    out = []
    for section in dataclasses.fields(Settings):
        for f in dataclasses.fields(_section_class(section)):
            out.append((section.name, f))
    return out


def _section_class(section: dataclasses.Field[Any]) -> type:
    return section.type if isinstance(section.type, type) else SECTIONS[section.name]


def load_settings(path: str | Path | None, environ: Mapping[str, str]) -> Settings:
    """Defaults, then the TOML file, then the environment; raises ConfigError naming the key."""
    raw: dict[str, dict[str, Any]] = {}
    path = path or environ.get(CONFIG_ENV) or None
    if path:
        raw = _read_toml(Path(path))
    _apply_environment(raw, environ)
    return _build(raw)


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for section, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a [{section}] table")
    return data


def _apply_environment(raw: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> None:
    types = {f"{s}.{f.name}": f for s, f in declared()}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == CONFIG_ENV:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        dotted = f"{section}.{key}"
        if dotted not in types:
            raise ConfigError(f"{name}: no setting {dotted}")
        raw.setdefault(section, {})[key] = _from_env_text(dotted, types[dotted], value)


def _from_env_text(dotted: str, f: dataclasses.Field[Any], text: str) -> Any:
    kind = _kind(f)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{dotted}: expected true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{dotted}: expected a whole number, got {text!r}") from None
    if kind in (list, dict):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if kind is list:
                return [part.strip() for part in text.split(",") if part.strip()]
            raise ConfigError(f"{dotted}: expected a JSON object") from None
    return text


def _kind(f: dataclasses.Field[Any]) -> type:
    if f.default is not dataclasses.MISSING:
        return type(f.default)
    factory: Any = f.default_factory
    return type(factory())


def _build(raw: dict[str, dict[str, Any]]) -> Settings:
    sections = {s.name: s for s in dataclasses.fields(Settings)}
    built: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"[{name}]: no such section")
        cls = _section_class(sections[name])
        built[name] = cls(**_checked(name, cls, values))
    settings = Settings(**built)
    _validate(settings)
    return settings


def _checked(section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{section}.{key}: no such setting")
        kind = _kind(fields[key])
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise ConfigError(
                f"{section}.{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
            )
        if not _items_fit(value, hints[key]):
            raise ConfigError(f"{section}.{key}: expected {_hint_name(hints[key])}, got {value!r}")
        out[key] = value
    return out


def _items_fit(value: Any, hint: Any) -> bool:
    """The items of a list or table setting have their declared type too: `[1, 2]` as
    thanks_phrases would otherwise pass here and fail on the first mail that reads it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return all(isinstance(v, _plain(args[0])) for v in value)
    if origin is dict:
        return all(
            isinstance(k, _plain(args[0])) and isinstance(v, _plain(args[1]))
            for k, v in value.items()
        )
    return True


def _plain(hint: Any) -> type:
    return object if hint is Any else (typing.get_origin(hint) or hint)


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def _validate(s: Settings) -> None:
    checks = [
        ("smtp.port", 0 <= s.smtp.port <= 65535, "must be a port number"),
        ("http.port", 0 <= s.http.port <= 65535, "must be a port number"),
        ("http.score_posts_per_minute", s.http.score_posts_per_minute > 0, "must be positive"),
        ("http.health_outbox_max_age", s.http.health_outbox_max_age > 0, "must be positive"),
        ("gateway.reopen_window_days", s.gateway.reopen_window_days >= 0, "must not be negative"),
        ("gateway.ref_width", 1 <= s.gateway.ref_width <= 12, "must be 1 to 12"),
        ("gateway.max_attempts", s.gateway.max_attempts >= 1, "must be at least 1"),
        ("smtp.max_message_size", s.smtp.max_message_size > 0, "must be positive"),
        ("smtp.max_recipients", s.smtp.max_recipients > 0, "must be positive"),
        ("smtp.max_connections_per_peer", s.smtp.max_connections_per_peer > 0, "must be positive"),
        ("smtp.idle_timeout", s.smtp.idle_timeout > 0, "must be positive"),
        ("smtp.session_timeout", s.smtp.session_timeout > 0, "must be positive"),
        # A size or time bound of 0 or less would quarantine every mail.
        ("limits.max_parts", s.limits.max_parts > 0, "must be positive"),
        ("limits.max_mime_depth", s.limits.max_mime_depth > 0, "must be positive"),
        ("limits.max_attachment_size", s.limits.max_attachment_size > 0, "must be positive"),
        ("limits.max_header_size", s.limits.max_header_size > 0, "must be positive"),
        ("limits.parse_timeout", s.limits.parse_timeout > 0, "must be positive"),
        ("gateway.reply_token_days", s.gateway.reply_token_days >= 1, "must be at least 1"),
        # Without letters, every number in a subject would read as a reference.
        ("gateway.ref_prefix", s.gateway.ref_prefix[:1].isalpha(), "must start with a letter"),
        ("outbound.ack_limit_per_hour", s.outbound.ack_limit_per_hour >= 0, "must not be negative"),
        ("outbound.retry_hours", s.outbound.retry_hours >= 0, "must not be negative"),
        ("outbound.relay_timeout", s.outbound.relay_timeout > 0, "must be positive"),
        (
            "gateway.reply_languages",
            set(s.gateway.reply_languages) <= known_languages(),
            f"must be some of {', '.join(sorted(known_languages()))}",
        ),
        (
            "outbound.security",
            s.outbound.security in ("tls", "starttls", "none"),
            "must be tls, starttls or none",
        ),
        (
            "gateway.domain",
            "@" not in s.gateway.domain and s.gateway.domain != "",
            "must be a bare domain",
        ),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}")
    for address, kind in s.gateway.problem_types.items():
        if not isinstance(kind, str) or "@" not in address:
            raise ConfigError(f"gateway.problem_types: {address!r} must map an address to a name")


SECTIONS: dict[str, type] = {
    "gateway": GatewaySettings,
    "smtp": SmtpSettings,
    "imap": ImapSettings,
    "outbound": OutboundSettings,
    "http": HttpSettings,
    "limits": LimitsSettings,
    "templates": TemplatesSettings,
}
