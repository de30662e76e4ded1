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
* `generate_until`: `max_gen_toks` tokens decoded by the sampler (greedy unless the task sets a
  temperature), ending at the first EOS, then cut at the first stop string; with `ar=True`, HF greedy
  generation.

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

from .evaluate.likelihood import continuation_scores, encode_pair
from .evaluate.perplexity import evaluation_mode, sampling_ratio
from .sampling import SamplingOptions, anchor_id, generate
from .settings import from_dict

# The SamplingOptions fields that no model argument of their name sets: the adapter's own `seed` is the
# sampler's too, each request is one sample drawn at the task's temperature, and the harness shows progress.
NOT_MODEL_ARGUMENTS = ("seed", "num_samples", "temperature", "progress")


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
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(options.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            text = self._generate(context, length, temperature)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs

    @torch.no_grad()
    def _generate(self, context: str, length: int, temperature: float) -> str:
        if self.config is None:
            with evaluation_mode(self.model, 0.0):
                ids = self.tokenizer(context, return_tensors="pt")["input_ids"].to(self.model.device)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                          do_sample=temperature > 0, temperature=temperature or None,
                                          pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        with evaluation_mode(self.model, sampling_ratio(self.config)):
            return generate(self.model, self.tokenizer, context or None, length=length, steps=self.steps,
                            options=self.sampling, temperature=temperature)[0]


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
