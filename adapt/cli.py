"""`adapt <command>`: one CLI, a subcommand per job, each a thin layer over the Python API.

Every subcommand registers itself below with `_add_<name>(subparsers)`; its handler takes the parsed
arguments and returns an exit code. A `UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"adapt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adapt {args.command}: interrupted", file=sys.stderr)
        return 130


def _add_info(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show the diffusion settings and attention state of a checkpoint")
    parser.add_argument("model", help="a local model folder (or a Hub id when online)")
    parser.set_defaults(handler=_run_info)


def _run_info(args) -> int:
    import json

    from .attention import get_attention_ratio
    from .diffusion import DiffusionConfig
    from .modeling import load_model

    model, tokenizer = load_model(args.model)
    diffusion = DiffusionConfig.from_model_config(model.config)
    print(json.dumps({
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attention_implementation": model.config._attn_implementation,
        "attention_ratio": get_attention_ratio(model),
        "mask_token": tokenizer.mask_token,
        "diffusion": diffusion.to_dict() if diffusion else None,
    }, indent=2))
    return 0


_COMMANDS = [_add_info]
