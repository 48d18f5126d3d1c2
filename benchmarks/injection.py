"""Cost of VIF's injection: base vs fused vs materialised, as ratios measured in one run.

Two parts:

1. **model** - a scaled-down LLaVA (CLIP-style tower, 24 x 24 = 576 image tokens, a
   Llama LLM of ``--hidden`` width and ``--layers`` depth, the paper preset's pairs
   scaled to that depth): prefill latency, per-token decode latency (greedy, KV cache)
   and peak memory, for the plain model, VIF fused and VIF materialised.
2. **attention** - one attention call at LLaVA-1.5-7B layer shapes (32 heads x 128,
   576 image tokens in a ``--seq``-token prompt): SDPA alone, SDPA + the fused
   closed form, and the materialised reference; prefill and a single decode row.

Each configuration runs in its own subprocess so peak memory (CUDA allocator peak,
or the process's max RSS on CPU) belongs to that configuration alone.

    python benchmarks/injection.py                 # CPU, prints a table, writes bench-out/injection.json
    python benchmarks/injection.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import run_worker

# "attender" runs the VIF module but injects nothing (alpha = 0): the method's own cost,
# separated from the cost of injecting.
ROUTES = ("base", "attender", "fused", "materialised")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- part 1
def model_worker(route: str, args: argparse.Namespace) -> dict:
    import vif
    from vif.testing import llava_batch, tiny_llava

    dtype = getattr(torch, args.dtype)
    model = tiny_llava(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 64,
        image_size=96,
        patch_size=4,  # 24 x 24 = 576 image tokens, LLaVA-1.5's grid
        vocab_size=1000,
    ).to(device=args.device, dtype=dtype)
    batch = llava_batch(model, [(1, args.text_tokens // 2, args.text_tokens // 2)] * args.batch)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    runner = model
    if route == "attender":
        runner = vif.attach(model, vif.VIFConfig.preset(args.preset, model, alpha=0.0))
    elif route != "base":
        runner = vif.attach(model, vif.VIFConfig.preset(args.preset, model, injection=route))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    new_tokens = args.new_tokens
    gen = dict(do_sample=False, pad_token_id=0, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.no_grad():
        prefill = timed(lambda: runner(**batch), args.device, args.repeats)
        one = timed(
            lambda: runner.generate(**batch, **{**gen, "min_new_tokens": 1, "max_new_tokens": 1}),
            args.device,
            args.repeats,
        )
        full = timed(lambda: runner.generate(**batch, **gen), args.device, args.repeats)
    return {
        "prefill_ms": prefill,
        "decode_ms_per_token": (full - one) / (new_tokens - 1),
        "peak_mb": peak_memory_mb(args.device),
        "seq_len": int(batch["input_ids"].shape[1]),
    }


# ----------------------------------------------------------------------------- part 2
def attention_worker(route: str, args: argparse.Namespace) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vif.injection import InjectionPlan, fused_correction, materialised_attention

    dtype = getattr(torch, args.dtype)
    heads, dim, n_vis, seq, batch = 32, 128, 576, args.seq, args.batch
    start = 8  # a short system prompt before the image, as in LLaVA-1.5's template

    class Attention(torch.nn.Module):
        num_key_value_groups = 1
        is_causal = True

    module = Attention()
    g = torch.Generator(device=args.device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=args.device, dtype=dtype)

    pi = torch.softmax(torch.randn(batch, n_vis, generator=g, device=args.device), -1)
    positions = torch.arange(start, start + n_vis, device=args.device)[None].repeat(batch, 1)

    def plan_for(q_len: int, kv_len: int) -> InjectionPlan:
        rows = torch.arange(kv_len - q_len, kv_len, device=args.device)[None].repeat(batch, 1)
        inject = (rows < start) | (rows >= start + n_vis)
        return InjectionPlan(pi, positions, rows, inject, 0.5, span=(start, start + n_vis))

    def call(q_len: int):
        query, key, value = (
            rand(batch, heads, q_len, dim),
            rand(batch, heads, seq, dim),
            rand(batch, heads, seq, dim),
        )
        plan = plan_for(q_len, seq)
        if route == "base":
            return lambda: sdpa_attention_forward(module, query, key, value, None, scaling=dim**-0.5)
        if route == "fused":
            return lambda: fused_correction(
                sdpa_attention_forward(module, query, key, value, None, scaling=dim**-0.5)[0], value, plan
            )
        return lambda: materialised_attention(module, query, key, value, None, plan, scaling=dim**-0.5)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        prefill = timed(call(seq), args.device, args.repeats)
        decode = timed(call(1), args.device, args.repeats * 5)
    return {
        "prefill_ms": prefill,
        "decode_ms": decode,
        "peak_mb": peak_memory_mb(args.device),
        "seq_len": seq,
    }


# ----------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=512, help="LLM width of the scaled-down model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seq", type=int, default=672, help="prompt length for the 7B attention shapes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-out/injection.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())

    if args.worker:
        part, route = args.worker.split(":")
        result = (model_worker if part == "model" else attention_worker)(route, args)
        print(json.dumps(result))
        return

    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: dict[str, dict[str, dict]] = {"model": {}, "attention": {}}
    from tqdm import tqdm

    jobs = [
        (part, route) for part in results for route in ROUTES if (part, route) != ("attention", "attender")
    ]
    for part, route in tqdm(jobs, desc="benchmark", unit="run"):
        results[part][route] = run_worker(__file__, forwarded, f"{part}:{route}")

    def ratio(part: str, key: str, route: str) -> float:
        return results[part][route][key] / results[part]["base"][key]

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nVIF injection cost on {device}, {args.dtype}; ratios are route / base, same run\n")
    m = results["model"]
    print(
        f"model: scaled-down LLaVA, hidden {args.hidden}, {args.layers} layers, seq {m['base']['seq_len']}, "
        f"batch {args.batch}, preset {args.preset}"
    )
    header = f"{'route':<14}{'prefill ms':>12}{'x':>7}{'decode ms/tok':>15}{'x':>7}{'peak MB':>10}{'x':>7}"
    print(header)
    for route in ROUTES:
        r = m[route]
        print(
            f"{route:<14}{r['prefill_ms']:>12.2f}{ratio('model', 'prefill_ms', route):>7.2f}"
            f"{r['decode_ms_per_token']:>15.2f}{ratio('model', 'decode_ms_per_token', route):>7.2f}"
            f"{r['peak_mb']:>10.0f}{ratio('model', 'peak_mb', route):>7.2f}"
        )
    a = results["attention"]
    print(
        f"\nattention alone: LLaVA-1.5-7B layer shapes (32 x 128), prompt {args.seq} incl. 576 image tokens"
    )
    print(f"{'route':<14}{'prefill ms':>12}{'x':>7}{'decode ms':>12}{'x':>7}{'peak MB':>10}{'x':>7}")
    for route in ("base", "fused", "materialised"):
        r = a[route]
        print(
            f"{route:<14}{r['prefill_ms']:>12.3f}{ratio('attention', 'prefill_ms', route):>7.2f}"
            f"{r['decode_ms']:>12.3f}{ratio('attention', 'decode_ms', route):>7.2f}"
            f"{r['peak_mb']:>10.0f}{ratio('attention', 'peak_mb', route):>7.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
