"""The research harness behind docs/looking.md: one demo arm from a base checkpoint, fast.

A plain training loop over pre-encoded TinyFind data (no Trainer, no image decoding per step) with
the demo's recipe (AdamW, lr 1e-3, 5 % warm-up + cosine, gradients clipped at 1.0, batch 16; the
vision tower frozen), then the test split scored by the first answer token (TinyFind's answers are
one word) and the map's share on the target's tokens, overall and per answer. Every run in
docs/looking.md's log was made with it:

    .venv/bin/python benchmarks/looking_runs.py --data demo-out/data --base demo-out/models/base \\
        --arm vif --vif '{"extract_layers": [1, 2], "inject_layers": [3, 5], "num_heads": 1}' --seed 1

``--arm control | vif | oracle``; ``--vif`` holds ``VIFConfig`` fields over the ``compact`` preset
(``"preset": NAME`` picks another). One JSON line per run is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import vif
from vif.data.llava_format import LlavaFormatDataset, VIFCollator
from vif.demo.pipeline import target_tokens
from vif.loading import load_model


def encoded(data: Path, processor, split: str) -> list[dict]:
    """The split's items, encoded once and cached next to the data (``<split>.encoded.pt``)."""
    cache = data / f"{split}.encoded.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    dataset = LlavaFormatDataset(data / f"{split}.json", processor=processor)
    records = {r["id"]: r for r in json.loads((data / f"{split}.json").read_text())}
    items = []
    for i in range(len(dataset)):
        item = dataset[i]
        item["bbox"] = records[item["id"]]["meta"]["bbox"]
        items.append(item)
    torch.save(items, cache)
    return items


def evaluate(model, items: list[dict], collate, image_size: int, patch_size: int, has_map: bool) -> dict:
    """First-token accuracy, and the map's share on the target (overall and by answer token)."""
    model.eval()
    correct: dict[int, list[bool]] = {}
    on_target: dict[int, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(items), 50):
            chunk = items[start : start + 50]
            batch = collate(chunk)
            if not has_map:
                batch.pop("vif_boxes", None)
            out = model(**batch)
            labels = batch["labels"]
            first = (labels != -100).float().argmax(1)  # the answer's first token
            rows = torch.arange(len(chunk))
            gold = labels[rows, first]
            ok = out.logits[rows, first - 1].argmax(-1) == gold
            maps = torch.stack(list(out.vif.importance.values())).mean(0) if has_map else None
            for b, item in enumerate(chunk):
                answer = int(gold[b])
                correct.setdefault(answer, []).append(bool(ok[b]))
                if maps is not None:
                    mask = target_tokens(item["bbox"], image_size, patch_size)
                    on_target.setdefault(answer, []).append(float(maps[b, : mask.numel()][mask].sum()))
    model.train()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    result = {
        "accuracy": mean([c for v in correct.values() for c in v]),
        "accuracy_by_answer": {a: round(mean(v), 4) for a, v in sorted(correct.items())},
    }
    if on_target:
        result["on_target"] = mean([s for v in on_target.values() for s in v])
        result["on_target_by_answer"] = {a: round(mean(v), 4) for a, v in sorted(on_target.items())}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a TinyFind folder (vif demo's data/)")
    parser.add_argument(
        "--base", type=Path, required=True, help="the base checkpoint (vif demo's models/base)"
    )
    parser.add_argument("--arm", choices=("control", "vif", "oracle"), default="vif")
    parser.add_argument("--vif", default="{}", help="JSON: VIFConfig fields over the compact preset")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vif-lr", type=float, default=None, help="the VIF module's lr [--lr]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path("looking_runs.jsonl"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, processor = load_model(args.base, device="cpu", dtype="float32")
    train, test = encoded(args.data, processor, "train"), encoded(args.data, processor, "test")
    vision = model.config.vision_config
    torch.manual_seed(args.seed)
    if args.arm == "control":
        top = model
    else:
        fields = json.loads(args.vif)
        preset = fields.pop("preset", "compact")
        if args.arm == "oracle":
            fields["map_source"] = "boxes"
        top = vif.attach(model, vif.VIFConfig.preset(preset, model, **fields))
    top.train()
    model.model.vision_tower.requires_grad_(False)
    collate = VIFCollator(processor, return_boxes=args.arm != "control")

    named = [(n, p) for n, p in top.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not n.startswith("vif_module.")], "lr": args.lr}]
    vif_params = [p for n, p in named if n.startswith("vif_module.")]
    if vif_params:
        groups.append({"params": vif_params, "lr": args.vif_lr or args.lr})
    optimiser = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimiser.param_groups]
    warmup = max(1, int(0.05 * args.steps))
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    while len(order) < args.steps * args.batch_size:
        order += torch.randperm(len(train), generator=generator).tolist()

    history = []
    for step in range(args.steps):
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
        for group, lr in zip(optimiser.param_groups, base_lrs):
            group["lr"] = lr * scale
        batch = collate([train[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]])
        out = top(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            record = {"step": step + 1, "loss": round(float(out.loss), 4)}
            parts = getattr(out, "vif", None)
            for key in ("lm_loss", "kl", "evidence", "entropy", "mean_sigma"):
                value = getattr(parts, key, None)
                if value is not None:
                    record[key] = round(float(value), 4)
            history.append(record)
            print(json.dumps(record), flush=True)

    scores = evaluate(top, test, collate, vision.image_size, vision.patch_size, args.arm != "control")
    result = {
        "tag": args.tag,
        "arm": args.arm,
        "vif": args.vif,
        "steps": args.steps,
        "seed": args.seed,
        "lr": args.lr,
        "vif_lr": args.vif_lr,
        "data": str(args.data),
        "base": str(args.base),
        **scores,
        "seconds": round(time.perf_counter() - started, 1),
        "history": history,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
