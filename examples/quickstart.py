"""Quickstart: attach VIF to a (tiny, locally saved) LLaVA, train a step, generate, save, reload.

Runs on CPU in seconds. Swap the checkpoint for "llava-hf/llava-1.5-7b-hf" on a GPU
and nothing else changes.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vif
from vif.tiny import build_tiny_llava

workdir = Path(tempfile.mkdtemp(prefix="vif-quickstart-"))
checkpoint = build_tiny_llava(
    workdir / "tiny-llava", words="what colour is the small square red blue".split()
)

model = LlavaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa")
processor = AutoProcessor.from_pretrained(checkpoint)

image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
messages = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "what colour is the small square"}],
    }
]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=prompt, return_tensors="pt")

vmodel = vif.attach(model, vif.VIFConfig.preset("compact", model))
print(f"VIF module: {sum(p.numel() for p in vmodel.vif_module.parameters()):,} parameters")

# One training step: labels on the answer tokens only (here: the whole prompt, for brevity).
vmodel.train()
labels = inputs["input_ids"].clone()
labels[labels == model.config.image_token_id] = -100
out = vmodel(**inputs, labels=labels)
out.loss.backward()
print(
    f"loss {out.loss.item():.3f} = lm {out.vif.lm_loss.item():.3f} + 0.1 kl {out.vif.kl.item():.4f} "
    f"+ 0.1 sparsity {out.vif.sparsity.item():.3f}"
)

vmodel.eval()
ids = vmodel.generate(**inputs, max_new_tokens=5, do_sample=False)
print("generated:", processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
for layer, pi in vmodel(**inputs).vif.importance.items():
    print(f"layer {layer}: importance over {pi.shape[1]} image tokens, peak {pi.max().item():.3f}")

vmodel.save_pretrained(workdir / "my-vif")
with torch.no_grad():
    before = vmodel(**inputs).logits
reloaded = vif.VIFModel.from_pretrained(vmodel.detach(), workdir / "my-vif")
with torch.no_grad():
    after = reloaded(**inputs).logits
print(
    "saved",
    sorted(p.name for p in (workdir / "my-vif").iterdir()),
    "- reload exact:",
    torch.equal(before, after),
)
