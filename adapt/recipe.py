"""Recipes: a YAML file (plus `key=value` overrides) parsed into typed, validated dataclasses.

Every setting is a dataclass field with a default; the comment beside it is its documentation
(docs/recipes.md lists them all). Parsing is generic (adapt/settings.py): the type annotations decide
what a value may be, `Literal[...]` lists the valid choices, and `field(metadata=at_least(n))` states a
range. An unknown key, a wrong type or an out-of-range value is a `UserError` that names the key and
what it accepts; `validate` adds the rules that involve more than one setting.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .backend_names import BACKEND_NAMES
from .data import DataConfig
from .diffusion import MODES, DiffusionTraining
from .errors import UserError, quoted
from .sampling import DECODINGS, MAX_NUM_SAMPLES, STRATEGIES
from .settings import NUMPY_SEEDS, above, at_least, between, default_of, from_dict


@dataclass
class ModelSection:
    """The pretrained causal LM to adapt, and its mask token."""

    path: str = ""  # local HF folder, .gguf file or Hub id (required)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the weights as loaded
    # sdpa and eager carry the annealed and the block masks as bool or float tensors, flex_attention as
    # block-sparse FlexAttention masks (compiled on first use of each shape)
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    trust_remote_code: bool = False  # run the checkpoint's own Python code (only for sources you trust)
    allow_pickle: bool = False  # accept .bin/.pt weights when there are no safetensors (read with weights_only=True)
    # "add": a new token, embeddings resized; "reuse": the existing id `mask_token_id`. Ignored when the
    # model is already a diffusion checkpoint (its recorded mask token is kept).
    mask_token: Literal["add", "reuse"] = "add"
    mask_token_id: int | None = None  # the id to reuse (mask_token: reuse only)

    def dtype_bytes(self) -> int:
        """Bytes of one weight as loaded (`dtype`)."""
        return 4 if self.dtype == "float32" else 2


@dataclass
class TrainSection:
    """Batch, length of the run, the diffusion objective and numerics."""

    # sequences per process per micro-step: one batch (MAX_NUM_SAMPLES at most, and what the device's memory
    # holds by `adapt plan`'s estimate, checked before the data is read)
    batch_size: int = field(default=8, metadata=between(1, MAX_NUM_SAMPLES))
    grad_accum: int = field(default=1, metadata=at_least(1))  # micro-steps per optimizer step
    max_steps: int = field(default=1000, metadata=at_least(1))  # optimizer steps in the whole run
    # Optimizer steps over which attention goes from the source's ratio (0 = causal, an AR model) to
    # bidirectional (1 = bidirectional at once; a source already adapted stays bidirectional), or a
    # block model's blocks grow (diffusion.block_schedule: grow).
    anneal_steps: int = field(default=10_000, metadata=at_least(1))
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast (weights stay in model.dtype)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    max_grad_norm: float = field(default=1.0, metadata=at_least(0))  # clip the global norm; 0 = no clipping
    seed: int = field(default=0, metadata=NUMPY_SEEDS)  # model init of new rows, dropout, noise levels, masks
    eval_every: int = field(default=0, metadata=at_least(0))  # validation ELBO every N steps (0 = only at the end)
    eval_batches: int = field(default=4, metadata=at_least(0))  # validation batches per process (0 = no validation)
    # Monte Carlo masks per validation sequence (elbo_nll), a forward each: at most MAX_NUM_SAMPLES
    eval_samples: int = field(default=4, metadata=between(1, MAX_NUM_SAMPLES))
    log_every: int = field(default=1, metadata=at_least(1))  # print a log line every N steps
    # A step with a non-finite loss or gradient is skipped (weights unchanged, a warning); after this many
    # in a row the run stops with a checkpoint of the last finite weights (exit code 3).
    max_nonfinite_steps: int = field(default=5, metadata=at_least(1))


@dataclass
class LrMultipliers:
    """Each kind of parameter trains at optim.lr times its multiplier (RND1: keep the MLPs, which hold the
    AR model's knowledge, slower than attention, which must change most). A head tied to the embeddings
    is the embedding matrix and takes `embeddings`; `head` is for an untied output projection."""

    embeddings: float = field(default=1.0, metadata=at_least(0))  # token (and learned position) embeddings
    attention: float = field(default=1.0, metadata=at_least(0))  # q/k/v/o projections and their biases
    mlp: float = field(default=1.0, metadata=at_least(0))  # the feed-forward block of each layer
    norms: float = field(default=1.0, metadata=at_least(0))  # every LayerNorm/RMSNorm, wherever it sits
    head: float = field(default=1.0, metadata=at_least(0))  # the output projection (untied only)


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (transformers' schedulers)."""

    lr: float = field(default=3e-4, metadata=at_least(0))  # peak learning rate
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine decay to 0, or constant
    warmup_steps: int = field(default=0, metadata=at_least(0))  # linear warmup from 0
    weight_decay: float = field(default=0.01, metadata=at_least(0))
    beta1: float = field(default=0.9, metadata=between(0, 0.999999))
    beta2: float = field(default=0.95, metadata=between(0, 0.999999))
    adam_eps: float = field(default=1e-8, metadata=at_least(0))
    lr_multipliers: LrMultipliers = field(default_factory=LrMultipliers)  # per kind of parameter; 0 = unchanged


@dataclass
class AlignSection:
    """Representation alignment: pull the adapted model's hidden states (on the noisy input) towards the
    frozen source's (on the clean input) by cosine distance (docs/method.md). Costs a second, frozen
    copy of the source's weights on every process."""

    weight: float = field(default=0.0, metadata=at_least(0))  # of the alignment term beside the diffusion loss; 0 = off
    layers: list[int] = field(default_factory=lambda: [-1])  # decoder layers whose outputs are aligned; -1 = the last
    # true: the weight falls linearly to 0 over train.anneal_steps (the causal-to-bidirectional switch),
    # then the source is no longer run: the pull helps while attention changes, holds the model back after
    fade_with_annealing: bool = False


@dataclass
class DistillSection:
    """Teacher KL: at every position the diffusion loss scores, the student's prediction is pulled towards a
    frozen causal teacher's next-token distribution given the clean prefix (docs/method.md). Costs a
    frozen copy of the teacher's weights on every process and one no-grad forward of it per micro-batch."""

    weight: float = field(default=0.0, metadata=at_least(0))  # of the KL term beside the diffusion loss; 0 = off
    temperature: float = field(default=1.0, metadata=above(0))  # both distributions at this temperature (KL x T^2)
    teacher: str | None = None  # a causal LM with the source's tokenizer; null: the source itself (model.path)
    # On-policy distillation (OPDLM): every Nth optimizer step the student writes the last
    # on_policy_tokens of each block itself (the sampler at temperature 1, in on_policy_steps steps; a
    # hybrid model's drafts diffusion-decode), the teacher scores that continuation, and the step's loss
    # is the teacher KL alone on its masked tokens. 0 = never. Costs on_policy_steps no-grad forwards.
    on_policy_every: int = field(default=0, metadata=at_least(0))
    on_policy_tokens: int = field(default=32, metadata=at_least(1))
    on_policy_steps: int = field(default=32, metadata=at_least(1))

    def on_policy_at(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) draws its continuations from the student."""
        return self.on_policy_every > 0 and (step + 1) % self.on_policy_every == 0


# Estimators of a completion's log-probability under a diffusion policy (adapt/rl/estimators.py).
ESTIMATORS = ("coupled", "diffu-grpo", "ar")
MAX_GENERATIONS = 64  # completions per prompt: one batch of the sampler and of every forward


@dataclass
class RLSection:
    """Reward training (`adapt rl`, GRPO for diffusion models; docs/method.md): G completions per prompt
    drawn with the sampler, scored by the rewards, advantages normalised within each group, and the
    clipped policy-ratio objective on log-probabilities that the estimator gives."""

    # .txt (a prompt a line) or .jsonl (a 'prompt' field a row; the row's other fields, such as 'answer'
    # or 'tests', go to the reward functions). Setting it makes the recipe an `adapt rl` recipe.
    prompts: str = ""
    eval_prompts: str | None = None  # held-out prompts, same format: mean reward and its standard error
    eval_every: int = field(default=0, metadata=at_least(0))  # held-out reward every N steps (0: before and after only)
    num_generations: int = field(default=8, metadata=between(2, MAX_GENERATIONS))  # G: completions per prompt
    completion_length: int = field(default=64, metadata=at_least(1))  # tokens the sampler writes per completion
    steps: int | None = field(default=None, metadata=at_least(1))  # denoising steps per completion; null: one per token
    temperature: float = field(default=1.0, metadata=above(0))  # of the sampler: above 0, the group must differ
    strategy: Literal[STRATEGIES] = "random"  # the sampler's commit order
    block_size: int | None = field(default=None, metadata=at_least(1))  # the sampler's blocks; null: the model's
    # A hybrid model: "verify" samples from its AR head (pair it with estimator: ar), "diffusion" denoises
    decoding: Literal[DECODINGS] = "diffusion"
    # "coupled": coupled-GRPO's pair of complementary masks (two forwards); "diffu-grpo": the completion
    # fully masked and the prompt masked at prompt_mask_prob (one forward); "ar": a hybrid model's AR head, exact
    estimator: Literal[ESTIMATORS] = "coupled"
    prompt_mask_prob: float = field(default=0.15, metadata=between(0, 1, high_open=True))  # diffu-grpo only
    iterations: int = field(default=1, metadata=at_least(1))  # mu: optimizer steps on each batch of completions
    clip_epsilon: float = field(default=0.2, metadata=between(0, 1, low_open=True))  # ratio clipped to 1 +- epsilon
    kl_weight: float = field(default=0.0, metadata=at_least(0))  # beta: KL to the frozen reference; 0 = no reference
    reference: str | None = None  # the frozen reference for kl_weight > 0; null: model.path
    # Built in: exact_match (the final answer against the row's 'answer', GSM8K-style), code_tests (the
    # prompt and completion run with the row's 'tests' in the sandbox), format (format_pattern found);
    # or a Python callable "module:function" (prompts, completions, **row fields) -> one float each.
    rewards: list[str] = field(default_factory=lambda: ["format"])
    reward_weights: list[float] = field(default_factory=list)  # one per reward; empty: all 1
    format_pattern: str = r"####\s*-?[\d,]*\.?\d+"  # the format reward's regular expression (re.search)
    code_timeout: float = field(default=10.0, metadata=above(0))  # seconds per program of the code_tests reward


@dataclass
class LoraSection:
    """Low-rank adapters through peft; r: 0 trains all weights."""

    r: int = field(default=0, metadata=at_least(0))  # adapter rank (0 = full fine-tuning, no LoRA)
    alpha: float = field(default=16.0, metadata=at_least(0))  # scale alpha / r
    dropout: float = field(default=0.0, metadata=between(0, 1))
    target_modules: list[str] = field(default_factory=list)  # module names; empty = every linear layer but the head


# distributed.backend's choices: "auto" or a backend's name. Not "single": one process runs as single
# whatever the recipe names (auto or ddp), and named under several processes it could only be wrong.
BACKEND_CHOICES = ("auto", *(name for name in BACKEND_NAMES if name != "single"))


@dataclass
class DistributedSection:
    """How the processes share the work (the process count comes from the launcher)."""

    # auto (train/backends.py's choose_backend): deepspeed when deepspeed_config is set, else DDP for
    # several processes, else one process.
    backend: Literal[BACKEND_CHOICES] = "auto"
    deepspeed_config: str | None = None  # JSON path (recipes/deepspeed/*.json); "auto" values are filled in
    fsdp_reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3-like)


@dataclass
class CheckpointSection:
    """Training checkpoints (model, optimizer, scheduler, RNG, data position) under output_dir/checkpoints."""

    every: int = field(default=500, metadata=at_least(0))  # steps between checkpoints (0 = only at the end)
    keep: int = field(default=2, metadata=at_least(1))  # newest complete checkpoints kept
    # Steps between loadable models written to output_dir/models/step-N, kept for good (a progress or
    # forgetting curve: `adapt eval` reads them like the final model); each costs one model's disk.
    # 0 = only the final output_dir/model.
    export_every: int = field(default=0, metadata=at_least(0))


@dataclass
class LoggingSection:
    """Where the per-step figures go besides stdout and output_dir/metrics.jsonl."""

    tensorboard: bool = True  # event files under output_dir/logs
    wandb: bool = False  # Weights & Biases (needs `pip install wandb` and WANDB_API_KEY in the environment)
    project: str = "adapt"  # W&B project / TensorBoard run group
    progress_bar: bool = True  # tqdm bar, only when stderr is a terminal


@dataclass
class Recipe:
    """A training run. Only model.path, data.path (or data.sources) and output_dir have no usable default."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    diffusion: DiffusionTraining = field(default_factory=DiffusionTraining)
    optim: OptimSection = field(default_factory=OptimSection)
    align: AlignSection = field(default_factory=AlignSection)
    distill: DistillSection = field(default_factory=DistillSection)
    rl: RLSection = field(default_factory=RLSection)
    lora: LoraSection = field(default_factory=LoraSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    output_dir: str = ""  # checkpoints, logs and the exported model (output_dir/model)
    # null: start fresh (refused if output_dir already has checkpoints); "auto": continue from the newest
    # complete checkpoint if there is one; a path: continue from that checkpoint.
    resume: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path | None, overrides: list[str] = (), *, base: dict | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, and return the validated `Recipe`.

    `base` (a nested dict) is applied before the file, for callers such as `adapt convert` that build a
    recipe from defaults.
    """
    values: dict = {}
    if base:
        _merge(values, base)
    if path is not None:
        _merge(values, _read_yaml(Path(path)))
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(values, key, value)
    _refuse_moved_keys(values)
    recipe = from_dict(Recipe, values)
    validate(recipe)
    return recipe


# Keys an older version of adapt read from another section.
MOVED_KEYS = {"train.eps": "diffusion.eps", "train.loss_norm": "diffusion.loss_norm"}


def _refuse_moved_keys(values: dict) -> None:
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(values.get(section), dict) and key in values[section]:
            raise UserError(f"{old} has moved to {new}; write it in the {new.split('.')[0]}: section")


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML where only true/false are booleans (as in YAML 1.2), and a key given twice is an error.

    YAML 1.1, PyYAML's default, also reads yes/no/on/off as booleans, so `mixed_precision: no` (the
    word accelerate uses) would arrive as False and be refused as not one of the choices. PyYAML also
    lets the second of two equal keys (or of two sections of one name) silently win; here it is refused
    at its line. Keys a merge (`<<: *base`) brings in may still be overridden: that is what merges are for.
    """

    def construct_mapping(self, node, deep=False):
        first_at = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in first_at:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} given a second time (first at line {first_at[key].line + 1}), which would silently "
                    "replace the first", key_node.start_mark)
            first_at[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe not found: {path}; pass a YAML file such as recipes/smollm2-135m-cpu.yaml")
    try:
        values = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # where the parser gave up (0-based)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"recipe {path} is not valid YAML{where}: {problem}; fix the YAML there") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (model:, data:, train:, ...)")
    return values


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"override {quoted(text)} is not key=value; write e.g. optim.lr=1e-4 or data.seq_len=512")
    try:
        value = yaml.load(raw, Loader=_RecipeLoader) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(values: dict, key: str, value) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _merge(target: dict, source: dict) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)  # later merges and overrides write into it, never into `source`


# --------------------------------------------------------------------------------------------------
# Checks that involve more than one field


def validate(recipe: Recipe) -> None:
    """Cross-field rules; each names the key to change."""
    if not recipe.model.path:
        raise UserError("model.path is required; set it to a local model folder, a .gguf file or a Hub id")
    if not recipe.rl.prompts:  # an rl run reads prompts, not a corpus
        recipe.data.check()
    if not recipe.output_dir:
        raise UserError("output_dir is required; set it to a folder for checkpoints, logs and the exported model")
    if recipe.model.mask_token == "reuse" and recipe.model.mask_token_id is None:
        raise UserError("model.mask_token is 'reuse' but model.mask_token_id is not set; give the id to reuse")
    if recipe.model.mask_token == "add" and recipe.model.mask_token_id is not None:
        raise UserError("model.mask_token_id is only used with model.mask_token: reuse; remove it or set mask_token: reuse")
    dist = recipe.distributed
    if dist.backend == "deepspeed" and not dist.deepspeed_config:
        raise UserError("distributed.backend is 'deepspeed' but distributed.deepspeed_config is not set; "
                        "point it at a JSON file such as recipes/deepspeed/zero2.json")
    if dist.deepspeed_config and dist.backend not in ("auto", "deepspeed"):
        raise UserError(f"distributed.deepspeed_config is set but distributed.backend is {dist.backend!r}; "
                        "use backend: deepspeed (or auto), or remove deepspeed_config")
    if dist.deepspeed_config and not Path(dist.deepspeed_config).is_file():
        raise UserError(f"distributed.deepspeed_config: file not found: {dist.deepspeed_config}")
    if recipe.optim.warmup_steps > recipe.train.max_steps:
        raise UserError(f"optim.warmup_steps ({recipe.optim.warmup_steps}) exceeds train.max_steps "
                        f"({recipe.train.max_steps}); lower it")
    if recipe.align.weight > 0 and not recipe.align.layers:
        raise UserError("align.weight > 0 but align.layers is empty; list the layers to align, e.g. [-1] (the last)")
    _check_mode_sizes(recipe)
    _check_on_policy(recipe)
    _check_rl(recipe.rl)
    if recipe.train.mixed_precision == "fp16" and recipe.model.dtype == "float16":
        raise UserError("train.mixed_precision: fp16 needs float32 master weights; set model.dtype: float32")


def _check_on_policy(recipe: Recipe) -> None:
    distill = recipe.distill
    if distill.on_policy_every == 0:
        return
    if distill.weight == 0:
        raise UserError("distill.on_policy_every needs a teacher to score the student's continuations; set "
                        "distill.weight > 0")
    if recipe.data.format == "sft":
        raise UserError("distill.on_policy_every continues packed blocks of text, and data.format is sft; "
                        "use adapt distill to learn from a model's answers to prompts")
    if distill.on_policy_tokens >= recipe.data.seq_len:
        raise UserError(f"distill.on_policy_tokens = {distill.on_policy_tokens} leaves no prompt in blocks of "
                        f"data.seq_len = {recipe.data.seq_len}; set it below {recipe.data.seq_len}")
    if distill.on_policy_steps > distill.on_policy_tokens:
        raise UserError(f"distill.on_policy_steps = {distill.on_policy_steps} is more than the "
                        f"{distill.on_policy_tokens} tokens it generates; set it to at most {distill.on_policy_tokens}")


def _check_rl(rl: RLSection) -> None:
    if not rl.prompts:
        return
    if not rl.rewards:
        raise UserError("rl.rewards is empty; name at least one reward, e.g. [format] or [mypackage.rewards:score]")
    if rl.reward_weights and len(rl.reward_weights) != len(rl.rewards):
        raise UserError(f"rl.reward_weights has {len(rl.reward_weights)} weights for {len(rl.rewards)} rewards; give "
                        "one per reward, or none (all 1)")
    if rl.steps is not None and rl.steps > rl.completion_length:
        raise UserError(f"rl.steps = {rl.steps} is more than the {rl.completion_length} tokens of a completion "
                        f"(rl.completion_length); set it to at most {rl.completion_length}")
    if rl.reference is not None and rl.kl_weight == 0:
        raise UserError("rl.reference is set but rl.kl_weight is 0, so it would never be read; set rl.kl_weight > 0 "
                        "or remove rl.reference")


def _check_mode_sizes(recipe: Recipe) -> None:
    """A block or a draft block longer than the sequence it cuts is refused: nothing would be left to cut."""
    if recipe.diffusion.mode is None:
        return
    for f in dataclasses.fields(MODES[recipe.diffusion.mode]):
        size = getattr(recipe.diffusion, f.name)
        if size > recipe.data.seq_len:
            raise UserError(f"diffusion.{f.name} = {size} exceeds data.seq_len = {recipe.data.seq_len}; set it to at "
                            f"most {recipe.data.seq_len}")


def fields_doc() -> list[tuple[str, str, str]]:
    """(dotted key, type, default) for every setting, for docs and `adapt train --help`."""
    rows = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + f.name + ".")
                continue
            rows.append((prefix + f.name, str(hint).replace("typing.", ""), repr(default_of(cls, f.name))))

    walk(Recipe, "")
    return rows
