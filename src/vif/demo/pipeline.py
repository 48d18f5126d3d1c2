"""The demo's steps: data -> base model -> four arms x seeds -> scores and maps -> diagnostics -> report.

The arms, each continuing the same base checkpoint for the same steps with the same recipe:

* ``control``: no VIF;
* ``vif_paper``: VIF as the paper and its released code specify (``VIFConfig.preset("paper")``);
* ``vif``: VIF with this project's defaults (``VIFConfig.preset("compact")``: the map is learned
  with the answer-evidence head, attention centres and a sigma floor in tokens; docs/demo.md);
* ``oracle``: the ground-truth map (``map_source="boxes"``: uniform over the target's tokens, from
  the generator's boxes, in training and at evaluation): the upper bound of what a map can give.

Every arm runs once per seed (``DemoSettings.seeds``: data order and VIF initialisation), all from
one base model; runs are spread over ``workers`` processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.tinyfind import TinyFindConfig, answer_vocabulary, generate, question_vocabulary
from ..tiny import build_tiny_llava

ARMS = ("control", "vif_paper", "vif", "oracle")
LABELS = {
    "control": "control (no VIF)",
    "vif_paper": "VIF, paper recipe",
    "vif": "VIF, project defaults",
    "oracle": "ground-truth map (upper bound)",
}
# The tiny model's wiring, shared by every VIF arm: extract after layers 1 and 2 of 6, inject into 3
# and 5; one attention head in the attender (CPU SDPA is slow at 8-wide heads).
WIRING = {"extract_layers": [1, 2], "inject_layers": [3, 5], "num_heads": 1}


def default_arms() -> dict[str, Any]:
    """Each arm's ``vif`` recipe value (None: no VIF)."""
    return {
        "control": None,
        # The paper's min_sigma is 0.035 of the image on LLaVA's 24 x 24 grid, 0.84 of a token; the
        # same fraction of a token on this 8 x 8 grid is 0.105.
        "vif_paper": {"preset": "paper", **WIRING, "min_sigma": 0.105},
        "vif": {"preset": "compact", **WIRING},
        "oracle": {"preset": "compact", **WIRING, "map_source": "boxes"},
    }


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
    # training: the base run, then every arm continues for `arm_steps`, once per seed
    base_steps: int = 1500
    arm_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    # The VIF module's lr in every VIF arm: its answer-evidence reader must learn to read within the
    # arm's steps before the map can follow (at 1e-3 the map reached 17 % on target, docs/looking.md).
    vif_lr: float = 3e-3
    # Arms whose VIF module first trains alone (trainable.mode "vif-only": the LLM frozen) for these
    # many steps, then with the LLM for `arm_steps` like every arm: the LLM learns to use a map
    # only while the map is right (docs/looking.md). The LLM's own steps stay equal across arms.
    warmup_steps: dict[str, int] = field(default_factory=lambda: {"vif": 300})  # 600: better, slower
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: dict[str, Any] = field(default_factory=default_arms)
    # evaluation and diagnostics (of the seed-0 control and VIF arms)
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
            cls.full(),
            data=data,
            base_steps=4,
            arm_steps=2,
            batch_size=4,
            seeds=(0,),
            warmup_steps={"vif": 2},
            n_diagnose=4,
            n_heatmaps=1,
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
        "optimizer": {
            "lr": settings.lr,
            "vif_lr": settings.vif_lr if vif is not None else None,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
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
    workers: int = 2,
) -> dict[str, Any]:
    """Runs the whole demo into ``out_dir``; returns what ``metrics.json`` holds.

    ``threads``: torch CPU threads per process (None: leave torch's setting). One thread is the
    default because the model is tiny: more threads gain little, and on a machine shared with other
    jobs, spinning worker threads can make every step tens of times slower. ``workers``: processes
    that run the arms side by side (1: all in this process).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(
            Path(out_dir), settings or DemoSettings.full(), device, seed, progress, threads, workers
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    out: Path,
    settings: DemoSettings,
    device: str,
    seed: int,
    progress: bool,
    threads: int | None,
    workers: int,
) -> dict[str, Any]:
    from ..loading import load_model
    from ..training import train
    from .report import write_report

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
    unknown = set(settings.arms) - set(ARMS)
    if unknown or "control" not in settings.arms:
        raise ValueError(
            f"demo arms must include 'control' and come from {ARMS}; got {sorted(settings.arms)}"
        )
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
    base_recipe = _train_recipe(
        settings, init, paths["train"], out / "models" / "base", settings.base_steps, None, seed
    )
    base = train({**base_recipe, "disable_tqdm": not progress})
    base_seconds = time.perf_counter() - started

    # 3. every arm, once per seed, from the same base (same steps, same recipe)
    jobs = [
        ArmJob(
            arm,
            run_seed,
            settings,
            str(base.model_path),
            str(paths["train"]),
            str(paths["test"]),
            str(out),
            device,
        )
        for run_seed in settings.seeds
        for arm in settings.arms
    ]
    # Longest jobs first (measured: the paper preset's arm trains ~2.2x as long as the control,
    # the project's ~1.8x, the oracle's ~1.1x), so that no worker is left alone with a long job.
    cost = {"vif_paper": 0, "vif": 1, "oracle": 2, "control": 3}
    jobs.sort(key=lambda job: cost.get(job.arm, 0))
    results = _run_jobs(jobs, workers, threads, progress)

    # 4. diagnostics of the first seed's control and VIF arms, on the same test samples
    first = settings.seeds[0]
    models = {}
    for name in ("control", "vif"):
        if name in settings.arms:
            result = results[(name, first)]
            models[name] = load_model(
                result["model_path"], device=device, dtype="float32", adapter=result["vif_adapter"]
            )
    diagnostics = _diagnose(models, paths["test"], out / "diagnostics", settings, progress)

    metrics = _metrics(results, settings, diagnostics)
    metrics.update(
        {
            "seeds": list(settings.seeds),
            "steps": {
                "base": settings.base_steps,
                "arm": settings.arm_steps,
                "warmup": settings.warmup_steps,
            },
            "seconds": round(time.perf_counter() - started, 1),
            "seconds_base": round(base_seconds, 1),
            "n_test": results[("control", first)]["n"],
            "on_target_if_uniform": diagnostics["control"]["on_target"]["uniform"],
            "seed": seed,
            "device": device,
            "workers": workers,
            "settings": settings.to_dict(),
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    predictions = {f"{arm}/seed{s}": r["predictions"] for (arm, s), r in results.items()}
    (out / "predictions.json").write_text(json.dumps(predictions, indent=1) + "\n")
    write_report(out, metrics, diagnostics)
    return metrics


# ----------------------------------------------------------------------------- one arm, one seed
@dataclass
class ArmJob:
    """One arm trained with one seed from the base, then scored (picklable, for worker processes)."""

    arm: str
    seed: int
    settings: DemoSettings
    base: str
    train_json: str
    test_json: str
    out: str
    device: str

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def run_arm(job: ArmJob, threads: int | None = 1, progress: bool = False) -> dict[str, Any]:
    """Trains one arm, scores it on the test split and measures its map; returns the numbers."""
    from ..loading import load_model
    from ..training import train
    from .scoring import score_split

    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    settings, out = job.settings, Path(job.out)
    vif = settings.arms[job.arm]
    base, train_json = Path(job.base), Path(job.train_json)
    recipe = _train_recipe(
        settings, base, train_json, out / "models" / job.name, settings.arm_steps, vif, job.seed
    )
    warmup = settings.warmup_steps.get(job.arm, 0) if vif is not None else 0
    if warmup:
        stage = _train_recipe(
            settings, base, train_json, out / "models" / f"{job.name}-warmup", warmup, vif, job.seed
        )
        stage["trainable"] = {"mode": "vif-only"}
        warmed = train({**stage, "disable_tqdm": not progress})
        recipe = {**recipe, "vif": None, "init_adapter": str(warmed.vif_adapter)}
    trained = train({**recipe, "disable_tqdm": not progress})
    model, processor = load_model(
        trained.model_path, device=job.device, dtype="float32", adapter=trained.vif_adapter
    )
    score = score_split(
        model, processor, Path(job.test_json), out / "eval" / job.name, settings.eval_batch_size, progress
    )
    maps = map_on_target(model, processor, Path(job.test_json), settings) if vif is not None else {}
    return {
        "arm": job.arm,
        "seed": job.seed,
        "accuracy": score["accuracy"],
        "per_type": score["per_type"],
        "n": score["n"],
        "predictions": score["predictions"],
        "train_loss": trained.metrics.get("loss"),
        "model_path": str(trained.model_path),
        "vif_adapter": None if trained.vif_adapter is None else str(trained.vif_adapter),
        "seconds": round(time.perf_counter() - started, 1),
        **maps,
    }


def _job_in_worker(job: ArmJob, threads: int | None) -> dict[str, Any]:
    """One job in a worker process, its output (training logs, warnings) in ``logs/<job>.log``."""
    log = Path(job.out) / "logs" / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "w") as f:  # file descriptors, so that C-level and logging output go there too
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        return run_arm(job, threads, progress=False)


def _run_jobs(
    jobs: list[ArmJob], workers: int, threads: int | None, progress: bool
) -> dict[tuple[str, int], dict[str, Any]]:
    from tqdm.auto import tqdm

    results: dict[tuple[str, int], dict[str, Any]] = {}
    bar = tqdm(total=len(jobs), desc="arms x seeds", unit="run", disable=not progress)
    if workers <= 1:
        for job in jobs:
            results[(job.arm, job.seed)] = run_arm(job, threads, progress=False)
            bar.update()
    else:
        # spawn: a forked child would inherit this process's torch threads and state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_job_in_worker, job, threads): job for job in jobs}
            for future, job in futures.items():
                results[(job.arm, job.seed)] = future.result()
                bar.update()
    bar.close()
    return results


def map_on_target(model: Any, processor: Any, test_json: Path, settings: DemoSettings) -> dict[str, Any]:
    """How much of a VIF model's map lands on the target, over the whole test split.

    The maps are those of inference (the prior, from the question; the answer tokens are labelled
    so that the attender does not read them). Returns ``importance_on_target`` (mean share of the
    map on the image tokens that overlap the target's box), ``importance_variation`` (mean
    total-variation distance of a sample's map to the mean map: 0 = the same map for every image)
    and ``importance_on_target_by_answer``.
    """
    from ..data.llava_format import LlavaFormatDataset, VIFCollator

    dataset = LlavaFormatDataset(test_json, processor=processor)
    collate = VIFCollator(processor, return_boxes=True)
    records = {r["id"]: r for r in json.loads(test_json.read_text())}
    shares, maps, by_answer = [], [], {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), settings.eval_batch_size):
            items = [dataset[i] for i in range(start, min(start + settings.eval_batch_size, len(dataset)))]
            batch = collate(items)
            batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if model.config_vif.map_source != "boxes":
                batch.pop("vif_boxes")
            pi = torch.stack(list(model(**batch).vif.importance.values())).mean(0).cpu()
            for b, item in enumerate(items):
                record = records[item["id"]]
                mask = target_tokens(record["meta"]["bbox"], settings.image_size, settings.patch_size)
                share = float(pi[b, : mask.numel()][mask].sum())
                shares.append(share)
                maps.append(pi[b, : mask.numel()].numpy())
                answer = record["conversations"][1]["value"]
                by_answer.setdefault(answer, []).append(share)
    return {
        "importance_on_target": sum(shares) / len(shares),
        "importance_variation": _variation(maps),
        "importance_on_target_by_answer": {a: sum(v) / len(v) for a, v in sorted(by_answer.items())},
    }


# ----------------------------------------------------------------------------- summaries
def _metrics(
    results: dict[tuple[str, int], dict[str, Any]], settings: DemoSettings, diagnostics: dict[str, Any]
) -> dict[str, Any]:
    """Per arm: means over seeds and the per-seed values; the seed-0 diagnostics where measured."""
    metrics: dict[str, Any] = {}
    for arm in settings.arms:
        runs = [results[(arm, s)] for s in settings.seeds]
        accuracy = [r["accuracy"] for r in runs]
        entry: dict[str, Any] = {
            "accuracy": float(np.mean(accuracy)),
            "accuracy_per_seed": accuracy,
            "accuracy_std": float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else 0.0,
            "per_type": {t: float(np.mean([r["per_type"][t] for r in runs])) for t in runs[0]["per_type"]},
            "train_loss_per_seed": [r["train_loss"] for r in runs],
            "seconds_per_seed": [r["seconds"] for r in runs],
        }
        if settings.arms[arm] is not None:
            on = [r["importance_on_target"] for r in runs]
            entry["importance_on_target"] = float(np.mean(on))
            entry["importance_on_target_per_seed"] = on
            variation = [r["importance_variation"] for r in runs if r["importance_variation"] is not None]
            entry["importance_variation"] = float(np.mean(variation)) if variation else None
            answers = runs[0]["importance_on_target_by_answer"]
            entry["importance_on_target_by_answer"] = {
                a: float(np.mean([r["importance_on_target_by_answer"][a] for r in runs])) for a in answers
            }
        if arm in diagnostics:
            d = diagnostics[arm]
            entry.update(
                deep_entropy=d["deep_entropy"],
                deep_ratio=d["deep_ratio"],
                deep_attention_on_target=d["on_target"]["deep_attention"],
            )
        metrics[arm] = entry
    control = metrics["control"]["accuracy_per_seed"]
    for arm in settings.arms:
        if arm != "control":
            diffs = [a - c for a, c in zip(metrics[arm]["accuracy_per_seed"], control)]
            metrics[arm]["gain_over_control"] = float(np.mean(diffs))
            metrics[arm]["gain_over_control_per_seed"] = diffs
    if "oracle" in metrics and "vif" in metrics:
        gap = metrics["oracle"]["accuracy"] - metrics["control"]["accuracy"]
        metrics["vif"]["share_of_oracle_gap"] = (
            (metrics["vif"]["accuracy"] - metrics["control"]["accuracy"]) / gap if gap > 0 else None
        )
    return metrics


def _diagnose(
    models: dict[str, tuple[torch.nn.Module, Any]],
    test_json: Path,
    out: Path,
    settings: DemoSettings,
    progress: bool,
) -> dict[str, Any]:
    """The control and VIF arms through :mod:`vif.diagnostics` into one folder (plots with both curves)."""
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
    result = {"control": summary["base"], "difference": summary.get("difference")}
    if "vif" in models:
        result["vif"] = summary["vif"]
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
    """How much of the deep-layer visual attention lands on the target's tokens.

    Returns ``{"uniform", "deep_attention", "per_layer": {layer: share}}``: mean over samples of the
    share of the renormalised attention over image tokens that falls on the tokens overlapping the
    target box; ``uniform`` is that share for a flat distribution (the number of target tokens / Nv),
    the level of an attention that ignores where the target is.
    """
    from ..diagnostics.stats import deep_layers

    per_layer: dict[int, list[float]] = {layer: [] for layer in collection.layers}
    uniform: list[float] = []
    for record in collection.records:
        mask = target_tokens(boxes[record.meta["id"]], image_size, patch_size).numpy()
        uniform.append(float(mask.mean()))
        for pos, layer in enumerate(collection.layers):
            visual = record.visual[pos]
            per_layer[layer].append(float(visual[mask].sum() / max(visual.sum(), 1e-12)))
    mean = {layer: sum(v) / len(v) for layer, v in per_layer.items() if v}
    deep = deep_layers(collection)
    return {
        "uniform": sum(uniform) / max(len(uniform), 1),
        "deep_attention": sum(mean[layer] for layer in deep) / len(deep),
        "per_layer": mean,
    }


def _variation(maps: list[np.ndarray]) -> float | None:
    """Mean total-variation distance of each map to the mean map (maps of equal length only)."""
    if not maps or len({m.shape for m in maps}) != 1:
        return None
    stacked = np.stack(maps)  # (n_samples, Nv)
    return float(0.5 * np.abs(stacked - stacked.mean(0)).sum(-1).mean())
