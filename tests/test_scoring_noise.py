"""scripts/scoring_noise.py: both ELBO estimators it simulates are unbiased for the sum of the exact
losses, the count form with less variance, and a bad argument is one line with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import import_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scoring_noise():
    return import_script("scoring_noise")


def test_both_estimators_are_unbiased_and_the_count_form_varies_less(scoring_noise):
    losses = torch.tensor([0.5, 3.0, 1.2, 7.0, 0.1], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    spread = {}
    for estimator in ("bernoulli", "count"):
        draws = torch.tensor([scoring_noise.estimate(losses, estimator, 4, generator) for _ in range(2000)])
        stderr = draws.std() / len(draws) ** 0.5
        # the Bernoulli form integrates t over (eps, 1): its mean is a hair below the exact sum
        assert abs(draws.mean() - losses.sum()) < 4 * stderr + 0.01 * losses.sum(), (estimator, draws.mean())
        spread[estimator] = float(draws.std())
    assert spread["count"] < 0.6 * spread["bernoulli"], spread


def test_one_token_is_scored_exactly_by_the_count_form(scoring_noise):
    generator = torch.Generator().manual_seed(1)
    assert scoring_noise.estimate(torch.tensor([2.5], dtype=torch.float64), "count", 8, generator) == pytest.approx(2.5)


def test_a_bad_argument_is_one_line_and_exit_code_2():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "scoring_noise.py"), "--samples", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "scoring_noise: error: --limit must be 1..5000, --repeats 1..10000 and each --samples 1..4096"]
