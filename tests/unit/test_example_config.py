"""``e2a.example.yaml`` shows every documented key with its real default, and is valid as is
and fully uncommented (so it cannot drift from e2a.config or docs/configuration.md)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from e2a.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "e2a.example.yaml"
_KEY_LINE = re.compile(r"^# ( *[a-z_]+:.*)$")


def _uncommented() -> str:
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if m:
            lines.append(m.group(1))
    return "\n".join(lines) + "\n"


def _paths(tree: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        found.add(path)
        if isinstance(value, dict):
            found |= _paths(value, path + ".")
    return found


def test_example_config_loads_unchanged_to_the_defaults(tmp_path):
    """As shipped (all commented) and fully uncommented, the example loads to Config()."""
    assert load_config(str(EXAMPLE), environ={}, cwd=tmp_path) == Config()
    uncommented = tmp_path / "e2a.yaml"
    uncommented.write_text(_uncommented())
    assert load_config(str(uncommented), environ={}, cwd=tmp_path) == Config()


def test_example_config_shows_every_key():
    """Every key of the Config dataclasses and of docs/configuration.md's table is in the example."""
    shown = _paths(yaml.safe_load(_uncommented()))
    wanted = set()
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.type) or f.default_factory is not dataclasses.MISSING:  # a section
            section = getattr(Config(), f.name)
            wanted |= {f"{f.name}.{g.name}" for g in dataclasses.fields(section)}
        else:
            wanted.add(f.name)
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", (REPO / "docs" / "configuration.md").read_text(), re.M))
    assert documented, "the key table of docs/configuration.md was not found"
    assert not (wanted - shown), sorted(wanted - shown)
    assert not (documented - shown), sorted(documented - shown)
