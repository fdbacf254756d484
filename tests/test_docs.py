"""Docs stay true to the code: every config key is documented, and nothing documented is gone."""

import dataclasses
import re
from pathlib import Path

from utils.config import Config, config_to_dict

REPO = Path(__file__).resolve().parent.parent


def dotted_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from dotted_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_config_key_is_documented_and_vice_versa():
    text = (REPO / "docs" / "CONFIG.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", text, flags=re.MULTILINE))
    actual = set(dotted_keys(config_to_dict(Config())))
    assert actual - documented == set(), "undocumented keys"
    assert documented - actual == set(), "documented keys that do not exist"
    assert dataclasses.is_dataclass(Config)


def test_shipped_configs_load():
    from utils.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.run.name, path
