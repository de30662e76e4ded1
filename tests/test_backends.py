"""A backend is one class in one table (adapt/train/backends.py's BACKENDS), so it cannot be half-added:
every class in the table answers every question the loop and `adapt plan` ask, the recipe offers
exactly the table's names, `adapt plan` sizes each by its own memory model, and "auto" is one function."""

from pathlib import Path

import pytest

from adapt.backend_names import BACKEND_NAMES
from adapt.errors import UserError
from adapt.plan import PlanSettings, meta_model, plan
from adapt.recipe import BACKEND_CHOICES, DistributedSection, load_recipe
from adapt.settings import choices_of
from adapt.train.backends import (BACKENDS, Backend, DDPBackend, DeepSpeedBackend, SingleBackend, choose_backend,
                                  open_backend)

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero2.json'}"
# How a recipe names each backend it may name; a backend added to the table needs its line here.
NAMED = {"ddp": ["distributed.backend=ddp"], "deepspeed": ["distributed.backend=deepspeed", ZERO2],
         "fsdp": ["distributed.backend=fsdp"]}
OPERATIONS = ("prepare", "inner_model", "clip_gradients", "save_state", "load_state")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A small Llama's config.json: all `adapt plan` reads."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("config")
    LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                tie_word_embeddings=False).save_pretrained(folder)
    return folder / "config.json"


@pytest.fixture(scope="module")
def planned(config):
    """planned(*overrides): a recipe for the small Llama."""
    return lambda *overrides: load_recipe(None, [f"model.path={config}", "data.path=d", "output_dir=o", *overrides])


@pytest.fixture(scope="module")
def shape(planned):
    return meta_model(planned())[1]


def test_the_recipe_offers_auto_and_the_tables_names():
    assert tuple(BACKENDS) == BACKEND_NAMES  # the names the recipe imports without the training code
    assert choices_of(DistributedSection, "backend") == BACKEND_CHOICES == ("auto", *NAMED)
    assert set(BACKENDS) == {"single", *NAMED}  # single: what one process runs, never named


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_answers_the_loop_and_the_plan(name, shape, planned, tmp_path):
    backend = BACKENDS[name]
    assert issubclass(backend, Backend) and backend.name == name and isinstance(backend.supports_lora, bool)
    assert all(getattr(backend, operation) is not getattr(Backend, operation) for operation in OPERATIONS)
    recipe = planned(*NAMED.get(name, []))
    states = backend.model_states(recipe, shape, 8, 8)
    assert set(states["gpu"]) == {"weights", "gradients", "optimizer"} and states["cpu"]
    assert all(value >= 0 for value in [*states["gpu"].values(), *states["cpu"].values()])
    assert backend.plan_entry(recipe)["name"] == name and backend.describe(backend.plan_entry(recipe))
    # No safetensors in the folder: every loader falls back to the ordinary, whole one.
    settings = load_recipe(None, [f"model.path={tmp_path}", "data.path=d", "output_dir=o"]).model
    assert backend.load(settings, lambda settings: "whole") == "whole"


@pytest.mark.parametrize("name", list(NAMED))
def test_the_plan_sizes_each_named_backend_by_its_own_memory_model(name, shape, planned):
    recipe = planned(*NAMED[name])
    result = plan(recipe, PlanSettings(gpus=8))
    assert result["backend"]["name"] == name
    own = BACKENDS[name].model_states(recipe, shape, 8, 8)
    one_process = SingleBackend.model_states(recipe, shape, 8, 8)
    rows = {key: result["per_gpu_bytes"][key] for key in own["gpu"]}
    assert rows == own["gpu"] != one_process["gpu"]
    assert result["per_node_cpu_bytes"] == own["cpu"]


def test_auto_is_one_choice_for_the_run_and_the_plan(planned, tmp_path, monkeypatch):
    auto, deepspeed = planned(), planned(ZERO2)
    assert choose_backend(auto, 1) is SingleBackend and choose_backend(auto, 2) is DDPBackend
    assert choose_backend(deepspeed, 1) is DeepSpeedBackend and choose_backend(deepspeed, 8) is DeepSpeedBackend
    assert all(choose_backend(planned(*NAMED[name]), world) is BACKENDS[name] for name in NAMED for world in (1, 8))
    assert [plan(auto, PlanSettings(gpus=gpus))["backend"]["name"] for gpus in (1, 8)] == ["single", "ddp"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process
    for named in ("auto", "ddp"):  # ddp in one process runs as single: accelerate wraps nothing
        recipe = load_recipe(None, [f"model.path={tmp_path}", "data.path=d", f"output_dir={tmp_path}",
                                    "logging.tensorboard=false", f"distributed.backend={named}"])
        assert type(open_backend(recipe, tmp_path)) is SingleBackend


def test_lora_is_refused_where_the_backend_cannot_train_it(tmp_path):
    refusing = [name for name in NAMED if not BACKENDS[name].supports_lora]
    assert refusing == ["fsdp"]
    recipe = load_recipe(None, [f"model.path={tmp_path}", "data.path=d", f"output_dir={tmp_path}", "lora.r=4",
                                "distributed.backend=fsdp"])
    with pytest.raises(UserError, match="^lora with distributed.backend: fsdp is not supported; "
                                        "use ddp or deepspeed for LoRA$"):
        open_backend(recipe, tmp_path)
