"""Peak memory and time of ``vif.diagnose`` on a long sequence: fast probe vs eager output_attentions.

The diagnostics need, per layer, the attention of a few query rows (the answer tokens)
on the image tokens. Two routes give the same numbers (tests/test_diagnostics.py):

* ``probe`` - the model runs on SDPA; an observer inside the attention function
  recomputes only the chosen rows from query and key: ``rows x seq`` scores per head;
* ``attentions`` - the model runs on eager attention with ``output_attentions=True``,
  which materialises ``(B, H, seq, seq)`` probabilities in every layer.

A third configuration, ``forward``, is one plain SDPA forward of the same batch without
any diagnostics: the floor both routes are measured against.

The model is a tiny-width LLaVA saved with ``build_tiny_llava`` (a real checkpoint,
loaded with ``vif.loading.load_model``): a 24 x 24 = 576-token image, LLaVA-1.5's
grid, plus a ``--text-tokens`` question, one sample with a short answer. Each
configuration runs in its own subprocess; "peak extra" is the peak memory during the
call minus the memory before it (CUDA allocator peak, or max RSS on CPU), so the
loaded model is not counted. Time is one run (the whole ``diagnose`` call, plots included).

    python benchmarks/diagnose_memory.py                  # CPU; table + bench-out/diagnose_memory.json
    python benchmarks/diagnose_memory.py --device cuda --text-tokens 4000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = ("forward", "probe", "attentions")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(args: argparse.Namespace, root: Path) -> tuple[Path, Path]:
    """The tiny checkpoint and one PNG, written once and shared by the workers."""
    import numpy as np
    from PIL import Image

    from vif.tiny import build_tiny_llava

    model_dir = build_tiny_llava(
        root / "model",
        words=["red square", "coloured blocks"],
        image_size=96,
        patch_size=4,  # 24 x 24 = 576 image tokens
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        max_position_embeddings=args.text_tokens + 1024,
    )
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    image = root / "image.png"
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))).save(image)
    return model_dir, image


def worker(config: str, args: argparse.Namespace) -> dict:
    from PIL import Image

    from vif.diagnostics import diagnose
    from vif.diagnostics.inputs import encode_pil_sample, iter_batches
    from vif.loading import load_model

    dtype = getattr(torch, args.dtype)
    attn = "eager" if config == "attentions" else "sdpa"
    model, processor = load_model(args.model_dir, args.device, dtype, attn_implementation=attn)
    question = " ".join(["describe the coloured blocks of this picture"] * (args.text_tokens // 7))
    samples = [(Image.open(args.image).convert("RGB"), question, "a red square and coloured blocks.")]
    seq_len = len(encode_pil_sample(processor, *samples[0])["input_ids"])

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = current_rss_mb()
    start = time.perf_counter()
    if config == "forward":
        batch, _ = next(iter_batches(samples, processor))
        batch = {k: v.to(args.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.no_grad():
            model(**batch, use_cache=False)
        summary = None
    else:
        summary = diagnose(
            model,
            samples,
            Path(args.out_dir) / config,
            processor=processor,
            route="probe" if config == "probe" else "attentions",
            n_heatmaps=1,
            progress=False,
        )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mb()
    seconds = time.perf_counter() - start
    return {
        "config": config,
        "seq_len": seq_len,
        "peak_extra_mb": peak - before,
        "seconds": seconds,
        "deep_entropy": None if summary is None else summary["deep_entropy"],
        "rows": None if summary is None else summary["mean_rows_per_sample"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=1500, help="question length (words)")
    parser.add_argument("--out", default="bench-out/diagnose_memory.json")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, image = build(args, Path(tmp))
        for config in CONFIGS:
            command = [sys.executable, __file__, "--worker", config, "--model-dir", str(model_dir)]
            command += ["--image", str(image), "--out-dir", str(Path(tmp) / "diag")]
            command += ["--device", args.device, "--dtype", args.dtype]
            command += ["--text-tokens", str(args.text_tokens)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"worker {config} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    by = {r["config"]: r for r in results}
    probe, eager = by["probe"], by["attentions"]
    report = {
        "device": args.device,
        "dtype": args.dtype,
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "image_tokens": 576},
        "seq_len": probe["seq_len"],
        "results": results,
        "memory_ratio_attentions_over_probe": eager["peak_extra_mb"] / max(probe["peak_extra_mb"], 1e-9),
        "time_ratio_attentions_over_probe": eager["seconds"] / probe["seconds"],
        "same_deep_entropy": abs(probe["deep_entropy"] - eager["deep_entropy"]) < 1e-4,
        # One layer's (B, H, L, L) fp32 probabilities, for scale: output_attentions keeps all layers'.
        "one_layer_attention_matrix_mb": args.heads * probe["seq_len"] ** 2 * 4 / 2**20,
    }
    print(
        f"diagnose on a {report['seq_len']}-token sequence (576 image tokens), {args.layers} layers x "
        f"{args.heads} heads, {args.device} {args.dtype}; one run each\n"
    )
    print(f"{'config':<12} {'peak extra MiB':>15} {'seconds':>9} {'deep entropy':>13}")
    for r in results:
        entropy = "-" if r["deep_entropy"] is None else f"{r['deep_entropy']:.4f}"
        print(f"{r['config']:<12} {r['peak_extra_mb']:>15.1f} {r['seconds']:>9.2f} {entropy:>13}")
    print(
        f"\nattentions / probe: memory x{report['memory_ratio_attentions_over_probe']:.1f}, "
        f"time x{report['time_ratio_attentions_over_probe']:.2f}; same deep entropy: {report['same_deep_entropy']}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
