"""Sharded training with two processes on CPU (gloo): FSDP and DeepSpeed ZeRO-2 / -3 under
``accelerate launch``, against the one-process run with the same micro-batches; and bf16.

One ``accelerate launch`` (``--num_processes 2``) runs every engine in turn, each with the
variables ``accelerate launch`` exports for its shipped config (computed by accelerate's own launch
code, :func:`accelerate_env`); the two processes run real ``vif train`` commands
(tests/launch_vif_train.py). Per engine: a full fine-tune of 2 steps with a checkpoint after each
(its VIF module is the project's default, ``compact``), the same run resumed from the step-1
checkpoint, and a LoRA run of 2 steps (with a new VIF module with the other choices of the
project's options, see ``LOOKING``); FSDP also runs its shard-grad-op config with bf16, VIF-only. Two
steps are the fewest that test what matters: the second step uses the Adam moments of the first,
which a resume must restore (without vif's FSDP optimiser reload the resumed run ends 5e-3
away), and the sharded gradients of both.

What "the same" means here. Each process takes micro-batches of 2 samples (accelerate hands
process r the r-th of the step's micro-batches); the one-process reference (in this process)
takes the same micro-batches and accumulates two of them per step (``ONE_PROCESS``). Some of
VIF's losses depend on the micro-batch (the evidence head's token reader scores each answer
against the micro-batch's answers), so a reference with one micro-batch of 4 would be another
training, on any engine (measured 1e-2 away). Both runs also draw the same posterior noise
(seeded per sample, see vif.training.distributed.sample_seeds) and keep fp32 weights. What
differs is the order of the sums (an all-reduce or reduce-scatter of two halves, or two
accumulated halves), so gradients differ by float32 rounding (~1e-7 relative). Adam divides each
gradient by its running RMS, so the update of an element whose gradient is at that rounding
level is rounding noise scaled up to the learning rate: the bias of a softmax's scores (the
mixture logits, the attention centres' keys and salience) gets a gradient that is exactly zero
in exact arithmetic, and with Adam's default eps (1e-8) those biases ended up to 5e-5 apart after
2 steps. With the distilled salience (a cross-entropy between maps over the tokens, also blind
to that bias) the salience's output bias reached 1.1e-4 apart under ZeRO-3 with eps 1e-6.
``ADAM_EPS`` = 1e-5 sits above that level and far below the other gradients (VIF's gradient norm
is 20-60): measured at most 3.3e-5 apart (that bias, ZeRO-3, LoRA run), every other weight of
the VIF module, LoRA adapter and full model within 1.2e-7, every engine. ATOL = 1e-4 keeps the margin the test had and stays far below how far
the VIF module moves (6e-3 in 2 steps; asserted > MOVED). A resumed run must match its
uninterrupted twin exactly (the same processes do the same sums), and does: the tolerance there
is 0.

A run that only "ran" would pass on plain DDP: each run's engine.json lists the Adam elements
every process holds, which must add up to the trainable count with no process holding more
than 60 % of them (DDP: 100 % each).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training import recipe as base_recipe
from test_training import setup  # noqa: F401  (module fixture: tiny LLaVA, PNGs, initial VIF module)

from vif.data.llava_format import LlavaFormatDataset, VIFCollator
from vif.loading import load_model
from vif.training import train
from vif.training.api import build_trainer

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "tests" / "launch_vif_train.py"
ATOL = 1e-4
ADAM_EPS = 1e-5  # above the rounding level of the gradients (see the module docstring)
MOVED = 3e-3  # how far the VIF module must move in 2 steps (measured 6e-3; vif_lr 3e-3)
LOGITS_ATOL = 1e-3  # logits of weights within ATOL of each other (measured: below 1e-5)
LORA = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}  # dropout is not rank-independent
# The LoRA runs start a new VIF module with the other choices of the project's options (the full
# runs' module has the defaults: token reader, learned answer embeddings, detached input): its
# evidence head reads the LM head, which ZeRO-3 partitions, through the pooled reader, and its input
# is not detached, so its losses reach the LoRA weights. Both read the vision encoder's output (a
# hook on the projector's input) and the LLM's input embeddings (a hook on decoder layer 0), and
# every engine must initialise the new module alike.
LOOKING = {
    "preset": "compact",
    "extract_layers": [1, 1],
    "inject_layers": [2, 3],
    "evidence_readout": "lm_head",
    "evidence_reader": "pooled",
    "detach_input": False,
}
LORA_RUN = {"trainable": LORA, "init_adapter": None, "vif": LOOKING, "save_steps": 1000}
# The one-process runs: the same micro-batches of 2, accumulated two to a step (see the module docstring).
ONE_PROCESS = {"batch": 2, "schedule__grad_accumulation": 2}
# The shipped configs, and what each run's engine.json must report.
ENGINES = [
    ("accelerate_fsdp_full_shard.yaml", {"engine": "fsdp", "fsdp_sharding": "FULL_SHARD"}),
    ("accelerate_zero2.yaml", {"engine": "deepspeed", "zero_stage": 2}),
    ("accelerate_zero3.yaml", {"engine": "deepspeed", "zero_stage": 3}),
]


def run_recipe(setup, out: Path, batch: int = 2, **changes) -> dict:  # noqa: F811
    """The tests' recipe: 2 steps of ``batch`` samples per process and micro-batch, checkpoints at 1 and 2."""
    changes = {"save_steps": 1, "schedule__max_steps": 2, "adam_epsilon": ADAM_EPS, **changes}
    return base_recipe(setup, out, schedule__per_device_batch_size=batch, **changes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_env(config: str) -> dict[str, str]:
    """The ``ACCELERATE_*`` / ``FSDP_*`` variables ``accelerate launch --config_file recipes/CONFIG`` exports.

    Computed by accelerate's own ``launch_command`` with its last call, the one that starts the
    processes, replaced by a look at the environment it prepared.
    """
    from accelerate.commands import launch as accelerate_launch

    seen: dict[str, str] = {}
    argv = ["--config_file", str(REPO / "recipes" / config), "--num_processes", "2", "--num_machines", "1"]
    args = accelerate_launch.launch_command_parser().parse_args([*argv, "script.py"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accelerate_launch, "_run_torchrun", lambda _args: seen.update(os.environ))
        accelerate_launch.launch_command(args)
    assert seen, f"accelerate launch --config_file {config} did not reach torchrun"
    return {k: v for k, v in seen.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def launch(config: str, steps: list[dict], tmp_path: Path) -> None:
    """``accelerate launch`` of a shipped config with two processes running ``steps``."""
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO / "src"),
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes" / config),
        "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
        str(LAUNCHER), str(tmp_path / "steps.json"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    errors = "\n".join(line for line in out.splitlines() if "Error" in line)
    assert proc.returncode == 0 and "launch_vif_train: done" in proc.stdout, errors[-3000:] + out[-3000:]


def train_steps(recipe_dict: dict, path: Path, *extra: str) -> dict:
    path.write_text(json.dumps(recipe_dict))
    return {"train": [str(path), *extra]}


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    """Largest difference between two state dicts with the same keys and shapes (asserted <= atol)."""
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst
    return worst


def moved(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
    return max((after[k].float() - before[k].float()).abs().max().item() for k in before)


def assert_sharded(out: Path, engine: str, detail: dict) -> None:
    report = json.loads((out / "engine.json").read_text())
    assert report["engine"] == engine and report["processes"] == 2, report
    for key, value in detail.items():
        assert report[key] == value, report
    counts, total = report["optimizer_elements_per_process"], report["trainable_elements"]
    assert sum(counts) >= total and max(counts) <= 0.6 * total, report  # DDP: each == total


def logits(model_dir: Path, adapter: Path, setup) -> torch.Tensor:  # noqa: F811
    model, processor = load_model(model_dir, device="cpu", dtype="float32", adapter=adapter)
    ds = LlavaFormatDataset(setup["data"], processor=processor)
    batch = VIFCollator(processor)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):  # noqa: F811
    """The one-process references, full and LoRA, and their logits."""
    root = tmp_path_factory.mktemp("single")
    train(run_recipe(setup, root / "full", **ONE_PROCESS))
    train(run_recipe(setup, root / "lora", **ONE_PROCESS, **LORA_RUN))
    ref = {"root": root}
    for run in ("full", "lora"):
        ref[run] = logits(root / run, root / run / "vif", setup)
    return ref


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def sharded(setup, tmp_path_factory):  # noqa: F811
    """One ``accelerate launch`` of two processes that runs every engine's runs; their folder per config."""
    root = tmp_path_factory.mktemp("sharded")
    steps, folders = [], {}
    for config, detail in ENGINES:
        if detail["engine"] == "deepspeed" and not deepspeed_available():
            continue  # the DeepSpeed cases skip themselves
        out = folders[config] = root / Path(config).stem
        out.mkdir()
        full = run_recipe(setup, out / "full")
        steps += [
            {"engine": accelerate_env(config)},
            train_steps(full, out / "full.json"),
            {"copy": [str(out / "full" / "checkpoint-1"), str(out / "resumed" / "checkpoint-1")]},
            train_steps(full, out / "full.json", "--output-dir", str(out / "resumed"), "--resume"),
            train_steps(run_recipe(setup, out / "lora", **LORA_RUN), out / "lora.json"),
        ]
        if detail["engine"] == "fsdp":
            # The shard-grad-op config (test_shipped_engine_configs: the same but for this variable),
            # with FSDP's bf16 mixed precision, VIF-only.
            sgo = run_recipe(
                setup, out / "sgo", trainable={"mode": "vif-only"}, precision="bf16", save_steps=1000
            )
            steps += [
                {"env": {"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}},
                train_steps(sgo, out / "sgo.json"),
            ]
    launch(ENGINES[0][0], steps, root)  # started with the first config; its "engine" step sets the same
    return folders


def vif_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "vif" / "vif_module.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("config, engine", ENGINES)
def test_sharded_runs_match_one_process_and_resume_exactly(setup, single, sharded, config, engine):  # noqa: F811
    if engine["engine"] == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is installed by run.sh (pip install deepspeed)")
    one, out = single["root"], sharded[config]
    engine = dict(engine)
    name = engine.pop("engine")
    for run in ("full", "resumed", "lora"):
        assert_sharded(out / run, name, engine)

    # Full fine-tune: the VIF module, at the end and at the step-1 checkpoint.
    init = load_file(setup["init_vif"] / "vif_module.safetensors")
    dist_vif, one_vif = vif_state(out / "full"), vif_state(one / "full")
    close(dist_vif, one_vif, ATOL)
    assert moved(dist_vif, init) > MOVED
    close(vif_state(out / "full" / "checkpoint-1"), vif_state(one / "full" / "checkpoint-1"), ATOL)
    # Resumed from the sharded checkpoint: exactly the uninterrupted run.
    close(vif_state(out / "resumed"), dist_vif, 0.0)
    model_a = load_file(out / "full" / "model.safetensors")
    close(load_file(out / "resumed" / "model.safetensors"), model_a, 0.0)

    # LoRA: the adapter and the VIF module; what was saved reloads on one process and gives
    # the one-process run's logits.
    close(vif_state(out / "lora"), vif_state(one / "lora"), ATOL)
    adapter = load_file(out / "lora" / "adapter_model.safetensors")
    close(adapter, load_file(one / "lora" / "adapter_model.safetensors"), ATOL)
    assert (
        max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > MOVED / 10
    )  # B starts at 0
    assert (logits(out / "lora", out / "lora" / "vif", setup) - single["lora"]).abs().max() <= LOGITS_ATOL
    if name == "fsdp":
        check_shard_grad_op_bf16(out / "sgo", setup)

    # The full model: the same weights as the one-process run, and the same logits on reload.
    close(model_a, load_file(one / "full" / "model.safetensors"), ATOL)
    assert (logits(out / "full", out / "full" / "vif", setup) - single["full"]).abs().max() <= LOGITS_ATOL


def check_shard_grad_op_bf16(out: Path, setup) -> None:  # noqa: F811
    """The VIF-only bf16 run under FSDP shard-grad-op: sharded, every loss part finite, the adapter reloads."""
    detail = {
        "fsdp_sharding": "SHARD_GRAD_OP",
        "fsdp_activation_checkpointing": True,
        "mixed_precision": "bf16",
    }
    assert_sharded(out, "fsdp", detail)
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 2
    for entry in logged:  # FSDP and accelerate's fp32 output conversion drop out.vif: the parts must survive
        for key in ("loss", "lm_loss", "kl", "sparsity", "entropy", "mean_sigma"):
            assert math.isfinite(entry[key]), (key, entry)
    saved = vif_state(out)
    assert moved(saved, load_file(setup["init_vif"] / "vif_module.safetensors")) > 1e-3
    model, _ = load_model(setup["model"], device="cpu", adapter=out / "vif")
    close(model.vif_module.state_dict(), saved, 0.0)


def test_shipped_engine_configs():
    configs = {p.name: yaml.safe_load(p.read_text()) for p in (REPO / "recipes").glob("accelerate_*.yaml")}
    assert set(configs) >= {
        "accelerate_fsdp_full_shard.yaml",
        "accelerate_fsdp_shard_grad_op.yaml",
        "accelerate_zero2.yaml",
        "accelerate_zero3.yaml",
    }
    full, grad_op = configs["accelerate_fsdp_full_shard.yaml"], configs["accelerate_fsdp_shard_grad_op.yaml"]
    # The slow test runs the shard-grad-op config as the full-shard one with this one variable changed.
    assert full["fsdp_config"].pop("fsdp_sharding_strategy") == "FULL_SHARD"
    assert grad_op["fsdp_config"].pop("fsdp_sharding_strategy") == "SHARD_GRAD_OP"
    assert full == grad_op
    fsdp = full["fsdp_config"]
    assert fsdp["fsdp_use_orig_params"] and fsdp["fsdp_activation_checkpointing"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and full["mixed_precision"] == "no"
    for stage in (2, 3):
        accel = configs[f"accelerate_zero{stage}.yaml"]
        ds = json.loads((REPO / accel["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert accel["distributed_type"] == "DEEPSPEED" and ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_bf16_training_on_cpu(setup, tmp_path):  # noqa: F811
    # One process, torch's CPU autocast in bfloat16 (fp32 master weights).
    trainer = build_trainer(base_recipe(setup, tmp_path / "out", precision="bf16", schedule__max_steps=3))
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3
    for entry in logged:  # accelerate's fp32 output conversion drops out.vif: the parts must survive it
        for key in ("loss", "lm_loss", "kl", "sparsity", "entropy", "mean_sigma"):
            assert math.isfinite(entry[key]), (key, entry)
    trainer.save_model()

    # The saved adapter round-trips: the same fp32 weights as the live module.
    live = {k: v.detach() for k, v in trainer.parts.vif.vif_module.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in live.values())
    close(vif_state(tmp_path / "out"), live, 0.0)

    # Fused and materialised injection agree under bf16 autocast, as they do in fp32 (test_injection).
    out = {}
    for injection in ("fused", "materialised"):
        model, processor = load_model(
            tmp_path / "out", device="cpu", adapter=tmp_path / "out" / "vif", injection=injection
        )
        close(model.vif_module.state_dict(), live, 0.0)
        ds = LlavaFormatDataset(setup["data"], processor=processor)
        batch = VIFCollator(processor)([ds[i] for i in range(len(ds))])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[injection] = model(**batch)
    fused, materialised = out["fused"], out["materialised"]
    assert fused.logits.dtype == torch.bfloat16  # autocast really ran the model in bf16
    # bf16 keeps 8 bits of mantissa: measured 2e-3 apart (one unit at |logit| 0.46), as far as bf16 is from fp32.
    scale = fused.logits.float().abs().max().item()
    assert (fused.logits.float() - materialised.logits.float()).abs().max().item() <= 3e-2 * scale
    for layer, pi in fused.vif.importance.items():
        assert torch.allclose(pi.float(), materialised.vif.importance[layer].float(), atol=1e-6)
