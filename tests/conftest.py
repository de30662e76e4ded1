import importlib
import sys
from pathlib import Path

import pytest
import torch

from adapt.presets import FAMILIES, implementations

from .tiny_runs import train_tiny_model

# Every (family, attention implementation) pair the toolkit supports; tests parametrised over it prove
# each property for each pair.
FAMILY_IMPLS = [(family, impl) for family in FAMILIES for impl in implementations(family)]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield


@pytest.fixture(scope="module")
def trained():
    """(model, tokenizer, config) of `train_tiny_model`, trained once per test module that asks for it."""
    return train_tiny_model()


def import_script(name: str):
    """The module of scripts/NAME.py, imported with scripts/ on the path only while it is imported."""
    folder = str(Path(__file__).resolve().parent.parent / "scripts")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)
