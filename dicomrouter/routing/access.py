"""Who may associate with the router, and what each caller may do (pure decisions)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from functools import lru_cache

from dicomrouter.config import ClientConfig, Config, ServerConfig

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognised


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of an accepted association."""

    ae_title: str
    address: str
    kind: str  # client | server | unknown
    roles: frozenset[str]
    client: ClientConfig | None = None
    server: ServerConfig | None = None


@dataclass(frozen=True)
class AssociationDecision:
    accepted: bool
    reason: str
    caller: Caller | None = None
    reject: tuple[int, int, int] | None = None


@lru_cache(maxsize=256)
def _addresses_of(host: str) -> frozenset[str]:
    """Every IP address `host` names (a literal address names itself)."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()


def host_matches(configured_host: str, address: str) -> bool:
    """True when the peer `address` is one of the configured host's addresses."""
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    candidates = {peer}
    if peer.version == 6 and peer.ipv4_mapped:
        candidates.add(peer.ipv4_mapped)
    return any(ipaddress.ip_address(a) in candidates for a in _addresses_of(configured_host))


def called_ae_known(config: Config, called_ae: str) -> bool:
    """The router answers under its own AE title and every live server's (virtual AEs)."""
    if called_ae == config.router.ae_title:
        return True
    return config.server_by_ae(called_ae) is not None


def decide_association(config: Config, calling_ae: str, called_ae: str, address: str) -> AssociationDecision:
    """Accept or reject an A-ASSOCIATE-RQ, with the reason either way."""
    calling_ae = calling_ae.strip()
    called_ae = called_ae.strip()
    if not called_ae_known(config, called_ae):
        return AssociationDecision(
            False, f"called AE title {called_ae!r} is neither the router's nor a server's", reject=REJECT_CALLED_AE
        )
    client = config.client(calling_ae)
    if client is not None:
        if client.host and not host_matches(client.host, address):
            return AssociationDecision(
                False,
                f"client {calling_ae!r} must call from {client.host}, not {address}",
                reject=REJECT_CALLING_AE,
            )
        caller = Caller(calling_ae, address, "client", client.roles, client=client)
        return AssociationDecision(True, "known client", caller)
    server = config.server_by_ae(calling_ae)
    if server is not None and host_matches(server.host, address):
        # A PACS delivering C-MOVE sub-operations to the router calls in under its own AE title.
        return AssociationDecision(True, "configured server", Caller(calling_ae, address, "server", frozenset(), server=server))
    if config.router.accept_unknown_callers:
        caller = Caller(calling_ae, address, "unknown", config.router.unknown_caller_roles)
        return AssociationDecision(True, "unknown caller accepted (accept_unknown_callers)", caller)
    if server is not None:
        return AssociationDecision(
            False, f"server AE {calling_ae!r} must call from {server.host}, not {address}", reject=REJECT_CALLING_AE
        )
    return AssociationDecision(False, f"calling AE title {calling_ae!r} is not a configured client", reject=REJECT_CALLING_AE)


def inactive_reason(server: ServerConfig) -> str:
    """The one wording of "this server takes nothing now", for every refusal comment and log line."""
    return f"server {server.name!r} ({server.ae_title}) is inactive"


def called_server_refusal(config: Config, called_ae: str) -> str | None:
    """Why an echo or store to a server's own AE title is refused (it is inactive), or None."""
    if called_ae == config.router.ae_title:
        return None
    server = config.server_by_ae(called_ae)
    if server is not None and not server.usable:
        return inactive_reason(server)
    return None


def may_write(caller: Caller, server: ServerConfig) -> bool:
    """C-STORE to a server in environment E needs E_write (or admin)."""
    return "admin" in caller.roles or f"{server.environment}_write" in caller.roles


def may_read(caller: Caller, server: ServerConfig) -> bool:
    """C-FIND / C-MOVE / C-GET from a server in environment E needs E_read (or admin)."""
    return "admin" in caller.roles or f"{server.environment}_read" in caller.roles
