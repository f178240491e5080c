"""Experiment configs as YAML: `load_config("configs/x.yaml", ["train.lr=1e-4", "zero.stage=3"])`.

Reads the file, applies the command-line overrides and returns a `pipeline.core.config.Config`
(whose fields, types and checks live there). Any mistake is a `ConfigError` whose one-line message
names the file and the key. `python -m pipeline.config FILE [key=value ...]` prints the resolved config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pipeline.core.config import Config, ConfigError, from_dict, to_dict
from pipeline.core.fileio import atomic_write_text


def apply_override(data: dict, override: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a raw config dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, check it; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    if data is None:  # an empty file is a damaged one more often than a wish for every default
        raise ConfigError(f"{path}: empty config (an experiment names at least its run.dir and data.shards)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...), got a {type(data).__name__}")
    try:
        for override in overrides:
            apply_override(data, override)
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config_or_report(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config | None:
    """load_config for a command's main(): a ConfigError is printed as one line, and None returned."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


if __name__ == "__main__":
    try:
        resolved = load_config(sys.argv[1], sys.argv[2:])
    except (ConfigError, IndexError) as e:
        sys.exit(
            f"error: {e}" if isinstance(e, ConfigError) else "usage: python -m pipeline.config FILE [key=value ...]"
        )
    print(yaml.safe_dump(to_dict(resolved), sort_keys=False), end="")
