"""A user's first hour (issue 14): one test per finding, on a tiny real LLaVA and real PNG files.

1. the docs' adapter paths: tests/test_docs.py runs the docs' commands in order;
2. every weight-free check runs before weights load, a user error is one line and exit 2;
3. nothing a user made is overwritten;
4. resume cannot go wrong silently;
5. a failed from_pretrained / attach leaves the base model exactly as it was;
6. VIFModel is a drop-in for the base model;
7. device_map / offload through accelerate;
8. one spelling per option, consistent dtypes, the missing options;
9. the recipe passes TrainingArguments fields through.

Where a check must happen before weights load, the model folder's weights file is garbage:
loading it would fail with a safetensors error instead of the expected message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import vif
from vif.cli import main
from vif.data.llava_format import LlavaFormatDataset, VIFCollator
from vif.loading import load_model
from vif.testing import SQUARE_COLOURS, SQUARE_WORDS, write_colour_squares
from vif.tiny import build_tiny_llava
from vif.training import RecipeError

COLORS = SQUARE_COLOURS
WORDS = SQUARE_WORDS
VIF = {"preset": "compact", "extract_layers": [1, 1], "inject_layers": [2, 3]}  # 4 decoder layers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    model = build_tiny_llava(
        root / "model", WORDS, image_size=48, patch_size=12, hidden_size=32, num_layers=4, num_heads=2,
        num_kv_heads=1,
    )  # fmt: skip
    # The same folder with weights that cannot load: what must fail before weights load, fails
    # with its own message, not with a safetensors error.
    broken = root / "broken-model"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all" * 10)
    samples, bench = write_colour_squares(root)
    (root / "data.json").write_text(json.dumps(samples))
    (root / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in bench) + "\n")
    base, _ = load_model(model, device="cpu", dtype="float32")
    torch.manual_seed(0)
    config = vif.VIFConfig.preset("compact", base, extract_layers=[1, 1], inject_layers=[2, 3])
    vif.attach(base, config).save_pretrained(root / "adapter")
    return {"root": root, "model": model, "broken": broken, "data": root / "data.json",
            "bench": root / "bench.jsonl", "adapter": root / "adapter"}  # fmt: skip


def recipe(world, out, **top) -> dict:
    r = {
        "model": str(world["model"]),
        "vif": VIF,
        "data": {"json": str(world["data"])},
        "trainable": {"mode": "vif-only"},
        "optimizer": {"lr": 1e-3},
        "schedule": {"max_steps": 2, "per_device_batch_size": 2, "scheduler": "constant"},
        "activation_checkpointing": False,
        "precision": "fp32",
        "logging_steps": 1,
        "save_steps": 1,
        "output_dir": str(out),
        "seed": 0,
    }
    r.update(top)
    return r


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def one_error(capsys, code: int) -> str:
    """The single ``error:`` line a user error prints (exit status 2)."""
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    return lines[0]


def a_batch(world, processor) -> dict:
    dataset = LlavaFormatDataset(world["data"], processor=processor)
    items = [dataset[i] for i in range(len(dataset))]
    return VIFCollator(processor)([{k: v for k, v in item.items() if k != "id"} for item in items])


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def progress_bars_back():
    yield
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()


# -----------------------------------------------------------------------------
# 2. Mistakes are found before weights load, and reported in one line


def test_2_check_finds_every_mistake_before_weights_load(world, tmp_path, capsys):
    good = recipe(world, tmp_path / "out", model=str(world["broken"]))
    # The good recipe passes --check without loading the (garbage) weights.
    assert main(["train", str(write(tmp_path / "ok.yaml", good)), "--check"]) == 0
    capsys.readouterr()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(world["data"].read_text()[:-40])
    int_answer = json.loads(world["data"].read_text())
    int_answer[2]["conversations"][1]["value"] = 3
    (tmp_path / "int.json").write_text(json.dumps(int_answer))
    corrupt = tmp_path / "images"
    corrupt.mkdir()
    for name in COLORS:
        shutil.copy(world["root"] / f"{name}.png", corrupt / f"{name}.png")
    (corrupt / "green.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    cases = [
        ({"data": {"json": str(tmp_path / "nowhere.json")}}, "data.json '.*nowhere.json' does not exist"),
        ({"model": str(tmp_path / "no-model")}, "model '.*no-model' is not a folder"),
        ({"data": {"json": str(world["data"]), "image_folder": str(tmp_path / "no-images")}}, "is not a directory"),
        ({"vif": {**VIF, "alpha": 2.0}}, r"alpha=2.0 is outside \[0, 1\]"),
        ({"vif": {**VIF, "inject_layers": [2, 9]}}, r"layer indices \[9\] are out of range .* 4 decoder layers"),
        ({"report_to": "wandbb"}, "report_to .*wandbb is not supported, only .*tensorboard"),
        ({"optim": "nonsense"}, "TrainingArguments refused the recipe: nonsense is not a valid OptimizerNames"),
        ({"data": {"json": str(truncated)}}, r"truncated.json: invalid JSON at line 1 column \d+"),
        ({"data": {"json": str(tmp_path / "int.json")}}, r"int.json item 3: sample 'green': the 'gpt' turn's 'value' must be a string, got int 3"),
        ({"data": {"json": str(world["data"]), "image_folder": str(corrupt)}}, r"cannot be read, e.g. sample 'green'.*green.png"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append(({"precision": "fp16"}, "precision: fp16 needs a CUDA GPU"))
        # (bf16 on a CPU without native bfloat16 is emulated, with a warning: tests/test_distributed.py)
    for i, (change, message) in enumerate(cases):
        path = write(tmp_path / f"r{i}.yaml", {**good, **change})
        line = one_error(capsys, main(["train", str(path), "--check"]))
        assert __import__("re").search(message, line), (change, line)
    assert not (tmp_path / "out").exists()
    # --debug shows the traceback instead (the exception propagates).
    with pytest.raises(RecipeError, match="alpha=2.0"):
        main(["--debug", "train", str(tmp_path / "r3.yaml"), "--check"])
    # The same checks run first when training for real: nothing loads the garbage weights.
    line = one_error(capsys, main(["train", str(tmp_path / "r4.yaml")]))
    assert "out of range" in line
    # vif eval: an integer answer is named as such (was "'int' object is not iterable").
    bench = [json.loads(line) for line in world["bench"].read_text().splitlines()]
    bench[1]["answer"] = 3
    (world["root"] / "bench_int.jsonl").write_text("\n".join(json.dumps(r) for r in bench))
    argv = ["eval", "--model", str(world["broken"]), "--benchmark", str(world["root"] / "bench_int.jsonl")]
    line = one_error(capsys, main(argv + ["--metric", "exact_match"]))
    assert (
        "line 2 (sample 'blue'): field 'answer' must be a string (or a list of strings), got an integer 3"
        in line
    )


# -----------------------------------------------------------------------------
# 3. Nothing a user made is overwritten


def test_3_outputs_never_overwrite_what_a_user_made(world, tmp_path, capsys):
    # Training into the base model's own folder, or into a folder holding someone's model.
    base_before = tree(world["model"])
    line = one_error(capsys, main(["train", str(write(tmp_path / "a.yaml", recipe(world, world["model"])))]))
    assert "is the base model's own folder" in line
    assert tree(world["model"]) == base_before
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"mine": true}')
    line = one_error(capsys, main(["train", str(write(tmp_path / "b.yaml", recipe(world, theirs)))]))
    assert "holds a model vif train did not write (config.json)" in line
    assert (theirs / "config.json").read_text() == '{"mine": true}'

    # vif eval: a non-empty folder is refused; --overwrite replaces eval's own files only.
    out = tmp_path / "eval"
    out.mkdir()
    (out / "predictions_base.jsonl").write_text("stale\n")  # from an earlier --compare run
    (out / "summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    argv = ["eval", "--model", str(world["model"]), "--adapter", str(world["adapter"]), "--benchmark",
            str(world["bench"]), "--metric", "exact_match", "--output-dir", str(out), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert "--output-dir '" in one_error(capsys, main(argv)) and (out / "predictions_base.jsonl").exists()
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "predictions_vif.jsonl", "summary.json"]
    assert (out / "notes.txt").read_text() == "mine"

    # vif diagnose: stale heatmaps of an earlier run are removed by --overwrite, other files kept.
    out = tmp_path / "diag"
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "sample007_image0.png").write_bytes(b"stale")
    (out / "heatmaps" / "my-figure.png").write_bytes(b"mine")
    argv = ["diagnose", "--model", str(world["model"]), "--data", str(world["data"]), "--output-dir", str(out),
            "--device", "cpu", "--max-samples", "2", "--n-heatmaps", "1", "--image-aspect", "keep", "--no-progress"]  # fmt: skip
    assert "is not empty" in one_error(capsys, main(argv))
    assert main(argv + ["--overwrite"]) == 0
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert heatmaps == ["my-figure.png", "sample000_image0.png"]


# -----------------------------------------------------------------------------
# 4. Resume cannot go wrong silently


def test_4_resume_skips_incomplete_checkpoints_and_refuses_a_changed_recipe(world, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    data = tmp_path / "data.json"
    shutil.copy(world["data"], data)
    r = recipe(world, out, data={"json": str(data), "image_folder": str(world["root"])})
    path = write(tmp_path / "r.yaml", r)
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    # A kill while checkpoint-2 was written: it is skipped with a warning, checkpoint-1 resumes.
    # Logging, saving, reporting and the run's name are not part of the recipe's fingerprint.
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    bookkeeping = {**r, "logging_steps": 5, "save_steps": 7, "report_to": "none", "save_total_limit": 3}
    with caplog.at_level(logging.WARNING, logger="vif.training.rundir"):
        assert main(["train", str(write(tmp_path / "r2.yaml", bookkeeping)), "--resume"]) == 0
    assert "skipping" in caplog.text and "checkpoint-2" in caplog.text and "incomplete" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    capsys.readouterr()
    # A changed recipe (learning rate, alpha, seed, data) is refused, naming the key.
    for change, key in [
        ({"optimizer": {"lr": 5e-4}}, "optimizer.lr"),
        ({"vif": {**VIF, "alpha": 0.3}}, "vif.alpha"),
        ({"seed": 1}, "seed"),
        ({"data": {**r["data"], "json": str(tmp_path / "shuffled.json")}}, "data.json"),
    ]:
        (tmp_path / "shuffled.json").write_text(json.dumps(json.loads(world["data"].read_text())[::-1]))
        line = one_error(
            capsys, main(["train", str(write(tmp_path / "c.yaml", {**r, **change})), "--resume"])
        )
        assert f"differs from the one {out} was started with ({key}:" in line and "--force" in line, line
    data.write_text(json.dumps(json.loads(world["data"].read_text())[::-1]))  # same path, other content
    assert "(data.json.sha256: " in one_error(capsys, main(["train", str(path), "--resume"]))
    data.write_text(world["data"].read_text())
    # A changed VIF size cannot resume, even forced: a clear error instead of a state-dict dump.
    bigger = {**r, "vif": {**VIF, "latent_size": 64}}
    line = one_error(capsys, main(["train", str(write(tmp_path / "d.yaml", bigger)), "--resume", "--force"]))
    assert "saved with another VIF config than this recipe builds" in line


# -----------------------------------------------------------------------------
# 9 (+ 8). The recipe passes TrainingArguments through; vif train's output


def test_9_training_arguments_pass_through_and_train_output(world, tmp_path, capfd):
    out = tmp_path / "run"
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(json.loads(world["data"].read_text())[:2]))
    r = recipe(
        world,
        out,
        data={"json": str(world["data"]), "eval_json": str(eval_json), "eval_image_folder": str(world["root"])},
        optim="adafactor", run_name="first-hour", warmup_steps=1, report_to=[], eval_steps=1,
    )  # fmt: skip
    path = write(tmp_path / "r.yaml", r)
    assert main(["train", str(path), "--check"]) == 0
    assert json.loads(capfd.readouterr().out)["optim"] == "adafactor"
    from vif.training import check

    args = check(path).training_args
    assert (args.optim, args.run_name, args.warmup_steps, args.report_to) == (
        "adafactor",
        "first-hour",
        1,
        [],
    )
    assert args.eval_strategy == "steps" and args.prediction_loss_only
    # Validated by transformers itself, before weights load.
    bad = write(tmp_path / "bad.yaml", {**r, "model": str(world["broken"]), "eval_strategy": "sometimes"})
    line = one_error(capfd, main(["train", str(bad), "--check"]))
    assert "TrainingArguments refused the recipe: sometimes is not a valid IntervalStrategy" in line
    # 8: with --json, stdout is one JSON object; the Trainer's logs went to stderr.
    assert main(["train", str(path), "--json", "--no-progress"]) == 0
    captured = capfd.readouterr()
    result = json.loads(captured.out)
    assert result["global_step"] == 2 and result["vif_adapter"] == str(out / "vif")
    assert "'loss':" in captured.err and "'eval_loss':" in captured.err
    assert "%|" not in captured.err  # --no-progress: no bars (training or loading)
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])  # the eval set was used


# -----------------------------------------------------------------------------
# 5. A failed from_pretrained or attach leaves the base model exactly as it was


def model_state(model) -> dict:
    configs = {
        name: getattr(getattr(model.config, name, model.config), "_attn_implementation", None)
        for name in ("text_config", "vision_config")
    }
    return {
        "hooks": [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), sorted(k for k in vars(m) if "vif" in k))
            for name, m in model.named_modules()
        ],
        "attn": (model.config._attn_implementation, configs),
        "attached": "_vif_attached" in vars(model),
    }


def test_5_failed_load_or_attach_leaves_the_model_as_it_was(world, monkeypatch):
    model, processor = load_model(world["model"], device="cpu", dtype="float32")
    batch = a_batch(world, processor)
    with torch.no_grad():
        logits = model(**batch).logits
    before = model_state(model)  # after a first forward: transformers adds output-recording hooks then
    # An override that changes the module's shape: VIFLoadError, found before anything is attached.
    with pytest.raises(vif.VIFLoadError, match="latent_size.*change the module's shape"):
        vif.VIFModel.from_pretrained(model, world["adapter"], latent_size=8)
    assert model_state(model) == before
    # Failures after the module is attached (a weights read that fails, Ctrl-C): detached again.
    import vif.model as vif_model

    for error in (RuntimeError("disk read failed"), KeyboardInterrupt()):

        def failing_load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(vif_model, "load_file", failing_load)
        with pytest.raises(vif.VIFLoadError if isinstance(error, Exception) else KeyboardInterrupt):
            vif.VIFModel.from_pretrained(model, world["adapter"])
        assert model_state(model) == before
    monkeypatch.undo()
    # attach failing on its last step (switching the attention implementation): all undone.
    monkeypatch.setattr(
        model, "set_attn_implementation", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no"))
    )
    with pytest.raises(RuntimeError, match="no"):
        vif.attach(model, vif.VIFConfig.preset("compact", model, extract_layers=[1], inject_layers=[2]))
    monkeypatch.undo()
    assert model_state(model) == before
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    vmodel = vif.VIFModel.from_pretrained(model, world["adapter"])  # and VIF attaches normally now
    assert vmodel.detach() is model and model_state(model) == before


# -----------------------------------------------------------------------------
# 6. VIFModel is a drop-in for the base model


def test_6_vif_model_is_a_drop_in(world, tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments, pipeline

    from vif.eval.generation import generate_answers

    model, processor = load_model(world["model"], device="cpu", dtype="float32", adapter=world["adapter"])
    base = model.base_model
    # Attributes PEFT's PeftModel forwards to the base model.
    assert model.generation_config is base.generation_config and model.dtype == torch.float32
    assert (
        model.name_or_path == base.name_or_path
        and model.get_input_embeddings() is base.get_input_embeddings()
    )
    assert model.num_parameters() == base.num_parameters() and model.can_generate()
    assert not hasattr(model, "hf_device_map") and model.main_input_name == "input_ids"

    # pipeline("image-text-to-text") gives what VIFModel.generate gives.
    image = Image.open(world["root"] / "red.png").convert("RGB")
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "what color is the square"}]
    out = pipe(text=[{"role": "user", "content": content}], max_new_tokens=4, return_full_text=False)
    message = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the square"}]}
    ]
    expected = generate_answers(model, processor, [message], [[image]], 4, image_aspect="keep")
    assert out[0]["generated_text"].strip() == expected[0].strip()

    # A plain Trainer with default arguments (remove_unused_columns reads the base forward's
    # signature) and activation checkpointing through the usual flag.
    dataset = LlavaFormatDataset(world["data"], processor=processor)
    items = [dataset[i] for i in range(len(dataset))]  # each has an extra "id" column
    start = {k: v.clone() for k, v in model.vif_module.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=2, report_to="none",
        gradient_checkpointing=True, learning_rate=1e-2, save_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    model.train()
    Trainer(model=model, args=args, train_dataset=items, data_collator=VIFCollator(processor)).train()
    layer = base.model.language_model.layers[2]
    assert (
        layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    )
    assert all(not torch.equal(v, start[k]) for k, v in model.vif_module.state_dict().items())
    with pytest.raises(vif.VIFConfigError, match="use_reentrant=True"):
        model.gradient_checkpointing_enable({"use_reentrant": True})

    # save_pretrained takes transformers' keywords.
    model.save_pretrained(tmp_path / "saved", safe_serialization=True, max_shard_size="5GB")
    model.save_pretrained(tmp_path / "from_state", state_dict=model.state_dict(), is_main_process=True)
    model.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    a, b = (
        load_file(tmp_path / "saved" / "vif_module.safetensors"),
        load_file(tmp_path / "from_state" / "vif_module.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # An adapter by hub id, offline, from a cache laid out as the hub's.
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-vif"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "saved", repo / "snapshots" / commit / "vif")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    fresh, _ = load_model(world["model"], device="cpu", dtype="float32")
    hub = vif.VIFModel.from_pretrained(fresh, "someone/tiny-vif", subfolder="vif")
    assert all(torch.equal(v, a[k]) for k, v in hub.vif_module.state_dict().items())
    hub.detach()
    with pytest.raises(vif.VIFLoadError, match="'someone/missing' is not a local folder.*hub"):
        vif.VIFModel.from_pretrained(fresh, "someone/missing")


# -----------------------------------------------------------------------------
# 7. device_map / offloading through accelerate


def test_7_offloaded_base_model(world, tmp_path):
    # The vision tower (the model's first parameters) and two decoder layers offloaded to disk.
    device_map = {
        "model.vision_tower": "disk", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
        "model.language_model.layers.2": "cpu", "model.language_model.layers.3": "disk",
        "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    offloaded, _ = load_model(
        world["model"], dtype="float32", adapter=world["adapter"], device_map=device_map,
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    assert next(offloaded.base_model.parameters()).device.type == "meta"  # "the first parameter" is no device
    assert offloaded.vif_device == torch.device("cpu") and offloaded.device == torch.device("cpu")
    assert offloaded.hf_device_map == device_map
    reference, processor = load_model(world["model"], device="cpu", dtype="float32", adapter=world["adapter"])
    batch = a_batch(world, processor)
    with torch.no_grad():
        a, b = offloaded(**batch), reference(**batch)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert torch.allclose(a.vif.importance[3], b.vif.importance[3], atol=1e-7)
    # Generation (vif eval's code) puts the inputs where the model computes, not on "meta".
    from vif.eval.generation import generate_answers, user_message

    images = [[Image.open(world["root"] / "red.png")], [Image.open(world["root"] / "blue.png")]]
    questions = [user_message("what color is the square")] * 2
    assert generate_answers(offloaded, processor, questions, images, 4) == generate_answers(
        reference, processor, questions, images, 4
    )


# -----------------------------------------------------------------------------
# 8. One spelling per option, consistent dtypes, the missing options


def test_8_cli_consistency(world, tmp_path, capsys, progress_bars_back):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith(f"vif {vif.__version__}")
    # The same dtype names everywhere; auto = the checkpoint's dtype (transformers' meaning).
    half = tmp_path / "bf16-model"
    model, _ = load_model(world["model"], device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    model.save_pretrained(half)
    shutil.copy(world["model"] / "processor_config.json", half)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(world["model"] / name, half)
    assert load_model(half, device="cpu", dtype="auto")[0].dtype == torch.bfloat16
    assert load_model(half, device="cpu", dtype="fp32")[0].dtype == torch.float32
    # vif eval --alpha 0 with --compare: the VIF run is exactly the base run.
    out = tmp_path / "alpha0"
    argv = ["eval", "--model", str(world["model"]), "--compare", str(world["adapter"]), "--benchmark",
            str(world["bench"]), "--metric", "exact_match", "--output-dir", str(out), "--dtype", "fp32",
            "--device", "cpu", "--alpha", "0", "--no-progress", "--max-new-tokens", "4"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    rows = {run: (out / f"predictions_{run}.jsonl").read_text().splitlines() for run in ("base", "vif")}
    assert [json.loads(r)["prediction"] for r in rows["base"]] == [
        json.loads(r)["prediction"] for r in rows["vif"]
    ]
    assert json.loads((out / "summary.json").read_text())["alpha"] == 0.0
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err and "%|" not in captured.err  # --no-progress is quiet
    # diagnose: --output-dir, validated --layers, a hint it can act on for a bad image.
    broken = ["diagnose", "--model", str(world["broken"]), "--data", str(world["data"]), "--device", "cpu"]
    assert "'a' is not a layer number" in one_error(capsys, main(broken + ["--layers", "a,b"]))
    assert "[7] out of range; the language model has 4 decoder layers" in one_error(
        capsys, main(broken + ["--layers", "0,7"])
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{**json.loads(world["data"].read_text())[0], "image": str(tmp_path / "x.png")}])
    )
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    line = one_error(capsys, main(broken[:4] + [str(bad), "--output-dir", str(tmp_path / "d")]))
    assert "x.png" in line and "on_bad_image" not in line and "Fix or remove" in line
    assert main(broken + ["--alpha", "0.5"]) == 2 and "give --adapter or --compare" in capsys.readouterr().err
    # --image-aspect reaches the diagnostics' data (the images are wide: pad and keep differ).
    from vif.diagnostics.inputs import iter_batches

    processor = load_model(world["model"], device="cpu")[1]
    pad = next(iter_batches(str(world["data"]), processor, image_aspect="pad"))[0]["pixel_values"]
    keep = next(iter_batches(str(world["data"]), processor, image_aspect="keep"))[0]["pixel_values"]
    assert pad.shape == keep.shape and not torch.equal(pad, keep)
    # Recipe precision takes the long names too; eval --dtype the short ones.
    from vif.training import load_recipe

    assert load_recipe({"model": "m", "data": {"json": "d"}, "precision": "float32"}).precision == "fp32"
    # A text-only model is named as such.
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(vif.BackboneError, match="not a vision-language model"):
        vif.attach(llm)
