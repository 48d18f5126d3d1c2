"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Both families share the layout VIF needs:

* decoder layers at ``model.model.language_model.layers`` (as LLaVA);
* every image is a run of ``config.image_token_id`` (``<|image_pad|>``) tokens between
  ``<|vision_start|>`` and ``<|vision_end|>``;
* each image has its own grid: ``image_grid_thw[i] = (t, h, w)`` in 14-px patches, and
  the vision tower merges 2 x 2 patches into one LLM token, so image ``i`` fills
  ``t * (h / 2) * (w / 2)`` tokens, row-major over the merged ``(h / 2) x (w / 2)`` grid.
  ``image_grid_thw`` lists the images of the whole batch in sequence order (sample 0's
  first), which is how the model itself consumes it.

The importance map is rendered on each image's own grid: token ``(r, c)`` of an
``H x W`` grid sits at ``((c + .5) / W, (r + .5) / H)`` of that image's unit square,
so the spec's unit square is the image in its own aspect ratio (see docs/backbones.md).

Videos are refused (:class:`BackboneError`): a video's tokens form a ``t x H x W``
volume, and a 2-D mixture has no defined meaning over time. Pass frames as separate
images, or run video prompts with ``VIFModel.disabled()``.

M-RoPE: the model gives image tokens 2-D positions only when it gets
``mm_token_type_ids`` (the processor returns it); without it transformers silently
falls back to 1-D positions. VIF refuses such inputs rather than run a model that sees
its images scrambled. VIF itself never touches positions: it reads kv slots, which
M-RoPE does not change, so the rope deltas Qwen stores at prefill keep working during
cached decoding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .base import BackboneAdapter, BackboneError, register_backbone


@register_backbone
class QwenVLAdapter(BackboneAdapter):
    """Dynamic per-image grids from ``image_grid_thw``; several images per sample."""

    model_types = ("qwen2_vl", "qwen2_5_vl")

    # 1. where the decoder layers are --------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    # 2. where the image tokens are ----------------------------------------------
    def image_token_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        self.refuse_video(inputs)
        return inputs["input_ids"] == self.model.config.image_token_id

    def refuse_video(self, inputs: dict[str, Any]) -> None:
        video_id = self.model.config.video_token_id
        given = [k for k in ("pixel_values_videos", "video_grid_thw") if inputs.get(k) is not None]
        encoded = inputs.get("mm_encoder_outputs") or {}
        if encoded.get("video") is not None:
            given.append("mm_encoder_outputs['video']")
        if given or (inputs["input_ids"] == video_id).any():
            what = f"{' and '.join(given)} given" if given else f"video tokens (id {video_id}) in input_ids"
            raise BackboneError(
                f"VIF does not support video inputs on {type(self.model).__name__} ({what}): its importance "
                "map is a 2-D mixture over one image's grid, with no defined meaning across a video's frames. "
                "Pass the frames you care about as separate images (one <|image_pad|> block and one "
                "image_grid_thw row each), or run video prompts on the base model inside "
                "`with vif_model.disabled():`."
            )

    # 3. each image's grid --------------------------------------------------------
    def image_grids(self, inputs: dict[str, Any], image_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per sample, the merged ``(rows, cols)`` grid of each image, in sequence order.

        Read from ``image_grid_thw`` when given (a plain forward). ``generate()`` encodes
        the images before its first forward and passes ``mm_encoder_outputs`` and M-RoPE
        ``position_ids (4, B, L)`` instead; then each image's grid is read from its
        tokens' (height, width) positions, which M-RoPE lays out row-major.
        """
        runs = image_runs(image_mask)
        if not any(runs):
            return [[] for _ in runs]
        self.check_positions(inputs, image_mask, runs)
        if inputs.get("image_grid_thw") is not None:
            return self.grids_from_thw(inputs["image_grid_thw"], runs)
        positions = inputs.get("position_ids")
        if positions is not None and positions.dim() == 3:
            return grids_from_positions(positions, runs)
        raise BackboneError(
            f"input_ids hold {int(image_mask.sum())} image tokens but image_grid_thw is missing; VIF needs "
            "each image's grid. Pass the image_grid_thw the processor returns with pixel_values."
        )

    def check_positions(
        self, inputs: dict[str, Any], image_mask: torch.Tensor, runs: list[list[tuple]]
    ) -> None:
        """Refuses inputs whose image tokens would silently get 1-D positions (no M-RoPE)."""
        types = inputs.get("mm_token_type_ids")
        positions = inputs.get("position_ids")
        if types is not None:
            valid = inputs.get("attention_mask")
            valid = torch.ones_like(image_mask) if valid is None else valid.bool()
            if types.shape != image_mask.shape or not torch.equal((types == 1) & valid, image_mask & valid):
                raise BackboneError(
                    "mm_token_type_ids does not mark exactly the image tokens of input_ids (type 1 must be "
                    f"where input_ids == image_token_id {self.model.config.image_token_id}); M-RoPE would give "
                    "the images wrong positions. Use the mm_token_type_ids the processor returns for these "
                    "input_ids (pad them like input_ids)."
                )
        elif positions is None:
            raise BackboneError(
                f"{type(self.model).__name__} needs mm_token_type_ids to give image tokens their 2-D "
                "(M-RoPE) positions; without it transformers silently falls back to 1-D positions. Pass "
                "the processor's mm_token_type_ids (or (input_ids == image_token_id).long())."
            )
        if positions is not None and positions.dim() == 3:
            # M-RoPE's last two rows are (height, width); 1-D positions make them equal everywhere,
            # while real 2-D ones differ at every token off the diagonal (r != c) of an image with
            # more than one token.
            height, width = positions[-2], positions[-1]
            several = any(length > 1 for sample in runs for _, length in sample)
            if several and torch.equal(height[image_mask], width[image_mask]):
                raise BackboneError(
                    "the position_ids given hold 1-D positions for the image tokens (height and width rows "
                    "are equal), so M-RoPE is not in use and the model sees its images scrambled. Pass "
                    "mm_token_type_ids (the processor returns it) so that the model, or generate(), "
                    "computes 2-D positions."
                )

    def grids_from_thw(
        self, image_grid_thw: torch.Tensor, runs: list[list[tuple]]
    ) -> list[list[tuple[int, int]]]:
        merge = self.merge_size
        per_image = []
        for i, (t, h, w) in enumerate(image_grid_thw.tolist()):
            if t != 1:
                raise BackboneError(
                    f"image_grid_thw[{i}] = {(t, h, w)} has t={t}: an image has one temporal patch "
                    "(t=1). Several frames are a video, which VIF does not support; pass frames as images."
                )
            if h % merge or w % merge:
                raise BackboneError(
                    f"image_grid_thw[{i}] = {(t, h, w)} is not divisible by the {merge} x {merge} patch "
                    "merge; use the image_grid_thw the model's processor returns."
                )
            per_image.append((h // merge, w // merge))
        # image_grid_thw lists the batch's images in sequence order (sample 0's first) and
        # each image is one run of image tokens (the processor wraps it in vision start / end).
        lengths = [[length for _, length in sample] for sample in runs]
        sizes = [h * w for h, w in per_image]
        flat = [n for sample in lengths for n in sample]
        if flat != sizes:
            raise BackboneError(
                "image_grid_thw does not match the image tokens in input_ids: the images' runs of "
                f"<|image_pad|> tokens have lengths {lengths} (per sample, in order) but image_grid_thw's "
                f"{len(sizes)} images need {sizes} tokens ((h/{merge}) * (w/{merge}) each). Build input_ids "
                "and image_grid_thw together with the model's processor (one <|image_pad|> per merged "
                "patch, each image between <|vision_start|> and <|vision_end|>)."
            )
        grids, taken = [], 0
        for sample in runs:
            grids.append(per_image[taken : taken + len(sample)])
            taken += len(sample)
        return grids


def image_runs(image_mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per sample, ``(start, length)`` of each maximal run of image tokens; image_mask ``(B, L)``."""
    m = image_mask.to(torch.int8)
    edge = torch.zeros(m.shape[0], 1, dtype=m.dtype, device=m.device)
    step = torch.diff(m, dim=1, prepend=edge, append=edge)  # +1 where a run starts, -1 after it ends
    starts, ends = (step == 1).nonzero().tolist(), (step == -1).nonzero().tolist()
    runs: list[list[tuple[int, int]]] = [[] for _ in range(m.shape[0])]
    for (b, start), (_, end) in zip(starts, ends):
        runs[b].append((start, end - start))
    return runs


def grids_from_positions(position_ids: torch.Tensor, runs: list[list[tuple]]) -> list[list[tuple[int, int]]]:
    """Each image's grid from its tokens' M-RoPE positions ``(3 or 4, B, L)`` (last rows: height, width)."""
    height, width = position_ids[-2], position_ids[-1]
    grids = []
    for b, sample in enumerate(runs):
        found = []
        for start, length in sample:
            r = height[b, start : start + length] - height[b, start]
            c = width[b, start : start + length] - width[b, start]
            cols = int(c.max()) + 1
            index = torch.arange(length, device=r.device)
            if length % cols or not (torch.equal(r, index // cols) and torch.equal(c, index % cols)):
                raise BackboneError(
                    f"the image tokens at {start}..{start + length - 1} of sample {b} do not have row-major "
                    "M-RoPE positions, so their grid cannot be read from position_ids. Pass image_grid_thw "
                    "(or let the model compute positions from mm_token_type_ids)."
                )
            found.append((length // cols, cols))
        grids.append(found)
    return grids
