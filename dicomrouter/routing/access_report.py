"""What one calling AE may do on each server, and why (pure; `dicomrouter access explain`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dicomrouter.config import Config, ServerConfig
from dicomrouter.routing.access import (
    AssociationDecision,
    Caller,
    decide_association,
    inactive_reason,
    may_read,
    may_write,
)
from dicomrouter.routing.find_targets import find_targets
from dicomrouter.routing.move_routes import (
    destination_refusal,
    move_permission,
    resolve_destination,
)

OPERATIONS = ("echo", "store", "find", "retrieve", "move_to")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    why: str


@dataclass
class ServerAccess:
    server: ServerConfig
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # operation -> verdict


@dataclass
class AccessReport:
    calling_ae: str
    address: str  # "" when the caller may call from anywhere
    association: AssociationDecision
    servers: list[ServerAccess]
    move_destinations: list[tuple[str, str]]  # (destination, why) the caller may C-MOVE to
    refused_destinations: list[tuple[str, str]]

    @property
    def caller(self) -> Caller | None:
        return self.association.caller

    def as_dict(self) -> dict:
        caller = self.caller
        return {
            "calling_ae": self.calling_ae,
            "address": self.address or None,
            "accepted": self.association.accepted,
            "reason": self.association.reason,
            "kind": caller.kind if caller else None,
            "roles": sorted(caller.roles) if caller else [],
            "servers": [
                {
                    "name": entry.server.name,
                    "ae_title": entry.server.ae_title,
                    "environment": entry.server.environment,
                    **{op: {"allowed": v.allowed, "why": v.why} for op, v in entry.verdicts.items()},
                }
                for entry in self.servers
            ],
            "move_destinations": [{"name": name, "why": why} for name, why in self.move_destinations],
            "refused_move_destinations": [{"name": name, "why": why} for name, why in self.refused_destinations],
        }


def explain_access(config: Config, calling_ae: str, address: str) -> AccessReport:
    """Ask the same functions the router asks, for every live server and move destination.

    `address` is the IP address the caller would call from ("" when the caller may call from
    anywhere; a placeholder address is then used for the admission check).
    """
    decision = decide_association(config, calling_ae, config.router.ae_title, address or "0.0.0.0")
    servers = [ServerAccess(s) for s in config.live_servers()]
    move_ok: list[tuple[str, str]] = []
    move_refused: list[tuple[str, str]] = []
    caller = decision.caller
    if not decision.accepted or caller is None:
        refused = Verdict(False, f"association rejected: {decision.reason}")
        for entry in servers:
            entry.verdicts = dict.fromkeys(OPERATIONS, refused)
        return AccessReport(calling_ae, address, decision, servers, [], [])
    readable_for_find = {s.name for s in find_targets(config, caller).servers}
    for entry in servers:
        entry.verdicts = _verdicts(config, caller, entry.server, readable_for_find)
    if caller.kind == "server":
        why = "a server AE only delivers the C-MOVE sub-operations the router asked for"
        return AccessReport(calling_ae, address, decision, servers, [], [("(any)", why)])
    names = [s.name for s in config.live_servers()] + [c.ae_title for c in config.clients if c.host and c.port]
    for name in names:
        destination = resolve_destination(config, name)
        if destination is None:
            continue
        allowed, why = move_permission(caller, destination, config)
        (move_ok if allowed else move_refused).append((name, why))
    return AccessReport(calling_ae, address, decision, servers, move_ok, move_refused)


def _role_verdict(allowed: bool, caller: Caller, server: ServerConfig, kind: str) -> Verdict:
    """`allowed` as access.may_read / may_write decided it, with the role that decided."""
    role = f"{server.environment}_{kind}"
    if not allowed:
        return Verdict(False, f"needs {role} (or admin)")
    return Verdict(True, "admin" if "admin" in caller.roles else role)


def _verdicts(config: Config, caller: Caller, server: ServerConfig, find_servers: set[str]) -> dict[str, Verdict]:
    if caller.kind == "server":
        nothing = Verdict(False, "a server AE only delivers relayed C-MOVE sub-operations")
        return {"echo": Verdict(True, "association accepted (configured server)"), **dict.fromkeys(OPERATIONS[1:], nothing)}
    if server.usable:
        verdicts = {"echo": Verdict(True, f"association accepted; the router also answers as {server.ae_title}")}
    else:
        verdicts = {"echo": Verdict(False, f"{inactive_reason(server)}: an echo to it is refused with 0x0124")}
    write = _role_verdict(may_write(caller, server), caller, server, "write")
    read = _role_verdict(may_read(caller, server), caller, server, "read")
    if not server.usable:
        verdicts["store"] = Verdict(False, f"{inactive_reason(server)}: nothing is routed to it; refused with 0x0124")
    else:
        verdicts["store"] = write if write.allowed else Verdict(False, f"{write.why}: refused with 0x0124")
    if server.name in find_servers:
        verdicts["find"] = read
    elif not server.usable:
        verdicts["find"] = Verdict(False, "server inactive")
    elif not read.allowed:
        verdicts["find"] = read
    else:
        verdicts["find"] = Verdict(False, "not in its query_servers")
    if read.allowed and not server.usable:
        verdicts["retrieve"] = Verdict(True, f"{read.why}; inactive, used only for studies no active server holds")
    else:
        verdicts["retrieve"] = read
    destination = resolve_destination(config, server.name)
    allowed, why = move_permission(caller, destination, config) if destination else (False, "not a destination")
    if destination is not None and (inactive := destination_refusal(destination)):
        allowed, why = False, f"{inactive}: refused with 0x0124"
    verdicts["move_to"] = Verdict(allowed, why)
    return verdicts
