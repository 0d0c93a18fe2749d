"""Validated, comment-preserving edits of the YAML file (servers and clients)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from dicomrouter.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    read_document,
    suggest,
    yaml_round_trip,
)


class RegistryError(Exception):
    """An edit that is refused, with the reason for the admin."""


class InvalidResult(RegistryError):
    """The edited file would not pass validation; the message names each key path."""


@dataclass(frozen=True)
class EditResult:
    config: Config
    message: str
    servers: tuple[str, ...] = ()  # the names of the servers the edit found (for the audit trail)


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it, fsync the folder."""
    folder = path.parent
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ConfigDocument:
    """The YAML file as a round-trip document; `commit()` validates the whole result, then writes."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()
        self.data = read_document(self.path)
        if self.data is None:
            self.data = CommentedMap()
        self.servers_found: list[str] = []

    def section(self, name: str) -> CommentedSeq:
        value = self.data.get(name)
        if value is None:
            value = CommentedSeq()
            self.data[name] = value
        return value

    def find_server(self, name: str) -> tuple[CommentedMap, str]:
        """The server entry named `name`, else the one with that AE title; and its name."""
        entries = [item for item in self.section("servers") if isinstance(item, Mapping)]
        found = next((item for item in entries if item.get("name") == name), None)
        found = found or next((item for item in entries if item.get("ae_title") == name), None)
        if found is None:
            known = {str(item.get(key)) for item in entries for key in ("name", "ae_title")}
            raise RegistryError(f"no server named {name!r}, nor with that AE title; {suggest(name, known)}")
        self.servers_found.append(str(found.get("name")))
        return found, self.servers_found[-1]

    def find_client(self, ae_title: str) -> CommentedMap:
        for item in self.section("clients"):
            if isinstance(item, Mapping) and item.get("ae_title") == ae_title:
                return item
        raise RegistryError(f"no client with AE title {ae_title!r}")

    def render(self) -> str:
        buffer = io.StringIO()
        yaml_round_trip().dump(self.data, buffer)
        return buffer.getvalue()

    def validate(self) -> Config:
        """Parse the edited document again, so what is written is what `load_config` accepts."""
        text = self.render()
        reparsed = yaml_round_trip().load(text)
        try:
            return parse_config(reparsed, self.path)
        except ConfigError as exc:
            reasons = "; ".join(f"{p.key}: {p.message}" + (f" ({p.fix})" if p.fix else "") for p in exc.problems)
            raise InvalidResult(f"refused, the result would be invalid: {reasons}") from None

    def commit(self) -> Config:
        config = self.validate()
        write_atomically(self.path, self.render())
        return config


def _is_flow(node: Any) -> bool:
    return bool(getattr(node, "fa", None) is not None and node.fa.flow_style())


def _last_scalar(node: Any) -> tuple[list, int] | None:
    """The comment slot after the last scalar of block collection `node`, created if missing.

    ruamel keeps there the end-of-line comment plus the blank lines and comment lines that
    follow it, which visually belong before whatever comes next in the file.
    """
    while isinstance(node, (CommentedMap, CommentedSeq)) and node and not _is_flow(node):
        key = list(node)[-1] if isinstance(node, CommentedMap) else len(node) - 1
        value = node[key]
        if isinstance(value, (CommentedMap, CommentedSeq)) and value and not _is_flow(value):
            node = value
            continue
        slot = node.ca.items.setdefault(key, [None, None, None, None])
        return slot, (2 if isinstance(node, CommentedMap) else 0)
    return None


def _take_following_lines(node: Any) -> str:
    """Remove and return the lines after the end-of-line comment of `node`'s last scalar."""
    found = _last_scalar(node)
    if not found:
        return ""
    slot, index = found
    token = slot[index]
    if not isinstance(token, CommentToken):
        return ""
    head, newline, tail = token.value.partition("\n")
    if not tail:
        return ""
    if head.strip():
        token.value = head + newline
    else:
        slot[index] = None  # only the newline the emitter writes anyway was left
    return tail


def _give_following_lines(node: Any, lines: str) -> None:
    """Put `lines` after the last scalar of `node` (after its end-of-line comment, if any)."""
    found = _last_scalar(node) if lines else None
    if not found:
        return
    slot, index = found
    token = slot[index]
    if isinstance(token, CommentToken):
        token.value = token.value + lines
    else:
        slot[index] = CommentToken("\n" + lines, CommentMark(0))


def set_value(mapping: CommentedMap, key: str, value: Any) -> None:
    """Set a key, appending it at the end when new (existing keys keep their place).

    A key added or removed at the end takes along the blank lines and comments that
    followed the mapping, so they stay between it and the next thing in the file.
    """
    if key in mapping and value is not None:
        mapping[key] = value
        return
    if key not in mapping and value is None:
        return
    lines = _take_following_lines(mapping)
    if value is None:
        del mapping[key]
    else:
        mapping[key] = value
    _give_following_lines(mapping, lines)


def append_item(sequence: CommentedSeq, item: CommentedMap) -> None:
    """Append to a block sequence, keeping what followed the old last item after the new one."""
    lines = _take_following_lines(sequence)
    sequence.append(item)
    _give_following_lines(sequence, lines)


def remove_item(sequence: CommentedSeq, item: CommentedMap) -> None:
    """Remove an item; what followed the sequence stays after it."""
    lines = _take_following_lines(sequence)
    sequence.remove(item)
    _give_following_lines(sequence, lines)


def edit(path: Path, change: Callable[[ConfigDocument], str]) -> EditResult:
    """Apply `change` to the document, validate the whole result, write it atomically.

    ConfigError when the file cannot be parsed, or is itself invalid and the edit did not mend it.
    """
    document = ConfigDocument(path)
    message = change(document)
    try:
        config = document.commit()
    except InvalidResult:
        load_config(document.path)  # a file already broken is reported as such, like `config check`
        raise
    return EditResult(config, message, tuple(dict.fromkeys(document.servers_found)))


# ----------------------------------------------------------------------------- servers


def add_server(document: ConfigDocument, fields: dict[str, Any]) -> str:
    name = fields["name"]
    if any(isinstance(s, Mapping) and s.get("name") == name for s in document.section("servers")):
        raise RegistryError(f"a server named {name!r} already exists")
    fields = {"active": True, "primary": False, "deleted": False} | {
        key: value for key, value in fields.items() if value is not None
    }
    entry = CommentedMap()
    for key in (
        "name", "ae_title", "host", "port", "environment", "active", "primary", "deleted", "comments", "web_url",
        "retrieve",
    ):
        if key in fields:
            entry[key] = fields[key]
    if entry["primary"]:
        for other in document.section("servers"):
            if isinstance(other, Mapping) and other.get("primary"):
                set_value(other, "primary", False)
    append_item(document.section("servers"), entry)
    return f"added server {name!r}"


def edit_server(document: ConfigDocument, name: str, fields: dict[str, Any]) -> str:
    entry, name = document.find_server(name)
    changed = []
    for key, value in fields.items():
        if value is None:
            continue
        if key == "comments" and value == "":
            set_value(entry, key, None)
        else:
            set_value(entry, key, value)
        changed.append(key)
    if not changed:
        raise RegistryError("nothing to change: give at least one option")
    return f"edited server {name!r}: {', '.join(changed)}"


def set_active(document: ConfigDocument, name: str, active: bool) -> str:
    entry, name = document.find_server(name)
    if entry.get("deleted"):
        raise RegistryError(f"server {name!r} is deleted; restore it first")
    if not active and entry.get("primary"):
        raise RegistryError(f"server {name!r} is the primary; make another server primary first")
    set_value(entry, "active", active)
    return f"server {name!r} is now {'active' if active else 'inactive'}"


def set_primary(document: ConfigDocument, name: str) -> str:
    entry, name = document.find_server(name)
    if entry.get("deleted"):
        raise RegistryError(f"server {name!r} is deleted; restore it first")
    if not entry.get("active", True):
        raise RegistryError(f"server {name!r} is inactive; activate it before making it primary")
    for other in document.section("servers"):
        if isinstance(other, Mapping) and other is not entry and other.get("primary"):
            set_value(other, "primary", False)
    set_value(entry, "primary", True)
    return f"server {name!r} is now the primary"


def delete_server(document: ConfigDocument, name: str, studies_held: int | None) -> str:
    """Soft delete when the catalog records studies on it; remove from the file otherwise."""
    entry, name = document.find_server(name)
    if entry.get("primary"):
        raise RegistryError(f"server {name!r} is the primary; make another server primary first")
    if studies_held is None or studies_held > 0:
        set_value(entry, "deleted", True)
        set_value(entry, "active", False)
        why = "the catalog is unavailable" if studies_held is None else f"the catalog records {studies_held} studies on it"
        return f"server {name!r} soft-deleted: {why} (kept for history)"
    remove_item(document.section("servers"), entry)
    return f"server {name!r} removed from the file (no studies recorded on it)"


def restore_server(document: ConfigDocument, name: str) -> str:
    entry, name = document.find_server(name)
    if not entry.get("deleted"):
        raise RegistryError(f"server {name!r} is not deleted")
    set_value(entry, "deleted", False)
    set_value(entry, "active", False)
    return f"server {name!r} restored (inactive; activate it when ready)"


# ----------------------------------------------------------------------------- clients

CLIENT_KEYS = ("ae_title", "host", "port", "roles", "query_servers", "move_destinations", "http_token_sha256")
LIST_KEYS = ("roles", "query_servers", "move_destinations")


def _yaml_value(key: str, value: Any) -> Any:
    """Lists as one-line flow sequences (`roles: [test_read, test_write]`), the rest as given."""
    if key in LIST_KEYS:
        sequence = CommentedSeq(value)
        sequence.fa.set_flow_style()
        return sequence
    return value


def _server_names(document: ConfigDocument, fields: dict[str, Any]) -> dict[str, Any]:
    """Server AE titles given for query_servers / move_destinations, written as the servers' names."""
    entries = [s for s in document.section("servers") if isinstance(s, Mapping)]
    names = {str(s.get("name")) for s in entries}
    clients = {str(c.get("ae_title")) for c in document.section("clients") if isinstance(c, Mapping)}
    by_ae = {str(s.get("ae_title")): str(s.get("name")) for s in entries}
    fields = dict(fields)
    for key in ("query_servers", "move_destinations"):
        if fields.get(key) is not None:
            keep = names | (clients if key == "move_destinations" else set())
            fields[key] = [item if item in keep else by_ae.get(item, item) for item in fields[key]]
    return fields


def add_client(document: ConfigDocument, fields: dict[str, Any]) -> str:
    fields = _server_names(document, fields)
    ae_title = fields["ae_title"]
    if any(isinstance(c, Mapping) and c.get("ae_title") == ae_title for c in document.section("clients")):
        raise RegistryError(f"a client with AE title {ae_title!r} already exists")
    entry = CommentedMap()
    for key in CLIENT_KEYS:
        if fields.get(key) is not None:
            entry[key] = _yaml_value(key, fields[key])
    entry.setdefault("roles", _yaml_value("roles", []))
    append_item(document.section("clients"), entry)
    return f"added client {ae_title!r}"


def edit_client(document: ConfigDocument, ae_title: str, fields: dict[str, Any], clear: tuple[str, ...] = ()) -> str:
    """Set the fields given (None: unchanged) and remove the keys in `clear`."""
    fields = _server_names(document, fields)
    entry = document.find_client(ae_title)
    changed = []
    for key in clear:
        if key not in CLIENT_KEYS or key == "ae_title":
            raise RegistryError(f"cannot clear {key!r}; clearable: {', '.join(CLIENT_KEYS[1:])}")
        if fields.get(key) is not None:
            raise RegistryError(f"{key!r} is both set and cleared")
        set_value(entry, key, None)
        changed.append(f"{key} cleared")
    for key, value in fields.items():
        if value is None:
            continue
        set_value(entry, key, _yaml_value(key, value))
        changed.append(key)
    if not changed:
        raise RegistryError("nothing to change: give at least one option")
    return f"edited client {ae_title!r}: {', '.join(changed)}"


def remove_client(document: ConfigDocument, ae_title: str) -> str:
    remove_item(document.section("clients"), document.find_client(ae_title))
    return f"removed client {ae_title!r}"


def set_client_token(document: ConfigDocument, ae_title: str, token_sha256: str) -> str:
    """Store the sha256 of a client's new HTTP token (the token itself never reaches the file)."""
    set_value(document.find_client(ae_title), "http_token_sha256", token_sha256)
    return f"new HTTP token for client {ae_title!r} (sha256 stored)"
