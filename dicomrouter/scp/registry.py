"""The services the router offers, by SOP class, and the presentation contexts it accepts for them.

Storage is every class nobody else claims (`router.storage_classes: all`, the default, takes
private and new classes as Orthanc's UnknownSopClassAccepted does), `standard` only those
pynetdicom lists as storage, or a list of UIDs. Every refused context says why in the log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import ServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dicomrouter.config import Config
from dicomrouter.dul.association import Service
from dicomrouter.dul.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTED,
    AssociateRequest,
    ContextResult,
    ProposedContext,
    RoleProposal,
    first_supported,
    negotiate,
)
from dicomrouter.routing.access import Caller
from dicomrouter.routing.store_rules import possible_decisions

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# The data set of a query or retrieve request is decoded by pydicom: these four syntaxes.
UNCOMPRESSED_SYNTAXES = frozenset(
    ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
)
STORAGE_SYNTAXES = frozenset(str(ts) for ts in ALL_TRANSFER_SYNTAXES)
VERIFICATION = "1.2.840.10008.1.1"
PROBE_BACKOFF_S = 60.0  # a destination a probe could not reach is not probed again for this long
STANDARD_STORAGE = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

# (server name, SOP class, transfer syntaxes proposed) -> the syntaxes that server accepts, or None: unknown.
DestinationVerdict = Callable[[str, str, tuple[str, ...]], "frozenset[str] | None"]


def valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


def storage_class_allowed(config: Config, sop_class: str) -> tuple[bool, str]:
    """Whether `router.storage_classes` lets the router store this class, and why not."""
    policy = getattr(config.router, "storage_classes", "all")
    if not valid_uid(sop_class):
        return False, "not a valid UID"
    if isinstance(policy, Iterable) and not isinstance(policy, str):
        allowed = sop_class in policy
        return allowed, "" if allowed else "not in router.storage_classes"
    known = uid_to_service_class(sop_class)
    if sop_class in STANDARD_STORAGE:
        return True, ""
    if known is not ServiceClass:  # a known service that is not storage (commitment, print, ...)
        return False, f"{known.__name__.removesuffix('ServiceClass') or 'this'} service is not offered"
    if policy == "standard":
        return False, "not a standard storage class (router.storage_classes: standard)"
    return True, ""


@dataclass
class ServiceRegistry:
    """SOP class -> service; storage takes the rest."""

    services: dict[str, Service]  # echo, find, move, get by abstract syntax
    store: Service | None  # None: nothing may be stored here (a C-GET's sub-operations still go out)
    transfer_syntaxes: dict[str, frozenset[str]]  # abstract syntax -> what its service decodes
    destination_verdict: DestinationVerdict | None = None
    capabilities: Any = None  # store.capabilities.DestinationCapabilities: asked at negotiation
    _unreachable_until: dict[str, float] = field(default_factory=dict)
    # Classes whose requestor may take the SCP role (a PACS sending its storage commitment report).
    either_role: frozenset[str] = frozenset()
    # C-STOREs from a configured server: sub-operations of a C-MOVE the router sent to itself.
    delivery: Service | None = None

    @classmethod
    def of(cls, store: Service | None, *by_class: tuple[Iterable[str], Service]) -> ServiceRegistry:
        services: dict[str, Service] = {}
        for sop_classes, service in by_class:
            for sop_class in sop_classes:
                services[str(sop_class)] = service
        return cls(services, store, {uid: UNCOMPRESSED_SYNTAXES for uid in services})

    def stopped(self) -> None:
        """Tell the services that keep something between associations (the find's kept links)."""
        for service in {id(s): s for s in self.services.values()}.values():
            stopped = getattr(service, "stopped", None)
            if stopped is not None:
                stopped()

    def negotiate(
        self, request: AssociateRequest, caller: Caller, config: Config
    ) -> tuple[list[ContextResult], dict[int, Service]]:
        """The answer to each proposed context, and the service behind each accepted one."""
        self.learn_destinations(request, caller, config)
        chosen: dict[int, Service] = {}

        def decide(context: ProposedContext, roles: RoleProposal | None) -> ContextResult:
            service = self.services.get(context.abstract_syntax)
            if service is not None:
                result = first_supported(context, self.transfer_syntaxes[context.abstract_syntax])
                if result.accepted:
                    chosen[context.context_id] = service
                    if roles is not None:  # the router is SCP of these, but of a few it may be either
                        scp = roles.scp and context.abstract_syntax in self.either_role
                        result = replace(result, scu_role=roles.scu, scp_role=scp)
                return result
            return self._decide_storage(context, roles, caller, config, chosen, request.called_ae)

        return negotiate(request, decide), chosen

    def _decide_storage(
        self,
        context: ProposedContext,
        roles: RoleProposal | None,
        caller: Caller,
        config: Config,
        chosen: dict[int, Service],
        called_ae: str,
    ) -> ContextResult:
        allowed, why = storage_class_allowed(config, context.abstract_syntax)
        if not allowed:
            return ContextResult(
                context.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, context.abstract_syntax, "", reason=why
            )
        sends = roles.scu if roles is not None else True  # the requestor stores to us
        receives = roles.scp if roles is not None else False  # the requestor takes a C-GET's sub-operations
        if self.store is None and not receives:
            return ContextResult(
                context.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, context.abstract_syntax, "", reason="storage not offered"
            )
        # The syntax proposed first is taken (a PACS delivering sub-operations proposes the one it holds
        # the instance in first): the bytes go on as received, never transcoded.
        result = first_supported(context, STORAGE_SYNTAXES)
        delivers = caller.kind == "server" and self.delivery is not None
        if result.accepted and sends and not receives and not delivers and self.destination_verdict is not None:
            result = self._as_destinations_would(result, context, caller, called_ae, config)
        if not result.accepted:
            return result
        if delivers and sends and not receives:  # kept as the PACS holds it: its first syntax
            chosen[context.context_id] = self.delivery
        else:
            chosen[context.context_id] = self.store or self.services[VERIFICATION]
        if roles is not None:
            result = replace(result, scu_role=sends and self.store is not None, scp_role=receives)
        return result

    def _as_destinations_would(
        self, result: ContextResult, context: ProposedContext, caller: Caller, called_ae: str, config: Config
    ) -> ContextResult:
        """Refuse what every destination the store could go to would refuse (the modality must not be told
        Success for an instance that will be dead-lettered); accept a syntax some possible destination takes.
        A destination never asked (unreachable) is trusted to accept, as before."""
        assert self.destination_verdict is not None
        proposed = tuple(ts for ts in context.transfer_syntaxes if ts in STORAGE_SYNTAXES)
        acceptable: set[str] = set()
        for decision in possible_decisions(config, caller.ae_title, called_ae):
            takes = set(proposed)
            for server in decision.destinations:
                verdict = self.destination_verdict(server.name, context.abstract_syntax, proposed)
                if verdict is not None:
                    takes &= verdict
            acceptable |= takes
        chosen = next((ts for ts in proposed if ts in acceptable), None)
        if chosen is None:
            return ContextResult(
                context.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, context.abstract_syntax, "",
                reason="no destination this store could reach accepts this SOP class in the proposed transfer syntaxes",
            )
        return replace(result, result=ACCEPTED, transfer_syntax=chosen)

    def learn_destinations(self, request: AssociateRequest, caller: Caller, config: Config) -> None:
        """Before answering: ask the destinations this caller's stores could reach about the storage
        contexts it proposes that they were never asked about (within router.connect_timeout)."""
        if self.capabilities is None or caller.kind == "server" or self.store is None:
            return
        roles = request.roles or {}
        contexts = []
        for context in request.contexts:
            role = roles.get(context.abstract_syntax)
            if context.abstract_syntax in self.services or (role is not None and not role.scu):
                continue
            if storage_class_allowed(config, context.abstract_syntax)[0]:
                syntaxes = [ts for ts in context.transfer_syntaxes if ts in STORAGE_SYNTAXES]
                if syntaxes:
                    contexts.append((context.abstract_syntax, syntaxes))
        if not contexts:
            return
        now = time.monotonic()
        servers = {
            server.name: server
            for decision in possible_decisions(config, caller.ae_title, request.called_ae)
            for server in decision.destinations
            if self._unreachable_until.get(server.name, 0.0) <= now
        }
        if not servers:
            return
        verdicts = self.capabilities.verdicts(list(servers.values()), contexts, config.router.connect_timeout_s)
        for name, by_class in verdicts.items():
            if any(verdict.unknown for verdict in by_class.values()):
                # Not reachable (or silent): trusted to accept; not asked again for a while, so that every
                # association does not wait out connect_timeout while a destination is down.
                self._unreachable_until[name] = time.monotonic() + PROBE_BACKOFF_S
