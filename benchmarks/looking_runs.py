"""The research harness behind docs/looking.md: one demo arm from a base checkpoint, fast.

A plain training loop over pre-encoded TinyFind data (no Trainer, no image decoding per step) with
the demo's recipe (AdamW, lr 1e-3, 5 % warm-up + cosine, gradients clipped at 1.0, batch 16; the
vision tower frozen), then the test split scored by the first answer token (TinyFind's answers are
one word) and the map's share on the target's tokens, overall and per answer. Every run in
docs/looking.md's log was made with it:

    .venv/bin/python benchmarks/looking_runs.py --data demo-out/data --base demo-out/models/base \\
        --arm vif --vif '{"extract_layers": [1, 2], "inject_layers": [3, 5], "num_heads": 1}' --seed 1

``--arm control | vif | oracle``; ``--vif`` holds ``VIFConfig`` fields over the ``compact`` preset
(``"preset": NAME`` picks another); ``--vif-lr`` the VIF module's lr; ``--warmup N`` first trains
the VIF module alone (the LLM frozen) for N steps, like the demo's first stage; ``--eval-every N``
scores along the way. A VIF arm with an evidence reader also reports what the reader reads at
the target (``reader``: its answer right at the target's tokens; the share on the target of its
own map, a softmax over tokens of its log-sum-exp score over the five colours). One JSON line
per run is appended to ``--out``.
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


COLOURS = ("blue", "green", "purple", "red", "yellow")


def reader_probe(model, items: list[dict], collate, processor, image_size: int, patch_size: int) -> dict:
    """What the evidence reader reads from the vision encoder's features at inference."""
    head = model.vif_module.evidence
    ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(c) for c in COLOURS])
    right, on, n = 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), 50):
            chunk = items[start : start + 50]
            batch = collate(chunk)
            batch.pop("vif_boxes", None)
            model(**batch)
            encoder = model._runtime.encoder  # (n_image_tokens, Dv): one image per sample here
            features = encoder.reshape(len(chunk), -1, encoder.shape[-1])
            scores = head.proj(head.norm(features)) @ head.answers.weight[ids].T  # (B, N, 5)
            labels = batch["labels"]
            gold = labels[torch.arange(len(chunk)), (labels != -100).float().argmax(1)]
            for b, item in enumerate(chunk):
                mask = target_tokens(item["bbox"], image_size, patch_size)
                score = scores[b, : mask.numel()]
                answer = int((ids == gold[b]).nonzero()[0, 0])
                right += int(score[mask].logsumexp(0).argmax() == answer)
                on += float(score.logsumexp(-1).softmax(0)[mask].sum())
                n += 1
    model.train()
    return {"read_at_target": right / n, "reader_map_on_target": on / n}


def schedule(step: int, steps: int) -> float:
    """The demo's lr multiplier: 5 % linear warm-up, then cosine to 0."""
    warmup = max(1, int(0.05 * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


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
    parser.add_argument("--vif-lr", type=float, default=3e-3, help="the VIF module's lr [3e-3, the demo's]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path("looking_runs.jsonl"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0, help="VIF-only steps (LLM frozen) first")
    parser.add_argument("--eval-every", type=int, default=0, help="score every N steps as well")
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
    has_map = args.arm != "control"
    evals = []

    def train_steps(steps: int, optimiser, params: list, seed: int, log_key: str) -> list[dict]:
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < steps * args.batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        lrs, history = [g["lr"] for g in optimiser.param_groups], []
        for step in range(steps):
            for group, lr in zip(optimiser.param_groups, lrs):
                group["lr"] = lr * schedule(step, steps)
            batch = collate([train[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]])
            out = top(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            if (step + 1) % 50 == 0:
                record = {log_key: step + 1, "loss": round(float(out.loss.detach()), 4)}
                parts = getattr(out, "vif", None)
                for key in ("lm_loss", "kl", "evidence", "entropy", "mean_sigma"):
                    value = getattr(parts, key, None)
                    if value is not None:
                        record[key] = round(float(value), 4)
                history.append(record)
                print(json.dumps(record), flush=True)
            last = step + 1 == steps  # the final scores follow the loop
            if log_key == "step" and args.eval_every and (step + 1) % args.eval_every == 0 and not last:
                scores = evaluate(top, test, collate, vision.image_size, vision.patch_size, has_map)
                evals.append({"step": step + 1, **scores})
                print(
                    json.dumps(
                        {
                            "step": step + 1,
                            "accuracy": scores["accuracy"],
                            "on_target": scores.get("on_target"),
                        }
                    )
                )
        for group, lr in zip(optimiser.param_groups, lrs):
            group["lr"] = lr
        return history

    history = []
    if args.warmup and vif_params:
        # The VIF module alone first (the LLM frozen), with its own optimiser and schedule.
        llm = groups[0]["params"]
        for p in llm:
            p.requires_grad_(False)
        alone = torch.optim.AdamW([{"params": vif_params, "lr": groups[-1]["lr"]}], weight_decay=0.0)
        history += train_steps(args.warmup, alone, vif_params, args.seed + 1000, "warmup")
        for p in llm:
            p.requires_grad_(True)
    history += train_steps(args.steps, optimiser, [p for g in groups for p in g["params"]], args.seed, "step")

    scores = evaluate(top, test, collate, vision.image_size, vision.patch_size, has_map)
    if has_map and getattr(top.vif_module, "evidence", None) is not None:
        scores["reader"] = reader_probe(top, test, collate, processor, vision.image_size, vision.patch_size)
    result = {
        "tag": args.tag,
        "arm": args.arm,
        "vif": args.vif,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "lr": args.lr,
        "vif_lr": args.vif_lr,
        "data": str(args.data),
        "base": str(args.base),
        **scores,
        "seconds": round(time.perf_counter() - started, 1),
        "history": history,
        "evals": evals,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
