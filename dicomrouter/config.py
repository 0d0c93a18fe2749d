"""YAML configuration -> frozen, typed config objects.

Every problem is reported with the file, the key path (``servers[2].port``) and a fix.
Loading never raises anything but :class:`ConfigError`; an unknown key is an error (a typo such as
``acept_unknown_callers`` would otherwise silently keep the default), reported with a "did you mean".
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from dicomrouter.config_location import CONFIG_ENV_VAR, DEFAULT_CONFIG_NAME
from dicomrouter.dul.ae_title import ae_title_problem

ENVIRONMENTS = ("test", "prod")
ROLES = ("test_read", "test_write", "prod_read", "prod_write", "admin")
OPERATIONS = ("echo", "find", "store", "move")
# How the router takes instances from a server: C-GET, C-MOVE to itself, or C-GET falling back to
# C-MOVE when the server refuses C-GET (remembered per server: retrieve/move_to_self.py).
RETRIEVE_MODES = ("auto", "get", "move")
DUPLICATE_POLICIES = ("overwrite", "reject")


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    fix: str = ""

    def render(self) -> str:
        text = f"  {self.key or '(top level)'}: {self.message}"
        if self.fix:
            text += f"\n      fix: {self.fix}"
        return text


class ConfigError(Exception):
    """A configuration file that cannot be used, with every problem found."""

    def __init__(self, path: Path | str, problems: Sequence[Problem]):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"invalid configuration in {self.path}:"]
        lines += [p.render() for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class CallingAETitles:
    """How the router introduces itself to one server, per operation."""

    echo: str | None = None
    find: str | None = None
    store: str | None = None
    move: str | None = None


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP port (metrics, health, admin API, status page, DICOMweb); absent: no HTTP listener."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls: TLSConfig | None = None
    health_interval_s: float = 30.0  # C-ECHO each destination the forwarder has not talked to lately
    # Web origins (scheme://host[:port], or "*") whose pages may call /dicom-web (CORS): a viewer
    # served from another origin than the router's HTTP port.
    cors_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogSettings:
    """`serve`'s log; the command line's --log-level/--log-format win over these."""

    level: str = "info"
    format: str | None = None  # console | json; None: console on a terminal, json otherwise


@dataclass(frozen=True)
class ServerConfig:
    name: str
    ae_title: str
    host: str
    port: int
    environment: str
    active: bool
    primary: bool
    deleted: bool
    comments: str
    web_url: str | None
    calling_ae: CallingAETitles
    move_routing: Mapping[str, str]
    worklist: bool = False
    tls: TLSConfig | None = None
    # A commitment request counts an instance on this server only once the server itself committed it.
    storage_commitment: bool = False
    retrieve: str = "auto"  # one of RETRIEVE_MODES

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def usable(self) -> bool:
        """Active and not deleted: may receive stores and queries."""
        return self.active and not self.deleted


@dataclass(frozen=True)
class ClientConfig:
    ae_title: str
    host: str | None
    port: int | None
    roles: frozenset[str]
    query_servers: tuple[str, ...] | None = None
    move_destinations: tuple[str, ...] | None = None
    http_token_sha256: str | None = None  # sha256 (hex) of its HTTP token; the token is never stored


@dataclass(frozen=True)
class RouteConfig:
    name: str
    match: Mapping[str, tuple[str, ...]]
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class ForwardingConfig:
    """Store-and-forward timings. Defaults deliver within a minute of a PACS coming back."""

    workers_per_destination: int = 4
    retry_initial_s: float = 3.0
    retry_max_s: float = 30.0
    retry_multiplier: float = 2.0
    retry_jitter: float = 0.2
    max_attempts: int = 1000
    lease_s: float = 120.0
    poll_interval_s: float = 1.0
    keep_done_s: float = 7 * 86400.0  # finished jobs are pruned from the catalog after this long


@dataclass(frozen=True)
class StorageCommitmentSettings:
    """Storage commitment (N-ACTION / N-EVENT-REPORT) timings."""

    max_wait_s: float = 3600.0  # an instance still undelivered after this long is reported failed
    poll_interval_s: float = 1.0  # how often pending requests are looked at
    report_retry_initial_s: float = 5.0  # a client not listening for its report: first retry after this
    report_retry_max_s: float = 300.0


@dataclass(frozen=True)
class AuditSettings:
    """How long the audit trail keeps its rows (serve prunes older ones in the background)."""

    keep_days: float = 365.0
    # Repeated rejections of one address for one reason: one summary line and row per interval.
    rejection_summary_interval_s: float = 60.0


MAX_WORKERS = 64  # worker processes of one router (the shared association table has a slot per worker)


@dataclass(frozen=True)
class RouterSettings:
    ae_title: str = "DICOMROUTER"
    host: str = "0.0.0.0"
    port: int = 11112
    catalog: str = "sqlite:///var/catalog.db"
    spool: Path = Path("var/spool")
    accept_unknown_callers: bool = False
    unknown_caller_roles: frozenset[str] = frozenset({"test_read", "test_write"})
    duplicate_policy: str = "overwrite"
    # Worker processes of `serve`, each a full router on the one port; None: one per CPU.
    workers: int | None = None
    max_associations: int = 64
    max_pending_per_address: int = 4  # connections from one address still waiting for their A-ASSOCIATE-RQ
    max_pdu_size: int = 262144
    max_dataset_size: int = 2 * 1024**3  # one received data set; beyond it the association is aborted
    max_in_memory_dataset: int = 16 * 1024**2  # larger data sets go to the spool while they arrive
    acse_timeout_s: float = 10.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    echo_timeout_s: float = 3.0
    find_timeout_s: float = 5.0
    # An association with a PACS stays open this long after a complete C-FIND, for the next one (0: never)
    find_keepalive_s: float = 10.0
    max_find_results: int = 10000
    # Storage SOP classes the router accepts: "all", "standard" (those pynetdicom lists), or these UIDs
    storage_classes: str | frozenset[str] = "all"
    forwarding: ForwardingConfig = field(default_factory=ForwardingConfig)
    storage_commitment: StorageCommitmentSettings = field(default_factory=StorageCommitmentSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    tls: TLSConfig | None = None
    http: HttpSettings | None = None
    log: LogSettings = field(default_factory=LogSettings)


@dataclass(frozen=True)
class Config:
    path: Path
    router: RouterSettings
    servers: tuple[ServerConfig, ...]
    clients: tuple[ClientConfig, ...]
    routes: tuple[RouteConfig, ...]

    @property
    def primary(self) -> ServerConfig:
        return next(s for s in self.servers if s.primary and not s.deleted)

    def live_servers(self) -> list[ServerConfig]:
        """Servers that are not soft-deleted, in file order."""
        return [s for s in self.servers if not s.deleted]

    def usable_servers(self) -> list[ServerConfig]:
        return [s for s in self.servers if s.usable]

    def server(self, name: str) -> ServerConfig | None:
        return next((s for s in self.servers if s.name == name), None)

    def server_by_ae(self, ae_title: str) -> ServerConfig | None:
        return next(
            (s for s in self.servers if s.ae_title == ae_title and not s.deleted), None
        )

    def server_by_name_or_ae(self, text: str) -> ServerConfig | None:
        """The server named `text`, else the one whose AE title it is (deleted ones too)."""
        return self.server(text) or next((s for s in self.servers if s.ae_title == text), None)

    def unknown_server(self, text: str) -> str:
        """Why `text` names no server, with the closest name or AE title."""
        known = {s.name for s in self.servers} | {s.ae_title for s in self.servers}
        return f"no server named {text!r}, nor with that AE title; {suggest(text, known)}"

    def client(self, ae_title: str) -> ClientConfig | None:
        return next((c for c in self.clients if c.ae_title == ae_title), None)


# --------------------------------------------------------------------------- loading


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV_VAR, DEFAULT_CONFIG_NAME))


def yaml_round_trip() -> YAML:
    """The YAML engine for files admins edit: keeps comments, blank lines and key order."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml


def read_document(path: Path) -> Any:
    """Parse the YAML file (round-trip mode) or raise ConfigError naming the position."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            path,
            [
                Problem(
                    "",
                    "file not found",
                    f"pass --config FILE, set {CONFIG_ENV_VAR}, or copy config/dicomrouter.example.yaml",
                )
            ],
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [Problem("", f"cannot read the file: {exc}")]) from None
    try:
        document = yaml_round_trip().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(
            path,
            [
                Problem(
                    "",
                    f"YAML syntax error at {where}: {exc.problem}",
                    "check indentation and quoting near that line",
                )
            ],
        ) from None
    except YAMLError as exc:
        raise ConfigError(path, [Problem("", f"YAML error: {exc}")]) from None
    return document


def load_config(path: Path | str) -> Config:
    path = Path(path).absolute()
    return parse_config(read_document(path), path)


def parse_config(document: Any, path: Path) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    parser = _Parser(path)
    config = parser.parse(document)
    if parser.problems:
        raise ConfigError(path, parser.problems)
    assert config is not None
    return config


# --------------------------------------------------------------------------- validation


STORAGE_CLASS_CHOICES = ("all", "standard")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TOP_KEYS = ("router", "servers", "clients", "routes")
_ROUTER_KEYS = (
    "ae_title",
    "host",
    "port",
    "catalog",
    "spool",
    "accept_unknown_callers",
    "unknown_caller_roles",
    "duplicate_policy",
    "workers",
    "max_associations",
    "max_pending_per_address",
    "max_pdu_size",
    "max_dataset_size",
    "max_in_memory_dataset",
    "acse_timeout",
    "dimse_timeout",
    "network_timeout",
    "connect_timeout",
    "echo_timeout",
    "find_timeout",
    "find_keepalive",
    "max_find_results",
    "storage_classes",
    "forwarding",
    "storage_commitment",
    "audit",
    "tls",
    "http",
    "log",
)
_STORAGE_COMMITMENT_KEYS = ("max_wait", "poll_interval", "report_retry_initial", "report_retry_max")
_AUDIT_KEYS = ("keep_days", "rejection_summary_interval")
_HTTP_KEYS = ("host", "port", "tls", "health_interval", "cors_origins")
_ORIGIN = re.compile(r"https?://[^/\s:?#]+(:\d{1,5})?")
_LOG_KEYS = ("level", "format")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")
_FORWARDING_KEYS = (
    "workers_per_destination",
    "retry_initial",
    "retry_max",
    "retry_multiplier",
    "retry_jitter",
    "max_attempts",
    "lease",
    "poll_interval",
    "keep_done",
)
_SERVER_KEYS = (
    "name",
    "ae_title",
    "host",
    "port",
    "environment",
    "active",
    "primary",
    "deleted",
    "comments",
    "web_url",
    "calling_ae",
    "move_routing",
    "worklist",
    "tls",
    "storage_commitment",
    "retrieve",
)
_CLIENT_KEYS = (
    "ae_title", "host", "port", "roles", "query_servers", "move_destinations", "http_token_sha256", "comments"
)
_ROUTE_KEYS = ("name", "match", "destinations")
_TLS_KEYS = ("certificate", "private_key", "ca_certificates", "require_client_certificate")

_MISSING = object()


class _Parser:
    def __init__(self, path: Path):
        self.path = path
        self.base = path.parent
        self.problems: list[Problem] = []

    def error(self, key: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem(key, message, fix))

    # -- small typed getters; each records a problem and returns a fallback

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(key, f"expected a mapping of keys, found {type(value).__name__}", "indent the keys under it")
            return {}
        return value

    def check_keys(self, data: Mapping[str, Any], allowed: Sequence[str], prefix: str) -> None:
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                where = f"{prefix}.{key}" if prefix else str(key)
                fix = f"did you mean {hint[0]!r}? rename it" if hint else f"remove it; known keys: {', '.join(allowed)}"
                self.error(where, "unknown key", fix)

    def get_str(self, data, name, key, default=_MISSING, allow_none=False) -> Any:
        value = data.get(name, default)
        if value is _MISSING:
            self.error(key, "is required", f"add `{name}:` with a value")
            return ""
        if value is None and (allow_none or default is None):
            return None
        if not isinstance(value, str) or not value.strip():
            self.error(key, f"expected non-empty text, found {value!r}", "quote the value")
            return str(value)
        return value

    def get_bool(self, data, name, key, default: bool) -> bool:
        value = data.get(name, default)
        if not isinstance(value, bool):
            self.error(key, f"expected true or false, found {value!r}", f"write `{name}: true` or `{name}: false`")
            return default
        return value

    def get_int(self, data, name, key, default=_MISSING, low=1, high=2**31) -> int:
        value = data.get(name, default)
        if value is _MISSING:
            self.error(key, "is required", f"add `{name}:` with a number")
            return low
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.error(key, f"{value!r} is not a whole number from {low} to {high}", f"use a number from {low} to {high}")
            return low
        return value

    def get_seconds(self, data, name, key, default: float, allow_zero: bool = False) -> float:
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not allow_zero):
            expected = "a number of seconds (0 or more)" if allow_zero else "a positive number of seconds"
            self.error(key, f"{value!r} is not {expected}", "use a number such as 5 or 0.5")
            return default
        return float(value)

    def get_duration(self, data, name, key, default: float) -> float:
        """Seconds, given as a number of seconds or with a unit: 90s, 30m, 12h, 7d, 2w."""
        value = data.get(name, default)
        if isinstance(value, str):
            match = _DURATION.match(value)
            if match:
                value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            self.error(key, f"{value!r} is not a positive duration", "use seconds (3600) or a number with a unit: 30m, 12h, 7d")
            return default
        return float(value)

    def get_port(self, data, name, key, required=True) -> int | None:
        value = data.get(name, _MISSING if required else None)
        if value is None:
            return None
        if value is _MISSING:
            self.error(key, "is required", "add a TCP port number (1-65535)")
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.error(key, f"{value!r} is not a valid TCP port", "use a number from 1 to 65535")
            return 0
        return value

    def get_ae(self, data, name, key, default=_MISSING) -> str:
        value = data.get(name, default)
        if value is _MISSING:
            self.error(key, "is required", "add an AE title (1-16 characters)")
            return ""
        problem = ae_title_problem(value)
        if problem:
            self.error(key, problem, "use 1-16 printable ASCII characters, no backslash")
            return str(value)
        return value.strip(" ")

    def get_str_list(self, data, name, key) -> tuple[str, ...] | None:
        value = data.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            self.error(key, f"expected a list of text, found {value!r}", f"write `{name}: [A, B]`")
            return ()
        return tuple(value)

    def get_roles(self, data, name, key, default: frozenset[str]) -> frozenset[str]:
        if data.get(name) is None:
            return default
        roles = self.get_str_list(data, name, key) or ()
        for role in roles:
            if role not in ROLES:
                hint = difflib.get_close_matches(role, ROLES, n=1)
                self.error(
                    key,
                    f"{role!r} is not a role" + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                    "use " + ", ".join(ROLES),
                )
        return frozenset(r for r in roles if r in ROLES)

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def resolve_catalog_url(self, url: str) -> str:
        """Make a relative sqlite path relative to the config file's folder."""
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith("sqlite:////"):
            rest = url[len(prefix) :]
            if rest and rest != ":memory:" and not rest.startswith("/"):
                return prefix + str(self.base / rest)
        return url

    # -- sections

    def parse(self, document: Any) -> Config | None:
        if document is None:
            document = {}
        if not isinstance(document, Mapping):
            self.error("", "the file must be a mapping with router, servers, clients and routes", "see config/dicomrouter.example.yaml")
            return None
        self.check_keys(document, _TOP_KEYS, "")
        router = self.parse_router(self.mapping(document.get("router"), "router"))
        servers = self.parse_servers(document.get("servers"))
        clients = self.parse_clients(document.get("clients"))
        routes = self.parse_routes(document.get("routes"))
        self.check_registry(servers)
        self.check_references(router, servers, clients, routes)
        return Config(self.path, router, tuple(servers), tuple(clients), tuple(routes))

    def parse_tls(self, data: Any, key: str, listening: bool) -> TLSConfig | None:
        """A `tls:` block; its files must load (`listening`: the router's own port)."""
        if data is None:
            return None
        data = self.mapping(data, key)
        self.check_keys(data, _TLS_KEYS, key)

        def opt_path(name: str) -> Path | None:
            value = self.get_str(data, name, f"{key}.{name}", None)
            return self.resolve_path(value) if value else None

        tls = TLSConfig(
            certificate=opt_path("certificate"),
            private_key=opt_path("private_key"),
            ca_certificates=opt_path("ca_certificates"),
            require_client_certificate=self.get_bool(
                data, "require_client_certificate", f"{key}.require_client_certificate", False
            ),
        )
        if not listening and tls.require_client_certificate:
            self.error(
                f"{key}.require_client_certificate",
                "only applies to the router's own port",
                "remove it here; whether this server requires our certificate is its own setting",
            )
        # ssl is imported only for a config with TLS files: every CLI command loads the config.
        from dicomrouter.net.tls import TLSSetupError, check_tls_files

        try:
            check_tls_files(tls, listening)
        except TLSSetupError as exc:
            self.error(f"{key}.{exc.field}", exc.message, exc.fix)
        return tls

    def parse_router(self, data: Mapping[str, Any]) -> RouterSettings:
        self.check_keys(data, _ROUTER_KEYS, "router")
        d = RouterSettings()
        policy = data.get("duplicate_policy", d.duplicate_policy)
        if policy not in DUPLICATE_POLICIES:
            self.error("router.duplicate_policy", f"{policy!r} is not a duplicate policy", "use overwrite or reject")
            policy = d.duplicate_policy
        fwd_data = self.mapping(data.get("forwarding"), "router.forwarding")
        self.check_keys(fwd_data, _FORWARDING_KEYS, "router.forwarding")
        fd = ForwardingConfig()
        k = "router.forwarding."
        forwarding = ForwardingConfig(
            workers_per_destination=self.get_int(fwd_data, "workers_per_destination", k + "workers_per_destination", fd.workers_per_destination, 1, 32),
            retry_initial_s=self.get_seconds(fwd_data, "retry_initial", k + "retry_initial", fd.retry_initial_s),
            retry_max_s=self.get_seconds(fwd_data, "retry_max", k + "retry_max", fd.retry_max_s),
            retry_multiplier=self.get_seconds(fwd_data, "retry_multiplier", k + "retry_multiplier", fd.retry_multiplier),
            retry_jitter=float(fwd_data.get("retry_jitter", fd.retry_jitter)) if isinstance(fwd_data.get("retry_jitter", fd.retry_jitter), int | float) else fd.retry_jitter,
            max_attempts=self.get_int(fwd_data, "max_attempts", k + "max_attempts", fd.max_attempts, 1, 10**9),
            lease_s=self.get_seconds(fwd_data, "lease", k + "lease", fd.lease_s),
            poll_interval_s=self.get_seconds(fwd_data, "poll_interval", k + "poll_interval", fd.poll_interval_s),
            keep_done_s=self.get_duration(fwd_data, "keep_done", k + "keep_done", fd.keep_done_s),
        )
        if forwarding.retry_max_s < forwarding.retry_initial_s:
            self.error(k + "retry_max", "is smaller than retry_initial", "make retry_max at least retry_initial")
        return RouterSettings(
            ae_title=self.get_ae(data, "ae_title", "router.ae_title", d.ae_title),
            host=self.get_str(data, "host", "router.host", d.host),
            port=self.get_port(data, "port", "router.port", required=False) or d.port,
            catalog=self.resolve_catalog_url(self.get_str(data, "catalog", "router.catalog", d.catalog)),
            spool=self.resolve_path(str(self.get_str(data, "spool", "router.spool", str(d.spool)))),
            accept_unknown_callers=self.get_bool(data, "accept_unknown_callers", "router.accept_unknown_callers", False),
            unknown_caller_roles=self.get_roles(data, "unknown_caller_roles", "router.unknown_caller_roles", d.unknown_caller_roles),
            duplicate_policy=policy,
            workers=self.get_int(data, "workers", "router.workers", None, 1, MAX_WORKERS) if "workers" in data else None,
            max_associations=self.get_int(data, "max_associations", "router.max_associations", d.max_associations, 1, 10000),
            max_pending_per_address=self.get_int(
                data, "max_pending_per_address", "router.max_pending_per_address", d.max_pending_per_address, 1, 10000
            ),
            max_pdu_size=self.get_int(data, "max_pdu_size", "router.max_pdu_size", d.max_pdu_size, 4096, 64 * 1024 * 1024),
            max_dataset_size=self.get_int(
                data, "max_dataset_size", "router.max_dataset_size", d.max_dataset_size, 1024, 1024**4
            ),
            max_in_memory_dataset=self.get_int(
                data, "max_in_memory_dataset", "router.max_in_memory_dataset", d.max_in_memory_dataset, 1024, 1024**4
            ),
            acse_timeout_s=self.get_seconds(data, "acse_timeout", "router.acse_timeout", d.acse_timeout_s),
            dimse_timeout_s=self.get_seconds(data, "dimse_timeout", "router.dimse_timeout", d.dimse_timeout_s),
            network_timeout_s=self.get_seconds(data, "network_timeout", "router.network_timeout", d.network_timeout_s),
            connect_timeout_s=self.get_seconds(data, "connect_timeout", "router.connect_timeout", d.connect_timeout_s),
            echo_timeout_s=self.get_seconds(data, "echo_timeout", "router.echo_timeout", d.echo_timeout_s),
            find_timeout_s=self.get_seconds(data, "find_timeout", "router.find_timeout", d.find_timeout_s),
            find_keepalive_s=self.get_seconds(
                data, "find_keepalive", "router.find_keepalive", d.find_keepalive_s, allow_zero=True
            ),
            max_find_results=self.get_int(data, "max_find_results", "router.max_find_results", d.max_find_results, 1, 10**7),
            storage_classes=self.get_storage_classes(data.get("storage_classes", d.storage_classes)),
            forwarding=forwarding,
            storage_commitment=self.parse_storage_commitment(
                self.mapping(data.get("storage_commitment"), "router.storage_commitment")
            ),
            audit=self.parse_audit(self.mapping(data.get("audit"), "router.audit")),
            tls=self.parse_tls(data.get("tls"), "router.tls", listening=True),
            http=self.parse_http(data.get("http")),
            log=self.parse_log(self.mapping(data.get("log"), "router.log")),
        )

    def parse_storage_commitment(self, data: Mapping[str, Any]) -> StorageCommitmentSettings:
        self.check_keys(data, _STORAGE_COMMITMENT_KEYS, "router.storage_commitment")
        d = StorageCommitmentSettings()
        k = "router.storage_commitment."
        settings = StorageCommitmentSettings(
            max_wait_s=self.get_duration(data, "max_wait", k + "max_wait", d.max_wait_s),
            poll_interval_s=self.get_seconds(data, "poll_interval", k + "poll_interval", d.poll_interval_s),
            report_retry_initial_s=self.get_seconds(data, "report_retry_initial", k + "report_retry_initial", d.report_retry_initial_s),
            report_retry_max_s=self.get_seconds(data, "report_retry_max", k + "report_retry_max", d.report_retry_max_s),
        )
        if settings.report_retry_max_s < settings.report_retry_initial_s:
            self.error(k + "report_retry_max", "is smaller than report_retry_initial", "make report_retry_max at least report_retry_initial")
        return settings

    def parse_audit(self, data: Mapping[str, Any]) -> AuditSettings:
        self.check_keys(data, _AUDIT_KEYS, "router.audit")
        value = data.get("keep_days", AuditSettings.keep_days)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            self.error("router.audit.keep_days", f"{value!r} is not a positive number of days", "use a number such as 365")
            value = AuditSettings.keep_days
        interval = self.get_seconds(
            data, "rejection_summary_interval", "router.audit.rejection_summary_interval",
            AuditSettings.rejection_summary_interval_s,
        )
        return AuditSettings(keep_days=float(value), rejection_summary_interval_s=interval)

    def get_storage_classes(self, value: Any) -> str | frozenset[str]:
        key = "router.storage_classes"
        fix = "write `all` (any class, private ones included), `standard`, or a list of SOP Class UIDs"
        if value in STORAGE_CLASS_CHOICES:
            return value
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            self.error(key, f"{value!r} is not all, standard or a list of UIDs", fix)
            return "all"
        uids = []
        for index, uid in enumerate(value):
            if not isinstance(uid, str) or not _UID.fullmatch(uid) or len(uid) > 64:
                self.error(f"{key}[{index}]", f"{uid!r} is not a UID", "give dotted numbers such as 1.2.840.10008.5.1.4.1.1.2")
            else:
                uids.append(uid)
        return frozenset(uids)

    def parse_http(self, value: Any) -> HttpSettings | None:
        if value is None:
            return None
        data = self.mapping(value, "router.http")
        self.check_keys(data, _HTTP_KEYS, "router.http")
        d = HttpSettings()
        return HttpSettings(
            host=self.get_str(data, "host", "router.http.host", d.host),
            port=self.get_port(data, "port", "router.http.port", required=False) or d.port,
            tls=self.parse_tls(data.get("tls"), "router.http.tls", listening=True),
            health_interval_s=self.get_seconds(data, "health_interval", "router.http.health_interval", d.health_interval_s),
            cors_origins=self.get_origins(data),
        )

    def get_origins(self, data: Mapping[str, Any]) -> tuple[str, ...]:
        key = "router.http.cors_origins"
        origins = self.get_str_list(data, "cors_origins", key) or ()
        for index, origin in enumerate(origins):
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                self.error(
                    f"{key}[{index}]",
                    f"{origin!r} is not a web origin",
                    "give scheme, host and port only, as the browser sends them "
                    "(https://viewer.example:3000, no path or trailing slash), or '*' for any",
                )
        return tuple(origin.lower() for origin in origins)

    def parse_log(self, data: Mapping[str, Any]) -> LogSettings:
        self.check_keys(data, _LOG_KEYS, "router.log")
        level = data.get("level", "info")
        if level not in LOG_LEVELS:
            self.error("router.log.level", f"{level!r} is not a log level", "use " + ", ".join(LOG_LEVELS))
            level = "info"
        log_format = data.get("format")
        if log_format is not None and log_format not in LOG_FORMATS:
            self.error("router.log.format", f"{log_format!r} is not a log format", "use console or json")
            log_format = None
        return LogSettings(level=level, format=log_format)

    def get_token_hash(self, data: Mapping[str, Any], key: str) -> str | None:
        value = data.get("http_token_sha256")
        if value is None:
            return None
        text = str(value).strip().lower()
        if len(text) != 64 or any(ch not in "0123456789abcdef" for ch in text):
            self.error(key, "is not a sha256 in hex (64 characters 0-9a-f)", "set it with `dicomrouter clients token AE`")
            return None
        return text

    def parse_servers(self, value: Any) -> list[ServerConfig]:
        if value is None:
            self.error("servers", "no servers are configured", "list at least one PACS under `servers:`")
            return []
        if not isinstance(value, Sequence) or isinstance(value, str):
            self.error("servers", "expected a list of servers", "start each server with `- name: ...`")
            return []
        servers = []
        for index, item in enumerate(value):
            key = f"servers[{index}]"
            data = self.mapping(item, key)
            self.check_keys(data, _SERVER_KEYS, key)
            name = self.get_str(data, "name", f"{key}.name")
            environment = data.get("environment", _MISSING)
            if environment not in ENVIRONMENTS:
                shown = "is required" if environment is _MISSING else f"{environment!r} is not an environment"
                self.error(f"{key}.environment", shown, "use test or prod")
                environment = "test"
            calling = self.mapping(data.get("calling_ae"), f"{key}.calling_ae")
            self.check_keys(calling, OPERATIONS, f"{key}.calling_ae")
            calling_ae = {
                op: self.get_ae(calling, op, f"{key}.calling_ae.{op}", None) if calling.get(op) is not None else None
                for op in OPERATIONS
            }
            routing = self.mapping(data.get("move_routing"), f"{key}.move_routing")
            move_routing = {}
            for destination in routing:
                move_routing[str(destination)] = self.get_ae(routing, destination, f"{key}.move_routing.{destination}")
            web_url = data.get("web_url")
            if web_url is not None and not (isinstance(web_url, str) and web_url.startswith(("http://", "https://"))):
                self.error(f"{key}.web_url", f"{web_url!r} is not an http(s) URL", "write it like http://host:8042")
                web_url = None
            comments = data.get("comments") or ""
            servers.append(
                ServerConfig(
                    name=name,
                    ae_title=self.get_ae(data, "ae_title", f"{key}.ae_title"),
                    host=self.get_str(data, "host", f"{key}.host"),
                    port=self.get_port(data, "port", f"{key}.port") or 0,
                    environment=environment,
                    active=self.get_bool(data, "active", f"{key}.active", True),
                    primary=self.get_bool(data, "primary", f"{key}.primary", False),
                    deleted=self.get_bool(data, "deleted", f"{key}.deleted", False),
                    comments=str(comments),
                    web_url=web_url,
                    calling_ae=CallingAETitles(**calling_ae),  # type: ignore[arg-type]  # filled below
                    move_routing=move_routing,
                    worklist=self.get_bool(data, "worklist", f"{key}.worklist", False),
                    tls=self.parse_tls(data.get("tls"), f"{key}.tls", listening=False),
                    storage_commitment=self.get_bool(data, "storage_commitment", f"{key}.storage_commitment", False),
                    retrieve=self.get_retrieve_mode(data, f"{key}.retrieve"),
                )
            )
        return servers

    def get_retrieve_mode(self, data: Mapping[str, Any], key: str) -> str:
        value = data.get("retrieve", "auto")
        if value not in RETRIEVE_MODES:
            self.error(
                key,
                f"{value!r} is not a retrieve mode",
                "use get (C-GET), move (C-MOVE to the router) or auto (C-GET, C-MOVE where the server refuses C-GET)",
            )
            return "auto"
        return value

    def parse_clients(self, value: Any) -> list[ClientConfig]:
        if value is None:
            return []
        if not isinstance(value, Sequence) or isinstance(value, str):
            self.error("clients", "expected a list of clients", "start each client with `- ae_title: ...`")
            return []
        clients = []
        for index, item in enumerate(value):
            key = f"clients[{index}]"
            data = self.mapping(item, key)
            self.check_keys(data, _CLIENT_KEYS, key)
            roles = self.get_roles(data, "roles", f"{key}.roles", frozenset())
            clients.append(
                ClientConfig(
                    ae_title=self.get_ae(data, "ae_title", f"{key}.ae_title"),
                    host=self.get_str(data, "host", f"{key}.host", None),
                    port=self.get_port(data, "port", f"{key}.port", required=False),
                    roles=roles,
                    query_servers=self.get_str_list(data, "query_servers", f"{key}.query_servers"),
                    move_destinations=self.get_str_list(data, "move_destinations", f"{key}.move_destinations"),
                    http_token_sha256=self.get_token_hash(data, f"{key}.http_token_sha256"),
                )
            )
        return clients

    def parse_routes(self, value: Any) -> list[RouteConfig]:
        if value is None:
            return []
        if not isinstance(value, Sequence) or isinstance(value, str):
            self.error("routes", "expected a list of routing rules", "start each rule with `- name: ...`")
            return []
        routes = []
        for index, item in enumerate(value):
            key = f"routes[{index}]"
            data = self.mapping(item, key)
            self.check_keys(data, _ROUTE_KEYS, key)
            name = data.get("name") or f"rule {index + 1}"
            match_data = self.mapping(data.get("match"), f"{key}.match")
            match: dict[str, tuple[str, ...]] = {}
            for attribute in match_data:
                listed = self.get_str_list(match_data, attribute, f"{key}.match.{attribute}")
                if listed is None:
                    self.error(f"{key}.match.{attribute}", "has no pattern", "give a glob or a list of globs")
                    listed = ()
                match[str(attribute)] = listed
            destinations = self.get_str_list(data, "destinations", f"{key}.destinations")
            if not destinations:
                self.error(f"{key}.destinations", "is required", "list one or more server names")
                destinations = ()
            routes.append(RouteConfig(str(name), match, destinations))
        return routes

    def check_registry(self, servers: list[ServerConfig]) -> None:
        seen_names: dict[str, int] = {}
        seen_aes: dict[str, int] = {}
        for index, server in enumerate(servers):
            key = f"servers[{index}]"
            if server.name in seen_names:
                self.error(f"{key}.name", f"{server.name!r} is already used by servers[{seen_names[server.name]}]", "give every server a unique name")
            seen_names.setdefault(server.name, index)
            if server.ae_title and server.ae_title in seen_aes:
                self.error(f"{key}.ae_title", f"{server.ae_title!r} is already used by servers[{seen_aes[server.ae_title]}]", "give every server a unique AE title")
            seen_aes.setdefault(server.ae_title, index)
            if server.deleted and server.active:
                self.error(f"{key}.active", f"server {server.name!r} is deleted but active", "set active: false, or deleted: false to restore it")
            if server.deleted and server.primary:
                self.error(f"{key}.primary", f"server {server.name!r} is deleted but primary", "make another server primary first")
        if not servers:
            return
        primaries = [(i, s) for i, s in enumerate(servers) if s.primary and not s.deleted]
        if not primaries:
            self.error("servers", "no server is primary", "set `primary: true` on exactly one active server")
        elif len(primaries) > 1:
            names = ", ".join(f"servers[{i}] ({s.name})" for i, s in primaries)
            self.error("servers", f"{len(primaries)} servers are primary: {names}", "keep `primary: true` on exactly one")
        else:
            index, primary = primaries[0]
            if not primary.active:
                self.error(f"servers[{index}].active", f"the primary server {primary.name!r} is inactive", "activate it, or make an active server primary")
        if not any(s.usable for s in servers):
            self.error("servers", "no server is active", "set `active: true` on at least one server that is not deleted")

    def check_references(self, router, servers, clients, routes) -> None:
        server_names = {s.name for s in servers}
        server_aes = {s.ae_title for s in servers}
        client_aes = {}
        for index, client in enumerate(clients):
            if client.ae_title in client_aes:
                self.error(f"clients[{index}].ae_title", f"{client.ae_title!r} is already used by clients[{client_aes[client.ae_title]}]", "list each client once")
            client_aes.setdefault(client.ae_title, index)
            for name in client.query_servers or ():
                if name not in server_names:
                    self.error(f"clients[{index}].query_servers", f"{name!r} is not a server name", suggest(name, server_names))
            for name in client.move_destinations or ():
                if name not in server_names and name not in client_aes and name not in {c.ae_title for c in clients}:
                    self.error(f"clients[{index}].move_destinations", f"{name!r} is neither a server name nor a client AE title", suggest(name, server_names | {c.ae_title for c in clients}))
        destinations = server_names | server_aes | {c.ae_title for c in clients} | {router.ae_title}
        for index, server in enumerate(servers):
            for destination in server.move_routing:
                if destination not in destinations:
                    self.error(
                        f"servers[{index}].move_routing.{destination}",
                        f"{destination!r} is neither a server name, a client AE title nor the router's AE title",
                        suggest(destination, destinations),
                    )
        for index, route in enumerate(routes):
            for name in route.destinations:
                if name not in server_names:
                    self.error(f"routes[{index}].destinations", f"{name!r} is not a server name", suggest(name, server_names))


def suggest(name: str, known: set[str]) -> str:
    """A fix for an unknown name: the closest known one, else the list."""
    hint = difflib.get_close_matches(name, sorted(known), n=1)
    if hint:
        return f"did you mean {hint[0]!r}?"
    return "known: " + ", ".join(sorted(known)) if known else "add it first"


def calling_ae_for(server: ServerConfig, operation: str, router: RouterSettings) -> str:
    """The AE title the router uses towards `server` for `operation`."""
    return getattr(server.calling_ae, operation) or router.ae_title
