"""Where is a study: the catalog first, then a C-FIND to every server the caller may read."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom import Dataset

from dicomrouter.catalog.queries import Catalog
from dicomrouter.config import Config, ServerConfig
from dicomrouter.logging import get_logger
from dicomrouter.net.find_client import STUDY_ROOT_FIND, PeerFind, PeerFindError
from dicomrouter.routing.move_routes import order_sources

log = get_logger(__name__)


@dataclass
class Location:
    """The servers to retrieve a study from, and what was learned on the way."""

    sources: list[ServerConfig]
    inactive_only: bool = False  # every source is inactive (historical data)
    found_by: str = "catalog"  # catalog | find
    unreachable: dict[str, str] = field(
        default_factory=dict
    )  # server name -> why the C-FIND failed


def query_study_holders(
    config: Config, servers: list[ServerConfig], study_uid: str
) -> tuple[list[str], dict[str, str]]:
    """C-FIND (Study Root, STUDY level) `study_uid` on `servers` in parallel: (holders, failures)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid

    def ask(server: ServerConfig) -> tuple[str, bool | str]:
        find = PeerFind(
            server, config.router, STUDY_ROOT_FIND, identifier, config.router.find_timeout_s
        )
        try:
            found = sum(1 for _ in find.answers()) > 0  # read to the final answer
            return server.name, found
        except PeerFindError as exc:
            return server.name, exc.reason
        finally:
            find.close()

    holders, failures = [], {}
    if not servers:
        return holders, failures
    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="locate") as pool:
        for name, outcome in pool.map(ask, servers):
            if outcome is True:
                holders.append(name)
            elif isinstance(outcome, str):
                failures[name] = outcome
    return holders, failures


def locate_study(
    config: Config,
    catalog: Catalog | None,
    study_uid: str,
    may_use: Callable[[ServerConfig], bool] = lambda _server: True,
) -> Location:
    """The servers holding `study_uid` that `may_use` allows, in the order to retrieve from."""
    if catalog is not None:
        names = [row.server_name for row in catalog.where_study(study_uid)]
        sources, inactive = _usable(config, names, may_use)
        if sources or inactive:
            return _location(sources, inactive, study_uid, "catalog")
    candidates = [s for s in config.live_servers() if may_use(s)]
    holders, failures = query_study_holders(config, candidates, study_uid)
    if catalog is not None:
        for name in holders:
            try:
                catalog.record_study_seen(name, study_uid, "found")
            except Exception:  # learning is a nicety; the move goes on
                log.exception("catalog_learn_failed", server=name, study_uid=study_uid)
    sources, inactive = _usable(config, holders, may_use)
    location = _location(sources, inactive, study_uid, "find")
    location.unreachable = failures
    return location


def _usable(
    config: Config, names: list[str], may_use
) -> tuple[list[ServerConfig], list[ServerConfig]]:
    allowed = [name for name in names if (s := config.server(name)) is not None and may_use(s)]
    return order_sources(config, allowed)


def _location(sources, inactive, study_uid: str, found_by: str) -> Location:
    if sources:
        return Location(sources, False, found_by)
    if inactive:
        log.warning(
            "move_from_inactive_server",
            study_uid=study_uid,
            servers=[s.name for s in inactive],
            reason="no active server holds the study; historical data stays reachable",
        )
        return Location(inactive, True, found_by)
    return Location([], False, found_by)
