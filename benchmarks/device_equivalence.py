"""Fused vs materialised vs base on an accelerator: max differences, fp32 and bf16.

The test suite proves equivalence on CPU in fp32; this repeats the core checks on
whatever device is given (SDPA there dispatches to different kernels).

    python benchmarks/device_equivalence.py --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import vif
from vif.testing import llava_batch, tiny_llava

MIXED = [(1, 3, 6), (0, 5, 7), (2, 2, 4)]


def check(device: str, dtype: torch.dtype) -> dict:
    model = tiny_llava(hidden_size=128, num_heads=4, num_kv_heads=2).to(device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in llava_batch(model, MIXED, with_labels=True).items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        base = model(**batch).logits
    vmodel = vif.attach(model, vif.VIFConfig.preset("paper", model))
    result = {}
    with torch.no_grad():
        fused = vmodel(**batch).logits
        vmodel.config_vif.injection = "materialised"
        materialised = vmodel(**batch).logits
        vmodel.config_vif.injection = "fused"
        with vmodel.disabled():
            disabled = vmodel(**batch).logits
    result["fused_vs_materialised_max_abs"] = (fused - materialised)[real].abs().max().item()
    result["disabled_equals_base"] = bool(torch.equal(disabled, base))
    result["vif_changes_logits_max_abs"] = (fused - base)[real].abs().max().item()

    vmodel.train()
    grads = {}
    for path in ("fused", "materialised"):
        vmodel.config_vif.injection = path
        vmodel.zero_grad()
        torch.manual_seed(0)
        vmodel(**batch).loss.float().backward()
        grads[path] = torch.cat(
            [p.grad.flatten().float() for p in vmodel.vif_module.parameters() if p.grad is not None]
        )
    scale = grads["materialised"].abs().max().item()
    result["grad_max_abs_diff_relative"] = (grads["fused"] - grads["materialised"]).abs().max().item() / scale
    vmodel.eval()
    vmodel.config_vif.injection = "fused"
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = vmodel.generate(**unlabelled, use_cache=True, **kwargs)
    uncached = vmodel.generate(**unlabelled, use_cache=False, **kwargs)
    result["generate_cache_equals_no_cache"] = bool(torch.equal(cached, uncached))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench-out/device_equivalence.json")
    args = parser.parse_args()
    results = {name: check(args.device, getattr(torch, name)) for name in ("float32", "bfloat16")}
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
