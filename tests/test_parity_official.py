"""Opt-in parity with the official PyTorch code: `make parity` (needs requirements-bench.txt).

The official loss comes from a clone of https://github.com/jingw193/PNE_Loss named by
the environment variable PNE_OFFICIAL_REPO; nothing of it is stored here.
"""

from __future__ import annotations

import os
import zlib

import jax
import numpy as np
import pytest

from pne_jax import pne_loss
from pne_jax.losses import pne_batch_stats, resize_labels_nearest
from tests.test_pne import random_case

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def official_repo():
    repo = os.environ.get("PNE_OFFICIAL_REPO")
    if not repo:
        pytest.fail(
            "set PNE_OFFICIAL_REPO to the root of a clone of https://github.com/jingw193/PNE_Loss"
        )
    return repo


CASES = [
    # (b, h, w, c, d), options, scenario
    ((2, 16, 32, 19, 32), dict(), "plain"),
    ((2, 16, 32, 19, 32), dict(num_samples=17, temperature=0.5), "fallback"),
    ((2, 12, 12, 6, 16), dict(num_samples=5, gate=(2, 9), loss_weight=0.8), "ignore"),
    ((2, 16, 16, 150, 16), dict(num_samples=100), "absent"),
    ((2, 16, 16, 171, 16), dict(num_samples=1, temperature=0.1), "ties"),
    ((1, 8, 8, 4, 8), dict(num_samples=5), "all_correct"),
]


@pytest.mark.parametrize("shape,options,scenario", CASES)
def test_matches_official_value_and_gradient(official_repo, shape, options, scenario):
    from benchmarks.official_pne import make_official_loss, official_pne_loss

    rng = np.random.default_rng(zlib.crc32(scenario.encode()))  # not hash(): replayable
    for _ in range(3):
        logits, labels, emb = random_case(rng, *shape, scenario=scenario)
        official = make_official_loss(official_repo, **options)
        value, tensor = official_pne_loss(
            official, logits, labels, emb.astype(np.float64), requires_grad=True
        )
        value.backward()
        want = float(value.detach())
        want_grad = tensor.grad.permute(0, 2, 3, 1).numpy()

        loss_fn = lambda e, lg=logits, lb=labels: pne_loss(lg, lb, e, **options)  # noqa: E731
        got, got_grad = jax.value_and_grad(loss_fn)(emb)
        gate = options.get("gate", (0, 199))
        if not pne_batch_stats(logits, labels, emb, gate=gate).num_pairs.any():
            # No pair: the official code returns (emb.sum() - logits.sum()) * 1e-16 so that
            # every parameter gets a gradient; ours is exactly 0 (see README).
            assert float(got) == 0.0 and np.all(np.asarray(got_grad) == 0)
            np.testing.assert_allclose(want, (emb.sum() - logits.sum()) * 1e-16, rtol=1e-4)
            np.testing.assert_allclose(want_grad, 1e-16)
            continue
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
        scale = max(np.abs(want_grad).max(), 1e-30)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("size", [(8, 16), (7, 13), (3, 5), (64, 128), (33, 65)])
def test_resize_labels_nearest_matches_torch(size):
    import torch
    import torch.nn.functional as F

    labels = np.random.default_rng(0).integers(0, 255, (2, 64, 128))
    want = F.interpolate(torch.as_tensor(labels[:, None]).float(), size, mode="nearest")
    np.testing.assert_array_equal(resize_labels_nearest(labels, size), want[:, 0].long().numpy())
