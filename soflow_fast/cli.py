"""One command-line convention for every tool (train, sample, export, evaluate, prepare_latents, compare).

- A flag is written ``--a_b`` or ``--a-b``; help shows the underscore spelling, the one the config keys
  and the authors' YAML files use.
- One name for one idea in every tool: ``--working_dir`` (a run directory), ``--batch_size``,
  ``--ckpt_steps`` (the checkpoint of a step), ``--weights`` (a weights file), ``--nfe`` (network calls
  per sample), ``--force``. Names an earlier version used are still read (``aliases``), not shown.
- A boolean flag alone means true and never takes the next word; ``--flag=true|false`` sets it.
- Every option has help text (``Parser.add_argument`` refuses one without).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def flag_name(token: str) -> str:
    """``--a-b=x`` -> ``--a_b=x``: the option's name in underscores, its value as written."""
    if not token.startswith("--") or token == "--":
        return token
    name, eq, value = token.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def parse_bool(text: str, flag: str) -> bool:
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"{flag} takes true or false, got {text!r}")


class _Bool(argparse.Action):
    """A boolean option: alone it is true; ``--flag=false`` (rewritten to a value by the parser) sets it."""

    def __init__(self, option_strings, dest, default=False, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the convention above.

    Args:
        prog: the console command (``soflow-sample``); the description says the ``python -m`` form.
        aliases: old flag name -> its name now (both without dashes, in underscores), read silently.
    """

    def __init__(self, prog: str, description: str, aliases: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        # no prefixes of a flag: train's config keys go through (--p is soflow.p, not --preset)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=prog, description=description, **kwargs)
        self.aliases = dict(aliases or {})
        self._bools: set[str] = set()

    def add_argument(self, *names: str, **kwargs) -> argparse.Action:
        if names and names[0].startswith("-") and not kwargs.get("help"):
            raise ValueError(f"{names[0]}: every option of a soflow_fast tool has help text")
        if kwargs.get("action") in ("store_true", "bool"):
            kwargs["action"] = _Bool
        action = super().add_argument(*names, **kwargs)
        if isinstance(action, _Bool):
            self._bools.update(action.option_strings)
        return action

    def normalize(self, args: list[str]) -> list[str]:
        """The convention applied to ``args``: underscores, aliases, ``--flag=value`` of a boolean."""
        out: list[str] = []
        for token in args:
            if token == "--":
                out.append(token)
                continue
            token = flag_name(token)
            if token.startswith("--"):
                name, eq, value = token[2:].partition("=")
                name = self.aliases.get(name, name)
                token = f"--{name}{eq}{value}"
                if f"--{name}" in self._bools and eq:
                    if not parse_bool(value, f"--{name}"):
                        continue  # false: the option's default
                    token = f"--{name}"
            out.append(token)
        return out

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        try:
            args = self.normalize(args)
        except argparse.ArgumentTypeError as e:
            self.error(str(e))
        return super().parse_known_args(args, namespace)


class Bare:
    """The value of a config flag given without one (``--fsdp`` alone): true for a boolean key."""

    def __repr__(self) -> str:
        return "BARE"


BARE = Bare()


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr=1e-4", "--run.seed", "3", "--fsdp"]`` -> {"lr": 1e-4, "run.seed": 3, "fsdp": BARE}.

    Values are parsed as YAML. A flag followed by another flag (or by nothing) has no value: ``BARE``,
    which a boolean key reads as true and any other key refuses.
    """
    out: dict[str, Any] = {}
    args = [flag_name(a) for a in args]
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key=value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        elif i + 1 >= len(args) or args[i + 1].startswith("--"):
            out[key] = BARE
            i += 1
            continue
        else:
            i += 1
            raw = args[i]
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"--{key}: {raw!r} is not a valid value ({getattr(e, 'problem', None) or e})") from None
        i += 1
    return out
