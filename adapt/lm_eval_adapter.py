"""lm-evaluation-harness model class `adapt`: any harness task on a diffusion checkpoint (or its AR source).

    python -m adapt.lm_eval_adapter --model adapt --model_args pretrained=DIR --tasks hellaswag
    python -m adapt.lm_eval_adapter --model adapt --model_args pretrained=SOURCE,ar=True --tasks hellaswag

The harness finds model classes in its registry only once the module defining them is imported, and
it has no plugin hook, so run it through this module (the same command line as `lm_eval`), or import
`adapt.lm_eval_adapter` before `lm_eval.simple_evaluate(model="adapt", ...)`.

* `loglikelihood`: the continuation's negative ELBO (masking only the continuation, `samples` masks of stratified
  sizes, seed `seed`), an upper bound on its NLL; `is_greedy` is whether every continuation token
  is the argmax with the whole continuation masked. With `ar=True`: the exact AR log-likelihood.
* `loglikelihood_rolling`: the ELBO of the whole text after a BOS/EOS, in windows of the model's length.
* `generate_until`: `max_gen_toks` tokens decoded by the sampler, ending at the first EOS, then cut at
  the first stop string. Greedy unless the task asks to sample (`do_sample`: its temperature, else 1);
  any other sampler option its generation settings name (top_k, top_p, block_size, ...) overrides the
  model argument for that request. With `ar=True`, the causal model's own `generate` with the same
  temperature, top-k, top-p and seed.
* `apply_chat_template=True` (and `--apply_chat_template`) renders prompts in the tokenizer's chat template.

Model arguments: pretrained, ar, samples (32), seed (0), batch_size (8), steps (default: one per token),
max_gen_toks (256), dtype, device, and every field of `adapt.SamplingOptions` (same defaults, same
checks) but those in NOT_MODEL_ARGUMENTS: the seed is `seed`, the temperature the task's.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from .errors import UserError
from .chat_template import check_chat_template, render_chat
from .evaluate.generative import before_stops
from .evaluate.likelihood import continuation_scores, encode_pair
from .evaluate.perplexity import evaluation_mode, sampling_ratio
from .evaluate.samples import ar_generate
from .sampling import SamplingOptions, anchor_id, context_ids, generate
from .settings import default_of, from_dict

# The SamplingOptions fields that no model argument of their name sets: the adapter's own `seed` is the
# sampler's too, each request is one sample drawn at the task's temperature, and the harness shows progress.
NOT_MODEL_ARGUMENTS = ("seed", "num_samples", "temperature", "progress")
# The SamplingOptions fields a task's generation settings may name (its temperature is read with do_sample).
REQUEST_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingOptions) if f.name not in NOT_MODEL_ARGUMENTS)


@register_model("adapt")
class AdaptLM(LM):
    def __init__(self, pretrained: str, ar: bool = False, dtype: str | None = None, device: str | None = None,
                 **options):
        from .export import load
        from .modeling import load_model

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # the harness passes "cuda" by default
        if ar:
            model, tokenizer = load_model(pretrained, dtype=dtype)
            model, config = model.to(device), None
        else:
            model, tokenizer, config = load(pretrained, dtype=dtype, device=device)
        self._setup(model, tokenizer, config, **options)

    @classmethod
    def from_model(cls, model, tokenizer, config=None, **options) -> "AdaptLM":
        """Wrap a model already in memory (`config=None`: score it the AR way)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, config, **options)
        return self

    def _setup(
        self,
        model,
        tokenizer,
        config,
        *,
        samples: int = 32,
        seed: int = 0,
        batch_size: int | str = 8,
        steps: int | None = None,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        **options,  # SamplingOptions fields; the rest (e.g. max_batch_size, passed to every model) are not used
    ) -> None:
        LM.__init__(self)
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.samples, self.seed = int(samples), int(seed)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> the default
        self.steps = steps
        self.sampling = _sampling_options(options, seed=self.seed)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048

    def _scores(self, sequences, starts):
        return continuation_scores(self.model, sequences, starts, config=self.config, n_samples=self.samples,
                                   seed=self.seed, batch_size=self.batch_size, max_length=self.max_length)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = [encode_pair(self.tokenizer, *request.args) for request in requests]
        scores = []
        for first in tqdm(range(0, len(encoded), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = encoded[first:first + self.batch_size]
            scores += self._scores([seq for seq, _ in chunk], [start for _, start in chunk])
        return [(-score.nll, score.greedy) for score in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix = anchor_id(self.tokenizer)  # BOS, else EOS
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            tokens = self.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            # The harness's windows count predicted positions; ours also hold the first, given token.
            windows = [make_disjoint_window(window) for window in
                       get_rolling_token_windows(tokens, prefix, self.max_length - 1, context_len=1)]
            scores = self._scores([context + target for context, target in windows],
                                  [len(context) for context, _ in windows])
            results.append(-sum(score.nll for score in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, generation_kwargs = request.args
            until, length, options = self._request_settings(generation_kwargs)
            outputs.append(before_stops(self._generate(context, length, options), until))
        return outputs

    def _request_settings(self, generation_kwargs: dict | None) -> tuple[list[str], int, SamplingOptions]:
        """A request's stop strings, new tokens and sampling options: the model arguments' options with
        the task's temperature (greedy unless it asks to sample) and any sampler option it names."""
        settings = dict(generation_kwargs or {})
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        length = int(settings.pop("max_gen_toks", self.max_gen_toks))
        sampled, temperature = settings.pop("do_sample", False), settings.pop("temperature", None)
        if not sampled:
            temperature = 0.0
        elif temperature is None:
            temperature = default_of(SamplingOptions, "temperature")
        unknown = sorted(set(settings) - set(REQUEST_OPTIONS))
        if unknown:
            raise UserError(f"the task's generation setting {', '.join(map(repr, unknown))} is no sampler option; "
                            f"a task may set until, max_gen_toks, do_sample and {', '.join(REQUEST_OPTIONS)}")
        hints = typing.get_type_hints(SamplingOptions)
        given = {name: _as_field_type(hints[name], value) for name, value in settings.items()}
        values = {**dataclasses.asdict(self.sampling), **given, "temperature": float(temperature)}
        return until, length, from_dict(SamplingOptions, values)

    @torch.no_grad()
    def _generate(self, context: str, length: int, options: SamplingOptions) -> str:
        if self.config is None:  # the causal model's own generate, with the same draw settings
            with evaluation_mode(self.model, 0.0):
                ids = torch.tensor([context_ids(self.tokenizer, context)], device=self.model.device)
                new = ar_generate(self.model, ids, length=length, options=options, seed=self.seed,
                                  tokenizer=self.tokenizer)
            return self.tokenizer.decode(new[0], skip_special_tokens=True)
        with evaluation_mode(self.model, sampling_ratio(self.config)):
            return generate(self.model, self.tokenizer, context or None, length=length, steps=self.steps,
                            options=options)[0]

    # The harness's chat template interface (`apply_chat_template=True`): the tokenizer's own template.
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        check_chat_template(self.tokenizer)
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt)


def _sampling_options(arguments: dict, seed: int) -> SamplingOptions:
    """The `SamplingOptions` that the model arguments naming its fields set, and `seed`."""
    hints = typing.get_type_hints(SamplingOptions)
    values = {field.name: _as_field_type(hints[field.name], arguments[field.name])
              for field in dataclasses.fields(SamplingOptions)
              if field.name in arguments and field.name not in NOT_MODEL_ARGUMENTS}
    return from_dict(SamplingOptions, {**values, "seed": seed})


def _as_field_type(hint, value):
    """A model argument read by its field's type. The harness guesses a type from the text alone, so it
    is read again from the text: "none" is None only where the field allows None (cache=none is the
    choice "none"), "true" / "false" are bools; numbers and choices are left to `from_dict`."""
    text = "none" if value is None else str(value)
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if type(None) in allowed and text.lower() == "none":
        return None
    if bool in allowed:
        return {"true": True, "false": False}.get(text.lower(), text)
    return text


def main() -> None:
    """`lm_eval`'s command line, with the `adapt` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
