"""The demo's steps: data -> base model -> control and VIF arms -> scores -> diagnostics -> report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.tinyfind import TinyFindConfig, answer_vocabulary, generate, question_vocabulary
from ..tiny import build_tiny_llava


@dataclass
class DemoSettings:
    """Everything that sizes the demo. ``full()`` is the default run, ``quick()`` the CI-sized one."""

    data: TinyFindConfig = field(default_factory=TinyFindConfig)
    # the tiny LLaVA: CLIP vision tower (frozen, as in LLaVA) -> MLP projector -> Llama
    image_size: int = 64
    patch_size: int = 8  # 8 x 8 = 64 image tokens; a 6 px target covers 1-4 of them
    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 128  # the vision tower stays random: wide random features keep colour readable
    # training: the base run, then each arm continues for `arm_steps`
    base_steps: int = 1500
    arm_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    # A small custom VIF module: the compact preset with 2 layer pairs, 1 attention head (CPU SDPA is
    # slow at 8-wide heads), and a minimum spread of one patch (0.035 is about one token of a 24 x 24
    # grid; on an 8 x 8 grid it would make every Gaussian a single token with no gradient to move it).
    vif: dict[str, Any] = field(
        default_factory=lambda: {
            "preset": "compact",
            "extract_layers": [1, 2],
            "inject_layers": [3, 5],
            "num_heads": 1,
            "min_sigma": 0.12,
        }
    )
    # evaluation and diagnostics
    eval_batch_size: int = 50
    n_diagnose: int = 100
    n_heatmaps: int = 4

    @classmethod
    def full(cls) -> DemoSettings:
        data = TinyFindConfig(
            image_size=64,
            target_size=6,
            n_train=2000,
            n_val=0,
            n_test=400,
            question_types=("color",),
        )
        return cls(data=data)

    @classmethod
    def quick(cls) -> DemoSettings:
        data = replace(cls.full().data, n_train=32, n_test=8)
        return replace(
            cls.full(), data=data, base_steps=4, arm_steps=2, batch_size=4, n_diagnose=4, n_heatmaps=1
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
    threads: int | None = 1,
) -> dict[str, Any]:
    """Runs the whole demo into ``out_dir``; returns what ``metrics.json`` holds.

    ``threads``: torch CPU threads during the run (None: leave torch's setting). One thread is the
    default because the model is tiny: more threads gain little, and on a machine shared with other
    jobs, spinning worker threads can make every step tens of times slower.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, settings, device, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    out_dir: str | Path, settings: DemoSettings | None, device: str, seed: int, progress: bool
) -> dict[str, Any]:
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
            model, processor, paths["test"], out / "eval" / name, settings.eval_batch_size, progress
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
            "deep_attention_on_target": diagnostics[name]["on_target"]["deep_attention"],
            "importance_on_target": diagnostics[name]["on_target"]["importance"],
            "importance_variation": diagnostics[name]["on_target"]["importance_variation"],
            "train_loss": arms[name].metrics.get("loss"),
        }
        for name in arms
    }
    metrics.update(
        {
            "steps": {"base": settings.base_steps, "arm": settings.arm_steps},
            "seconds": round(seconds, 1),
            "n_test": scores["control"]["n"],
            "on_target_if_uniform": diagnostics["control"]["on_target"]["uniform"],
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

    runs, collections = [], {}
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
        collections[name] = collection
    summary = write_outputs(out, runs)
    boxes = {r["id"]: r["meta"]["bbox"] for r in json.loads(test_json.read_text())}
    result = {"control": summary["base"], "vif": summary["vif"], "difference": summary["difference"]}
    for name, collection in collections.items():
        result[name]["on_target"] = on_target(collection, boxes, settings.image_size, settings.patch_size)
    return result


def target_tokens(bbox: list[int], image_size: int, patch_size: int) -> torch.Tensor:
    """``(G * G,)`` bool: the image tokens (row-major ``G x G`` grid) whose patch overlaps the pixel box
    ``[x0, y0, x1, y1)`` of the answer-relevant target(s)."""
    grid = image_size // patch_size
    x0, y0, x1, y1 = bbox
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[y0 // patch_size : (y1 - 1) // patch_size + 1, x0 // patch_size : (x1 - 1) // patch_size + 1] = True
    return mask.flatten()


def on_target(
    collection: Any, boxes: dict[str, list[int]], image_size: int, patch_size: int
) -> dict[str, Any]:
    """How much of the deep-layer visual attention (and of VIF's map) lands on the target's tokens.

    Returns ``{"uniform", "deep_attention", "per_layer": {layer: share}, "importance": share | None,
    "importance_variation": tv | None}``: mean over samples of the share of the renormalised attention
    over image tokens that falls on the tokens overlapping the target box; ``uniform`` is that share for
    a flat distribution (the number of target tokens / Nv), the level of an attention that ignores where
    the target is. ``importance_variation`` is the mean total-variation distance between a sample's VIF
    map and the mean map over samples: 0 when the map is the same for every image (it cannot be
    following the target), up to 1 for maps on disjoint tokens.
    """
    from ..diagnostics.stats import deep_layers

    per_layer: dict[int, list[float]] = {layer: [] for layer in collection.layers}
    importance: list[float] = []
    maps: list[np.ndarray] = []  # (Nv,) VIF map of each sample, averaged over injection layers
    uniform: list[float] = []
    for record in collection.records:
        mask = target_tokens(boxes[record.meta["id"]], image_size, patch_size).numpy()
        uniform.append(float(mask.mean()))
        for pos, layer in enumerate(collection.layers):
            visual = record.visual[pos]
            per_layer[layer].append(float(visual[mask].sum() / max(visual.sum(), 1e-12)))
        if record.importance:
            pi = np.mean(list(record.importance.values()), axis=0)
            importance.append(float(pi[mask].sum()))
            maps.append(pi)
    mean = {layer: sum(v) / len(v) for layer, v in per_layer.items() if v}
    deep = deep_layers(collection)
    return {
        "uniform": sum(uniform) / max(len(uniform), 1),
        "deep_attention": sum(mean[layer] for layer in deep) / len(deep),
        "per_layer": mean,
        "importance": sum(importance) / len(importance) if importance else None,
        "importance_variation": _variation(maps),
    }


def _variation(maps: list[np.ndarray]) -> float | None:
    """Mean total-variation distance of each map to the mean map (maps of equal length only)."""
    if not maps or len({m.shape for m in maps}) != 1:
        return None
    stacked = np.stack(maps)  # (n_samples, Nv)
    return float(0.5 * np.abs(stacked - stacked.mean(0)).sum(-1).mean())
