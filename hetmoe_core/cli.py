"""Command line: ``python -m hetmoe_core <command> ...`` (every command takes ``--json``).

Each command is a pair ``add_<name>(parser)`` / ``cmd_<name>(args) -> dict`` registered in
``COMMANDS``; ``main`` prints the dict as JSON or as indented text, and turns ``ValueError``
into a one-line error with exit code 2 (never a traceback for bad input).
"""
from __future__ import annotations

import argparse
import json
import sys


def _source(p):
    p.add_argument("source", help="'default', 'tiny:<family>', a local folder or a Hugging Face hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true")


def _load(args):
    from .models import load_model
    return load_model(args.source, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, revision=args.revision)


# ---- info (issue A)
def add_info(p):
    _source(p)


def cmd_info(args) -> dict:
    lm = _load(args)
    return {"source": args.source, "fingerprint": lm.fingerprint, **lm.anatomy.summary()}


COMMANDS = {
    "info": (add_info, cmd_info, "anatomy summary of an MoE model"),
}


def _print(out, as_json: bool):
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return
    for k, v in out.items():
        print(f"{k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hetmoe_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="print JSON")
        add(p)
    args = parser.parse_args(argv)
    try:
        out = COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if out is not None:
        _print(out, args.json)
    return 0
