"""`find`: the federated C-FIND from the command line, with who holds what and how each server did."""

from __future__ import annotations

import json
import shlex
import sys
from typing import TYPE_CHECKING

import click

from dicomrouter.cli.common import CliState, open_catalog, pass_state, print_table, server_argument

# pydicom, pynetdicom and the federation load when `find` runs, not with every command.
if TYPE_CHECKING:
    from pydicom import Dataset

    from dicomrouter.config import Config, ServerConfig
    from dicomrouter.query.federation import FederatedAnswer, FindSummary
    from dicomrouter.routing.access import Caller

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE", "WORKLIST")
_HIDDEN = ("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle")


def _caller(config: Config, as_client: str | None) -> Caller:
    from dicomrouter.routing.access import Caller

    if as_client is None:  # the admin at the router's console reads everything
        return Caller(config.router.ae_title, "cli", "client", frozenset({"admin"}))
    client = config.client(as_client)
    if client is None:
        raise click.ClickException(f"no client with AE title {as_client!r} in {config.path}")
    return Caller(client.ae_title, "cli", "client", client.roles, client=client)


def _query_model(level: str, model: str | None) -> str:
    from dicomrouter.net.find_client import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, WORKLIST_FIND
    from dicomrouter.query.merge import LEVELS_BY_MODEL

    if level == "WORKLIST":
        return WORKLIST_FIND
    model = model or ("patient" if level == "PATIENT" else "study")
    if level not in LEVELS_BY_MODEL[model]:
        raise click.UsageError(f"level {level} is not in the {model} root model; use --model patient")
    return PATIENT_ROOT_FIND if model == "patient" else STUDY_ROOT_FIND


def _columns(identifier: Dataset) -> list[tuple[str, ...]]:
    """Attribute paths to show: the query's keys, one level into sequences."""
    paths = []
    for elem in identifier:
        if elem.keyword in _HIDDEN:
            continue
        if elem.VR == "SQ":
            items = elem.value
            paths += [(elem.keyword, inner.keyword) for inner in (items[0] if items else [])]
        else:
            paths.append((elem.keyword or str(elem.tag),))
    return paths


def _value(answer: Dataset, path: tuple[str, ...]) -> str:
    dataset = answer
    for keyword in path[:-1]:
        items = dataset.get(keyword)
        if not items:
            return ""
        dataset = items[0]
    value = dataset.get(path[-1])
    if value is None:
        return ""
    if isinstance(value, list | tuple) or value.__class__.__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _in_config_order(config: Config, names: list[str]) -> list[str]:
    """The servers holding an answer in the file's order, not the order they happened to answer."""
    order = {server.name: index for index, server in enumerate(config.servers)}
    return sorted(names, key=lambda name: order.get(name, len(order)))


def _holders(config: Config, answer: FederatedAnswer) -> str:
    """The servers holding an answer; with each one's instance count when the copies differ."""
    names = _in_config_order(config, answer.servers)
    if not answer.copies_differ:
        return ", ".join(names)
    incomplete = set(answer.incomplete)
    return ", ".join(
        f"{name} ({answer.counts.get(name)}{', incomplete' if name in incomplete else ''})" for name in names
    )


def _print_table(config: Config, columns, answers: list[FederatedAnswer]) -> None:
    headers = [".".join(path) for path in columns] + ["servers"]
    rows = [[_value(a.identifier, path) for path in columns] + [_holders(config, a)] for a in answers]
    print_table(headers, rows)
    differ = sum(a.copies_differ for a in answers)
    if differ:
        click.echo(
            f"copies differ for {differ} of {len(answers)}: each server's instance count is shown, the incomplete"
            " copies are flagged; the row (and a DICOM answer) shows the most complete copy"
        )


def _print_servers(summary: FindSummary, skipped: tuple[ServerConfig, ...]) -> None:
    click.echo("")
    outcome = {"complete": "", "partial": " (partial)", "failed": " (every server failed)"}.get(
        summary.outcome, f" ({summary.outcome})"
    )
    not_asked = f"; {len(skipped)} inactive not asked" if skipped else ""
    click.echo(
        f"{summary.answers} answers from {len(summary.servers)} servers in {summary.elapsed_ms:.0f} ms{outcome}{not_asked}"
    )
    for report in summary.failed_servers:
        click.echo(f"failed: {report.name}: {report.state}: {report.reason}")
    for server in skipped:
        click.echo(f"skipped: {server.name}: inactive; ask it with --server {shlex.quote(server.name)}")
    click.echo("")
    print_table(
        ("server", "state", "answers", "first answer ms", "total ms"),
        [(r.name, r.state, r.answers, r.first_answer_ms, r.elapsed_ms) for r in summary.servers],
    )


def _as_json(
    config: Config, columns, answers: list[FederatedAnswer], summary: FindSummary, skipped: tuple[ServerConfig, ...]
) -> str:
    document = {
        "outcome": summary.outcome,
        "elapsed_ms": summary.elapsed_ms,
        "answers": [
            {
                "attributes": {".".join(path): _value(a.identifier, path) for path in columns},
                "servers": _in_config_order(config, a.servers),
                "instances": {name: a.counts.get(name) for name in _in_config_order(config, a.servers)},
                "incomplete": _in_config_order(config, a.incomplete),
            }
            for a in answers
        ],
        "servers": [r.as_dict() for r in summary.servers],
        "skipped_inactive": [server.name for server in skipped],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


@click.command("find")
@click.option("--level", type=click.Choice(LEVELS, case_sensitive=False), default="STUDY", show_default=True)
@click.option("--model", type=click.Choice(["patient", "study"]), default=None,
              help="Q/R information model (default: patient root for PATIENT, else study root).")
@click.option("-k", "--key", "keys", multiple=True, metavar="KEY=VALUE",
              help="Matching or return key, as findscu: PatientName=SMITH*, 0010,0020=, "
                   "StudyDate=20240101-20240131, ScheduledProcedureStepSequence[0].Modality=CT.")
@click.option("--server", "servers", multiple=True, metavar="NAME", help="Ask only these servers (repeat).")
@click.option("--as", "as_client", metavar="AE", help="Query as this client: its roles and query_servers.")
@click.option("--no-defaults", is_flag=True, help="Send only the -k keys, not the level's usual return keys.")
@click.option("--timeout", type=float, default=None, help="Seconds per server (default: router.find_timeout).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_state
def find_command(state: CliState, level: str, model: str | None, keys: tuple[str, ...],
                 servers: tuple[str, ...], as_client: str | None, no_defaults: bool,
                 timeout: float | None, as_json: bool) -> None:
    """Query every server you may read at once; one row per study (or patient, series, image)."""
    from dicomrouter.logging import configure_logging
    from dicomrouter.query.federation import Federation
    from dicomrouter.query.keys import BadKey, build_identifier
    from dicomrouter.routing.find_targets import find_targets

    config = state.config()
    level = level.upper()
    query_model = _query_model(level, model)
    try:
        identifier = build_identifier(level, keys, defaults=not no_defaults)
    except BadKey as exc:
        raise click.BadParameter(str(exc), param_hint="-k") from None
    servers = tuple(server_argument(config, name).name for name in servers)
    configure_logging("console", "error")  # the report below says which servers failed
    targets = find_targets(config, _caller(config, as_client), worklist=level == "WORKLIST",
                           names=servers or None)
    if not targets.servers:
        skipped = "; inactive, not asked: " + ", ".join(s.name for s in targets.skipped) if targets.skipped else ""
        raise click.ClickException((targets.refused or "no server to query") + skipped)
    try:
        catalog = open_catalog(config, must_exist=True)
    except click.ClickException:
        catalog = None  # finding works without it; nothing is learned
    # No one is waiting: merge fully; one query: no association to keep.
    federation = Federation(catalog, merge_window_s=None, keep_links=False)
    retrieve_ae = None if level == "WORKLIST" else config.router.ae_title
    run = federation.start(targets.servers, config.router, query_model, identifier, level,
                           retrieve_ae, timeout_s=timeout, calling_ae="cli")
    answers = list(run.answers())
    federation.close()
    summary = run.summary
    assert summary is not None
    columns = _columns(identifier)
    if as_json:
        click.echo(_as_json(config, columns, answers, summary, targets.skipped))
    else:
        _print_table(config, columns, answers)
        _print_servers(summary, targets.skipped)
        if summary.outcome == "limited":
            click.echo(f"stopped at router.max_find_results ({config.router.max_find_results}); narrow the query", err=True)
    sys.exit(1 if summary.outcome == "failed" else 0)
