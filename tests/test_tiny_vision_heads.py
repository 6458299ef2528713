"""tiny-vision's CLIP-like heads: the whitening projection and its top-k variant (projection_dim)."""

import numpy as np
import pytest
import torch

from harness.zoo import tiny_vision as tv

pytestmark = pytest.mark.usefixtures("one_thread")


def _pooled(n=400, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, d)  # a spread spectrum, like pre-trained features
    return torch.randn(n, d, generator=g) * scales + 0.5


def test_projection_dim_keeps_the_leading_rows_of_the_full_whitening():
    pooled = _pooled()
    full = tv.whitening(pooled, 0.05)
    top = tv.whitening(pooled, 0.05, dim=6)
    assert full.shape == (24, 24) and top.shape == (6, 24)
    assert torch.equal(top, full[:6])


def test_projection_dim_zero_or_too_large_is_the_full_projection():
    pooled = _pooled()
    full = tv.whitening(pooled, 0.05)
    assert torch.equal(tv.whitening(pooled, 0.05, dim=0), full)
    assert torch.equal(tv.whitening(pooled, 0.05, dim=99), full)


def test_kept_directions_are_the_highest_variance_ones_and_whitened():
    pooled = _pooled()
    top = tv.whitening(pooled, 0.0, dim=4)
    z = pooled.double() @ top.double().T
    second = z.T @ z / len(z)
    assert torch.allclose(second, torch.eye(4, dtype=torch.float64), atol=1e-3)
    # The leading directions carry most of the (uncentred) second moment of the features.
    x = pooled.double()
    energy = lambda rows: float(((x @ rows.T) ** 2).sum())  # noqa: E731
    unit = torch.nn.functional.normalize(top.double(), dim=1)
    rest = torch.nn.functional.normalize(tv.whitening(pooled, 0.0).double()[4:], dim=1)
    assert energy(unit) > energy(rest)


def test_compute_heads_with_projection_dim_gives_prototypes_of_that_dimension():
    torch.manual_seed(0)
    recipe = dict(tv.DEFAULT_RECIPE, hidden_size=32, num_layers=1, num_heads=2, projection_dim=8, head_shots=2)
    model = tv.make_model(recipe).eval()
    bank = tv._digit_bank()
    tasks = ["shapes", "colors"]
    data = {t: tv.head_examples(t, 40, 0, bank) for t in tasks}
    calibration = {t: tv.make_split(t, "calibration", 40, 0, bank) for t in tasks}
    heads = tv.compute_heads(model, data, calibration, recipe)
    assert heads.projection.shape == (8, 32)
    for t in tasks:
        assert heads.protos[t].shape == (len(tv.TASKS[t][1]), 8)
        assert np.allclose(heads.protos[t].norm(dim=-1).numpy(), 1.0, atol=1e-5)
    logits = heads.logits(model, "shapes", tv.to_pixels(data["shapes"][0][:5]))
    assert logits.shape == (5, 8) and torch.isfinite(logits).all()
