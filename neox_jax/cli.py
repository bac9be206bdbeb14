"""Helpers shared by the scripts: every script's argument parser (`Parser`: a bad flag is one `FATAL:` line),
`--config SPEC` / `--config.FIELD=VALUE` read out of a command line (the spec is then loaded by `config.from_spec`),
early output checks, run summaries. Any other fault the user can cause becomes one `FATAL:` line in
`errors.guarded`."""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import sys

from neox_jax import errors, files, goodput
from neox_jax import metrics as metrics_lib

CONFIG_HELP = "config file, path[:arg]; any field is overridden with --config.FIELD=VALUE"


class Parser(argparse.ArgumentParser):
    """Every script's argparse parser (its subcommands' too): help text laid out as written, no abbreviated flags
    (`--work` is not `--workdir`: a flag added later would change what it means), and a bad flag one `FATAL:` line
    with exit status 2, as every other bad input: an unknown flag names the near names and the script's flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.commands = None

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def error(self, message):
        errors.fatal(message, 2)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        parser, whose = self._owner(args)
        for arg in itertools.takewhile(lambda a: a != "--", args):  # before a missing flag is reported
            flag = arg.partition("=")[0]
            if arg.startswith("--") and flag not in parser._option_string_actions:
                errors.fatal(unknown_flag(flag, parser, whose), 2)
        known, extra = self.parse_known_args(args, namespace)
        if extra:
            errors.fatal(f"unexpected arguments: {' '.join(extra)} (flags are --name=value)", 2)
        return known

    def _owner(self, args: list[str]) -> tuple[argparse.ArgumentParser, str]:
        """The parser whose flags `args` give: the subcommand's once one is named, else this one."""
        for arg in args:
            if self.commands and arg in self.commands.choices:
                return self.commands.choices[arg], f"{arg}'s flags"
        return self, "this script's flags"


def unknown_flag(flag: str, parser: argparse.ArgumentParser, whose: str) -> str:
    """"unknown flag --wokdir; did you mean --workdir? (this script's flags: --config, --config.FIELD, ...)"."""
    actions = [[s for s in a.option_strings if s.startswith("--")] for a in parser._actions]
    every = [s[2:] for names in actions for s in names]
    listed = sorted(names[0] for names in actions if names and names[0] not in ("--help", "--config"))
    if "config" in every:  # read by split_config_args, with its fields
        listed = ["--config", "--config.FIELD", *listed]
    near = difflib.get_close_matches(flag.lstrip("-"), every, n=3, cutoff=0.6)
    return (f"unknown flag {flag}" + (f"; did you mean {', '.join('--' + n for n in near)}?" if near else "")
            + f" ({whose}: {', '.join(listed)})")


class Switch(argparse.Action):
    """A boolean flag: `--name` sets it; `--noname` (absl's spelling, which the docs use) and `--no-name` clear it."""

    def __init__(self, option_strings, dest, default=False, help=None, **kwargs):
        self.negatives = [f"--no{o[2:]}" for o in option_strings] + [f"--no-{o[2:]}" for o in option_strings]
        super().__init__([*option_strings, *self.negatives], dest, nargs=0, default=default, help=help, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)


def split_config_args(argv: list[str], flag: str = "config") -> tuple[str | None, dict, list[str]]:
    """`--config SPEC` and `--config.FIELD=VALUE` (either with `=` or the value as the next argument) taken out of
    `argv`: (SPEC or None, {FIELD: VALUE as given}, the other arguments in order). Every script that takes a config
    reads it this way; `config.from_spec(spec, overrides, "--config")` then types the values by the config's fields."""
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


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """`parser.parse_args` for a script that takes a config: `--config SPEC` and `--config.FIELD=VALUE` read as
    every script reads them (`split_config_args`; the parser's own `--config` gives its help and default), the rest
    by `parser`. Sets args.config (SPEC, else the parser's default) and args.overrides ({FIELD: VALUE}). `argv`:
    the arguments after the program name (default: this process's)."""
    spec, overrides, rest = split_config_args(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    if (spec is not None or overrides) and not hasattr(args, "config"):
        raise errors.InputError("--config: this command takes no config")
    if spec is not None:
        args.config = spec
    args.overrides = overrides
    return args


def _int_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
        return value

    return parse


# argparse types refusing a value below their least as a usage error: a batch size or a device count (>= 1), a
# number of few-shot examples (>= 0)
positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def add_overwrite(parser: argparse.ArgumentParser, *flags: str) -> None:
    """The --overwrite flag of a script writing the files `flags` name (`check_writable` refuses an existing one
    without it)."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {' / '.join(flags)} file")


def check_writable(path: str | None, flag: str, overwrite: bool = False) -> None:
    """Refuse an output file that could not be written, or one that exists unless `overwrite` (`files.check_new`),
    before the work whose results would go into it."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise errors.InputError(f"{flag} {path} is a directory; expected a file name")
    if not os.path.isdir(folder):
        raise errors.InputError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise errors.InputError(f"{flag} {path}: the folder {folder} is not writable")
    files.check_new([path], flag, overwrite)


def default_workdir(config_spec: str) -> str:
    """runs/<config name>[_<arg>]: stable, so running the same command again resumes. An argument that is a
    path (configs/pretrained.py:DIR) contributes its last component."""
    path, _, arg = config_spec.partition(":")
    arg = os.path.basename(os.path.normpath(arg)) if arg else ""
    name = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg else "")
    return os.path.join("runs", name)


def final_line(last: dict, workdir: str) -> str:
    """The run's last line: step, losses (with the unigram baseline beside the validation loss), the latest
    train.eval_tasks scores, throughput, energy, goodput."""
    parts = [f"done: step {last.get('step')}"]
    if last.get("loss") is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if last.get("val_loss") is not None:
        parts.append(f"val_loss {last['val_loss']:.4f}")
    if last.get("unigram_val_loss") is not None:
        parts.append(f"unigram baseline {last['unigram_val_loss']:.4f}")
    if last.get("task_scores"):
        parts.append(f"tasks at step {last['task_scores_step']}: {last['task_scores']}")
    if last.get("tokens_per_s") is not None:
        parts.append(f"tokens_per_s {last['tokens_per_s']:,.0f}")
    if last.get("energy_kwh_total") is not None:
        label = metrics_lib.estimated_label(last.get("energy_estimated"))
        parts.append(f"energy {last['energy_kwh_total']:.4g} kWh ({label}), {last['co2e_kg_total']:.4g} kg CO2e")
    if last.get("goodput") is not None:
        parts.append(goodput.describe(last))
    parts.append(f"workdir {workdir}")
    return " | ".join(parts)
