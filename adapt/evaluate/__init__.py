"""Evaluation: ELBO perplexity, multiple choice, last-word prediction, infilling, code infilling.

Each task scores a diffusion checkpoint and, with `ar=True`, its causal source the AR way on the same
examples, so the two print side by side. See docs/evaluation.md for how each task is scored.
"""

from .perplexity import ar_perplexity, elbo_perplexity, evaluation_mode

__all__ = ["ar_perplexity", "elbo_perplexity", "evaluation_mode"]
