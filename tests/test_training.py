"""vif.training on a tiny real LLaVA: recipes, loss parts, learning, LoRA, resume, two processes, bad data.

Everything runs the real code path: a tiny checkpoint saved with save_pretrained, PNG files
on disk, the transformers Trainer, peft, torch.distributed (gloo). The collator's masks
(answer tokens = assistant turns, image tokens = expanded placeholders, padding in
neither) are tested in test_llava_format.py::test_collated_masks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vif
from vif.data.llava_format import BadImageError, LlavaFormatDataset, VIFCollator
from vif.loading import load_model
from vif.testing import SQUARE_COLOURS, SQUARE_WORDS, write_colour_squares
from vif.tiny import build_tiny_llava, build_tiny_qwen2_5_vl
from vif.training import RecipeError, TrainingDataError, load_recipe, train
from vif.training.api import build_trainer
from vif.training.parts import part_of

REPO = Path(__file__).resolve().parents[1]
COLORS = SQUARE_COLOURS
WORDS = SQUARE_WORDS
# Explicit pairs: the tiny model has 4 decoder layers.
VIF = {"preset": "compact", "extract_layers": [1, 1], "inject_layers": [2, 3]}


def write_samples(root: Path, names=tuple(COLORS)) -> Path:
    samples, _ = write_colour_squares(root, names)
    (root / "data.json").write_text(json.dumps(samples))
    return root / "data.json"


def build_model(path: Path, image_size: int = 48) -> Path:
    return build_tiny_llava(
        path,
        WORDS,
        image_size=image_size,
        patch_size=12,
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        num_kv_heads=1,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    model = build_model(root / "model")
    data = write_samples(root)
    # A fixed initial VIF module, so tests can compare trained weights with their start.
    base, _ = load_model(model, device="cpu", dtype="float32")
    torch.manual_seed(0)
    vmodel = vif.attach(
        base, vif.VIFConfig.preset(VIF["preset"], base, **{k: v for k, v in VIF.items() if k != "preset"})
    )
    vmodel.save_pretrained(root / "init_vif")
    return {"root": root, "model": model, "data": data, "init_vif": root / "init_vif"}


def recipe(setup, out: Path, **changes) -> dict:
    r = {
        "model": str(setup["model"]),
        "vif": None,
        "init_adapter": str(setup["init_vif"]),
        "data": {"json": str(setup["data"])},
        "trainable": {"mode": "full"},
        "optimizer": {"lr": 1e-3, "vif_lr": 3e-3},
        "schedule": {
            "max_steps": 4,
            "per_device_batch_size": 2,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
        },
        "activation_checkpointing": False,
        "logging_steps": 1,
        "save_steps": 1000,
        "output_dir": str(out),
        "seed": 0,
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = r
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return r


def vif_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "vif_module.safetensors")


# -----------------------------------------------------------------------------
# Recipes


def test_shipped_recipes_validate():
    files = sorted((REPO / "recipes").glob("llava-*.yaml"))
    assert {f.name for f in files} >= {"llava-1.5-7b-vif.yaml", "llava-1.5-7b-vif-lora.yaml"}
    for path in files:
        r = load_recipe(path)
        # The paper's hyper-parameters (spec section 8).
        assert r.optimizer.lr == 2e-5 and r.optimizer.weight_decay == 0.0
        assert r.schedule.scheduler == "cosine" and r.schedule.warmup_ratio == 0.03 and r.schedule.epochs == 1
        assert r.data.max_length == 2048 and r.data.image_aspect == "pad" and r.activation_checkpointing
        assert r.vif == "large" and r.precision == "bf16"  # the paper's size, vif's method (docs/looking.md)
    full, lora, stage1 = (
        load_recipe(REPO / "recipes" / f"llava-1.5-7b-vif{suffix}.yaml")
        for suffix in ("", "-lora", "-stage1")
    )
    assert stage1.trainable.mode == "vif-only" and not stage1.train_projector  # the optional first stage
    assert full.trainable.mode == "full" and full.train_projector
    assert lora.trainable.mode == "lora" and (lora.trainable.lora.r, lora.trainable.lora.alpha) == (128, 256)
    assert lora.trainable.lora.dropout == 0.05
    # The accelerate config points at a ZeRO-2 DeepSpeed file that exists.
    accel = yaml.safe_load((REPO / "recipes/accelerate_zero2.yaml").read_text())
    assert accel["distributed_type"] == "DEEPSPEED"
    ds_file = REPO / accel["deepspeed_config"]["deepspeed_config_file"]
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 2


def test_recipe_errors():
    ok = {"model": "m", "data": {"json": "d.json"}}
    assert load_recipe(ok).vif == "compact"
    with pytest.raises(
        RecipeError, match=r"unknown recipe key\(s\) \['lerning_rate'\].*valid keys.*'optimizer'"
    ):
        load_recipe({**ok, "lerning_rate": 1e-5})
    with pytest.raises(
        RecipeError, match=r"'learning_rate' is a TrainingArguments field.*use 'optimizer.lr'"
    ):
        load_recipe({**ok, "learning_rate": 1e-5})
    with pytest.raises(RecipeError, match=r"\['schedule.warmup'\].*'warmup_ratio'"):
        load_recipe({**ok, "schedule": {"warmup": 0.1}})
    with pytest.raises(
        RecipeError, match=r"'trainable.mode' is 'qlora'; valid values: \['full', 'lora', 'vif-only'\]"
    ):
        load_recipe({**ok, "trainable": {"mode": "qlora"}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['latent'\] in 'vif'"):
        load_recipe({**ok, "vif": {"preset": "compact", "latent": 3}})
    with pytest.raises(RecipeError, match="either 'vif'.*or 'init_adapter'"):
        load_recipe({**ok, "init_adapter": "x"})
    with pytest.raises(RecipeError, match="'schedule.per_device_batch_size' = 'many' has the wrong type"):
        load_recipe({**ok, "schedule": {"per_device_batch_size": "many"}})
    with pytest.raises(RecipeError, match="projector: true with mode 'vif-only'"):
        load_recipe({**ok, "trainable": {"mode": "vif-only", "projector": True}})
    with pytest.raises(RecipeError, match="'model' is missing"):
        load_recipe({"data": {"json": "d.json"}})
    # YAML 1.1 reads 2e-5 as a string: accepted as a number.
    assert load_recipe({**ok, "optimizer": {"lr": "2e-5"}}).optimizer.lr == 2e-5
    assert load_recipe(ok, **{"schedule.max_steps": 7}).schedule.max_steps == 7


def test_cli_train_and_resume(setup, tmp_path, capsys):
    from vif.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(setup, tmp_path / "out", save_steps=1)))
    assert main(["train", str(path), "--check", "--set", "optimizer.lr=5e-4"]) == 0
    assert json.loads(capsys.readouterr().out)["optimizer"]["lr"] == 5e-4
    assert main(["train", str(path), "--resume"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "schedule.max_steps=1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 1
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    # More steps change the learning-rate schedule: not the same run, so resuming needs --force.
    assert main(["train", str(path), "--set", "schedule.max_steps=2", "--resume"]) == 2
    assert "schedule.max_steps: 1 -> 2" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "schedule.max_steps=2", "--resume", "--force"]) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert main(["train", str(path), "--set", "nonsense"]) == 2
    assert "--set 'nonsense': expected KEY=VALUE" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The objective


def test_loss_is_lm_plus_weighted_kl_and_sparsity(setup, tmp_path):
    trainer = build_trainer(recipe(setup, tmp_path / "out"))
    batch = VIFCollator(trainer.processing_class, return_ids=True)(
        [trainer.train_dataset[i] for i in range(3)]
    )
    model = trainer.model.train()
    torch.manual_seed(0)
    loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    v = out.vif
    assert v.used_posterior
    weights = model.config_vif
    assert (weights.kl_weight, weights.sparsity_weight, weights.evidence_weight) == (0.1, 0.1, 3.0)
    expected = v.lm_loss + 0.1 * v.kl + 0.1 * v.sparsity + 3.0 * v.evidence
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for part in (v.lm_loss, v.kl, v.sparsity, v.evidence, v.entropy, v.mean_sigma):
        assert part.item() > 0
    # compute_loss keeps the parts for the Trainer's log.
    assert trainer._part_count == 1
    assert trainer._part_sums["kl"] == pytest.approx(v.kl.item()) and "entropy" in trainer._part_sums

    # Inside the Trainer's loop the model is in training mode: z comes from the posterior.
    seen = []
    model.register_forward_hook(
        lambda _m, _a, out: seen.append((out.vif.used_posterior, out.vif.kl is not None))
    )
    model.eval()
    trainer.args.max_steps = 2
    trainer.train()
    assert seen == [(True, True)] * 2


def test_activation_checkpointing_gives_the_same_gradients(setup, tmp_path):
    grads = {}
    for ckpt in (False, True):
        trainer = build_trainer(recipe(setup, tmp_path / f"out{ckpt}", activation_checkpointing=ckpt))
        batch = VIFCollator(trainer.processing_class)([trainer.train_dataset[i] for i in range(4)])
        model = trainer.model.train()
        torch.manual_seed(0)  # the posterior's sample
        model(**batch).loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("vif_module.") for n in grads[True])
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, atol=1e-6, rtol=1e-5), name


# -----------------------------------------------------------------------------
# Learning


def kl_on(model_path, adapter, data_setup, prior_from=None) -> float:
    """KL(posterior || prior) of ``adapter`` on the whole training set, posterior mode, fixed noise.

    ``prior_from``: another adapter whose prior replaces ``adapter``'s.
    """
    model, processor = load_model(model_path, device="cpu", dtype="float32", adapter=adapter)
    if prior_from is not None:
        prior = {k[len("prior.") :]: v for k, v in vif_state(prior_from).items() if k.startswith("prior.")}
        model.vif_module.prior.load_state_dict(prior)
    ds = LlavaFormatDataset(data_setup["data"], processor=processor)
    batch = VIFCollator(processor)([ds[i] for i in range(len(ds))])
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        return model(**batch).vif.kl.item()


def test_training_memorises_and_moves_vif(setup, tmp_path):
    r = recipe(
        setup, tmp_path / "out", schedule__max_steps=30, schedule__per_device_batch_size=4, optimizer__lr=1e-2
    )
    result = train(r)
    assert result.global_step == 30 and result.vif_adapter == tmp_path / "out" / "vif"
    lm = [e["lm_loss"] for e in result.log_history if "lm_loss" in e]
    assert len(lm) == 30 and lm[-1] < 0.3 * lm[0], lm
    for key in ("kl", "sparsity", "entropy", "mean_sigma"):
        assert all(key in e for e in result.log_history if "loss" in e)
    assert result.metrics["lm_loss"] == lm[-1]
    # every tensor of the VIF module moved away from its initialisation
    before, after = vif_state(setup["init_vif"]), vif_state(result.vif_adapter)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    # full fine-tune: LLM and projector trained, vision tower frozen
    base, _ = load_model(setup["model"], device="cpu", dtype="float32")
    trained = dict(load_model(result.model_path, device="cpu", dtype="float32")[0].named_parameters())
    changed = {part_of(n) for n, p in base.named_parameters() if not torch.equal(p, trained[n])}
    assert changed == {"language", "projector"}
    # the prior moved towards the posterior: the trained posterior is closer to the trained prior than
    # to the prior it started from (the posterior itself moves, pulled by the evidence loss)
    kl_start = kl_on(result.model_path, result.vif_adapter, setup, prior_from=setup["init_vif"])
    kl_after = kl_on(result.model_path, result.vif_adapter, setup)
    assert kl_after < 0.5 * kl_start, (kl_start, kl_after)


def test_lora_trains_only_the_language_model(setup, tmp_path):
    r = recipe(setup, tmp_path / "out", trainable={"mode": "lora", "lora": {"r": 4, "alpha": 8}})
    result = train(r)
    out = result.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter, not a full copy
    assert result.trainable["projector"] == 0 and result.trainable["vision"] == 0
    base, _ = load_model(setup["model"], device="cpu", dtype="float32")
    merged, _ = load_model(result.model_path, device="cpu", dtype="float32")  # merges the LoRA adapter
    changed = {part: [] for part in ("vision", "projector", "language")}
    same_keys = dict(base.named_parameters()).keys() == dict(merged.named_parameters()).keys()
    assert same_keys
    merged_params = dict(merged.named_parameters())
    for name, p in base.named_parameters():
        if not torch.equal(p, merged_params[name]):
            changed[part_of(name)].append(name)
    assert not changed["vision"] and not changed["projector"]
    assert changed["language"] and all("_proj" in n for n in changed["language"])
    before, after = vif_state(setup["init_vif"]), vif_state(result.vif_adapter)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_vif_only_trains_only_the_vif_module(setup, tmp_path):
    result = train(recipe(setup, tmp_path / "out", trainable={"mode": "vif-only"}, schedule__max_steps=2))
    assert result.trainable["trainable"] == result.trainable["vif"] > 0
    assert result.model_path == Path(setup["model"]).resolve()  # base weights are not saved
    assert not (result.output_dir / "model.safetensors").exists()
    model, _ = load_model(result.model_path, device="cpu", adapter=result.vif_adapter)
    after = vif_state(result.vif_adapter)
    assert all(torch.equal(v, after[k]) for k, v in model.vif_module.state_dict().items())
    assert all(not torch.equal(v, after[k]) for k, v in vif_state(setup["init_vif"]).items())


def test_control_arm_without_vif(setup, tmp_path):
    r = recipe(setup, tmp_path / "out", vif=None, init_adapter=None, schedule__max_steps=2)
    result = train(r)
    assert result.vif_adapter is None and not (result.output_dir / "vif").exists()
    assert "kl" not in result.metrics and result.metrics["lm_loss"] > 0
    model, _ = load_model(result.model_path, device="cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_qwen2_5_vl_lora_with_vif(setup, tmp_path):
    # Nothing in the trainer is LLaVA-specific: the same recipe trains a Qwen2.5-VL folder.
    model = build_tiny_qwen2_5_vl(
        tmp_path / "qwen", WORDS, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=1
    )
    r = recipe(
        setup,
        tmp_path / "out",
        model=str(model),
        vif=VIF,
        init_adapter=None,
        trainable={"mode": "lora", "projector": True, "lora": {"r": 4, "alpha": 8}},
        schedule__max_steps=3,
    )
    result = train(r)
    assert result.trainable["projector"] > 0 and result.metrics["kl"] > 0
    base, _ = load_model(model, device="cpu", dtype="float32")
    merged, _ = load_model(result.model_path, device="cpu", dtype="float32", adapter=result.vif_adapter)
    merged_params = dict(merged.base_model.named_parameters())
    changed = {part_of(n) for n, p in base.named_parameters() if not torch.equal(p, merged_params[n])}
    assert changed == {"language", "projector"}  # the merger trained in full, the vision blocks frozen


# -----------------------------------------------------------------------------
# Resume and several processes


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_reaches_the_uninterrupted_parameters(setup, tmp_path, mode):
    full = recipe(
        setup,
        tmp_path / "a",
        schedule__max_steps=6,
        save_steps=3,
        trainable={"mode": mode, "lora": {"r": 4, "alpha": 8}},
    )
    # LoRA dropout and the posterior's noise make the run depend on the restored RNG state too.
    # 4 samples, batch 2: the interruption at step 3 falls mid-epoch, so batches must be skipped.
    a = train(full)
    # An interrupted run: only checkpoint-3 survived.
    shutil.copytree(a.output_dir / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    with pytest.raises(RecipeError, match="already holds checkpoints"):
        train({**full, "output_dir": str(tmp_path / "b")})
    b = train({**full, "output_dir": str(tmp_path / "b"), "resume": True})
    assert b.global_step == 6
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    for name in (weights, "vif/vif_module.safetensors"):
        wa, wb = load_file(a.output_dir / name), load_file(b.output_dir / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-6), (name, k)
    # and the resumed run did start from the checkpoint: it differs from the start
    assert any(
        not torch.equal(v, vif_state(setup["init_vif"])[k]) for k, v in vif_state(b.vif_adapter).items()
    )


@pytest.mark.slow
def test_two_processes_agree_and_save(setup, tmp_path):
    r = recipe(setup, tmp_path / "out", schedule__max_steps=3, schedule__per_device_batch_size=1)
    (tmp_path / "recipe.json").write_text(json.dumps(r))
    script = tmp_path / "dist_train.py"
    script.write_text(
        "import json, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from vif.training.api import build_trainer\n"
        "torch.set_num_threads(1)\n"
        "trainer = build_trainer(json.loads(open(sys.argv[1]).read()))\n"
        "trainer.train()\n"
        "trainer.save_model()\n"
        "rank = torch.distributed.get_rank()\n"
        "state = {k: v.detach().contiguous() for k, v in trainer.parts.vif.vif_module.state_dict().items()}\n"
        "save_file(state, f'{sys.argv[2]}/rank{rank}.safetensors')\n"
        "print('world', torch.distributed.get_world_size(), torch.distributed.get_backend())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        cmd + [str(script), str(tmp_path / "recipe.json"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "world 2 gloo" in proc.stdout
    s0, s1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert any(not torch.equal(s0[k], vif_state(setup["init_vif"])[k]) for k in s0)
    saved = vif_state(tmp_path / "out" / "vif")
    assert all(torch.equal(saved[k], s0[k]) for k in s0)
    model, _ = load_model(tmp_path / "out", device="cpu", adapter=tmp_path / "out" / "vif")
    assert all(torch.equal(v, s0[k]) for k, v in model.vif_module.state_dict().items())


# -----------------------------------------------------------------------------
# Bad data


def test_corrupt_and_missing_images(setup, tmp_path):
    data = json.loads(setup["data"].read_text())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    bad = [{**data[0], "id": "broken-one", "image": str(tmp_path / "broken.png")}, *data]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = recipe(
        setup, tmp_path / "out", data={"json": str(tmp_path / "bad.json"), "image_folder": str(setup["root"])}
    )
    with pytest.raises(BadImageError, match=r"sample 'broken-one'.*broken\.png.*on_bad_image='skip'"):
        train(r)
    # skip: the bad sample is dropped and training runs
    r["data"]["on_bad_image"] = "skip"
    r["schedule"]["max_steps"] = 1
    assert train(r).global_step == 1
    missing = [{**data[0], "id": "gone", "image": "nowhere.png"}, *data]
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    r = recipe(
        setup,
        tmp_path / "out2",
        data={"json": str(tmp_path / "missing.json"), "image_folder": str(setup["root"])},
    )
    with pytest.raises(BadImageError, match=r"1 image file\(s\).*do not exist.*'gone'.*nowhere\.png"):
        build_trainer(r)


def test_image_token_count_mismatch(setup, tmp_path):
    # A processor saved for another resolution (96 px: 64 tokens per image) beside a 48 px model (16).
    model_dir = tmp_path / "mismatched"
    shutil.copytree(setup["model"], model_dir)
    other = build_model(tmp_path / "other", image_size=96)
    for name in ("processor_config.json",):
        shutil.copy(other / name, model_dir / name)
    r = recipe(setup, tmp_path / "out", model=str(model_dir))
    with pytest.raises(
        TrainingDataError,
        match=r"sample 'red' \(item 0\): its image tokens do not match.*4 images but pixel_values has 1",
    ):
        build_trainer(r)
