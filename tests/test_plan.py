"""`adapt plan`: its figures against hand computation and against a step's measured peak on CPU."""

import json

import pytest
import torch

from adapt.cli import main
from adapt.plan import GPUS, HEADROOM, PlanSettings, activation_bytes, meta_model, plan
from adapt.recipe import load_recipe

from .tiny_runs import LLAMA2_7B, ROOT
# Llama-2-7B by hand: two 32000 x 4096 matrices (embedding, untied head); per layer 4 h^2 (Q, K, V, O),
# 3 h i (gate, up, down) and two norms; the final norm.
H, I, V, LAYERS = 4096, 11008, 32000, 32
P_7B = 2 * V * H + LAYERS * (4 * H * H + 3 * H * I + 2 * H) + H
LARGEST_7B = V * H  # the embedding (or the head) is the largest single module


def llama2_7b(*overrides):
    recipe_file = ROOT / "recipes/llama2-7b.yaml"
    config = [f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero3-offload.json'}"]
    return load_recipe(recipe_file, LLAMA2_7B + config + list(overrides))


def test_7b_parameters_from_config_alone():
    _, shape = meta_model(llama2_7b())
    assert shape.parameters == P_7B == 6_738_415_616
    assert shape.largest_layer == LARGEST_7B
    assert (shape.layers, shape.hidden, shape.kv_width, shape.intermediate) == (LAYERS, H, H, I)


def test_zero3_7b_on_8_gpus_matches_hand_computation():
    """16 bytes a parameter (16-bit weights and gradients, fp32 master and Adam moments) over 8 GPUs is
    13.5 GB; DeepSpeed also counts the fp32 gradient partition (18 bytes) and 4 bytes per parameter of
    the largest layer gathered: 15.7 GB = 14.6 GiB per GPU before activations."""
    result = plan(llama2_7b(f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero3.json'}"),
                  PlanSettings(gpus=8))
    states = sum(result["per_gpu_bytes"][key] for key in ("weights", "gradients", "optimizer"))
    assert states == pytest.approx(18 * P_7B / 8 + 4 * LARGEST_7B, abs=2)
    assert states == pytest.approx(result["deepspeed_model_states_estimate"], abs=2)
    assert 16 * P_7B / 8 == pytest.approx(13.5e9, rel=0.01) and states / 2**30 == pytest.approx(14.61, abs=0.01)
    # No offload: the processes hold only one layer's parameters in CPU RAM while they are built.
    assert result["per_node_cpu_bytes"]["deepspeed"] == pytest.approx(4 * LARGEST_7B * 8 * 1.5, abs=2)


def test_7b_recipe_as_written_on_64_gpus():
    """ZeRO-3 with optimizer and parameters offloaded: the GPU keeps only the gathered layers; each node's
    CPU RAM holds its share of the 18 bytes a parameter, times DeepSpeed's 1.5 buffer factor."""
    recipe = llama2_7b()
    result = plan(recipe, PlanSettings(gpus=64))
    gpu = result["per_gpu_bytes"]
    assert (gpu["weights"], gpu["gradients"], gpu["optimizer"]) == (4 * LARGEST_7B, 0, 0)
    assert result["per_node_cpu_bytes"]["deepspeed"] == pytest.approx(18 * P_7B / 8 * 1.5, abs=2)
    assert result["hardware"]["nodes"] == 8
    # Batch 4 x accumulation 4 x 64 GPUs x 2048 tokens, 31,000 steps: the paper's 65B tokens.
    assert result["tokens_per_step"] == 4 * 4 * 64 * 2048
    assert result["tokens"] == pytest.approx(65e9, rel=0.001)
    # Gradient checkpointing at batch 4 x 2048 (bf16): each layer's input is kept, and the layer being
    # recomputed (attention 4h + 2h, MLP 2h + 4i, its backward's 2i + h: 9h + 6i a token) needs what it
    # uses beyond the LM head's logits, log-softmax and gradient (3 rows of 32,000), freed by then.
    tokens = 4 * 2048
    assert gpu["activations"] == 2 * tokens * (LAYERS * H + (9 * H + 6 * I) - 3 * V)
    assert gpu["lm_head"] == 2 * 3 * tokens * V
    matmul = LAYERS * (4 * H * H + 3 * H * I)  # PaLM-style: the decoder's matmul weights, not embeddings or norms
    flops = 4 * 2048 * (6 * matmul + 12 * LAYERS * H * 2048 + 6 * V * H * (1 + 1e-3) / 2) * 4 * 64
    assert result["flops_per_step"] == pytest.approx(flops, rel=1e-9)
    peak, _ = GPUS["H100"]
    assert result["seconds"] == pytest.approx(31_000 * flops / (64 * peak * 0.40), rel=1e-9)


def test_zero2_and_ddp_by_hand():
    zero2 = plan(llama2_7b(f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero2.json'}"),
                 PlanSettings(gpus=16, nodes=2))
    states = sum(zero2["per_gpu_bytes"][key] for key in ("weights", "gradients", "optimizer"))
    assert states == pytest.approx(2 * P_7B + 18 * P_7B / 16, abs=2)
    ddp = plan(llama2_7b("distributed.backend=ddp", "distributed.deepspeed_config=null", "model.dtype=float32",
                         "train.mixed_precision=no"), PlanSettings(gpus=8))
    gpu = ddp["per_gpu_bytes"]
    # fp32 weights, gradients and their DDP buckets, AdamW's two moments; every process loads the model.
    assert (gpu["weights"], gpu["gradients"], gpu["optimizer"]) == (4 * P_7B, 8 * P_7B, 8 * P_7B)
    assert ddp["per_node_cpu_bytes"]["loading"] == 8 * 4 * P_7B
    assert not ddp["fits"] and ddp["largest_micro_batch"] == 0


def test_largest_micro_batch_is_the_edge_of_fitting():
    recipe = llama2_7b(f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero3.json'}")
    result = plan(recipe, PlanSettings(gpus=8))
    best = result["largest_micro_batch"]
    budget = result["hardware"]["gpu_memory_bytes"] * (1 - HEADROOM)
    _, shape = meta_model(recipe)
    states = sum(result["per_gpu_bytes"][key] for key in ("weights", "gradients", "optimizer"))
    assert states + sum(activation_bytes(recipe, shape, best).values()) <= budget
    assert states + sum(activation_bytes(recipe, shape, best + 1).values()) > budget


@pytest.mark.parametrize("checkpointing,vocab,block", [(False, 1024, None), (True, 1024, None), (True, 64, None),
                                                      (False, 1024, 32)])
def test_prediction_matches_measured_peak_on_cpu(tmp_path, checkpointing, vocab, block):
    """One forward and backward of a small Llama (float32, every position masked) on CPU: the measured
    peak above the weights is the predicted activations, LM head and mask plus the gradients."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adapt.attention import set_attention
    from adapt.bench import peak_step_memory
    from adapt.bidirectional import BidirectionalMode
    from adapt.block import BlockMode
    from adapt.diffusion import DiffusionConfig, diffusion_loss

    batch, length = 4, 256
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length,
                         tie_word_embeddings=False)
    config.save_pretrained(tmp_path)  # the plan reads the config alone
    recipe = load_recipe(None, [f"model.path={tmp_path / 'config.json'}", "data.path=unused", f"output_dir={tmp_path}",
                                f"data.seq_len={length}", f"train.batch_size={batch}", "model.mask_token=reuse",
                                "model.mask_token_id=5", f"train.gradient_checkpointing={str(checkpointing).lower()}",
                                *([f"diffusion.mode=block", f"diffusion.block_size={block}"] if block else [])])
    _, shape = meta_model(recipe)
    predicted = activation_bytes(recipe, shape, batch)

    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    diffusion = DiffusionConfig(mask_token_id=5, mode=BlockMode(block) if block else BidirectionalMode())
    ids = torch.randint(6, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    gradients = 4 * sum(p.numel() for p in model.parameters())
    for ratio in (1.0, 0.5) if block is None else (0.0,):  # a block model's mask is its block mask
        set_attention(model, ratio, generator=torch.Generator().manual_seed(0))

        def step():
            diffusion_loss(model, ids, diffusion, t=torch.ones(batch), mask=torch.ones_like(ids, dtype=torch.bool)
                           ).loss.backward()

        step()  # first calls allocate once-only buffers
        model.zero_grad(set_to_none=True)
        measured = peak_step_memory(torch.device("cpu"), step)
        model.zero_grad(set_to_none=True)
        expected = predicted["activations"] + predicted["lm_head"] + gradients
        expected += predicted["attention_mask"] if ratio < 1 else 0  # the block mask too (ratio 0)
        print(f"checkpointing {checkpointing}, vocab {vocab}, ratio {ratio}: measured {measured / 2**20:.2f} MiB, "
              f"predicted {expected / 2**20:.2f} MiB")
        assert measured == pytest.approx(expected, rel=0.15)


def test_cli_table_and_json(capsys):
    args = ["plan", str(ROOT / "recipes/llama2-7b.yaml"), *LLAMA2_7B,
            f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero3-offload.json'}", "--gpus", "64"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "64 x H100" in table and "8 node(s) x 8" in table and "fits" in table and "40% MFU" in table
    assert main(args + ["--json", "--gpu", "A100", "--mfu", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hardware"]["gpu"] == "A100" and result["hardware"]["mfu"] == 0.5


@pytest.mark.parametrize("flags,message", [
    (["--gpu-memory", "lots"], "--gpu-memory 'lots' is not an amount of memory; write it like 80GiB"),
    (["--gpus", "12", "--nodes", "5"], "--gpus 12 does not split evenly over --nodes 5"),
    (["--mfu", "2"], "mfu = 2.0 is out of range; it must be in [0.01, 1.0]"),
])
def test_bad_flags_are_one_line(capsys, flags, message):
    assert main(["plan", str(ROOT / "recipes/llama2-7b.yaml"), *LLAMA2_7B,
                 f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero3-offload.json'}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adapt plan: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_unreadable_model_names_the_config_fix(capsys, tmp_path):
    assert main(["plan", str(ROOT / "recipes/llama2-7b.yaml"), f"model.path={tmp_path / 'nothing'}",
                 f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero3-offload.json'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the model config" in err and "model.path=path/to/config.json" in err


def test_block_mode_complementary_masks_and_alignment_scale_what_they_should(tmp_path):
    """By hand: block diffusion runs 2L positions (L scored), complementary masks run every sequence twice,
    alignment holds a second copy of the weights; the plan's rows scale accordingly."""
    base = [str(ROOT / "recipes/llama2-7b.yaml"), *LLAMA2_7B, "train.gradient_checkpointing=false"]  # linear in tokens
    plain = plan(load_recipe(base[0], base[1:]), PlanSettings(gpus=8))["per_gpu_bytes"]
    block = plan(load_recipe(base[0], [*base[1:], "diffusion.mode=block", "diffusion.block_size=32"]),
                 PlanSettings(gpus=8))["per_gpu_bytes"]
    paired = plan(load_recipe(base[0], [*base[1:], "diffusion.complementary_masks=true", "diffusion.t_max=0.999"]),
                  PlanSettings(gpus=8))["per_gpu_bytes"]
    aligned = plan(load_recipe(base[0], [*base[1:], "align.weight=1"]), PlanSettings(gpus=8))["per_gpu_bytes"]
    assert block["activations"] == 2 * plain["activations"] and block["lm_head"] == plain["lm_head"]
    assert paired["activations"] == 2 * plain["activations"] and paired["lm_head"] == 2 * plain["lm_head"]
    assert aligned["alignment_source"] == 2 * P_7B  # bf16 weights, not sharded
    assert aligned["alignment_states"] > 0 and not {"alignment_source", "alignment_states"} & set(plain)


def test_a_hybrid_run_doubles_the_positions_and_runs_the_head_on_drafts_and_clean_stream():
    """By hand: a hybrid model's forward runs drafts and clean stream side by side (2L), and its LM head
    runs on the masked drafts and on every clean position (the AR loss): twice a bidirectional run's."""
    base = [str(ROOT / "recipes/llama2-7b.yaml"), *LLAMA2_7B, "train.gradient_checkpointing=false"]
    plain = plan(load_recipe(base[0], base[1:]), PlanSettings(gpus=8))
    hybrid = plan(load_recipe(base[0], [*base[1:], "diffusion.mode=hybrid", "diffusion.draft_size=16"]),
                  PlanSettings(gpus=8))
    assert hybrid["per_gpu_bytes"]["activations"] == 2 * plain["per_gpu_bytes"]["activations"]
    assert hybrid["per_gpu_bytes"]["lm_head"] == 2 * plain["per_gpu_bytes"]["lm_head"]
    assert hybrid["model"]["mode"] == {"mode": "hybrid", "draft_size": 16}
