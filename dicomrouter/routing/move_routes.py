"""Pure C-MOVE decisions: what a Move Destination names, who may send there, and how to get there.

A source server reaches a destination *directly* when its `move_routing` knows the destination
(the source then stores straight to it); otherwise the router *relays* (retrieves, then stores).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomrouter.config import ClientConfig, Config, ServerConfig
from dicomrouter.routing.access import Caller, inactive_reason, may_write

DIRECT = "direct"
RELAY = "relay"


@dataclass(frozen=True)
class MoveDestination:
    """Where a C-MOVE's sub-operations must end up."""

    name: str  # the server's name, or the client's AE title
    ae_title: str
    host: str
    port: int
    kind: str  # server | client
    server: ServerConfig | None = None
    client: ClientConfig | None = None

    @property
    def routing_keys(self) -> tuple[str, ...]:
        """The keys a source's `move_routing` may list this destination under."""
        return tuple(dict.fromkeys((self.name, self.ae_title)))


@dataclass(frozen=True)
class MoveRoute:
    """How one source server sends to one destination."""

    source: ServerConfig
    destination: MoveDestination
    via: str  # direct | relay
    move_destination_ae: (
        str | None
    )  # the AE title the source knows the destination (or the router) by

    @property
    def direct(self) -> bool:
        return self.via == DIRECT


def resolve_destination(config: Config, move_destination: str) -> MoveDestination | None:
    """The destination a Move Destination AE title (or server name) names, or None when unknown.

    A live server (by name or AE title) or a client with a host and port; a deleted server is
    unknown. The router's own AE title is not a destination: it would loop.
    """
    move_destination = move_destination.strip()
    if not move_destination:
        return None
    server = config.server(move_destination)
    if server is None or server.deleted:
        server = config.server_by_ae(move_destination)
    if server is not None and not server.deleted:
        return MoveDestination(
            server.name, server.ae_title, server.host, server.port, "server", server=server
        )
    client = config.client(move_destination)
    if client is not None and client.host and client.port:
        return MoveDestination(
            client.ae_title, client.ae_title, client.host, client.port, "client", client=client
        )
    return None


def destination_refusal(destination: MoveDestination) -> str | None:
    """Why no one may move to `destination` (an inactive server takes nothing, as for a store), or None."""
    if destination.server is not None and not destination.server.usable:
        return inactive_reason(destination.server)
    return None


def may_move_to(caller: Caller, destination: MoveDestination, config: Config) -> bool:
    """True when the caller may send studies to `destination` (see move_permission)."""
    return move_permission(caller, destination, config)[0]


def move_permission(caller: Caller, destination: MoveDestination, config: Config) -> tuple[bool, str]:
    """(may the caller send studies to `destination`, why).

    An admin may send anywhere. A client listing `move_destinations` may send to those (server
    names or client AE titles); otherwise to itself and to the servers it may write to.
    """
    if "admin" in caller.roles:
        return True, "admin"
    listed = caller.client.move_destinations if caller.client is not None else None
    if listed is not None:
        if any(key in listed for key in destination.routing_keys):
            return True, "listed in its move_destinations"
        return False, f"not in its move_destinations ({', '.join(listed) or 'empty'})"
    if destination.kind == "client":
        if destination.ae_title == caller.ae_title:
            return True, "itself"
        return False, "another client; only itself and writable servers unless move_destinations lists it"
    assert destination.server is not None
    if may_write(caller, destination.server):
        return True, f"may write to {destination.server.environment} servers"
    return False, f"needs {destination.server.environment}_write (or admin, or move_destinations)"


def plan_route(source: ServerConfig, destination: MoveDestination, router_ae: str) -> MoveRoute:
    """Direct when the source's move_routing knows the destination, otherwise relay."""
    for key in destination.routing_keys:
        ae_title = source.move_routing.get(key)
        if ae_title:
            return MoveRoute(source, destination, DIRECT, ae_title)
    return MoveRoute(source, destination, RELAY, source.move_routing.get(router_ae))


def route_table(config: Config) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The move-AE grid: destination names across, one row per live source server.

    A cell is the AE title the source uses for that destination, or "relay".
    """
    destinations = [s.name for s in config.live_servers()]
    destinations += [c.ae_title for c in config.clients if c.host and c.port]
    rows = []
    for source in config.live_servers():
        cells = []
        for name in destinations:
            destination = resolve_destination(config, name)
            if destination is None or destination.name == source.name:
                cells.append("-")
                continue
            route = plan_route(source, destination, config.router.ae_title)
            cells.append(route.move_destination_ae if route.direct else RELAY)
        rows.append((source.name, cells))
    return destinations, rows
