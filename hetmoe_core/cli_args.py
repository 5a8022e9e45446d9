"""Flag value types and shared arguments of the command line: a bad value gets one line that names its flag."""
from __future__ import annotations

import argparse
import math


# ---- flag value types: a bad value gets one line that names its flag (argparse adds "argument --flag: ")
def _number(text: str, kind=float) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"got {text}; give a finite number")
    if kind is int:
        if not x.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        return int(x)
    return x


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        x = _number(text, int)
        if x < lo:
            raise argparse.ArgumentTypeError(f"got {x}; give a whole number >= {lo}")
        return x
    parse.__name__ = f"integer >= {lo}"
    return parse


def _share(text: str) -> float:
    x = _number(text)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"got {text}; give a share of routed experts in [0, 1] (0.125 = 12.5%)")
    return x


def _shares(text: str) -> list[float]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("give at least one budget in [0, 1], e.g. 0,0.125,0.25")
    return [_share(v) for v in vals]


def _limit(text: str) -> float:
    x = _number(text)
    if not (0 < x < 1 or (x >= 1 and x.is_integer())):
        raise argparse.ArgumentTypeError(f"got {text}; give a whole number of documents >= 1 or a fraction in (0, 1)")
    return x


def _setting(text: str) -> tuple:
    """NAME=VALUE of --set, parsed by noise.parse_value (a bad name or value names the parameter)."""
    from .noise import parse_value
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=VALUE, e.g. adc_bits=6 "
                                         "(`python -m hetmoe_core presets` lists the parameters)")
    name, value = (x.strip() for x in text.split("=", 1))
    try:
        return name, parse_value(name, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _set_arg(p):
    p.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="override one noise parameter of the preset(s), e.g. --set adc_bits=6 --set t_inference=3600 "
                        "(repeatable; `presets` lists them with units and ranges)")


class _Parser(argparse.ArgumentParser):
    """Bad flags give one line (``error: argument --budget: 'abc' is not a number``) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")
