"""FSDP2 loads the model once, into the shards: no process holds a whole copy while it loads.

Two CPU processes under torchrun. For every family in adapt.presets, the weights read into the shards
(rank 0 broadcasting a piece at a time) are bit for bit the weights of the earlier path, where every
process loaded the whole model and then sharded it: the same parameters and buffers (RoPE frequencies),
a tied head still tied, the same first-step loss and the same weights after one step. A Llama of 154M
parameters (a bf16 checkpoint loaded as float32: 617 MB) is loaded with each process's peak RSS below
one copy of the weights, its decoder sharded, and the added mask token's rows the mean of the others.

glibc keeps freed blocks below its dynamic mmap threshold on the heap, so RSS would also count memory
already freed; MALLOC_MMAP_THRESHOLD_ fixes the threshold at 1 MiB for the measurement.

Run as a script under torchrun, this file is the worker: `compare REPORT RECIPE...` or `load REPORT RECIPE`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _prepare(backend, model, diffusion):
    """The sharded objective and its AdamW, as the loop prepares them (the schedule plays no part here)."""
    from adapt.diffusion import DiffusionTraining, objective_of
    from adapt.train.build import ModelWithLoss

    training = DiffusionTraining()
    objective, optimizer, _ = backend.prepare(ModelWithLoss(model, diffusion, training, objective_of(diffusion, training)),
                                              lambda objective: list(objective.parameters()), lambda optimizer: None)
    return objective, optimizer


def _one_step(backend, loading, recipe, rank: int) -> dict:
    """Load as the backend `loading` does, shard, train one step on fixed data and noise: what the two
    paths must agree on."""
    import torch

    from adapt.train.build import load_model
    from adapt.train.partitioned import is_empty

    model, _, diffusion = load_model(recipe, loading)
    empty = is_empty(model)
    objective, optimizer = _prepare(backend, model, diffusion)
    inner = objective.model
    loaded = backend.full_state_dict(objective)  # values on rank 0 only
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(rank))
    loss = objective(ids, generator=torch.Generator().manual_seed(rank)).loss
    loss.backward()
    optimizer.step()
    embedding = next(name for name, p in objective.named_parameters() if p is inner.get_input_embeddings().weight)
    return {"empty": empty, "loaded": loaded, "stepped": backend.full_state_dict(objective), "loss": loss.item(),
            "buffers": {name: b.clone() for name, b in inner.named_buffers()}, "embedding": embedding,
            "tied": inner.get_output_embeddings().weight is inner.get_input_embeddings().weight}


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _compare(report: str, recipe_paths: list[str]) -> None:
    """For each recipe: the earlier whole-copy path (ddp's loader, then FSDP2) against the load-once path."""
    from adapt.recipe import load_recipe
    from adapt.train.backends import DDPBackend, open_backend

    results = {}
    for path in recipe_paths:
        recipe = load_recipe(path)
        backend = open_backend(recipe, Path(recipe.output_dir))
        rank = backend.accelerator.process_index
        results[Path(path).stem] = _agreement(_one_step(backend, DDPBackend, recipe, rank),
                                              _one_step(backend, backend, recipe, rank))
    Path(f"{report}.{rank}").write_text(json.dumps(results))


def _agreement(whole: dict, once: dict) -> dict:
    """Each path's figures side by side, whether their tensors are equal, and the load-once mask rows."""
    from adapt.presets import VOCAB

    result = {key: [whole[key], once[key]] for key in ("empty", "loss", "tied")}
    result.update({f"same_{key}": _same(whole[key], once[key]) for key in ("buffers", "loaded", "stepped")})
    embedding = once["loaded"].get(once["embedding"])  # gathered on rank 0 only
    if embedding is not None:
        result.update(rows=embedding.shape[0], mask_rows_are_mean=_mask_rows_are_mean(embedding, VOCAB))
    return result


def _mask_rows_are_mean(embedding, mask_id: int) -> bool:
    """Whether the rows from the added mask token's on (it and the padding) are the mean of the rows before."""
    import torch

    added = embedding[mask_id:]
    return torch.equal(added, embedding[:mask_id].mean(dim=0).expand_as(added))


def _load(report: str, recipe_path: str) -> None:
    """Load the big model on the load-once path; report the peak RSS and how the weights came out."""
    from torch.distributed.tensor import DTensor

    from adapt.recipe import load_recipe
    from adapt.train.backends import open_backend
    from adapt.train.build import load_model
    from tests.tiny_runs import memory_status

    recipe = load_recipe(recipe_path)
    backend = open_backend(recipe, Path(recipe.output_dir))
    before = memory_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    model, _, diffusion = load_model(recipe, backend)
    objective, _ = _prepare(backend, model, diffusion)
    peak = memory_status("VmHWM")
    inner = objective.model
    embedding = inner.get_input_embeddings().weight.full_tensor()
    decoder = [p for name, p in inner.named_parameters() if ".layers." in name]
    result = {"rank": backend.accelerator.process_index, "before": before, "peak": peak, "rows": embedding.shape[0],
              "halved": all(isinstance(p, DTensor) and 2 * p.to_local().numel() == p.numel() for p in decoder),
              "mask_rows_are_mean": _mask_rows_are_mean(embedding, diffusion.mask_token_id)}
    Path(f"{report}.{result['rank']}").write_text(json.dumps(result))


def _run_worker(*args, env_extra: dict | None = None) -> None:
    from .tiny_runs import ENV

    env = dict(ENV, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env_extra or {}))
    run = subprocess.run([*TORCHRUN, __file__, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _write_recipe(recipe, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return path


def _family_folder(root: Path, family: str) -> Path:
    from .tiny_runs import causal_folder

    return causal_folder(root / family, family)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma"])
def test_the_empty_model_holds_the_embeddings_and_buffers_of_a_whole_load_and_nothing_else(tmp_path, family):
    import torch

    from adapt.modeling import load_model as load_pretrained
    from adapt.recipe import load_recipe
    from adapt.train.partitioned import load_empty

    folder = _family_folder(tmp_path, family)
    settings = load_recipe(None, [f"model.path={folder}", "data.path=d", "output_dir=o"]).model
    whole, _ = load_pretrained(settings.path)
    empty, _ = load_empty(settings, lambda settings: pytest.fail("fell back to the whole load"))
    real = {name for name, p in empty.named_parameters() if not p.is_meta}
    inputs, head = empty.get_input_embeddings().weight, empty.get_output_embeddings().weight
    assert real == {name for name, p in empty.named_parameters() if p is inputs or p is head}
    assert all(torch.equal(p, whole.get_parameter(name)) for name, p in empty.named_parameters() if name in real)
    assert (head is inputs) == (whole.get_output_embeddings().weight is whole.get_input_embeddings().weight)
    buffers = dict(whole.named_buffers())
    assert {name: b.dtype for name, b in empty.named_buffers()} == {name: b.dtype for name, b in buffers.items()}
    assert all(torch.equal(b, buffers[name]) for name, b in empty.named_buffers())
    assert not empty.training  # as from_pretrained returns it: dropout is the loop's to switch on


def test_a_checkpoint_that_does_not_fit_its_config_goes_to_the_whole_load(tmp_path):
    """Shapes are compared before anything is sharded, so the ordinary loader's error (or its renaming
    and merging of tensors) still applies."""
    from adapt.recipe import load_recipe
    from adapt.train.partitioned import load_empty

    folder = _family_folder(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    settings = load_recipe(None, [f"model.path={folder}", "data.path=d", "output_dir=o"]).model
    assert load_empty(settings, lambda settings: "whole") == "whole"


def test_lora_under_fsdp_is_refused_in_one_line(tmp_path):
    from .tiny_runs import recipe, run_cli

    run = run_cli("train", recipe(tmp_path, lora={"r": 4}, distributed={"backend": "fsdp"}))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "lora with distributed.backend: fsdp is not supported" in run.stderr


@pytest.mark.slow
def test_every_family_loads_into_the_shards_exactly_as_from_a_whole_copy(tmp_path):
    from adapt.presets import FAMILIES

    from .tiny_runs import recipe_for

    recipes = [_write_recipe(recipe_for(tmp_path, f"model.path={_family_folder(tmp_path, family)}",
                                        "distributed.backend=fsdp", output=family), tmp_path / f"{family}.yaml")
               for family in FAMILIES]
    report = tmp_path / "compare.json"
    _run_worker("compare", report, *recipes)
    for rank in (0, 1):
        for family, result in json.loads(Path(f"{report}.{rank}").read_text()).items():
            print(f"rank {rank} {family}: first-step loss {result['loss']}, tied {result['tied']}")
            assert result["empty"] == [False, True], family  # the load-once path was taken, and only there
            assert result["loss"][0] == result["loss"][1], family
            assert result["same_buffers"] and result["tied"][0] == result["tied"][1], family
            if rank == 0:  # the full state dicts are gathered on rank 0
                assert result["same_loaded"] and result["same_stepped"], family
                assert result["mask_rows_are_mean"] and result["rows"] % 64 == 0, family
    ties = json.loads(Path(f"{report}.0").read_text())
    assert ties["gpt2"]["tied"] == [True, True] and ties["llama"]["tied"] == [False, False]


@pytest.mark.slow
def test_no_process_holds_a_whole_copy_while_loading(tmp_path):
    from .tiny_runs import big_llama, peak_rss_below, recipe_for

    _, weight_bytes = big_llama(tmp_path / "causal")  # recipe_for's model folder
    recipe = _write_recipe(recipe_for(tmp_path, "distributed.backend=fsdp", "model.dtype=float32", output="fsdp"),
                           tmp_path / "fsdp.yaml")
    report = tmp_path / "load.json"
    _run_worker("load", report, recipe, env_extra={"MALLOC_MMAP_THRESHOLD_": str(2**20)})
    for result in peak_rss_below(report, weight_bytes):
        assert result["halved"] and result["mask_rows_are_mean"] and result["rows"] % 64 == 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mode, report_path, *recipe_files = sys.argv[1:]
    _compare(report_path, recipe_files) if mode == "compare" else _load(report_path, recipe_files[0])
