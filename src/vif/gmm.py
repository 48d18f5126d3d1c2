"""Spatial Gaussian-mixture decoding (spec section 5): latent slots -> importance over image tokens.

Every image token carries a coordinate ``(x, y)`` in its own image's unit square
(computed by the backbone adapter from that image's grid). Rendering the mixture at
those coordinates makes one code path serve fixed 24 x 24 grids, non-square dynamic
grids and several images per sample: each image shows the same map, stretched to
its own aspect ratio, and normalisation runs over all image tokens of the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Mixture:
    """Decoded Gaussian mixture for a batch.

    centers: ``(B, K, 2)`` in ``[0, 1]^2`` as ``(x, y)``; sigmas: ``(B, K)``;
    weights: ``(B, K)`` summing to 1 over ``K``.
    """

    centers: torch.Tensor
    sigmas: torch.Tensor
    weights: torch.Tensor
    #: ``(B, K, N)``: with ``centers="attention"``, each component's attention over the image
    #: tokens whose coordinates it averaged into its centre (None for ``centers="linear"``).
    locator: torch.Tensor | None = None


class GMMHead(nn.Module):
    """Maps each latent slot ``z_k`` to a 2-D Gaussian (centre, spread, mixture logit).

    Two ways to place the centres (``VIFConfig.centers``):

    * ``"linear"`` (the paper): ``c_k = sigmoid(W_c z_k)``. The centre must be decoded from
      the slot's features alone, which cannot localise (docs/demo.md: even trained directly on
      the target it reached 5 % on target).
    * ``"attention"`` (this project): ``z_k`` attends over the branch's encoded image tokens and
      ``c_k`` is the soft-argmax, the attention-weighted mean of the tokens' coordinates. The
      latent still decides where (it is the query), but "where" is read off the tokens.

    The spread is ``softplus(w_s . z_k) + floor``, ``floor`` given per sample by the caller
    (``min_sigma`` in image units, or in tokens of each image's grid).
    """

    def __init__(
        self,
        latent_size: int,
        min_sigma: float = 0.035,
        centers: str = "linear",
        salience_size: int | None = None,
    ) -> None:
        super().__init__()
        if centers not in ("linear", "attention"):
            raise ValueError(f"centers must be 'linear' or 'attention', got {centers!r}")
        self.min_sigma = min_sigma
        self.centers = centers
        if centers == "linear":
            self.center = nn.Linear(latent_size, 2)
        else:
            self.center_query = nn.Linear(latent_size, latent_size)
            self.center_key = nn.Linear(latent_size, latent_size)
            # How much each token stands out, whatever the slot: a dot product with one query can
            # only pick one direction of the feature space, so "any small saturated object" needs
            # a nonlinear score of its own.
            self.center_salience = nn.Sequential(
                nn.Linear(salience_size or latent_size, latent_size), nn.GELU(), nn.Linear(latent_size, 1)
            )
        self.spread = nn.Linear(latent_size, 1)
        self.logit = nn.Linear(latent_size, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The released code's initialisation: centres spread over the image from the
        # start (bias U(-1, 1) before the sigmoid), small initial spreads (bias -2).
        for layer in (self.spread, self.logit):
            nn.init.normal_(layer.weight, std=0.01)
        nn.init.constant_(self.spread.bias, -2.0)
        nn.init.zeros_(self.logit.bias)
        if self.centers == "linear":
            nn.init.normal_(self.center.weight, std=0.01)
            nn.init.uniform_(self.center.bias, -1.0, 1.0)

    def forward(
        self,
        z: torch.Tensor,
        tokens: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        floor: torch.Tensor | float | None = None,
        salience: torch.Tensor | None = None,
    ) -> Mixture:
        """z ``(B, K, Dz)`` -> :class:`Mixture`.

        ``centers="attention"`` also needs the encoded image tokens ``tokens (B, N, Dz)``, their
        coordinates ``coords (B, N, 2)`` and ``valid (B, N)`` bool. ``floor``: the smallest spread,
        a float or ``(B,)`` (default ``min_sigma``).
        """
        if self.centers == "linear":
            centers, locator = torch.sigmoid(self.center(z)), None
        else:
            if tokens is None or coords is None or valid is None:
                raise ValueError("centers='attention' needs the encoded image tokens, their coords and mask")
            scale = z.shape[-1] ** -0.5
            scores = torch.einsum("bkc,bnc->bkn", self.center_query(z), self.center_key(tokens)) * scale
            salient = self.center_salience(tokens if salience is None else salience).squeeze(-1)
            scores = scores + salient.float()[:, None, :]
            scores = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
            locator = torch.softmax(scores, dim=-1)
            centers = torch.einsum("bkn,bnd->bkd", locator, coords.float()).to(z.dtype)
        floor = self.min_sigma if floor is None else floor
        if isinstance(floor, torch.Tensor):
            floor = floor.to(z.dtype)[:, None]
        sigmas = F.softplus(self.spread(z)).squeeze(-1) + floor
        weights = torch.softmax(self.logit(z).squeeze(-1), dim=-1)
        return Mixture(centers, sigmas, weights, locator)


def render(
    mixture: Mixture, coords: torch.Tensor, valid: torch.Tensor, normalisation: str = "sum"
) -> torch.Tensor:
    """Importance distribution over the image tokens of each sample.

    Args:
        mixture: the decoded mixture, ``K`` components per sample.
        coords: ``(B, N, 2)`` each image token's ``(x, y)`` in its image's unit square.
        valid: ``(B, N)`` bool, False on padding entries (samples have different token counts).
        normalisation: ``"sum"`` (``M / sum M``) or ``"softmax"`` (softmax of ``M`` over tokens).

    Returns:
        ``(B, N)`` float32, summing to 1 over the valid tokens of each sample, 0 elsewhere.
    """
    coords = coords.float()
    centers, sigmas, weights = mixture.centers.float(), mixture.sigmas.float(), mixture.weights.float()
    sq_dist = (coords[:, :, None, :] - centers[:, None, :, :]).pow(2).sum(-1)  # (B, N, K)
    response = torch.exp(-sq_dist / (2 * sigmas[:, None, :].pow(2)))
    raw = (response * weights[:, None, :]).sum(-1)  # (B, N), in [0, 1]
    if normalisation == "sum":
        # The map is bounded away from 0 near every centre (sigma >= min_sigma and the
        # centres lie inside the image), so the sum cannot vanish; the clamp guards
        # degenerate grids of a single far-away token.
        raw = raw.masked_fill(~valid, 0.0)
        return raw / raw.sum(-1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)
    if normalisation == "softmax":
        return torch.softmax(raw.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0.0)
    raise ValueError(f"normalisation must be 'sum' or 'softmax', got {normalisation!r}")


def grid_coordinates(height: int, width: int, mode: str = "centers") -> torch.Tensor:
    """``(height * width, 2)`` coordinates ``(x, y)`` of a row-major token grid.

    ``"centers"`` puts token ``(r, c)`` at the centre of its patch, ``((c + .5) / W, (r + .5) / H)``,
    so a Gaussian centred on an image point peaks at the token whose patch covers it.
    ``"linspace"`` is the released code's ``linspace(0, 1, W) x linspace(0, 1, H)``.
    """
    if mode == "centers":
        xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
        ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    elif mode == "linspace":
        xs = torch.linspace(0, 1, width) if width > 1 else torch.full((1,), 0.5)
        ys = torch.linspace(0, 1, height) if height > 1 else torch.full((1,), 0.5)
    else:
        raise ValueError(f"grid_coords must be 'centers' or 'linspace', got {mode!r}")
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def entropy(pi: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of ``pi`` ``(B, N)`` -> ``(B,)``; zeros contribute 0.

    The clamp keeps the gradient finite at exact zeros (xlogy's is -inf there).
    """
    return -(pi * pi.clamp_min(torch.finfo(pi.dtype).tiny).log()).sum(-1)
