"""PNE statistics per shard inside `jax.shard_map` (check_vma at its default), then psum.

The recipe of the README's "Sharded batches": each device computes the statistics of its
own images, `jax.lax.psum` adds them over the mesh, and `pne_reduce` gives the global
loss, which must equal the unsharded `pne_loss` in value and gradient.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax import pne_loss
from pne_jax.losses import PNEStats, pne_batch_stats, pne_reduce
from tests.pne_reference import pne_reference
from tests.test_pne import random_case


def _mesh(axis_type: str) -> jax.sharding.Mesh:
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
    kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
    return jax.make_mesh((8,), ("data",), axis_types=(kind,))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_psum_of_per_shard_stats_equals_unsharded_loss(axis_type):
    rng = np.random.default_rng(21)
    logits, labels, emb = random_case(rng, 16, 10, 12, 19, 16, scenario="fallback")
    kw = dict(num_samples=17, temperature=0.5)
    want, want_grad = jax.value_and_grad(
        lambda e: pne_loss(logits, labels, e, loss_weight=0.9, **kw)
    )(emb)
    ref, _, ref_stats = pne_reference(logits, labels, emb, loss_weight=0.9, **kw)
    assert ref_stats["num_pairs"] > 16
    np.testing.assert_allclose(want, ref, rtol=1e-5)

    mesh = _mesh(axis_type)

    def per_shard(lg, lb, e):  # [2, h, w, .] each: this device's images
        stats = pne_batch_stats(lg, lb, e, **kw)
        assert stats.term_sum.shape == (2,)
        return jax.tree.map(lambda x: jax.lax.psum(x.sum(0), "data"), stats)

    global_stats = jax.shard_map(per_shard, mesh=mesh, in_specs=P("data"), out_specs=P())

    @jax.jit
    def loss_and_stats(lg, lb, e, w):
        def loss(e):
            stats = global_stats(lg, lb, e)
            return pne_reduce(stats, loss_weight=w), stats

        return jax.value_and_grad(loss, has_aux=True)(e)

    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, shard) for x in (logits, labels, emb)]
    (value, stats), grad = loss_and_stats(*args, 0.9)
    assert isinstance(stats, PNEStats)
    assert int(stats.num_pairs) == ref_stats["num_pairs"]
    assert int(stats.num_entries) == ref_stats["num_entries"]
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6 * np.abs(want_grad).max())


def test_shard_map_with_a_traced_temperature_and_no_pairs_on_some_shards():
    # Images 0-1 have pairs, the others are fully ignored: most shards contribute zeros,
    # and the temperature comes in replicated, as a traced value.
    rng = np.random.default_rng(22)
    logits, labels, emb = random_case(rng, 8, 8, 8, 5, 8, scenario="plain")
    labels[2:] = 255
    want, want_grad = jax.value_and_grad(
        lambda e: pne_loss(logits, labels, e, num_samples=5, temperature=0.25)
    )(emb)
    assert float(want) > 0
    mesh = _mesh("auto")

    def per_shard(lg, lb, e, t):
        stats = pne_batch_stats(lg, lb, e, num_samples=5, temperature=t)
        return jax.tree.map(lambda x: jax.lax.psum(x.sum(0), "data"), stats)

    global_stats = jax.shard_map(
        per_shard, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P()), out_specs=P()
    )
    loss = jax.jit(jax.value_and_grad(lambda e, lg, lb, t: pne_reduce(global_stats(lg, lb, e, t))))
    value, grad = loss(emb, logits, labels, np.float32(0.25))
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6 * np.abs(want_grad).max())
