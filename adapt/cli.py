"""`adapt <command>`: one CLI, a subcommand per job, each a thin layer over the Python API.

Every subcommand registers itself below with `_add_<name>(subparsers)`; its handler takes the parsed
arguments and returns an exit code. A `UserError` anywhere becomes one line on stderr and exit code 2.
SIGTERM and SIGINT stop any command where it is, raised as Python raises Ctrl-C (locks released, temporary
files removed on the way out), with one line and exit code 143 or 130; a training run catches them itself
once loaded, to checkpoint first (adapt/train/stops.py).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from .errors import UserError, exit_code_of


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage mistake is one line on stderr (exit code 2) like any other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="adapt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"adapt {__version__}")
    parser.commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(parser.commands)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, a flag the command does not take named by that command's parser (argparse
    would leave it to the top one: `adapt: error:`, pointing at `adapt --help`)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


class _Terminated(BaseException):
    """SIGTERM, raised wherever the command is, as Python raises KeyboardInterrupt for SIGINT: a
    BaseException, so every cleanup runs, but not a KeyboardInterrupt, which chat takes for "stop this answer"."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises `_Terminated` while the block runs (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    if not torch.cuda.is_available():  # else DeepSpeed announces its CPU fallback on stdout of every command
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not sys.stderr.isatty():
        # Progress bars are for terminals; in pipes and log files they bury the one-line error messages.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    prog = "adapt"
    try:  # Ctrl-C while the parser imports torch is an interruption like any other, not a traceback
        with _sigterm_raises():
            args = _parse(argv)
            prog = f"adapt {args.command}"
            return exit_code_of(lambda: args.handler(args), prog)
    except (KeyboardInterrupt, _Terminated) as stop:
        from .train.stops import EXIT_CODES

        signum = signal.SIGTERM if isinstance(stop, _Terminated) else signal.SIGINT
        print(f"{prog}: stopped by {signum.name}", file=sys.stderr)
        return EXIT_CODES[signum]


def _add_loading_options(parser) -> None:
    """The two ways to lower the loader's safety defaults, offered by every command that loads a model."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the checkpoint (only for sources you trust)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept .bin/.pt weights when there are no safetensors (read with weights_only=True)")


def _loading_kwargs(args) -> dict:
    return dict(trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)


def _loading_overrides(args) -> list[str]:
    return [f"model.{key}=true" for key, value in _loading_kwargs(args).items() if value]


def _dtypes() -> tuple[str, ...]:
    """The weight dtypes every command accepts: a recipe's model.dtype choices."""
    from .recipe import ModelSection
    from .settings import choices_of

    return choices_of(ModelSection, "dtype")


def _add_info(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show the diffusion settings and attention state of a checkpoint")
    parser.add_argument("model", help="a local model folder (or a Hub id when online)")
    _add_loading_options(parser)
    parser.set_defaults(handler=_run_info)


def _run_info(args) -> int:
    import json

    from .attention import get_attention_ratio
    from .diffusion import DiffusionConfig
    from .modeling import load_model

    model, tokenizer = load_model(args.model, **_loading_kwargs(args))
    diffusion = DiffusionConfig.from_model_config(model.config)
    print(json.dumps({
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attention_implementation": model.config._attn_implementation,
        "attention_ratio": get_attention_ratio(model),
        "mask_token": tokenizer.mask_token,
        "mode": diffusion.mode.describe() if diffusion else "causal LM (no diffusion settings)",
        "diffusion": diffusion.to_dict() if diffusion else None,
    }, indent=2))
    return 0


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="adapt a causal LM into a diffusion LM from a YAML recipe",
        description="Run a recipe (recipes/*.yaml; keys in docs/recipes.md). Launch with python -m adapt, "
                    "torchrun --nproc_per_node N -m adapt, or accelerate launch -m adapt.")
    _add_recipe_options(parser, "recipes/smollm2-135m-cpu.yaml", "optim.lr=1e-4")
    parser.set_defaults(handler=_run_train)


def _add_recipe_options(parser, recipe: str, override: str) -> None:
    """What a command that runs a recipe takes: the recipe, its overrides, resume or overwrite, loading."""
    parser.add_argument("recipe", help=f"YAML recipe, e.g. {recipe}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"recipe overrides, e.g. {override}")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint (resume=auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if output_dir holds a previous run (its checkpoints are deleted)")
    _add_loading_options(parser)


def _recipe_of(args):
    """The recipe `_add_recipe_options`' arguments name, with their overrides."""
    from .recipe import load_recipe

    overrides = (["resume=auto"] if args.resume else []) + _loading_overrides(args) + list(args.overrides)
    return load_recipe(args.recipe, overrides)


def _run_train(args) -> int:
    recipe = _recipe_of(args)
    if recipe.rl.prompts:
        raise UserError(f"{args.recipe} sets rl.prompts: it is a reward-training recipe; run it with adapt rl")
    return _train_and_report(recipe, overwrite=args.overwrite)


def _train_and_report(recipe, overwrite: bool = False, train=None) -> int:
    """Run `train(recipe, overwrite=...)` (None: adapt train's loop) and say where the model went."""
    from .train import Interrupted

    if train is None:
        from .train import train
    try:
        result = train(recipe, overwrite=overwrite)
    except Interrupted as stop:
        print(f"adapt train: {stop}", file=sys.stderr)
        return stop.exit_code
    if _is_main_process():
        print(f"adapt: diffusion model written to {result.model_dir} ({result.steps} steps, "
              f"{result.tokens_trained:,} tokens)")
        print(f"adapt: sample from it with:  adapt generate {result.model_dir} --length 64")
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"  # set by torchrun / accelerate launch


def _add_convert(subparsers) -> None:
    from .convert import DEFAULT_SEQ_LEN, DEFAULT_STEPS, convert_recipe
    from .diffusion import DiffusionTraining
    from .flags import finite_float
    from .recipe import ModelSection
    from .settings import choices_of, default_of

    batch_size, lr, mask_token = (default_of(convert_recipe, name) for name in ("batch_size", "lr", "mask_token"))
    parser = subparsers.add_parser(
        "convert", help="one command: adapt MODEL on a corpus with sane defaults",
        description="Adapt a causal LM (local folder, .gguf file or Hub id) into a diffusion LM on a text/jsonl/"
                    "parquet corpus. The recipe it runs is saved as OUT/recipe.yaml.")
    parser.add_argument("model", help="local HF folder, .gguf file, or Hub id")
    parser.add_argument("--data", required=True, help="text/jsonl/parquet file or folder (or a Hub dataset name)")
    parser.add_argument("--out", required=True, help="output folder; the model lands in OUT/model")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=finite_float, help="token budget, e.g. 2e6 (rounded up to whole steps)")
    budget.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seq-len", type=int, help=f"block length (default {DEFAULT_SEQ_LEN} or the model's limit)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"sequences per process per step (default {batch_size})")
    parser.add_argument("--lr", type=finite_float, default=lr, help=f"peak learning rate, cosine decay (default {lr})")
    parser.add_argument("--anneal-steps", type=int, help="steps from causal to bidirectional (default: half the run)")
    parser.add_argument("--mask-token", choices=choices_of(ModelSection, "mask_token"), default=mask_token,
                        help=f"add a new mask token or reuse an existing id (default {mask_token})")
    parser.add_argument("--mask-token-id", type=int, help="the id to reuse with --mask-token reuse")
    parser.add_argument("--mode", choices=[m for m in choices_of(DiffusionTraining, "mode") if m is not None],
                        help="the kind of diffusion model: bidirectional (one block, as DiffuLLaMA) or block "
                             "(blocks of --block-size tokens, exact KV cache when sampling) or hybrid (the AR model "
                             "kept whole, verifying drafts of --draft-size tokens; TiDAR); default: the source's "
                             "kind, bidirectional for an AR model")
    parser.add_argument("--block-size", type=int, help="--mode block: tokens per block")
    parser.add_argument("--draft-size", type=int, help="--mode hybrid: tokens drafted per draft block")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any other recipe setting (docs/recipes.md), e.g. --set train.mixed_precision=bf16")
    _add_loading_options(parser)
    parser.set_defaults(handler=_run_convert)


def _run_convert(args) -> int:
    from pathlib import Path

    from .convert import RECIPE_FILE, convert_recipe, write_recipe
    from .outputs import remove
    from .train import complete_checkpoints

    recipe = convert_recipe(
        args.model, args.data, args.out, tokens=int(args.tokens) if args.tokens is not None else None,
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
        anneal_steps=args.anneal_steps, mask_token=args.mask_token, mask_token_id=args.mask_token_id,
        mode=args.mode, block_size=args.block_size, draft_size=args.draft_size,
        overrides=_loading_overrides(args) + list(args.overrides))
    out, main_process = Path(args.out), _is_main_process()
    fresh = not out.exists()
    if main_process:
        write_recipe(recipe, out / RECIPE_FILE)
        print(f"adapt convert: {recipe.train.max_steps} steps x {recipe.train.batch_size} x {recipe.data.seq_len} "
              f"tokens per process; recipe saved to {out / RECIPE_FILE}")
    try:
        return _train_and_report(recipe)
    except UserError:
        if main_process and not complete_checkpoints(out):  # refused before its first checkpoint: leave no trace
            remove(out if fresh else out / RECIPE_FILE)
        raise


def _add_sampling_options(parser) -> None:
    """A flag per `SamplingOptions` field (the progress bar follows the terminal) and how to load the model."""
    from .flags import add_flags
    from .sampling import SamplingOptions

    add_flags(parser, SamplingOptions, exclude=("progress",))
    parser.add_argument("--json", action="store_true", help="print structured output (ids, commit steps)")
    _add_model_options(parser)


def _add_model_options(parser) -> None:
    """How a command that samples from a diffusion checkpoint loads it: dtype, device, the safety switches."""
    parser.add_argument("--dtype", choices=_dtypes(), help="weights dtype (default: saved)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    _add_loading_options(parser)


def _sampling_options(args, **fixed):
    """The `SamplingOptions` of the parsed flags, with the fields in `fixed` set as given; a progress bar
    on terminals unless `fixed` says otherwise."""
    from .flags import settings_from
    from .sampling import SamplingOptions

    return settings_from(args, SamplingOptions, **{"progress": None, **fixed})


def _add_trace_option(parser) -> None:
    parser.add_argument("--trace", metavar="FILE", help="also write how the first sample was denoised: a page that "
                                                        "replays it (.html) or a picture (.png)")


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="sample text from a diffusion checkpoint")
    parser.add_argument("model", help="a diffusion checkpoint folder (adapt export / adapt train output)")
    parser.add_argument("--prompt", help="text the sample continues (held fixed)")
    parser.add_argument("--length", type=int, required=True, help="tokens to generate")
    parser.add_argument("--steps", type=int, help="denoising steps = model forwards (<= length; default: one per "
                                                  "token); a hybrid model verifying its drafts takes none")
    _add_sampling_options(parser)
    _add_trace_option(parser)
    parser.set_defaults(handler=_run_generate)


def _run_generate(args) -> int:
    import json

    from .export import load
    from .sampling import generate_with_details
    from .trace import check_trace_path, generation_trace, write_trace

    options = _sampling_options(args)  # bad flags fail before the model loads
    if args.trace:
        check_trace_path(args.trace, reads=(args.model,))
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device, **_loading_kwargs(args))
    out = generate_with_details(model, tokenizer, args.prompt, length=args.length, steps=args.steps, options=options)
    if args.trace:
        write_trace(args.trace, generation_trace(tokenizer, out, f"adapt {args.command} {args.model}"))
    if args.json:
        print(json.dumps({
            "prompt": args.prompt, "prompt_ids": out.prompt_ids, "forwards": out.forwards,
            "tokens_per_forward": args.length * args.num_samples / max(out.forwards, 1),
            "samples": [{"text": text, "token_ids": ids, "commit_step": steps}
                        for text, ids, steps in zip(out.texts, out.token_ids, out.commit_step)],
        }, indent=2))
    else:
        print("\n\n".join((args.prompt or "") + text for text in out.texts))
    return 0


def _add_infill(subparsers) -> None:
    from .sampling import DEFAULT_MASK_MARKER, DEFAULT_SPAN_LENGTH

    parser = subparsers.add_parser("infill", help="fill [MASK] spans in a text, keeping the rest unchanged")
    parser.add_argument("model", help="a diffusion checkpoint folder")
    parser.add_argument("text", help='text with spans to fill: "[MASK:5]" = 5 tokens, "[MASK]" = --span-length')
    parser.add_argument("--mask-marker", default=DEFAULT_MASK_MARKER, help="the span marker (default %(default)s)")
    parser.add_argument("--span-length", type=int, default=DEFAULT_SPAN_LENGTH,
                        help="tokens a plain marker stands for (default %(default)s)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: one per masked token)")
    _add_sampling_options(parser)
    _add_trace_option(parser)
    parser.set_defaults(handler=_run_infill)


def _run_infill(args) -> int:
    import json

    from .export import load
    from .sampling import infill_with_details
    from .trace import check_trace_path, infilling_trace, write_trace

    options = _sampling_options(args)  # bad flags fail before the model loads
    if args.trace:
        check_trace_path(args.trace, reads=(args.model,))
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device, **_loading_kwargs(args))
    out = infill_with_details(model, tokenizer, args.text, mask_marker=args.mask_marker,
                              span_length=args.span_length, steps=args.steps, options=options)
    if args.trace:
        write_trace(args.trace, infilling_trace(tokenizer, out, f"adapt {args.command} {args.model}"))
    if args.json:
        print(json.dumps({
            "text": args.text, "forwards": out.forwards,
            "samples": [{"text": text, "spans": spans, "token_ids": ids, "commit_step": steps}
                        for text, spans, ids, steps in zip(out.texts, out.spans, out.token_ids, out.commit_step)],
        }, indent=2))
    else:
        print("\n\n".join(out.texts))
    return 0


def _add_chat(subparsers) -> None:
    from .chat import DEFAULT_MAX_TOKENS

    parser = subparsers.add_parser(
        "chat", help="talk with a diffusion checkpoint in the terminal, watching each answer denoise",
        description="Type a message, read the answer as it denoises. /reset clears the history, /exit or Ctrl-D "
                    "ends the chat, Ctrl-C stops an answer (which is then not kept). With stdin not a terminal: "
                    "one message per input line, one answer per output line.")
    parser.add_argument("model", help="a diffusion checkpoint folder whose tokenizer has a chat template")
    parser.add_argument("--system", help="a system prompt, first in every conversation")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="tokens each answer may take (fewer where the model's positions end; default %(default)s)")
    parser.add_argument("--steps", type=int, help="denoising steps per answer (<= max tokens; default: one per token); "
                                                  "a hybrid model verifying its drafts takes none")
    parser.add_argument("--template", metavar="FILE", help="a Jinja chat template, for a tokenizer without one")
    parser.add_argument("--no-live", action="store_true", help="print each answer whole, not as it denoises")
    _add_sampling_options(parser)
    parser.set_defaults(handler=_run_chat)


def _run_chat(args) -> int:
    from .chat import Chat, converse, display_for, read_template
    from .export import load

    if args.num_samples != 1:
        raise UserError("a chat answers each message once; drop --num-samples")
    options = _sampling_options(args, progress=False)  # the live view shows the progress
    template = read_template(args.template) if args.template else None
    model, tokenizer, config = load(args.model, dtype=args.dtype, device=args.device, **_loading_kwargs(args))
    chat = Chat(model, tokenizer, config, options=options, system=args.system, max_tokens=args.max_tokens,
                steps=args.steps, template=template)
    return converse(chat, display_for(as_json=args.json, live=not args.no_live))


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a complete checkpoint: safetensors, diffusion config, tokenizer, remote code, card")
    parser.add_argument("src", help="a diffusion model folder (e.g. a training output)")
    parser.add_argument("out", help="output folder (written atomically)")
    parser.add_argument("--dtype", choices=_dtypes(), help="save in this dtype")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--card", help="JSON file with model card fields: license, datasets, tags, evaluation, "
                                       "description, base_model")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_loading_options(parser)
    parser.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from .export import card_fields, export
    from .settings import read_from, read_json

    card = None
    if args.card:
        card = read_json(args.card, "pass a JSON object of model card fields, such as {\"license\": \"mit\"}")
        with read_from(args.card):
            card_fields(card)  # before minutes of loading
    out = export(args.src, args.out, dtype=args.dtype, card=card, overwrite=args.overwrite,
                 max_shard_size=args.max_shard_size, **_loading_kwargs(args))
    print(f"adapt export: wrote {out}")
    return 0


def _add_push(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="upload an exported checkpoint to the Hugging Face Hub (token: HF_TOKEN or saved login)")
    parser.add_argument("folder", help="a folder written by adapt export")
    parser.add_argument("repo_id", help="owner/name of the model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default main)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; send nothing")
    parser.set_defaults(handler=_run_push)


def _run_push(args) -> int:
    from .hub import push

    files = push(args.folder, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run)
    where = f"{args.repo_id}" + (f" (branch {args.revision})" if args.revision else "")
    if args.dry_run:
        print(f"adapt push: dry run; would upload {len(files)} files to {where}:")
        print("\n".join(f"  {name}" for name in files))
    else:
        print(f"adapt push: uploaded {len(files)} files to {where}")
    return 0


def _add_import(subparsers) -> None:
    parser = subparsers.add_parser("import", help="convert a published DiffuGPT / DiffuLLaMA checkpoint")
    parser.add_argument("src", help="the downloaded checkpoint folder")
    parser.add_argument("--format", required=True, choices=("diffugpt", "diffullama"), help="its layout")
    parser.add_argument("--base", required=True, help="the AR model it was adapted from (folder or Hub id), "
                                                      "e.g. gpt2 or meta-llama/Llama-2-7b-hf")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mask-id", type=int, help="mask token id (default: 10541 diffugpt, 811 diffullama)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(handler=_run_import)


def _run_import(args) -> int:
    from .importers import import_checkpoint

    out = import_checkpoint(args.src, format=args.format, base=args.base, out_dir=args.out,
                            mask_token_id=args.mask_id, overwrite=args.overwrite)
    print(f"adapt import: wrote {out}")
    return 0


def _add_eval(subparsers) -> None:
    from .evaluate.tasks import TASKS, EvalSettings
    from .flags import add_flags
    from .sampling import SamplingOptions

    parser = subparsers.add_parser(
        "eval", help="evaluate a diffusion checkpoint (or, with --ar, a causal one) on benchmark tasks",
        description=f"Tasks: {', '.join(TASKS)}. How each is scored: docs/evaluation.md.")
    parser.add_argument("model", help="a diffusion checkpoint folder (a causal checkpoint with --ar)")
    parser.add_argument("--task", nargs="+", required=True, metavar="T", help="one or more tasks")
    parser.add_argument("--ar", action="store_true", help="MODEL is a plain causal LM: score it the AR way")
    parser.add_argument("--source", metavar="DIR", help="also score this causal LM the AR way, side by side")
    add_flags(parser, EvalSettings, exclude=("sampling",))
    # One sample per call, seeded by eval's own --seed (sample i: seed + i), without a bar.
    add_flags(parser.add_argument_group("how the samples, gsm8k and mbpp tasks draw (adapt generate's flags)"),
              SamplingOptions, exclude=("num_samples", "seed", "progress"))
    parser.add_argument("--dtype", choices=_dtypes(), help="weights dtype (default float32)")
    parser.add_argument("--device", help="cpu (default), cuda, ...")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON to FILE")
    _add_loading_options(parser)
    parser.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    import json
    from dataclasses import asdict

    from .atomic import write_text_atomically
    from .evaluate.tasks import EvalSettings, check_tasks, format_table, run_tasks
    from .export import load
    from .flags import settings_from
    from .modeling import check_device, load_model, load_tokenizer
    from .outputs import check_output
    from .strict_json import to_json
    from .train.distill import check_same_tokenizer

    check_tasks(args.task)
    if args.output:
        check_output(args.output, folder=False, reads=(args.model, args.source, args.data))
    check_device(args.device)
    settings = settings_from(args, EvalSettings, sampling=_sampling_options(args, num_samples=1, progress=False))
    if "samples" in args.task and not (args.ar or args.source):
        raise UserError("task samples scores the samples under the AR model; pass --source AR_MODEL (the causal "
                        "model the checkpoint was adapted from), or --ar to sample a causal model itself")
    if args.source:  # figures side by side, or samples scored under the source, must count the same tokens
        check_same_tokenizer(load_tokenizer(args.model, **_loading_kwargs(args)),
                             load_tokenizer(args.source, **_loading_kwargs(args)), f"--source {args.source}",
                             "the model's")

    def causal(path):
        model, tokenizer = load_model(path, dtype=args.dtype, **_loading_kwargs(args))
        return model.to(args.device or "cpu"), tokenizer

    # samples: every run's samples are scored under the source (loaded once), else a causal model's own
    source = causal(args.source) if args.source and "samples" in args.task else None
    runs = []
    for path, as_ar in [(args.model, args.ar)] + ([(args.source, True)] if args.source else []):
        if as_ar:
            model, tokenizer = source if source and path == args.source else causal(path)
            config = None
        else:
            model, tokenizer, config = load(path, dtype=args.dtype, device=args.device, **_loading_kwargs(args))
        results = run_tasks(model, tokenizer, args.task, config=config, settings=settings,
                            scorer=source[0] if source else None,
                            progress=sys.stderr.isatty())  # bars in a log file would share the error line
        runs.append({"name": f"{path} ({'AR' if as_ar else 'diffusion'})", "model": path,
                     "mode": "ar" if as_ar else "diffusion", "results": results})
        del model
    report = to_json({"settings": asdict(settings), "runs": runs})
    if args.output:
        write_text_atomically(args.output, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else format_table(runs))
    return 0


def _add_bench(subparsers) -> None:
    from .bench import BenchSettings
    from .flags import add_flags

    parser = subparsers.add_parser(
        "bench", help="time and memory of diffusion training, sampling and ELBO against the causal baseline, "
                      "as ratios", description="Also python scripts/bench.py; the figures: docs/performance.md.")
    add_flags(parser, BenchSettings)
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the results as JSON to PATH; without PATH, JSON goes to stdout and the table to stderr")
    parser.set_defaults(handler=_run_bench)


def _run_bench(args) -> int:
    from .bench import BenchSettings, run, write_report
    from .flags import settings_from
    from .outputs import check_output

    settings = settings_from(args, BenchSettings)
    if args.json not in (None, "-"):
        check_output(args.json, folder=False, reads=(settings.model,))
    write_report(run(settings), args.json)
    return 0


def _add_plan(subparsers) -> None:
    from .flags import finite_float
    from .plan import PlanSettings
    from .settings import choices_of

    default = PlanSettings()
    parser = subparsers.add_parser(
        "plan", help="memory per GPU and node, the largest micro-batch that fits, and the run's time, before launching",
        description="Computed from the model's config alone (a config.json is enough: model.path=.../config.json); "
                    "the formulas: docs/cluster.md.")
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/llama2-7b.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.batch_size=8")
    parser.add_argument("--gpus", type=int, default=default.gpus, help=f"GPUs in the run (default: {default.gpus})")
    parser.add_argument("--nodes", type=int, help="nodes the GPUs are spread over (default: GPUs / 8, at least 1)")
    parser.add_argument("--gpu", choices=choices_of(PlanSettings, "gpu"), default=default.gpu,
                        help=f"for its peak bf16 FLOP/s and memory (default: {default.gpu})")
    parser.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB or 141GB (default: the --gpu's)")
    parser.add_argument("--mfu", type=finite_float, default=default.mfu,
                        help=f"assumed model FLOPs utilisation for the time estimate (default: {default.mfu})")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
    parser.set_defaults(handler=_run_plan)


def _run_plan(args) -> int:
    import json

    from .plan import PlanSettings, format_plan, plan
    from .recipe import load_recipe

    settings = PlanSettings(gpus=args.gpus, nodes=args.nodes, gpu=args.gpu, gpu_memory=args.gpu_memory, mfu=args.mfu)
    result = plan(load_recipe(args.recipe, args.overrides), settings)
    print(json.dumps(result, indent=2) if args.json else format_plan(result, args.recipe))
    return 0


def _add_distill(subparsers) -> None:
    from .flags import add_flags
    from .sampling import SamplingOptions
    from .self_distill import TARGETS

    parser = subparsers.add_parser(
        "distill", help="fewer decoding steps: train a diffusion model on its own answers (dParallel, d3LLM)",
        description="Writes the model's answers to --data's prompts into OUT/targets.jsonl (resumable), then "
                    "trains on them with LoRA, complementary masks and certainty forcing "
                    "(adapt/self_distill.py's TRAINING, saved as OUT/recipe.yaml); the model lands in OUT/model. "
                    "Run it again to continue a stopped run.")
    parser.add_argument("model", help="a diffusion checkpoint folder (adapt export / adapt train output)")
    parser.add_argument("--data", required=True, help="prompts: .txt (one a line) or .jsonl (a 'prompt' field a row)")
    parser.add_argument("--out", required=True, help="output folder: targets, checkpoints, OUT/model")
    parser.add_argument("--targets", choices=TARGETS, default=TARGETS[0],
                        help="who answers the prompts: the model itself with the sampler options below, or its AR "
                             "source (--source) with their temperature, top-k and top-p")
    parser.add_argument("--source", help="the AR source for --targets source (default: the model's base_model)")
    parser.add_argument("--length", type=int, required=True, help="tokens of each answer")
    parser.add_argument("--steps", type=int, help="denoising steps per answer (default: one per token)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any recipe setting of the training (docs/recipes.md), e.g. --set train.max_steps=400")
    add_flags(parser, SamplingOptions, exclude=("progress", "num_samples"))  # one answer a prompt
    _add_model_options(parser)  # while answering; the training loads as its recipe says
    parser.set_defaults(handler=_run_distill)


def _run_distill(args) -> int:
    from pathlib import Path

    from .convert import RECIPE_FILE, write_recipe
    from .export import load
    from .sampling import check_positive, check_steps
    from .self_distill import (check_distill_output, distill_recipe, read_prompts, source_answerer,
                               write_targets)

    out = Path(args.out)
    options = _sampling_options(args, num_samples=1)
    check_positive(length=args.length)  # before anything is written: a refused answer would leave a partial file
    if args.steps is not None:
        check_steps(args.steps, args.length)
    check_distill_output(out, args.model, args.data, args.source)
    prompts = read_prompts(args.data)
    recipe = distill_recipe(args.model, out / "targets.jsonl", out, _loading_overrides(args) + list(args.overrides))
    model, tokenizer, config = load(args.model, dtype=args.dtype, device=args.device, **_loading_kwargs(args))
    answer = None
    if args.targets == "source":
        source = config.base_model if args.source is None else args.source
        if source is None:
            raise UserError(f"--targets source needs the AR model {args.model} was adapted from, and its config names "
                            "no base_model; pass --source AR_MODEL")
        answer = source_answerer(source, tokenizer, length=args.length, options=options, dtype=args.dtype,
                                 device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    targets = write_targets(model, tokenizer, prompts, out, length=args.length, steps=args.steps, options=options,
                            answer=answer)
    print(f"adapt distill: {len(prompts)} answers in {targets}")
    del model, answer
    write_recipe(recipe, out / RECIPE_FILE)
    return _train_and_report(recipe)


def _add_serve(subparsers) -> None:
    from .flags import add_flags
    from .sampling import SamplingOptions
    from .serve.app import ServeSettings

    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) over a diffusion checkpoint",
        description="POST /v1/completions and /v1/chat/completions (stream or not), GET /v1/models and /health. "
                    "A request may set any sampler option as an extra field; see docs/generation.md, Serving.")
    parser.add_argument("model", help="a diffusion checkpoint folder (adapt export / adapt train output)")
    add_flags(parser, ServeSettings)
    add_flags(parser.add_argument_group("the sampler options of a request that does not set them"), SamplingOptions,
              exclude=("num_samples", "progress"))  # n is per request; a server draws no progress bar
    _add_model_options(parser)
    parser.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    from .export import load
    from .flags import settings_from
    from .serve.app import ServeSettings, check_address, serve

    settings = settings_from(args, ServeSettings)  # bad flags fail before the model loads
    defaults = _sampling_options(args, num_samples=1, progress=False)
    check_address(settings)
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device, **_loading_kwargs(args))
    serve(model, tokenizer, args.model, settings, defaults)
    return 0


def _add_rl(subparsers) -> None:
    parser = subparsers.add_parser(
        "rl", help="reward training of a diffusion model (diffu-GRPO, coupled-GRPO) from a recipe's rl: section",
        description="GRPO on a diffusion model (an adapt train / convert output): G completions per prompt from "
                    "the sampler, rewards, group-normalised advantages, the clipped ratio of estimated "
                    "log-probabilities (docs/method.md; keys in docs/recipes.md, section rl). Launch as adapt "
                    "train: python -m adapt, torchrun or accelerate launch.")
    _add_recipe_options(parser, "recipes/rl-hybrid-format-cpu.yaml (with an rl: section)", "rl.num_generations=4")
    parser.set_defaults(handler=_run_rl)


def _run_rl(args) -> int:
    from .rl import train_rl

    return _train_and_report(_recipe_of(args), overwrite=args.overwrite, train=train_rl)


_COMMANDS = [_add_info, _add_train, _add_convert, _add_generate, _add_infill, _add_export, _add_push, _add_import,
             _add_eval, _add_bench, _add_plan, _add_distill, _add_chat, _add_serve, _add_rl]
