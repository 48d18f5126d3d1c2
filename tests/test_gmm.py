"""The GMM renderer: normalisation, peaks, coordinates, entropy."""

import math

import torch

from vif.gmm import GMMHead, Mixture, entropy, grid_coordinates, render


def one_gaussian(x: float, y: float, sigma: float = 0.05) -> Mixture:
    return Mixture(torch.tensor([[[x, y]]]), torch.tensor([[sigma]]), torch.tensor([[1.0]]))


def test_grid_coordinates_are_patch_centres_row_major():
    coords = grid_coordinates(2, 3)
    assert torch.allclose(coords[0], torch.tensor([1 / 6, 1 / 4]))
    assert torch.allclose(coords[2], torch.tensor([5 / 6, 1 / 4]))  # end of the first row
    assert torch.allclose(coords[3], torch.tensor([1 / 6, 3 / 4]))
    lin = grid_coordinates(24, 24, "linspace")
    assert torch.allclose(lin[0], torch.zeros(2)) and torch.allclose(lin[-1], torch.ones(2))


def test_render_normalises_over_valid_tokens_and_peaks_under_the_centre():
    height, width = 3, 5  # a non-square grid
    coords = grid_coordinates(height, width)[None]
    valid = torch.ones(1, height * width, dtype=torch.bool)
    for x, y in [(0.1, 0.1), (0.55, 0.5), (0.95, 0.9)]:
        for mode in ("sum", "softmax"):
            pi = render(one_gaussian(x, y), coords, valid, mode)
            assert math.isclose(pi.sum().item(), 1.0, rel_tol=1e-6)
            row, col = divmod(pi.argmax().item(), width)
            assert (row, col) == (int(y * height), int(x * width))


def test_softmax_cannot_focus_but_sum_can():
    coords = grid_coordinates(24, 24)[None]
    valid = torch.ones(1, 576, dtype=torch.bool)
    sharp = one_gaussian(0.5, 0.5, sigma=0.035)
    assert entropy(render(sharp, coords, valid, "sum")).item() < 3.0
    assert entropy(render(sharp, coords, valid, "softmax")).item() > 6.3  # ln 576 = 6.356


def test_padding_entries_get_zero_and_entropy_is_finite():
    coords = torch.rand(2, 6, 2)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    head = GMMHead(8)
    z = torch.randn(2, 4, 8, requires_grad=True)
    pi = render(head(z), coords, valid)
    assert torch.equal(pi[1, 2:], torch.zeros(4))
    assert torch.allclose(pi.sum(-1), torch.ones(2))
    h = entropy(pi)
    assert h[1] <= math.log(2) + 1e-6
    h.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_head_initialisation_follows_the_released_code():
    head = GMMHead(16)
    assert torch.all(head.spread.bias == -2.0) and torch.all(head.logit.bias == 0.0)
    assert head.center.bias.abs().max() <= 1.0
    mixture = head(torch.zeros(1, 3, 16))
    assert torch.all(mixture.sigmas > 0.035)
    assert torch.allclose(mixture.weights.sum(-1), torch.ones(1))
