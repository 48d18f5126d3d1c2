"""The demo's steps: data -> base model -> control and VIF arms -> scores -> diagnostics -> report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.tinyfind import TinyFindConfig, answer_vocabulary, generate, question_vocabulary
from ..tiny import build_tiny_llava


@dataclass
class DemoSettings:
    """Everything that sizes the demo. ``full()`` is the default run, ``quick()`` the CI-sized one."""

    data: TinyFindConfig = field(default_factory=TinyFindConfig)
    # the tiny LLaVA: CLIP vision tower -> MLP projector -> Llama
    image_size: int = 96
    patch_size: int = 12
    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 32
    # training: the base run, then each arm continues for `arm_steps`
    base_steps: int = 600
    arm_steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    vif: dict[str, Any] = field(default_factory=lambda: {"preset": "compact"})
    # evaluation and diagnostics
    eval_batch_size: int = 50
    n_diagnose: int = 100
    n_heatmaps: int = 4

    @classmethod
    def full(cls) -> DemoSettings:
        return cls(
            data=TinyFindConfig(n_train=2000, n_val=0, n_test=400, question_types=("color", "position"))
        )

    @classmethod
    def quick(cls) -> DemoSettings:
        return replace(
            cls.full(),
            data=TinyFindConfig(n_train=64, n_val=0, n_test=16, question_types=("color", "position")),
            base_steps=8,
            arm_steps=4,
            batch_size=8,
            n_diagnose=8,
            n_heatmaps=2,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _train_recipe(
    settings: DemoSettings, model: Path, train_json: Path, out: Path, steps: int, vif: Any, seed: int
) -> dict[str, Any]:
    return {
        "model": str(model),
        "vif": vif,
        "data": {"json": str(train_json)},
        "trainable": {"mode": "full"},
        "optimizer": {"lr": settings.lr, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "schedule": {
            "scheduler": "cosine",
            "warmup_ratio": 0.05,
            "max_steps": steps,
            "per_device_batch_size": settings.batch_size,
        },
        "precision": "fp32",
        "activation_checkpointing": False,
        "seed": seed,
        "logging_steps": max(1, steps // 10),
        "save_steps": steps + 1,  # no intermediate checkpoints: only the final save
        "output_dir": str(out),
    }


def run_demo(
    out_dir: str | Path,
    settings: DemoSettings | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the whole demo into ``out_dir``; returns what ``metrics.json`` holds."""
    from ..loading import load_model
    from ..training import train
    from .report import write_report
    from .scoring import score_split

    settings = settings or DemoSettings.full()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(seed)

    # 1. data
    data_config = replace(settings.data, seed=seed, image_size=settings.image_size)
    paths = generate(out / "data", data_config, progress=progress)

    # 2. the base model: a random tiny LLaVA, trained without VIF
    words = question_vocabulary(data_config) + answer_vocabulary(data_config)
    init = build_tiny_llava(
        out / "models" / "init",
        words=words,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        num_kv_heads=settings.num_kv_heads,
        vision_hidden_size=settings.vision_hidden_size,
        seed=seed,
    )
    train_json = paths["train"]
    base = train(
        _train_recipe(settings, init, train_json, out / "models" / "base", settings.base_steps, None, seed)
    )

    # 3. two arms from the same base, same steps, same data order
    arms = {}
    for name, vif in (("control", None), ("vif", settings.vif)):
        recipe = _train_recipe(
            settings, base.model_path, train_json, out / "models" / name, settings.arm_steps, vif, seed + 1
        )
        arms[name] = train(recipe)

    # 4. scores on the test split
    scores, models = {}, {}
    for name, result in arms.items():
        model, processor = load_model(
            result.model_path, device=device, dtype="float32", adapter=result.vif_adapter
        )
        models[name] = (model, processor)
        scores[name] = score_split(
            model, processor, paths["test"], settings.eval_batch_size, label=name, progress=progress
        )

    # 5. diagnostics of both arms on the same test samples
    diagnostics = _diagnose(models, paths["test"], out / "diagnostics", settings, progress)

    seconds = time.perf_counter() - started
    metrics = {
        name: {
            "accuracy": scores[name]["accuracy"],
            "per_type": scores[name]["per_type"],
            "deep_entropy": diagnostics[name]["deep_entropy"],
            "deep_ratio": diagnostics[name]["deep_ratio"],
            "train_loss": arms[name].metrics.get("loss"),
        }
        for name in arms
    }
    metrics.update(
        {
            "steps": {"base": settings.base_steps, "arm": settings.arm_steps},
            "seconds": round(seconds, 1),
            "n_test": scores["control"]["n"],
            "seed": seed,
            "device": device,
            "settings": settings.to_dict(),
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    (out / "predictions.json").write_text(
        json.dumps({name: s["predictions"] for name, s in scores.items()}, indent=2) + "\n"
    )
    write_report(out, metrics, diagnostics)
    return metrics


def _diagnose(
    models: dict[str, tuple[torch.nn.Module, Any]],
    test_json: Path,
    out: Path,
    settings: DemoSettings,
    progress: bool,
) -> dict[str, Any]:
    """Both arms through :mod:`vif.diagnostics` into one folder (plots with both curves)."""
    from ..diagnostics import collect, summarise, write_outputs
    from ..diagnostics.inputs import iter_batches

    runs = []
    labels = {"control": "control", "vif": "VIF"}
    for name, (model, processor) in models.items():
        image_processor = processor.image_processor
        collection = collect(
            model,
            iter_batches(test_json, processor, batch_size=settings.eval_batch_size),
            rows="answer",
            label=labels[name],
            max_samples=settings.n_diagnose,
            keep_images=settings.n_heatmaps,
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
            tokenizer=processor.tokenizer,
            progress=progress,
            total=settings.n_diagnose,
        )
        runs.append((collection, summarise(collection)))
    summary = write_outputs(out, runs)
    return {"control": summary["base"], "vif": summary["vif"], "difference": summary["difference"]}
