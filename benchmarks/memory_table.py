"""Per-GPU training memory of LLaVA-1.5-7B + VIF under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP.

An estimate, made of two parts.

**Model states, from exact parameter counts.** LLaVA-1.5-7B (CLIP ViT-L/14-336, Vicuna-7B,
2-layer MLP projector; the llava-hf config) is built on the meta device with the VIF module
attached (``paper`` or ``compact`` preset), so every count is exact and nothing is allocated.
LoRA (r = 128 on q/k/v/o/gate/up/down of the LLM) is counted as r x (in + out) per wrapped
Linear. Bytes per parameter, as vif trains (N = all parameters, T = trainable ones, n = GPUs):

* DDP and FSDP (accelerate's bf16 autocast, fp32 master weights): weights 4 B x N, gradients
  4 B x T, Adam moments 8 B x T. FSDP1 keeps a gradient for every parameter of a flat unit
  that holds any trainable parameter (LoRA: the whole LLM layers), and the bf16 copy it
  gathers for compute: under full shard the root unit (embeddings, LM head, projector and the
  VIF module, which must stay in the root: see vif.training.distributed) for the whole step
  plus two decoder layers (the one running and the prefetched one); under shard-grad-op every
  parameter, from forward to the optimiser step.
* DeepSpeed bf16: weights 2 B x N (the module is cast to bf16), gradients 2 B x T, fp32 master
  weights 4 B x T and Adam 8 B x T. ZeRO-2 partitions gradients, master weights and Adam over
  n; ZeRO-3 also the weights, plus what it gathers live (the largest module, up to
  ``stage3_max_live_parameters``; counted as one decoder layer or the largest VIF submodule).

**Activations, measured at a scaled size and extrapolated.** A LLaVA with the real shapes
except the widths (576 image tokens, head size 128, MLP ratio 11008/4096, 4 decoder layers)
runs one training forward in bf16 autocast on the CPU at hidden sizes 256 and 512 (VIF preset
sized for each), and the bytes of the tensors autograd saves for backward are summed (each
storage once). Per decoder layer and per VIF pair these grow linearly in the hidden size
at a fixed sequence, so a line through the two sizes gives 4096. With activation
checkpointing (the paper recipe) the held activations are one bf16 hidden state per layer plus,
during backward, one recomputed layer (the extraction layer with its VIF pair being the
largest); the LM head's logits (bf16, and fp32 in the loss) come on top. The sequence is
``--seq`` tokens per sample (576 of them the image), ``--batch`` samples per GPU.

Not counted: the CUDA context and allocator fragmentation (add ~1-3 GB), communication
buckets, the vision tower's transient activations (frozen, run without saving), checkpoint
saving. Treat the totals as +-15 %.

    python benchmarks/memory_table.py                          # table + bench-out/memory_table.json
    python benchmarks/memory_table.py --gpus 8 --batch 16 --seq 2048 --no-checkpointing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

GIB = 1024**3
ENGINES = ("DDP", "ZeRO-2", "ZeRO-3", "FSDP full shard", "FSDP shard-grad-op")
LORA_R = 128
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llava_config(hidden: int = 4096, layers: int = 32, intermediate: int = 11008, vocab: int = 32064):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024 if hidden == 4096 else 32,
        intermediate_size=4096 if hidden == 4096 else 64,
        num_hidden_layers=24 if hidden == 4096 else 1,
        num_attention_heads=16 if hidden == 4096 else 2,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=min(32000, vocab - 1),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


# -----------------------------------------------------------------------------
# Model states


def counts(preset: str) -> dict[str, int]:
    """Exact parameter counts of LLaVA-1.5-7B + VIF (``preset``), built on the meta device."""
    from transformers import LlavaForConditionalGeneration

    import vif
    from vif.training.parts import part_of

    with torch.device("meta"):
        base = LlavaForConditionalGeneration(llava_config())
        base.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
        vmodel = vif.attach(base, vif.VIFConfig.preset(preset, base))
    parts = {"vision": 0, "projector": 0, "language": 0, "vif": 0}
    for name, p in vmodel.named_parameters():
        parts["vif" if name.startswith("vif_module.") else part_of(name.removeprefix("base_model."))] += (
            p.numel()
        )
    layers = base.model.language_model.layers
    parts["layer"] = sum(p.numel() for p in layers[0].parameters())
    parts["num_layers"] = len(layers)
    parts["lora"] = sum(
        LORA_R * (m.in_features + m.out_features)
        for name, m in base.model.language_model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LLM_PROJECTIONS
    )
    # The VIF module's largest submodule that runs as one forward (what ZeRO-3 gathers at once).
    parts["vif_largest_module"] = max(
        sum(p.numel() for p in m.parameters(recurse=False)) or 0 for m in vmodel.vif_module.modules()
    )
    parts["vif_largest_module"] = max(
        parts["vif_largest_module"],
        max(sum(p.numel() for p in b.parameters()) for b in vmodel.vif_module.prior.blocks),
    )
    embed = base.model.language_model.embed_tokens.weight.numel() + base.lm_head.weight.numel()
    parts["root"] = (
        embed
        + parts["projector"]
        + parts["vif"]
        + sum(p.numel() for p in base.model.language_model.norm.parameters())
    )
    parts["total"] = parts["vision"] + parts["projector"] + parts["language"] + parts["vif"]
    return parts


def trainable(c: dict[str, int], mode: str) -> tuple[int, int]:
    """(trainable parameters, parameters that FSDP keeps a gradient for) in ``mode``."""
    if mode == "full":
        t = c["language"] + c["projector"] + c["vif"]
        return t, t
    if mode == "lora":
        # LoRA weights live in the decoder layers' units, the VIF module in the root unit: FSDP1
        # keeps gradients for all of those units' parameters.
        return c["lora"] + c["vif"], c["layer"] * c["num_layers"] + c["lora"] + c["root"]
    return c["vif"], c["root"]  # vif-only: the root unit holds the VIF module


def model_states(c: dict[str, int], mode: str, engine: str, n: int) -> dict[str, float]:
    """Bytes per GPU of weights, gradients, optimiser states and gathered copies."""
    lora = c["lora"] if mode == "lora" else 0
    big_n = c["total"] + lora
    t, t_fsdp = trainable(c, mode)
    layer = c["layer"] + (lora // c["num_layers"])
    if engine == "DDP":
        return {"weights": 4 * big_n, "grads": 4 * t, "optimizer": 8 * t, "gathered": 0}
    if engine == "ZeRO-2":
        return {"weights": 2 * big_n, "grads": 2 * t / n, "optimizer": 12 * t / n, "gathered": 0}
    if engine == "ZeRO-3":
        live = 2 * max(layer, c["vif_largest_module"])
        return {"weights": 2 * big_n / n, "grads": 2 * t / n, "optimizer": 12 * t / n, "gathered": live}
    if engine == "FSDP full shard":
        gathered = 2 * (c["root"] + 2 * layer)
        return {
            "weights": 4 * big_n / n,
            "grads": 4 * t_fsdp / n,
            "optimizer": 8 * t / n,
            "gathered": gathered,
        }
    if engine == "FSDP shard-grad-op":
        return {
            "weights": 4 * big_n / n,
            "grads": 4 * t_fsdp / n,
            "optimizer": 8 * t / n,
            "gathered": 2 * big_n,
        }
    raise ValueError(engine)


# -----------------------------------------------------------------------------
# Activations


def saved_bytes(hidden: int, preset: str | None, seq: int, layers: int = 4) -> int:
    """Bytes autograd saves in one bf16-autocast training forward of a scaled LLaVA (+ VIF), batch 1."""
    from transformers import LlavaForConditionalGeneration

    import vif

    torch.manual_seed(0)
    config = llava_config(hidden=hidden, layers=layers, intermediate=int(hidden * 11008 / 4096), vocab=512)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    model.model.vision_tower.requires_grad_(False)
    if preset is not None:
        model = vif.attach(model, vif.VIFConfig.preset(preset, model, extract_layers=[1], inject_layers=[3]))
    model.train()
    n_image = 576
    ids = torch.randint(1, 500, (1, seq))
    ids[0, 1 : 1 + n_image] = config.image_token_id
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the second half is the answer (the posterior sees it)
    pixels = torch.randn(1, 3, 336, 336)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        out = model(input_ids=ids, pixel_values=pixels, labels=labels, attention_mask=torch.ones_like(ids))
    del out
    return sum(seen.values())


def activation_model(seq: int) -> dict[str, dict[str, float]]:
    """Fitted per-sample bytes at hidden 4096: per decoder layer, and per VIF pair for each preset."""
    widths = (256, 512)
    base = {w: (saved_bytes(w, None, seq, layers=4), saved_bytes(w, None, seq, layers=2)) for w in widths}
    per_layer = {w: (b4 - b2) / 2 for w, (b4, b2) in base.items()}
    fits = {"layer": line(per_layer, 4096)}
    for preset in ("paper", "compact"):
        pair = {w: saved_bytes(w, preset, seq, layers=4) - base[w][0] for w in widths}
        fits[f"vif_pair_{preset}"] = line(pair, 4096)
    fits["measured"] = {"per_layer": per_layer, "widths": list(widths)}
    return fits


def line(points: dict[int, float], at: int) -> float:
    (x0, y0), (x1, y1) = sorted(points.items())
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)


def activations(fit: dict, preset: str, seq: int, batch: int, checkpointing: bool, layers: int = 32) -> float:
    """Bytes of activations per GPU for ``batch`` samples of ``seq`` tokens."""
    pairs = 4
    vif_pairs = pairs * fit[f"vif_pair_{preset}"]
    logits = seq * 32064 * (2 + 4 + 4)  # bf16 logits, their fp32 upcast and its softmax in the loss
    if checkpointing:
        held = layers * seq * 4096 * 2 + fit["layer"] + fit[f"vif_pair_{preset}"]
    else:
        held = layers * fit["layer"] + vif_pairs
    return batch * (held + logits)


# -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="samples per GPU (the paper recipe: 16)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sample, 576 of them the image")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", default="bench-out/memory_table.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpointing = not args.no_checkpointing

    fit = activation_model(args.seq)
    rows = []
    for preset in ("paper", "compact"):
        c = counts(preset)
        act = activations(fit, preset, args.seq, args.batch, checkpointing)
        for mode in ("full", "lora", "vif-only"):
            for engine in ENGINES:
                s = model_states(c, mode, engine, args.gpus)
                states = sum(s.values())
                rows.append(
                    {"preset": preset, "mode": mode, "engine": engine, **{k: v / GIB for k, v in s.items()},
                     "activations": act / GIB, "total": (states + act) / GIB}
                )  # fmt: skip
    command = "python " + " ".join(sys.argv)
    print(f"# {command}")
    print(
        f"# LLaVA-1.5-7B + VIF, {args.gpus} GPUs, {args.batch} samples x {args.seq} tokens per GPU, "
        f"activation checkpointing {'on' if checkpointing else 'off'}; GiB per GPU"
    )
    head = "| preset | mode | engine | weights | grads | Adam (+ master) | gathered | activations | total |"
    print(head)
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['preset']} | {r['mode']} | {r['engine']} | {r['weights']:.1f} | {r['grads']:.1f} | "
            f"{r['optimizer']:.1f} | {r['gathered']:.1f} | {r['activations']:.1f} | {r['total']:.1f} |"
        )
    per_sample = {k: round(v / 2**20) for k, v in fit.items() if k != "measured"}
    print(f"# fitted activation MiB per sample at hidden 4096, {args.seq} tokens: {per_sample}")
    params = {p: counts(p) for p in ("paper", "compact")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command,
        "args": vars(args),
        "parameters": params,
        "activation_fit": fit,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
