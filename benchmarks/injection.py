"""Cost of VIF's injection: ratios to the base model, measured in one run.

Every figure is a ratio of VIF (fused injection) to the base, timed in the same process
in interleaved rounds (base, VIF, VIF, base, ...), so load from other processes hits
both alike; the ratio reported is the median over rounds of the per-round ratio, with
its smallest and largest value as the noise. Outputs are checked against the
materialised reference before anything is timed.

Parts (``--part``, several allowed):

* ``layer`` - one attention call at 7B layer shapes (LLaVA-1.5-7B: 32 heads x 128, no
  GQA; Qwen2.5-7B: 28 query heads on 4 KV heads, with one sample left-padded when the
  batch has two or more), 576 image tokens at slot 35 of an ``S``-token prompt: base
  SDPA vs ``vif_sdpa`` (SDPA + the fused closed form), prefill (``S`` rows) and one
  decode row (the prompt's image sum kept from the prefill, as in generation).
* ``memory`` - peak memory of one prefill attention call, base vs VIF, each in its own
  process (CUDA allocator peak, or the growth of the process's max RSS on CPU).
* ``model`` - a LLaVA-shaped model (tiny vision tower, 24 x 24 = 576 image tokens at
  slot 35, Llama LLM of ``--hidden`` x ``--layers``): prefill (last-token logits, as
  ``generate`` does) and per-token decode with the KV cache, base vs VIF per preset;
  with ``--attender``, also VIF at ``alpha = 0`` (the attender runs, nothing is
  injected), which splits the prefill cost into attender and injection.

    python benchmarks/injection.py --part layer memory model              # CPU, fp32, one thread
    python benchmarks/injection.py --part model --hidden 4096 --layers 8 --extract 3 --inject 7 \\
        --vocab 32000 --seq 640 --batch 1                                 # a 7B-like slice
    python benchmarks/injection.py --device cuda --dtype bfloat16 --cuda-graphs  # see injection_gpu.sh

On CUDA each sample is the throughput of ``--inner`` back-to-back calls between two
CUDA events (not call-by-call wall time), optionally replayed from a CUDA graph
(``--cuda-graphs``, layer part). Results: a table (with the command
that made it) and JSON records with ``part``, ``preset``, ``phase``, ``batch``, ``seq``,
``device``, ``dtype``, ``ratio`` (VIF over base, median), written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _common import run_worker

# (query heads, KV heads, head dim) of the language models VIF targets.
LAYER_SHAPES = {"llava-7b": (32, 32, 128), "qwen2.5-7b": (28, 4, 128)}
N_VISION, IMAGE_START, PAD = 576, 35, 16


# ----------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], device: str, inner: int) -> tuple[float, float]:
    """``(wall, cpu)`` seconds per call over ``inner`` back-to-back calls (CUDA events on a GPU).

    ``cpu`` is this process's CPU time: on a shared machine other processes delay the
    wall clock of a call, not the work it does (cache and memory-bandwidth contention
    still show). On a GPU both are the CUDA-event time.
    """
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) / 1e3 / inner
        return t, t
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner, (time.process_time() - cpu) / inner


CLOCK = {"wall": 0, "cpu": 1}


def interleaved(
    variants: dict[str, Callable[[], object]], device: str, rounds: int, inner: int
) -> dict[str, list[tuple[float, float]]]:
    """Seconds per call of each variant, one sample per round; the order flips every round."""
    names = list(variants)
    for name in names:  # warm-up (and, for VIF, the prompt's image sums)
        variants[name]()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(seconds_per_call(variants[name], device, inner))
    return times


def summary(times: dict[str, list[tuple[float, float]]], name: str, clock: str, base: str = "base") -> dict:
    """Median over rounds of the per-round ratio ``name / base`` on ``clock``, its range, and both clocks' medians."""
    out = {"clock": clock}
    for which, i in CLOCK.items():
        ratios = [t[i] / b[i] for t, b in zip(times[name], times[base])]
        suffix = "" if which == clock else f"_{which}"
        out[f"ratio{suffix}"] = statistics.median(ratios)
        out[f"ratio_min{suffix}"] = min(ratios)
        out[f"ratio_max{suffix}"] = max(ratios)
        out[f"base_ms{suffix}"] = statistics.median(t[i] for t in times[base]) * 1e3
        out[f"vif_ms{suffix}"] = statistics.median(t[i] for t in times[name]) * 1e3
    return out


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once into a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ----------------------------------------------------------------------------- layer part
class Source:
    """The part of the VIF runtime the attention function talks to: hands out one plan."""

    materialised = False

    def __init__(self, plan_for: Callable[[], object]) -> None:
        self.make = plan_for

    def plan_for(self, layer_idx: int, q_len: int, kv_len: int):
        return self.make()


class Attention(torch.nn.Module):
    """Only the attributes the attention functions read."""

    is_causal = True
    layer_idx = 0

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.eval()


def layer_case(shape: str, batch: int, seq: int, q_len: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Inputs of one attention call and the plan the runtime would build for them.

    Sample 0 is left-padded by ``PAD`` slots for the Qwen shape when ``batch > 1``.
    """
    from vif.injection import ImageSum, InjectionPlan

    hq, hkv, dim = LAYER_SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(seed)
    query = torch.randn(batch, hq, q_len, dim, generator=g, device=device, dtype=dtype)
    key = torch.randn(batch, hkv, seq, dim, generator=g, device=device, dtype=dtype)
    value = torch.randn(batch, hkv, seq, dim, generator=g, device=device, dtype=dtype)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    if shape == "qwen2.5-7b" and batch > 1:
        pad[0] = PAD
    slot = torch.arange(seq, device=device)
    real = slot[None, :] >= pad[:, None]  # (B, S) key / row validity
    mask = None
    rows = slot[seq - q_len :][None].expand(batch, -1)
    if bool(pad.any()):
        causal = slot[None, :] <= rows[0][:, None]  # (q, S)
        own = slot[None, :] == rows[0][:, None]  # padding rows attend to themselves (no NaN)
        mask = ((causal[None] & real[:, None, :]) | own[None])[:, None]  # (B, 1, q, S)
    positions = IMAGE_START + pad[:, None] + torch.arange(N_VISION, device=device)[None]
    pi = torch.softmax(torch.randn(batch, N_VISION, generator=g, device=device), -1)
    image = (rows >= positions[:, :1]) & (rows < positions[:, :1] + N_VISION)
    inject = real.gather(1, rows) & ~image
    span = (IMAGE_START, IMAGE_START + N_VISION + int(pad.max()))
    first_after = IMAGE_START + N_VISION + int(pad.min())  # as build_layout finds it
    state = ImageSum()

    def plan():
        return InjectionPlan(pi, positions, rows, inject, 0.5, span, (0, 0), state, first_after)

    return query, key, value, mask, plan, hq // hkv


def layer_part(args: argparse.Namespace, device_name: str) -> list[dict]:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vif.injection import PLAN_ATTRIBUTE, register_attention_functions

    register_attention_functions()
    vif_sdpa = AttentionInterface._global_mapping["vif_sdpa"]
    dtype = getattr(torch, args.dtype)
    records = []
    for shape in args.shapes:
        for seq in args.seq:
            for batch in args.layer_batch:
                for phase in ("prefill", "decode"):
                    q_len = seq if phase == "prefill" else 1
                    query, key, value, mask, plan, groups = layer_case(
                        shape, batch, seq, q_len, args.device, dtype
                    )
                    base_module, vif_module = Attention(groups), Attention(groups)
                    setattr(vif_module, PLAN_ATTRIBUTE, Source(plan))
                    scaling = query.shape[-1] ** -0.5

                    def base(module=base_module, q=query, k=key, v=value, m=mask, s=scaling):
                        return sdpa_attention_forward(module, q, k, v, m, scaling=s)[0]

                    def vif(module=vif_module, q=query, k=key, v=value, m=mask, s=scaling):
                        return vif_sdpa(module, q, k, v, m, scaling=s)[0]

                    with torch.no_grad():
                        error = check_layer(vif, base_module, query, key, value, mask, plan(), scaling, dtype)
                        variants = {"base": base, "vif": vif}
                        if args.cuda_graphs and args.device.startswith("cuda"):
                            vif()  # fills the kept image sum before capture
                            variants = {name: graphed(fn) for name, fn in variants.items()}
                        inner = args.inner if phase == "decode" or args.device.startswith("cuda") else 1
                        times = interleaved(variants, args.device, args.rounds, inner)
                        epilogue = epilogue_ms(
                            args, query, key, value, mask, base_module, plan, scaling, inner
                        )
                    records.append(
                        {
                            "part": "layer",
                            "preset": None,
                            "phase": phase,
                            "batch": batch,
                            "seq": seq,
                            "shape": shape,
                            "device": device_name,
                            "dtype": args.dtype,
                            "cuda_graphs": bool(args.cuda_graphs and args.device.startswith("cuda")),
                            "max_abs_error": error,
                            **summary(times, "vif", args.clock),
                            "epilogue_ms": epilogue,
                        }
                    )
                    # The injection's own work, timed alone: a low-noise estimate of the same ratio.
                    records[-1]["ratio_marginal"] = 1.0 + epilogue / records[-1]["base_ms"]
                    print_record(records[-1])
                    del query, key, value, mask
    return records


def epilogue_ms(args, query, key, value, mask, module, plan, scaling, inner) -> float:
    """Median time of the fused correction alone (on a fixed base output), in ms, on the chosen clock."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vif.injection import fused_correction

    out = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]

    def correction():
        return fused_correction(out, value, plan(), inplace=True)

    correction()
    samples = [
        seconds_per_call(correction, args.device, max(inner, 5))[CLOCK[args.clock]]
        for _ in range(args.rounds)
    ]
    return statistics.median(samples) * 1e3


def check_layer(vif, module, query, key, value, mask, plan, scaling, dtype) -> float:
    """Max |fused - materialised| on the first and last sample (the padded and an unpadded one)."""
    from vif.injection import InjectionPlan, materialised_attention

    out = vif()
    error = 0.0
    for b in sorted({0, query.shape[0] - 1}):
        one = slice(b, b + 1)
        sample_plan = InjectionPlan(
            plan.pi[one],
            plan.positions[one],
            plan.rows[one],
            plan.inject[one],
            plan.alpha,
            plan.span,
            plan.window,
        )
        m = None if mask is None else mask[one]
        reference, _ = materialised_attention(
            module, query[one].float(), key[one].float(), value[one].float(), m, sample_plan, scaling=scaling
        )
        error = max(error, (out[one].float() - reference).abs().max().item())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if not error <= tolerance:
        raise AssertionError(f"fused output differs from the materialised reference by {error:.2e}")
    return error


# ----------------------------------------------------------------------------- memory part
def memory_worker(route: str, args: argparse.Namespace) -> dict:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vif.injection import PLAN_ATTRIBUTE, register_attention_functions

    register_attention_functions()
    dtype = getattr(torch, args.dtype)
    shape, batch, seq = args.shapes[0], args.memory_batch, args.memory_seq
    query, key, value, mask, plan, groups = layer_case(shape, batch, seq, seq, args.device, dtype)
    module = Attention(groups)
    fn = sdpa_attention_forward
    if route == "vif":
        setattr(module, PLAN_ATTRIBUTE, Source(plan))
        fn = AttentionInterface._global_mapping["vif_sdpa"]
    with torch.no_grad():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn(module, query, key, value, mask, scaling=query.shape[-1] ** -0.5)[0]
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            before = rss_bytes()
            out = fn(module, query, key, value, mask, scaling=query.shape[-1] ** -0.5)[0]
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    inputs = sum(t.numel() * t.element_size() for t in (query, key, value))
    return {
        "peak_over_inputs_mb": (peak - before) / 2**20,
        "inputs_mb": inputs / 2**20,
        "out_shape": list(out.shape),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_part(args: argparse.Namespace, device_name: str, argv: list[str]) -> list[dict]:
    results = {route: run_worker(__file__, argv, f"memory:{route}") for route in ("base", "vif")}
    base, vif = results["base"], results["vif"]
    # The layer's footprint: its inputs (q, k, v) plus what the call adds on top of them.
    total = {r: results[r]["inputs_mb"] + results[r]["peak_over_inputs_mb"] for r in results}
    record = {
        "part": "layer",
        "preset": None,
        "phase": "prefill",
        "metric": "peak_memory",
        "batch": args.memory_batch,
        "seq": args.memory_seq,
        "shape": args.shapes[0],
        "device": device_name,
        "dtype": args.dtype,
        "ratio": total["vif"] / total["base"],
        "base_mb": total["base"],
        "vif_mb": total["vif"],
        "base_added_mb": base["peak_over_inputs_mb"],
        "vif_added_mb": vif["peak_over_inputs_mb"],
    }
    print_record(record)
    return [record]


# ----------------------------------------------------------------------------- model part
@contextlib.contextmanager
def built_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Creates modules directly on ``device`` in ``dtype`` (a 7B model is not built in fp32 on the host first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(args: argparse.Namespace, dtype: torch.dtype):
    from vif.testing import tiny_llava

    heads = max(1, args.hidden // 128)
    with built_on(args.device, dtype):
        model = tiny_llava(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=heads,
            num_kv_heads=heads,
            intermediate_size=args.intermediate or (args.hidden * 11008) // 4096,
            vocab_size=args.vocab,
            image_size=96,
            patch_size=4,  # 24 x 24 = 576 image tokens, LLaVA-1.5's grid
        )
    return model.to(device=args.device, dtype=dtype)


def model_batch(model, batch: int, seq: int, device: str, dtype: torch.dtype) -> dict:
    """``batch`` prompts of ``seq`` tokens (image at slot 35); sample 0 shorter by PAD when batch > 1."""
    from vif.testing import llava_batch

    samples = [
        (1, IMAGE_START, seq - IMAGE_START - N_VISION - (PAD if b == 0 and batch > 1 else 0))
        for b in range(batch)
    ]
    inputs = llava_batch(model, samples, padding_side="left")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def model_part(args: argparse.Namespace, device_name: str) -> list[dict]:
    from transformers.cache_utils import DynamicCache

    import vif

    dtype = getattr(torch, args.dtype)
    model = build_model(args, dtype)
    records = []
    for preset in args.preset:
        overrides = {}
        if args.extract is not None:
            overrides = {"extract_layers": args.extract, "inject_layers": args.inject}
        config = vif.VIFConfig.preset(preset, model, use_posterior=False, **overrides)  # inference only
        with built_on(args.device, dtype):
            vmodel = vif.attach(model, config)
        vmodel.eval()

        def switch(on: bool, vmodel=vmodel) -> None:
            attached = getattr(model, "_vif_attached", False)
            if on and not attached:
                vmodel._install()
            elif not on and attached:
                vmodel.detach()

        for seq in args.seq:
            for batch in args.batch:
                inputs = model_batch(model, batch, seq, args.device, dtype)
                step = torch.full((batch, 1), 7, device=args.device)

                def prefill(on: bool, alpha: float = config.alpha, inputs=inputs, vmodel=vmodel):
                    switch(on)
                    vmodel.config_vif.alpha = alpha
                    cache = DynamicCache()
                    run = vmodel if on else model
                    return run(**inputs, cache=cache, logits_to_keep=1), cache

                def decode_steps(on: bool, cache, inputs=inputs, step=step, vmodel=vmodel) -> list[float]:
                    switch(on)
                    run = vmodel if on else model
                    mask = inputs["attention_mask"]
                    times = []
                    for _ in range(args.new_tokens):
                        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                        times.append(
                            seconds_per_call(
                                lambda mask=mask: run(
                                    input_ids=step, attention_mask=mask, cache=cache, logits_to_keep=1
                                ),
                                args.device,
                                1,
                            )
                        )
                    return times

                prefill_variants = {"base": False, "vif": True}
                if args.attender:
                    prefill_variants["attender"] = True
                with torch.no_grad():
                    check_model(vmodel, model, inputs, switch)
                    times = {name: [] for name in prefill_variants}
                    decode = {"base": [], "vif": []}
                    for name, on in prefill_variants.items():  # warm-up
                        prefill(on, 0.0 if name == "attender" else config.alpha)
                    for r in range(args.model_rounds):
                        names = list(prefill_variants)
                        for name in names if r % 2 == 0 else names[::-1]:
                            on = prefill_variants[name]
                            alpha = 0.0 if name == "attender" else config.alpha
                            held = {}
                            times[name].append(
                                seconds_per_call(
                                    lambda on=on, alpha=alpha, held=held: held.update(
                                        cache=prefill(on, alpha)[1]
                                    ),
                                    args.device,
                                    1,
                                )
                            )
                            if name in decode:
                                steps = decode_steps(on, held["cache"])
                                decode[name].append(
                                    tuple(statistics.median(t[i] for t in steps) for i in (0, 1))
                                )
                    vmodel.config_vif.alpha = config.alpha
                for phase, table in (("prefill", times), ("decode", decode)):
                    record = {
                        "part": "model",
                        "preset": preset,
                        "phase": phase,
                        "batch": batch,
                        "seq": seq,
                        "hidden": args.hidden,
                        "layers": args.layers,
                        "pairs": [list(p) for p in config.pairs],
                        "device": device_name,
                        "dtype": args.dtype,
                        **summary(table, "vif", args.clock),
                    }
                    if phase == "prefill" and args.attender:
                        attender = summary(table, "attender", args.clock)
                        record["attender_ratio"] = attender["ratio"]
                        # Of VIF's extra prefill time, the share the attender takes (the rest: injection).
                        extra = record["vif_ms"] - record["base_ms"]
                        record["attender_share"] = (
                            (attender["vif_ms"] - record["base_ms"]) / extra if extra > 0 else None
                        )
                    records.append(record)
                    print_record(record)
        switch(False)
    return records


def check_model(vmodel, model, inputs, switch) -> None:
    """The fused path's last-token logits equal the materialised path's."""
    switch(True)
    outs = {}
    for path in ("fused", "materialised"):
        vmodel.config_vif.injection = path
        outs[path] = vmodel(**inputs, logits_to_keep=1).logits.float()
    vmodel.config_vif.injection = "fused"
    error = (outs["fused"] - outs["materialised"]).abs().max().item()
    scale = outs["materialised"].abs().max().item()
    # fp32: both exact up to rounding; half precision: the two paths round differently per layer.
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not error <= tolerance * max(scale, 1.0):
        raise AssertionError(f"fused logits differ from materialised by {error:.2e}")


# ----------------------------------------------------------------------------- driver
def print_record(r: dict) -> None:
    where = f"{r['part']:<6}{(r.get('preset') or r.get('shape', '')):<11}{r['phase']:<8}B={r['batch']:<3}S={r['seq']:<6}"
    if r.get("metric") == "peak_memory":
        print(
            f"{where}peak memory  base {r['base_mb']:9.0f} MB  vif {r['vif_mb']:9.0f} MB  x{r['ratio']:.4f}"
            f"  (added over q/k/v: {r['base_added_mb']:.0f} / {r['vif_added_mb']:.0f} MB)",
            flush=True,
        )
        return
    extra = f"  alone x{r['ratio_marginal']:.4f}" if "ratio_marginal" in r else ""
    if r.get("attender_ratio") is not None:
        share = r.get("attender_share")
        extra = f"  attender alone x{r['attender_ratio']:.3f}" + (
            f" ({share:.0%} of the extra)" if share is not None else ""
        )
    print(
        f"{where}base {r['base_ms']:10.3f} ms  vif {r['vif_ms']:10.3f} ms  "
        f"x{r['ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]  wall x{r.get('ratio_wall', r['ratio']):.3f}{extra}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part", nargs="+", default=["layer", "memory", "model"], choices=["layer", "memory", "model"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--seq", type=int, nargs="+", default=[640, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="model part")
    parser.add_argument("--layer-batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--shapes", nargs="+", default=list(LAYER_SHAPES), choices=list(LAYER_SHAPES))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds, layer part")
    parser.add_argument(
        "--inner", type=int, default=20, help="calls per sample (decode; every sample on CUDA)"
    )
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--memory-seq", type=int, default=2048)
    parser.add_argument("--preset", nargs="+", default=["compact", "paper"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="default: hidden x 11008 / 4096")
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--extract", type=int, nargs="+", default=None, help="explicit pairs (with --inject)")
    parser.add_argument("--inject", type=int, nargs="+", default=None)
    parser.add_argument("--new-tokens", type=int, default=8, help="decode steps per round, model part")
    parser.add_argument("--model-rounds", type=int, default=5)
    parser.add_argument("--attender", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="layer part: replay each call from a CUDA graph"
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCK),
        default=None,
        help="what ratios are taken of (default: cpu on CPU, wall on CUDA)",
    )
    parser.add_argument("--out", default="bench-out/injection.json")
    parser.add_argument("--append", action="store_true", help="add the records to those already in --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")

    if args.worker:
        print(json.dumps(memory_worker(args.worker.split(":")[1], args)))
        return
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    command = "python benchmarks/injection.py " + shlex.join(argv)
    print(
        f"{command}\nVIF fused injection vs base on {device_name}, {args.dtype}, {args.threads} CPU thread(s); "
        "ratio = median over interleaved rounds [min, max]\n",
        flush=True,
    )
    records = []
    if "layer" in args.part:
        records += layer_part(args, device_name)
    if "memory" in args.part:
        records += memory_part(args, device_name, argv)
    if "model" in args.part:
        records += model_part(args, device_name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [{"command": command, "threads": args.threads, "clock": args.clock}]
    if args.append and out.exists():
        earlier = json.loads(out.read_text())
        runs, records = earlier["runs"] + runs, earlier["records"] + records
    out.write_text(json.dumps({"runs": runs, "records": records}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
