"""Which servers a received instance goes to: called AE, then rules in order, then the primary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from dicomrouter.config import Config, RouteConfig, ServerConfig
from dicomrouter.routing.access import Caller, inactive_reason, may_write

# Match keys that are not DICOM keywords but facts about the association.
ASSOCIATION_KEYS = ("calling_ae", "called_ae")


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    matched: bool
    why: str


@dataclass(frozen=True)
class StoreDecision:
    destinations: tuple[ServerConfig, ...]
    reason: str
    rule: str | None = None
    refused: str | None = None  # set when no destination may take the instance
    verdicts: tuple[RuleVerdict, ...] = field(default=())


def rule_keywords(config: Config) -> set[str]:
    """The DICOM keywords the rules look at (what the header parse must provide)."""
    return {key for route in config.routes for key in route.match if key not in ASSOCIATION_KEYS}


def _values(value: object) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, list | tuple):
        return [str(v) for v in value] or [""]
    return [str(value)]


def _match_rule(route: RouteConfig, facts: Mapping[str, object]) -> tuple[bool, str]:
    for key, patterns in route.match.items():
        values = _values(facts.get(key))
        if not any(fnmatchcase(v, p) for v in values for p in patterns):
            shown = "\\".join(values) if values != [""] else "(absent)"
            return False, f"{key} is {shown!r}, not {' or '.join(repr(p) for p in patterns)}"
    return True, "every condition matched" if route.match else "no conditions"


def choose_destinations(
    config: Config, calling_ae: str, called_ae: str, header: Mapping[str, object]
) -> StoreDecision:
    """Pure decision; never returns an inactive or deleted server."""
    virtual = config.server_by_ae(called_ae) if called_ae != config.router.ae_title else None
    if virtual is not None:
        if not virtual.usable:
            return StoreDecision((), "called AE", refused=inactive_reason(virtual))
        return StoreDecision((virtual,), f"called AE {called_ae} is server {virtual.name!r}")
    facts = {"calling_ae": calling_ae, "called_ae": called_ae, **header}
    verdicts: list[RuleVerdict] = []
    for route in config.routes:
        matched, why = _match_rule(route, facts)
        if matched:
            usable = tuple(s for name in route.destinations if (s := config.server(name)) and s.usable)
            if not usable:
                verdicts.append(RuleVerdict(route.name, False, "matched, but every destination is inactive or deleted"))
                continue
            verdicts.append(RuleVerdict(route.name, True, why))
            return StoreDecision(usable, f"rule {route.name!r}", route.name, verdicts=tuple(verdicts))
        verdicts.append(RuleVerdict(route.name, False, why))
    return StoreDecision((config.primary,), "no rule matched: the primary", verdicts=tuple(verdicts))


def unusable_rules(config: Config) -> list[str]:
    """Rules whose destinations are all inactive or deleted (logged once per (re)load)."""
    result = []
    for route in config.routes:
        if not any((s := config.server(n)) and s.usable for n in route.destinations):
            result.append(route.name)
    return result


def possible_decisions(config: Config, calling_ae: str, called_ae: str) -> list[StoreDecision]:
    """Every decision `choose_destinations` could take for a store on this association, whatever the
    data set holds: what the router can know at negotiation and at the C-STORE command."""
    header_free = {"calling_ae": calling_ae, "called_ae": called_ae}
    virtual = config.server_by_ae(called_ae) if called_ae != config.router.ae_title else None
    if virtual is not None:
        return [choose_destinations(config, calling_ae, called_ae, {})]
    decisions = []
    for route in config.routes:
        association_match = {k: v for k, v in route.match.items() if k in ASSOCIATION_KEYS}
        matched, _why = _match_rule(RouteConfig(route.name, association_match, route.destinations), header_free)
        if not matched:
            continue
        usable = tuple(s for name in route.destinations if (s := config.server(name)) and s.usable)
        if not usable:
            continue
        decisions.append(StoreDecision(usable, f"rule {route.name!r}", route.name))
        if len(association_match) == len(route.match):
            return decisions  # this rule always matches here: nothing after it is ever reached
    decisions.append(StoreDecision((config.primary,), "no rule matched: the primary"))
    return decisions


@dataclass(frozen=True)
class StoreRefusal:
    reason: str
    servers: tuple[str, ...]


def store_refusal(config: Config, caller: Caller, called_ae: str) -> StoreRefusal | None:
    """Why no store from `caller` on this association could ever be accepted, or None when one could.

    Checked at the C-STORE command, before any data set byte is kept: a caller that may write to
    none of the destinations its stores could reach is refused there (0x0124).
    """
    decisions = possible_decisions(config, caller.ae_title, called_ae)
    for decision in decisions:
        if decision.destinations and all(may_write(caller, s) for s in decision.destinations):
            return None
    reachable = tuple(sorted({s.name for d in decisions for s in d.destinations}))
    if not reachable:
        virtual = config.server_by_ae(called_ae)
        return StoreRefusal(inactive_reason(virtual) if virtual else "no usable destination", ())
    needs = sorted({f"{s.environment}_write" for d in decisions for s in d.destinations})
    return StoreRefusal(f"{caller.ae_title} may not write to {', '.join(reachable)} (needs {' or '.join(needs)})", reachable)
