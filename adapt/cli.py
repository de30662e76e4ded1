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


def _add_eval(subparsers) -> None:
    from .evaluate.tasks import TASKS

    parser = subparsers.add_parser(
        "eval", help="evaluate a diffusion checkpoint (or, with --ar, a causal one) on benchmark tasks",
        description=f"Tasks: {', '.join(TASKS)}. How each is scored: docs/evaluation.md.")
    parser.add_argument("model", help="a diffusion checkpoint folder (a causal checkpoint with --ar)")
    parser.add_argument("--task", nargs="+", required=True, metavar="T", help="one or more tasks")
    parser.add_argument("--ar", action="store_true", help="MODEL is a plain causal LM: score it the AR way")
    parser.add_argument("--source", metavar="DIR", help="also score this causal LM the AR way, side by side")
    parser.add_argument("--data", help="elbo / sentence_infill: the text; choice tasks / lambada: a jsonl of requests")
    parser.add_argument("--limit", type=int, help="only the first N examples (blocks for elbo)")
    parser.add_argument("--samples", type=int, default=32, help="Monte Carlo noise levels per ELBO (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="elbo: blocks per forward")
    parser.add_argument("--seq-len", type=int, default=512, help="elbo: block length in tokens")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="elbo: score only the documents a training run with this fraction and --seed held out")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--timeout", type=float, default=10.0, help="code_infill: seconds per test program")
    parser.add_argument("--dtype", help="float32 (default), bfloat16, float16")
    parser.add_argument("--device", help="cpu (default), cuda, ...")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON to FILE")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    import json
    import os
    from dataclasses import asdict

    from .evaluate.tasks import EvalSettings, check_tasks, format_table, run_tasks, to_json
    from .export import load
    from .modeling import load_model

    check_tasks(args.task)
    if args.limit is not None and args.limit < 1 or args.samples < 1:
        raise UserError("--limit and --samples must be >= 1")
    settings = EvalSettings(
        data=args.data, limit=args.limit, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
        seq_len=args.seq_len, validation_fraction=args.validation_fraction, text_column=args.text_column,
        timeout=args.timeout,
    )
    runs = []
    for path, as_ar in [(args.model, args.ar)] + ([(args.source, True)] if args.source else []):
        if as_ar:
            model, tokenizer = load_model(path, dtype=args.dtype)
            model, config = model.to(args.device or "cpu"), None
        else:
            model, tokenizer, config = load(path, dtype=args.dtype, device=args.device)
        results = run_tasks(model, tokenizer, args.task, config=config, settings=settings)
        runs.append({"name": f"{path} ({'AR' if as_ar else 'diffusion'})", "model": path,
                     "mode": "ar" if as_ar else "diffusion", "results": results})
        del model
    report = to_json({"settings": asdict(settings), "runs": runs})
    if args.output:
        temporary = f"{args.output}.tmp"
        with open(temporary, "w") as handle:
            json.dump(report, handle, indent=2)
        os.replace(temporary, args.output)
    print(json.dumps(report, indent=2) if args.json else format_table(runs))
    return 0


_COMMANDS = [_add_info, _add_eval]
