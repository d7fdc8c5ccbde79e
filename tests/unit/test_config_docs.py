"""Every daemon's shipped sample config and configuration reference list every key with its
default, so the documentation cannot drift from the schema."""

import importlib
from pathlib import Path

import pytest

from common.daemon.config import defaults, load_config, render_reference

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ["tftpd", "proxydhcpd", "policyd", "imgsrvd"]
PACKAGES = {"policyd": "prebootpolicyd"}  # the daemon's name where its package differs


def schema(daemon: str):
    return importlib.import_module(f"{PACKAGES.get(daemon, daemon)}.config").SCHEMA


@pytest.mark.parametrize("daemon", DAEMONS)
def test_sample_config_lists_every_key_and_its_default(daemon):
    sample = (REPO / "packaging" / "etc" / f"{daemon}.conf").read_text()
    assert render_reference(schema(daemon)) in sample


@pytest.mark.parametrize("daemon", DAEMONS)
def test_sample_config_is_valid_and_all_defaults(daemon):
    path = str(REPO / "packaging" / "etc" / f"{daemon}.conf")
    assert load_config(path, schema(daemon)) == defaults(schema(daemon))


@pytest.mark.parametrize("daemon", DAEMONS)
def test_reference_documents_every_key(daemon):
    reference = (REPO / "docs" / f"config-{daemon}.md").read_text()
    for key in schema(daemon).keys:
        assert f"| `{key.name}` | `{key.default}` |" in reference
