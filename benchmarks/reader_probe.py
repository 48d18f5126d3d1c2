"""What the trained answer-evidence reader reads, per answer colour, on a finished ``vif demo``.

For each test question of the demo's TinyFind split, with the inference inputs (the question
only): does the reader read the right colour at the target's tokens (its most confident target
token), is its most confident token in the image on the target, and is that token's colour right;
beside it, the share of the map on the target. Colours are scored among the five answers.

    .venv/bin/python benchmarks/reader_probe.py --demo demo-out --arm vif-seed0
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from vif.data.llava_format import LlavaFormatDataset, VIFCollator
from vif.demo.pipeline import DemoSettings, target_tokens
from vif.loading import load_model

COLOURS = ("blue", "green", "purple", "red", "yellow")


def probe(demo: Path, arm: str, batch_size: int = 50) -> dict[str, dict[str, float]]:
    settings = DemoSettings.full()
    folder = demo / "models" / arm
    model, processor = load_model(folder, device="cpu", dtype="float32", adapter=folder / "vif")
    if model.vif_module.evidence is None or model.vif_module.evidence.answers is None:
        raise SystemExit(f"{arm}: no evidence reader with its own answer embeddings to probe")
    if "encoder" not in model.config_vif.token_sources:
        raise SystemExit(f"{arm}: the reader does not read the vision encoder's features")
    test = demo / "data" / "test.json"
    dataset = LlavaFormatDataset(test, processor=processor)
    collate = VIFCollator(processor, return_boxes=True)
    records = {r["id"]: r for r in json.loads(test.read_text())}
    ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(c) for c in COLOURS])
    head = model.vif_module.evidence
    counts = {
        c: {"n": 0, "right_at_target": 0, "top_on_target": 0, "top_right": 0, "map_on": 0.0} for c in COLOURS
    }
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate(items)
            batch.pop("vif_boxes")
            pi = torch.stack(list(model(**batch).vif.importance.values())).mean(0)
            encoder = model._runtime.encoder  # (n_image_tokens, Dv): one image per sample here
            features = encoder.reshape(len(items), -1, encoder.shape[-1])
            # the reader's output per token (its last layer too, not only its hidden features)
            p = (head.proj(head.norm(features)) @ head.answers.weight[ids].T).softmax(-1)  # (B, N, 5)
            for b, item in enumerate(items):
                record = records[item["id"]]
                answer = COLOURS.index(record["conversations"][1]["value"])
                mask = target_tokens(record["meta"]["bbox"], settings.image_size, settings.patch_size)
                probs = p[b, : mask.numel()]
                at_target = probs[mask]
                top = probs.max(-1).values.argmax()
                c = counts[COLOURS[answer]]
                c["n"] += 1
                c["right_at_target"] += int(at_target[at_target.max(-1).values.argmax()].argmax() == answer)
                c["top_on_target"] += int(mask[top])
                c["top_right"] += int(probs[top].argmax() == answer)
                c["map_on"] += float(pi[b, : mask.numel()][mask].sum())
    return {
        colour: {k: (100 * v / c["n"]) for k, v in c.items() if k != "n"} | {"n": c["n"]}
        for colour, c in counts.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("demo-out"))
    parser.add_argument("--arm", nargs="+", default=["vif-seed0"], help="model folders under <demo>/models")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# {shlex.join(['python', *sys.argv])}")
    print(
        "| arm | colour | reader right at the target | its most sure token on the target | that token's colour right | map on target |"
    )
    print("|---|---|---|---|---|---|")
    results = {}
    for arm in args.arm:
        results[arm] = probe(args.demo, arm)
        for colour, r in results[arm].items():
            print(
                f"| {arm} | {colour} | {r['right_at_target']:.1f} % | {r['top_on_target']:.1f} % | "
                f"{r['top_right']:.1f} % | {r['map_on']:.1f} % |"
            )
    (args.demo / "reader_probe.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
