"""Cost of training with VIF: base vs base + VIF (fused) vs base + VIF (materialised), one run.

One training step = forward with labels, backward, AdamW step, on a scaled-down LLaVA
(CLIP-style tower, 24 x 24 = 576 image tokens per image, a Llama LLM of ``--hidden``
width and ``--layers`` depth, the VIF preset's pairs scaled to that depth). Parameters
are frozen / grouped by the same code ``vif train`` uses (:mod:`vif.training.parts`):
``--mode full`` trains the LLM + projector (+ VIF), ``--mode lora`` LoRA r=128 on the LLM (+ VIF).

Each run is its own subprocess, so its peak memory is its own; ``--rounds`` runs per route are
interleaved, and the table gives the fastest step (least disturbed on a shared machine) and the
median. Memory:
CUDA - ``torch.cuda.max_memory_allocated`` over the timed steps; CPU - the process's
peak resident set (VmHWM) minus its resident set just before the first step, i.e. what
the steps themselves added (activations, gradients, optimiser state).

    python benchmarks/train_step.py                      # CPU; prints a table, writes bench-out/train_step.json
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --hidden 1024 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import run_worker

ROUTES = ("base", "fused", "materialised")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(route: str, args: argparse.Namespace) -> dict:
    from vif.testing import llava_batch, tiny_llava
    from vif.training.parts import build_training_model, count_parameters, parameter_groups
    from vif.training.recipe import Recipe

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = tiny_llava(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        num_kv_heads=max(1, args.hidden // 64),
        image_size=96,
        patch_size=4,  # 24 x 24 = 576 image tokens, LLaVA-1.5's grid
        vocab_size=1000,
    ).to(device=args.device, dtype=dtype)
    vif_spec = None if route == "base" else {"preset": args.preset, "injection": route}
    recipe = Recipe.from_dict(
        {
            "model": "benchmark",
            "data": {"json": "benchmark"},
            "vif": vif_spec,
            "trainable": {"mode": args.mode},
            "activation_checkpointing": args.checkpointing,
        }
    )
    parts = build_training_model(recipe, model)
    runner = parts.top.train()
    groups = parameter_groups(runner, 1e-5, 1e-5, 1e-5, 0.0)
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    batch = llava_batch(
        model,
        [(1, args.text_tokens // 2, args.text_tokens // 2)] * args.batch,
        with_labels=True,
        answer_len=args.text_tokens // 4,
    )
    batch = {k: v.to(args.device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)

    def step() -> None:
        loss = runner(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = rss_mb("VmRSS")
    step()  # warm-up; also allocates the optimiser state
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        step()
        sync(args.device)
        times.append((time.perf_counter() - start) * 1e3)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb("VmHWM") - before
    counts = count_parameters(runner)
    return {
        "step_ms": statistics.median(times),
        "step_ms_all": times,
        "peak_mb": peak,
        "trainable_params": counts["trainable"],
        "vif_params": counts["vif"],
        "seq_len": int(batch["input_ids"].shape[1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=256, help="LLM width of the scaled-down model")
    parser.add_argument(
        "--layers", type=int, default=32, help="32 = LLaVA-1.5-7B depth: VIF blocks vs LLM layers as at 7B"
    )
    parser.add_argument("--preset", default="paper", choices=["paper", "compact"])
    parser.add_argument("--mode", default="full", choices=["full", "lora"])
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per run (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per route, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", default="bench-out/train_step.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    forwarded = list(argv if argv is not None else sys.argv[1:])
    from tqdm import tqdm

    # Rounds interleave the routes (rotating their order), so load from other processes on a shared
    # machine hits all of them alike; each run is still its own process (its own peak memory).
    runs: dict[str, list[dict]] = {route: [] for route in ROUTES}
    jobs = [ROUTES[(i + r) % len(ROUTES)] for r in range(args.rounds) for i in range(len(ROUTES))]
    for route in tqdm(jobs, desc="benchmark", unit="run"):
        runs[route].append(run_worker(__file__, forwarded, route))
    results = {}
    for route, done in runs.items():
        steps = [t for run in done for t in run["step_ms_all"]]
        results[route] = {
            **done[0],
            "step_ms": min(steps),  # best of all steps: the least disturbed by other load
            "step_ms_median": statistics.median(steps),
            "step_ms_all": steps,
            "peak_mb": statistics.median(run["peak_mb"] for run in done),
        }
    base = results["base"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    memory = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS added by the steps"
    print(f"\nVIF training-step cost on {device}, {args.dtype}; ratios are route / base, same run")
    print(
        f"scaled-down LLaVA: hidden {args.hidden}, {args.layers} layers, seq {base['seq_len']} "
        f"(576 image tokens), batch {args.batch}, mode {args.mode}, preset {args.preset}, "
        f"checkpointing {'on' if args.checkpointing else 'off'}; memory = {memory}\n"
    )
    print(
        f"{'route':<14}{'step ms':>10}{'x':>7}{'median ms':>11}{'x':>7}{'peak MB':>10}{'x':>7}"
        f"{'trainable':>12}{'VIF params':>12}"
    )
    for route in ROUTES:
        r = results[route]
        print(
            f"{route:<14}{r['step_ms']:>10.1f}{r['step_ms'] / base['step_ms']:>7.2f}"
            f"{r['step_ms_median']:>11.1f}{r['step_ms_median'] / base['step_ms_median']:>7.2f}"
            f"{r['peak_mb']:>10.0f}{r['peak_mb'] / base['peak_mb']:>7.2f}"
            f"{r['trainable_params']:>12,}{r['vif_params']:>12,}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
