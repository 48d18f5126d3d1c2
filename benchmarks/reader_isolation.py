"""Can the answer-evidence reader learn to read from question-answer pairs alone? In isolation.

The reader (:class:`vif.attender.EvidenceHead`) is trained on its own, on the frozen vision
encoder's per-token features of a finished ``vif demo`` (its base model and TinyFind data), with
the answer as the only label and a flat map (no locator, no LLM): the demo's batch size, AdamW,
5 % warm-up + cosine, gradients clipped at 1, loss weight 3. Then, on the test split: does it name
the target's colour at the target's tokens (``read``), and how much of its own map (a softmax
over tokens of its log-sum-exp score over the five colours) lies on the target (``map``)? A
supervised reader (the target's tokens labelled, which the method never has) is the reference.

    .venv/bin/python benchmarks/reader_isolation.py --demo demo-out

Prints a table (with the command that made it) and writes ``<demo>/reader_isolation.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from vif.attender import EvidenceHead
from vif.data.llava_format import LlavaFormatDataset
from vif.demo.pipeline import DemoSettings, target_tokens
from vif.loading import load_model

COLOURS = ("blue", "green", "purple", "red", "yellow")


def features(demo: Path, split: str) -> dict[str, torch.Tensor]:
    """``f (N, n_tokens, D)`` the vision encoder's output per image token (the reader's input),
    ``mask (N, n_tokens)`` the target's tokens, ``y (N,)`` the answer's index in COLOURS."""
    settings = DemoSettings.full()
    model, processor = load_model(demo / "models" / "base", device="cpu", dtype="float32")
    records = json.loads((demo / "data" / f"{split}.json").read_text())
    dataset = LlavaFormatDataset(demo / "data" / f"{split}.json", processor=processor)
    config, chunks = model.config, []
    with torch.no_grad():
        for start in range(0, len(dataset), 100):
            pixels = torch.cat(
                [dataset[i]["pixel_values"] for i in range(start, min(start + 100, len(dataset)))]
            )
            hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            chosen = hidden[config.vision_feature_layer]
            chunks.append(chosen[:, 1:] if config.vision_feature_select_strategy == "default" else chosen)
    masks = [target_tokens(r["meta"]["bbox"], settings.image_size, settings.patch_size) for r in records]
    answers = [COLOURS.index(r["conversations"][1]["value"]) for r in records]
    return {"f": torch.cat(chunks), "mask": torch.stack(masks), "y": torch.tensor(answers)}


def train_reader(
    train: dict, reader: str, lr: float, steps: int, batch_size: int = 16, seed: int = 0
) -> EvidenceHead:
    """``reader``: an EvidenceHead reader ("tokens", "logsumexp") with a flat map, or "supervised"."""
    torch.manual_seed(seed)
    width = train["f"].shape[-1]
    head = EvidenceHead(width, width, "tokens" if reader == "supervised" else reader, len(COLOURS), 128)
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    generator, order = torch.Generator().manual_seed(seed), []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(train["y"]), generator=generator).tolist()
    warmup = max(1, int(0.05 * steps))
    for step in range(steps):
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        for group in optimiser.param_groups:
            group["lr"] = lr * scale
        rows = torch.tensor(order[step * batch_size : (step + 1) * batch_size])
        f, y, mask = train["f"][rows], train["y"][rows], train["mask"][rows]
        valid = torch.ones(mask.shape, dtype=torch.bool)
        if reader == "supervised":
            log_p = (head.proj(head.norm(f)) @ head.answers.weight.T).log_softmax(-1)
            picked = log_p.gather(2, y[:, None, None].expand(-1, mask.shape[1], 1)).squeeze(-1)
            loss = -(picked * mask).sum() / mask.sum()
        else:
            flat = valid.float() / valid.shape[1]
            loss = 3.0 * head(flat, f, None, y[:, None], valid)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return head


def score(head: EvidenceHead, test: dict) -> dict:
    with torch.no_grad():
        s = head.proj(head.norm(test["f"])) @ head.answers.weight.T  # (N, n_tokens, 5)
        mask, y = test["mask"], test["y"]
        read = s.masked_fill(~mask[..., None], -1e9).logsumexp(1).argmax(-1) == y
        on = (s.logsumexp(-1).softmax(-1) * mask).sum(-1)
    return {
        "read": float(read.float().mean()),
        "read_by_colour": {c: round(float(read[y == i].float().mean()), 3) for i, c in enumerate(COLOURS)},
        "map": float(on.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("demo-out"), help="a finished `vif demo` folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1500])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, test = features(args.demo, "train"), features(args.demo, "test")
    rows = []
    for reader in ("supervised", "tokens", "logsumexp"):
        for lr in args.lrs:
            for steps in args.steps:
                row = {
                    "reader": reader,
                    "lr": lr,
                    "steps": steps,
                    **score(train_reader(train, reader, lr, steps), test),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    command = shlex.join(["python", *sys.argv])
    print(f"# {command}")
    print("| reader (flat map, answers only) | lr | steps | reads the target's colour | its map on target |")
    print("|---|---|---|---|---|")
    for row in rows:
        name = "supervised (target tokens labelled)" if row["reader"] == "supervised" else row["reader"]
        print(
            f"| {name} | {row['lr']:g} | {row['steps']} | {100 * row['read']:.1f} % | {100 * row['map']:.1f} % |"
        )
    (args.demo / "reader_isolation.json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
