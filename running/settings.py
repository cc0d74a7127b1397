"""Settings of the scripts, each declared once: a table of `Setting` rows per script, argparse built from it.

A row names a flag, its default, its type, a help line (at most 120 characters), the rule its value must meet and
whether it defines a run (train.py: a resumed run takes those from its checkpoint). Defaults come from where they are
defined (training.py's recipe, STFTConfig, ModelConfig), and `--help` states each default once.
"""

import argparse
from dataclasses import dataclass

HELP_WIDTH = 120  # longest help line of a setting


class RunError(Exception):
    """A problem the user must fix (bad data directory, unusable split, ...): scripts print it as one line, exit 2."""


@dataclass(frozen=True)
class Setting:
    """One command-line setting. `check` is (predicate, rule): a value failing the predicate is an error that names
    the rule ("--batch_size must be >= 1"). `run`: the setting defines a training run (resume keeps the checkpoint's).
    `flag`: the option string when it is not --name ("-k"); a positional setting has positional=True."""

    name: str
    default: object = None
    help: str = ""
    type: object = None
    choices: tuple | None = None
    nargs: object = None
    metavar: object = None
    check: tuple | None = None
    run: bool = False
    action: object = None
    flag: str | None = None
    positional: bool = False
    required: bool = False

    def add_to(self, parser):
        options = dict(help=self.help)
        for key in ("type", "choices", "nargs", "metavar", "action"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        if self.positional:
            parser.add_argument(self.name, **options)
        else:
            flag = self.flag or f"--{self.name}"
            parser.add_argument(flag, dest=self.name, default=self.default, required=self.required, **options)


def at_least(low):
    return (lambda value: value >= low, f">= {low}")


POSITIVE = (lambda value: value > 0, "> 0")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' once: not for a default of None (the help says what None means), nor twice."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(doc, settings):
    """An argparse parser described by the first line of the script's docstring, one argument per setting."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=HelpFormatter)
    for setting in settings:
        setting.add_to(parser)
    return parser


def rule_problems(args, settings):
    """'--name must be RULE' for each setting whose value fails its check; [] when all pass (None is not checked)."""
    problems = []
    for setting in settings:
        value = getattr(args, setting.name)
        if setting.check and value is not None and not setting.check[0](value):
            problems.append(f"{setting.flag or '--' + setting.name} must be {setting.check[1]}")
    return problems


def parse(doc, settings, argv=None, more_problems=None):
    """(parser, args) from the command line; a value that breaks a rule of its setting, or one that
    more_problems(args) names, ends the script with a usage error that names them all."""
    parser = build_parser(doc, settings)
    args = parser.parse_args(argv)
    problems = rule_problems(args, settings) + (more_problems(args) if more_problems else [])
    if problems:
        parser.error("; ".join(problems))
    return parser, args


def run_keys(settings):
    """Names of the settings that define a run (on --resume they come from the checkpoint)."""
    return tuple(setting.name for setting in settings if setting.run)


CHECKPOINT = Setting(
    "checkpoint", None, "checkpoint written by train.py (best_model.pt, last.pt, ...)", positional=True
)
CHECKPOINT_DATA_DIR = Setting("data_dir", None, "directory of miniSEED files (default: the checkpoint's)")


def device_setting(what="run on"):
    return Setting("device", "auto", f"device to {what}: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N'")


def window_settings(verb):
    """--window_seconds and --window_stride of a script that reads a run's data (inference.py, embed.py)."""
    return (
        Setting("window_seconds", None, f"{verb} windows of this many seconds (default: the checkpoint's)", float),
        Setting(
            "window_stride", None, "seconds between window starts (default: the checkpoint's, else the length)", float
        ),
    )
