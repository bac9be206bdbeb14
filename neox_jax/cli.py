"""Helpers shared by the scripts: loading `path[:arg]` config specs, early flag checks, run summaries. (A fault
the user can cause becomes one `FATAL:` line in `errors.guarded`.)"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import sys

from absl import app, flags

from neox_jax import config as cfg
from neox_jax import errors
from neox_jax import metrics as metrics_lib


def import_file(path: str, prefix: str):
    """Import a Python file (a config or sweep file) by path, as a module named after it."""
    module_spec = importlib.util.spec_from_file_location(f"{prefix}{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str, overrides: dict | None = None, flag: str | None = None):
    """`configs/pythia.py:410m` -> the file's get_config("410m"), with {"a.b": value} overrides applied (text
    values typed by their fields; errors name `flag`.FIELD=VALUE when the overrides came from that flag)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise cfg.ConfigError(f"config file {path} not found (from {spec!r})")
    try:  # a config file is the user's code: whatever it raises is a bad config spec
        module = import_file(path, "_neox_config_")
        c = module.get_config(arg) if arg else module.get_config()
    except cfg.ConfigError:
        raise
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from e
    except Exception as e:  # noqa: BLE001
        raise cfg.ConfigError(f"config {spec}: get_config() raised {type(e).__name__}: {e}") from e
    return cfg.merge(c, overrides or {}, flag)


def parse_overrides(pairs, flag: str) -> dict:
    """["a.b=1", "c=x"] -> {"a.b": "1", "c": "x"}; `config.merge` types each value by its field."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise errors.InputError(f"{flag} expects field=value, got {pair!r}")
        out[key] = value
    return out


def split_config_args(argv: list[str], flag: str = "config") -> tuple[str | None, dict, list[str]]:
    """`--config SPEC` and `--config.FIELD=VALUE` (either with `=` or the value as the next argument) taken out of
    `argv`: (SPEC or None, {FIELD: VALUE as given}, the other arguments in order). Every script that takes a config
    reads it this way; `load_config(spec, overrides, "--config")` then types the values by the config's fields."""
    spec, overrides, rest = None, {}, []
    args = iter(argv)
    for arg in args:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name != flag and not name.startswith(flag + "."):
            rest.append(arg)
            continue
        if not sep:
            value = next(args, None)
            if value is None:
                raise errors.InputError(f"--{name} expects a value")
        if name == flag:
            spec = value
        else:
            overrides[name[len(flag) + 1:]] = value
    return spec, overrides, rest


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str]):
    """`parser.parse_args` for an argparse script that takes a config: `--config SPEC` and `--config.FIELD=VALUE`
    read as every script reads them (`split_config_args`; the parser's own `--config` gives its help and default),
    the rest by `parser`. Sets args.config (SPEC, else the parser's default) and args.overrides ({FIELD: VALUE})."""
    spec, overrides, rest = split_config_args(list(argv))
    args = parser.parse_args(rest)
    if (spec is not None or overrides) and not hasattr(args, "config"):
        raise errors.InputError("--config: this command takes no config")
    if spec is not None:
        args.config = spec
    args.overrides = overrides
    return args


def run_with_config(main, default_config: str) -> None:
    """`app.run` for an absl script that takes a config: `main(argv, config, spec)`, the config loaded once from
    `--config SPEC` (default `default_config`) with its `--config.FIELD=VALUE` overrides; the script's own flags
    are absl's. Bad input of either kind is one `FATAL:` line and exit status 2."""
    with errors.one_line_errors():
        spec, overrides, rest = split_config_args(sys.argv)
    spec = spec or default_config
    if "config" not in flags.FLAGS:  # for --help only: split_config_args has taken the flag out of argv
        flags.DEFINE_string("config", default_config, "config file, path[:arg]; any field is overridden with "
                            "--config.FIELD=VALUE", module_name=sys.argv[0])

    def run(argv):
        with errors.one_line_errors():
            config = load_config(spec, overrides, "--config")
        return main(argv, config, spec)

    app.run(run, argv=rest, flags_parser=parse_absl_flags)


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
    """absl's flag parsing with a bad flag (`--wokdir`, `--steps=abc`) as one line naming the near names, exit
    status 2 (absl itself exits 1 with its usage hint)."""
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        own = sorted({f.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
                      if not module.startswith("absl") for f in defined} - {"config"})
        near = difflib.get_close_matches(e.flagname, own, n=3, cutoff=0.6)
        errors.fatal(f"unknown flag --{e.flagname}" + (f"; did you mean {', '.join('--' + n for n in near)}?"
                                                      if near else "")
                     + f" (this script's flags: {', '.join('--' + n for n in ['config', 'config.FIELD', *own])})", 2)
    except flags.Error as e:
        errors.fatal(str(e), 2)


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
