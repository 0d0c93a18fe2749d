"""Builders of router config files for tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def base_document(router_port: int = 11199, servers: list[dict] | None = None) -> dict[str, Any]:
    return {
        "router": {
            "ae_title": "DICOMROUTER",
            "host": "127.0.0.1",
            "port": router_port,
            "catalog": "sqlite:///var/catalog.db",
            "spool": "var/spool",
            "accept_unknown_callers": False,
        },
        "servers": servers
        or [
            {"name": "Test PACS 1", "ae_title": "TEST_PACS_1", "host": "127.0.0.1", "port": 4242,
             "environment": "test", "active": True, "primary": True, "deleted": False},
            {"name": "Prod PACS 1", "ae_title": "PROD_PACS_1", "host": "127.0.0.1", "port": 4245,
             "environment": "prod", "active": True, "primary": False, "deleted": False},
        ],
        "clients": [
            {"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": 11113, "roles": ["test_read", "test_write"]},
        ],
        "routes": [],
    }


def write_document(path: Path, document: dict[str, Any]) -> Path:
    from ruamel.yaml import YAML

    yaml_engine = YAML(typ="safe")
    yaml_engine.default_flow_style = False
    with open(path, "w", encoding="utf-8") as handle:
        yaml_engine.dump(copy.deepcopy(document), handle)
    return path


def server_config(port: int, name: str = "Fake", ae_title: str = "PACS", host: str = "127.0.0.1"):
    """A ServerConfig for a peer a test runs itself (a fake PACS, a dead port)."""
    from dicomrouter.config import CallingAETitles, ServerConfig

    return ServerConfig(name, ae_title, host, port, "test", True, True, False, "", None, CallingAETitles(), {})
