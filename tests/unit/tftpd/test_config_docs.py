"""The shipped sample config and the configuration reference list every key with its default."""

from pathlib import Path

from common.config import defaults, load_config, render_reference
from tftpd.config import SCHEMA

REPO = Path(__file__).resolve().parents[3]


def test_sample_config_lists_every_key_and_its_default():
    sample = (REPO / "packaging" / "etc" / "tftpd.conf").read_text()
    assert render_reference(SCHEMA) in sample


def test_sample_config_is_valid_and_all_defaults():
    assert load_config(str(REPO / "packaging" / "etc" / "tftpd.conf"), SCHEMA) == defaults(SCHEMA)


def test_reference_documents_every_key():
    reference = (REPO / "docs" / "config-tftpd.md").read_text()
    for key in SCHEMA.keys:
        assert f"| `{key.name}` | `{key.default}` |" in reference
