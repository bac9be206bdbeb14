"""Helpers shared by the scripts: loading `path[:arg]` config specs, early flag checks, run summaries. (A fault
the user can cause becomes one `FATAL:` line in `errors.guarded`.)"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os

from absl import flags

from neox_jax import config as cfg
from neox_jax import errors
from neox_jax import metrics as metrics_lib


def import_file(path: str, prefix: str):
    """Import a Python file (a config or sweep file) by path, as a module named after it."""
    module_spec = importlib.util.spec_from_file_location(f"{prefix}{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str, overrides: dict | None = None):
    """`configs/pythia.py:410m` -> the file's get_config("410m"), with {"a.b": value} overrides applied."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found (from {spec!r})")
    try:  # a config file is the user's code: whatever it raises is a bad config spec
        module = import_file(path, "_neox_config_")
        c = module.get_config(arg) if arg else module.get_config()
    except cfg.ConfigError:
        raise
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from e
    except Exception as e:  # noqa: BLE001
        raise cfg.ConfigError(f"config {spec}: get_config() raised {type(e).__name__}: {e}") from e
    return cfg.merge(c, overrides or {})


def parse_overrides(pairs, flag: str = "--set") -> dict:
    """["a.b=1", "c=x"] -> {"a.b": 1, "c": "x"}: values parsed as JSON where they are JSON, else kept as text."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise errors.InputError(f"{flag} expects field=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a device count), refused as a usage error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def check_writable(path: str | None, flag: str) -> None:
    """Refuse an output file that could not be written, before the work whose results would go into it."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise errors.InputError(f"{flag} {path} is a directory; expected a file name")
    if not os.path.isdir(folder):
        raise errors.InputError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise errors.InputError(f"{flag} {path}: the folder {folder} is not writable")


def parse_absl_flags(argv):
    """absl's flag parsing with a bad flag value (`--config.train.steps=abc`) as one line and exit status 2
    (absl itself exits 1 with its usage hint)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        errors.fatal(str(e), 2)


def check_config_overrides(argv: list[str], default_config: str, own_flags: tuple = (), flag: str = "config") -> None:
    """Reject unknown flags and unknown --config.* fields before absl parses them, naming the near names
    (absl and ml_collections would otherwise fail with a bare message or a traceback). Call it before the
    script defines its config flag: ml_collections applies --config.* overrides as soon as it is defined."""
    known = sorted({flag, *own_flags} | {f for f in flags.FLAGS if not f.startswith("?")})

    spec, fields = default_config, []
    args = iter(argv[1:])
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        name, has_value, value = arg[2:].partition("=")
        if name == flag:
            spec = value if has_value else next(args, spec)
        elif name.startswith(flag + "."):
            fields.append(name[len(flag) + 1:])
        elif name not in known and not (name.startswith("no") and name[2:] in known) \
                and name not in ("help", "helpfull", "helpshort", "helpxml"):
            near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            errors.fatal(f"unknown flag --{name}"
                         + (f"; did you mean {', '.join('--' + n for n in near)}?" if near else "")
                         + f" (this script's flags: {', '.join('--' + n for n in sorted({flag, *own_flags}))})")
    if not fields and spec == default_config:
        return
    try:
        config = load_config(spec)
    except (FileNotFoundError, cfg.ConfigError) as e:
        errors.fatal(f"--{flag}: {e}")
    for field in fields:
        node, parts = config, field.split(".")
        for i, part in enumerate(parts):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                errors.fatal(f"--{flag}.{field}: "
                             + cfg._unknown(".".join(parts[: i + 1]), keys, ".".join(parts[:i])))
            node = node[part]


def default_workdir(config_spec: str) -> str:
    """runs/<config name>[_<arg>]: stable, so running the same command again resumes. An argument that is a
    path (configs/pretrained.py:DIR) contributes its last component."""
    path, _, arg = config_spec.partition(":")
    arg = os.path.basename(os.path.normpath(arg)) if arg else ""
    name = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg else "")
    return os.path.join("runs", name)


def summary(last: dict, workdir: str) -> str:
    """The run's last line: step, losses (with the unigram baseline beside the validation loss), throughput."""
    parts = [f"done: step {last.get('step')}"]
    if last.get("loss") is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if last.get("val_loss") is not None:
        parts.append(f"val_loss {last['val_loss']:.4f}")
    if last.get("unigram_val_loss") is not None:
        parts.append(f"unigram baseline {last['unigram_val_loss']:.4f}")
    if last.get("tokens_per_s") is not None:
        parts.append(f"tokens_per_s {last['tokens_per_s']:,.0f}")
    if last.get("energy_kwh_total") is not None:
        label = metrics_lib.estimated_label(last.get("energy_estimated"))
        parts.append(f"energy {last['energy_kwh_total']:.4g} kWh ({label}), {last['co2e_kg_total']:.4g} kg CO2e")
    parts.append(f"workdir {workdir}")
    return " | ".join(parts)
