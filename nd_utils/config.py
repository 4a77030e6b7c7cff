"""YAML run configurations: profiles in `configs/`, dotted overrides, the effective config.

A profile is a complete nested mapping (`configs/offline.yaml`, `configs/paper.yaml`). Overrides
use dotted keys (`target.layers=[layer4]`, `probe.sets.0.path=/data/val`) and may only set keys
that exist in the profile, so a typo is an error rather than a silently ignored setting.
`nd_utils.context.load_config` then checks the type, range or choices of every value
(`nd_utils.config_schema`): a bad value fails at once, with one ConfigError naming each key, its
value and what is expected. `Config.settings` is the config parsed once into typed objects.

Example:
    >>> cfg = read_config("offline", ["target.layers=[head]"])
    >>> cfg.settings.target.layers
    ['head']
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .config_schema import Schema, validate_config
from .errors import ConfigError, closest
from .plugins import MODULE_NAME, import_plugins

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

_MISSING = object()


def list_profiles() -> list[str]:
    """Names of the YAML profiles in `configs/` (without `.yaml`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _split(key: str) -> list[str]:
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed config key {key!r}: use dotted names such as target.layers")
    return key.split(".")


def _child(node: Any, part: str) -> Any:
    if isinstance(node, Mapping):
        return node.get(part, _MISSING)
    if isinstance(node, list) and part.lstrip("-").isdigit():
        idx = int(part)
        return node[idx] if -len(node) <= idx < len(node) else _MISSING
    return _MISSING


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(v, full + "."))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, (Mapping, list)):
                keys.extend(_all_keys(v, f"{prefix}{i}."))
    return keys


class Config:
    """A nested configuration with dotted-key access.

    `cfg["a.b"]` reads, `cfg.select(["a", "c.d"])` returns the sub-mapping a stage depends on,
    `cfg.to_dict()` a deep copy. Instances are treated as immutable: `with_overrides` copies.
    """

    def __init__(self, data: Mapping, source: str = "<dict>"):
        self._data = copy.deepcopy(dict(data))
        self.source = source
        self._settings: "Schema | None" = None

    @property
    def settings(self) -> Schema:
        """The typed settings (`cfg.settings.target.name`), parsed once from this config.

        Stage code reads attributes of these; the dotted form (`cfg["target.name"]`) is for
        overrides, keys of cache entries (`select`) and saved configs.
        """
        if self._settings is None:
            settings = validate_config(self._data, self.source)
            if settings is None:
                # only absent keys failed: name them (a config saved before they existed)
                try:
                    Schema.model_validate(self._data)
                except Exception as exc:  # noqa: BLE001 - re-raised as a ConfigError below
                    missing = sorted({".".join(map(str, e["loc"])) for e in exc.errors()
                                      if e["type"] == "missing"})
                    raise ConfigError(f"{self.source} lacks {', '.join(missing)}: add them "
                                      f"(see configs/offline.yaml) or run with a current "
                                      f"profile") from None
            self._settings = settings
        return self._settings

    def __getstate__(self) -> dict:
        # the parsed settings and the run context are rebuilt where the config is unpickled
        return {"_data": self._data, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        # Unpickling is how a Ray task (or any other worker process) receives its config: the
        # worker imports the plugins here, before the task loads a model by a name they register.
        self._data, self.source, self._settings = state["_data"], state["source"], None
        import_configured_plugins(self._data)

    def __getitem__(self, key: str) -> Any:
        node: Any = self._data
        for part in _split(key):
            node = _child(node, part)
            if node is _MISSING:
                raise self._unknown(key)
        return copy.deepcopy(node)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except ConfigError:
            return default

    def __contains__(self, key: str) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def keys(self) -> list[str]:
        """Every dotted key of the configuration, parents before children."""
        return _all_keys(self._data)

    def _unknown(self, key: str) -> ConfigError:
        near = closest(key, self.keys())
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        return ConfigError(
            f"config key {key!r} does not exist in {self.source}.{hint} "
            f"List the keys with nd_utils.load_config(...).keys()."
        )

    def set(self, key: str, value: Any) -> None:
        """Set an existing key (in place); unknown keys raise ConfigError naming close ones."""
        parts = _split(key)
        node: Any = self._data
        for part in parts[:-1]:
            node = _child(node, part)
            if node is _MISSING or not isinstance(node, (Mapping, list)):
                raise self._unknown(key)
        last = parts[-1]
        if _child(node, last) is _MISSING:
            raise self._unknown(key)
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        self._settings = None

    def with_overrides(self, overrides: "Iterable[str] | Mapping[str, Any] | None") -> "Config":
        """Return a copy with dotted overrides applied (`["a.b=1"]` or `{"a.b": 1}`)."""
        new = Config(self._data, self.source)
        for key, value in parse_overrides(overrides).items():
            new.set(key, value)
        return new

    def select(self, keys: Iterable[str]) -> dict:
        """The values of `keys` as a flat {dotted key: value} dict (what a stage reads)."""
        return {k: self[k] for k in keys}

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self._data, sort_keys=False, default_flow_style=None)

    def save(self, path: "str | Path") -> Path:
        """Write the configuration as YAML (atomically) and return the path."""
        from .store import atomic_write_text

        return atomic_write_text(Path(path), self.to_yaml())

    @property
    def data_dir(self) -> Path:
        """Absolute artifact-store root (`data_dir`, relative paths resolve against the repo)."""
        p = Path(str(self["data_dir"])).expanduser()
        return p if p.is_absolute() else (REPO_ROOT / p).resolve()

    def fingerprint(self) -> str:
        import hashlib

        blob = json.dumps(self._data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Config(source={self.source!r}, profile={self.get('profile')!r})"


def import_configured_plugins(data: Mapping) -> None:
    """Import `plugins:` of a config mapping (nd_utils.plugins) when it is a list of names."""
    names = data.get("plugins")
    if not isinstance(names, list) or not names:
        return
    if all(isinstance(n, str) and MODULE_NAME.fullmatch(n) for n in names):
        import_plugins(names)


def parse_overrides(overrides: "Iterable[str] | Mapping[str, Any] | None") -> dict:
    """Parse `["key=value", ...]` (values are YAML: `[a, b]`, `3`, `null`) into a dict.

    >>> parse_overrides(["target.layers=[layer4]", "seed=3"])
    {'target.layers': ['layer4'], 'seed': 3}
    """
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        overrides = [overrides]
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} has no '=': write it as key=value, e.g. target.layers=[layer4]"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        out[key.strip()] = value
    return out


def read_config(
    config: "str | Path | Mapping | Config" = "offline",
    overrides: "Iterable[str] | Mapping[str, Any] | None" = None,
) -> Config:
    """A profile by name, a YAML path, a mapping or a Config, with overrides applied; unchecked.

    `nd_utils.context.load_config` is what callers use: it also imports the configured plugins,
    validates every value and the names the registries hold, and makes `data_dir` absolute.
    """
    if isinstance(config, Config):
        cfg = Config(config.to_dict(), config.source)
    elif isinstance(config, Mapping):
        cfg = Config(config, "<dict>")
    else:
        text = str(config)
        path = Path(text).expanduser()
        if not path.suffix and not path.exists():
            path = CONFIG_DIR / f"{text}.yaml"
        if not path.exists():
            raise ConfigError(
                f"config {text!r} not found: give a profile name ({', '.join(list_profiles())}) "
                f"or the path of a YAML file."
            )
        data = _read_yaml(path)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path} does not hold a YAML mapping of settings")
        cfg = Config(data, str(path))
    env_dir = os.environ.get("ND_DATA_DIR")
    if env_dir and "data_dir" in cfg and not Path(str(cfg["data_dir"])).is_absolute():
        # Lets tests and batch jobs redirect the store without editing profiles; an explicit
        # override or an absolute path (a saved effective config) still wins.
        cfg.set("data_dir", env_dir)
    cfg = cfg.with_overrides(overrides)
    for required in ("profile", "data_dir", "target.name", "probe.sets"):
        if required not in cfg:
            raise ConfigError(f"{cfg.source} lacks the required key {required!r}")
    return cfg


def _read_yaml(path: Path) -> Any:
    """Parse a YAML file; syntax errors become a ConfigError naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = ": ".join(str(p) for p in (getattr(exc, "context", None),
                                             getattr(exc, "problem", None)) if p) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}. Fix the file there (indentation, "
                          f"a ':' after each key, matching quotes and brackets).") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save "
                          f"it as UTF-8") from None


def check_data_dir(cfg_or_path: "Config | str | Path") -> Path:
    """Check that the artifact store can be written: a folder, created when absent.

    Returns the absolute folder; raises ConfigError naming the path and the fix when it is a
    file or cannot be created or written. `load_config` does not call it (reading a read-only
    store is legitimate): call it before writing to the store.

    Example:
        >>> check_data_dir(read_config("offline")).is_dir()       # doctest: +SKIP
        True
    """
    if isinstance(cfg_or_path, Config):
        path = cfg_or_path.data_dir
    else:
        path = Path(str(cfg_or_path)).expanduser()
        path = path if path.is_absolute() else (REPO_ROOT / path).resolve()
    fix = ("set a writable folder with --set data_dir=/some/writable/folder or the ND_DATA_DIR "
           "environment variable")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"data_dir {str(path)!r} exists but is not a directory: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".nd-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"data_dir {str(path)!r} is not writable ({exc.strerror or exc}): "
                          f"{fix}") from None
    return path
