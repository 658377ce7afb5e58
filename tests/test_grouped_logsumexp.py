"""grouped_logsumexp against a dense float64 NumPy computation, value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pne_jax.losses.grouped_logsumexp import TileLayout, grouped_logsumexp


def _random_layout(rng, b, m, n_tiles, t, w, used, keyed):
    rows = rng.integers(0, m, (b, n_tiles, t))
    rows[rng.random(rows.shape) < 0.2] = m  # padding rows
    rows[:, used:] = m  # tiles past the used ones hold no rows
    cols = rng.integers(0, m, (b, n_tiles, w))
    bias = rng.normal(size=(b, n_tiles, w))
    bias[rng.random(bias.shape) < 0.2] = -np.inf  # absent columns
    row_key = col_key = None
    if keyed:
        row_key = rng.integers(0, 3, (b, n_tiles, t)).astype(np.int32)
        col_key = rng.integers(0, 3, (b, n_tiles, w)).astype(np.int32)
    tiles_used = np.full((b,), used, np.int32)
    tiles_used[0] = max(used - 1, 0)  # the batch maximum decides what is computed
    rows[0, tiles_used[0] :] = m
    return TileLayout(
        rows.astype(np.int32),
        cols.astype(np.int32),
        bias.astype(np.float32),
        row_key,
        col_key,
        tiles_used,
    )


def _dense(emb, inv_norm, layout, inv_temp, weights):
    """Float64 value of sum(weights * lse) and its gradient w.r.t. the row embeddings."""
    scale = np.asarray(inv_norm, np.float64)[..., None]
    u = np.asarray(emb, np.float64) * scale
    b, m, d = u.shape
    value, grad = 0.0, np.zeros_like(u)
    lse_all = np.zeros(layout.rows.shape)
    for i in range(b):
        for t in range(layout.rows.shape[1]):
            for r in range(layout.rows.shape[2]):
                row = layout.rows[i, t, r]
                if row >= m:
                    continue
                cols = layout.cols[i, t]
                s = u[i, cols] @ u[i, row] * inv_temp + layout.col_bias[i, t]
                if layout.row_key is not None:
                    s = np.where(layout.col_key[i, t] == layout.row_key[i, t, r], s, -np.inf)
                if not np.isfinite(s).any():
                    continue
                top = s.max()
                lse = top + np.log(np.exp(s - top).sum())
                lse_all[i, t, r] = lse
                p = np.exp(s - lse)
                value += weights[i, t, r] * lse
                grad[i, row] += weights[i, t, r] * inv_temp * (p @ u[i, cols]) * scale[i, row]
    return value, grad, lse_all


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("tiles_per_chunk", [1, 2])
def test_matches_dense_float64(keyed, tiles_per_chunk):
    rng = np.random.default_rng(7 + keyed + 2 * tiles_per_chunk)
    b, m, d, n_tiles, t, w = 2, 20, 6, 4, 3, 5
    layout = _random_layout(rng, b, m, n_tiles, t, w, used=3, keyed=keyed)
    layout.col_bias[1, 1] = -np.inf  # a used tile whose rows see no column
    layout.rows[1, 1, 0] = 0
    emb = rng.normal(size=(b, m, d)).astype(np.float32)
    inv_norm = rng.uniform(0.1, 10, size=(b, m)).astype(np.float32)  # any constant scale
    weights = rng.normal(size=(b, n_tiles, t)).astype(np.float32)

    def f(e):
        (lse,) = grouped_logsumexp(
            e, inv_norm, (layout,), inv_temp=2.0, tiles_per_chunk=tiles_per_chunk
        )
        return jnp.sum(lse * weights), lse

    (value, lse), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(emb)
    want_value, want_grad, want_lse = _dense(emb, inv_norm, layout, 2.0, weights)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    # Rows without any column and padding rows are exactly 0 and get no gradient.
    present = layout.col_bias != -np.inf  # [b, n_tiles, w]
    if keyed:
        seen = layout.row_key[..., None] == layout.col_key[:, :, None, :]
        has_col = np.any(seen & present[:, :, None, :], axis=-1)
    else:
        has_col = np.broadcast_to(np.any(present, axis=-1)[..., None], layout.rows.shape)
    empty = (layout.rows >= m) | ~has_col
    assert np.count_nonzero(empty & (layout.rows < m)) > 0, "no row without columns: add one"
    assert np.all(np.asarray(lse)[empty] == 0)
    used = np.zeros((b, m), bool)
    for i in range(b):
        used[i, layout.rows[i][~empty[i]]] = True
    assert 0 < used.sum() < b * m
    assert np.all(np.asarray(grad)[~used] == 0)


def test_skipped_chunks_are_not_computed():
    """Rows placed past tiles_used are outside the contract: they must come out as 0."""
    rng = np.random.default_rng(3)
    layout = _random_layout(rng, 1, 10, 4, 2, 3, used=4, keyed=False)
    layout = layout._replace(tiles_used=np.array([2], np.int32))
    emb = rng.normal(size=(1, 10, 4)).astype(np.float32)
    (lse,) = grouped_logsumexp(
        emb, np.ones((1, 10), np.float32), (layout,), inv_temp=1.0, tiles_per_chunk=2
    )
    assert np.all(np.asarray(lse)[:, 2:] == 0)
    assert np.any(np.asarray(lse)[:, :2] != 0)


def test_tile_count_must_divide_into_chunks():
    rng = np.random.default_rng(0)
    layout = _random_layout(rng, 1, 5, 3, 2, 2, used=3, keyed=False)
    with pytest.raises(ValueError, match="multiple of tiles_per_chunk"):
        grouped_logsumexp(
            np.zeros((1, 5, 2), np.float32),
            np.ones((1, 5), np.float32),
            (layout,),
            inv_temp=1.0,
            tiles_per_chunk=2,
        )


@pytest.mark.parametrize("keyed", [False, True])
def test_inside_shard_map_with_check_vma(keyed):
    """Per-device rows and banks inside `jax.shard_map` (check_vma=True, the default): the
    loop carries must vary over the mesh like the body's outputs, forward and backward."""
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
    rng = np.random.default_rng(11 + keyed)
    b, m, d, n_tiles, t, w = 8, 20, 6, 4, 3, 5
    layout = _random_layout(rng, b, m, n_tiles, t, w, used=3, keyed=keyed)
    layout = layout._replace(tiles_used=rng.integers(0, n_tiles + 1, b).astype(np.int32))
    emb = rng.normal(size=(b, m, d)).astype(np.float32)
    inv_norm = rng.uniform(0.5, 2, size=(b, m)).astype(np.float32)
    weights = rng.normal(size=(b, n_tiles, t)).astype(np.float32)
    # Rows past each image's tiles_used are outside the contract (see above).
    tiles = np.arange(n_tiles)[None, :, None]
    rows = np.where(tiles < layout.tiles_used[:, None, None], layout.rows, m).astype(np.int32)
    layout = layout._replace(rows=rows)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def per_device(e, inv_norm, layout, weights):
        (lse,) = grouped_logsumexp(e, inv_norm, (layout,), inv_temp=2.0, tiles_per_chunk=2)
        return jax.lax.psum(jnp.sum(lse * weights), "data"), lse

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=(P(), P("data")))
    (value, lse), grad = jax.jit(jax.value_and_grad(sharded, has_aux=True))(
        emb, inv_norm, layout, weights
    )
    want_value, want_grad, want_lse = _dense(emb, inv_norm, layout, 2.0, weights)
    assert np.count_nonzero(want_lse) > 20
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())


@pytest.mark.parametrize("keyed", [False, True])
def test_non_finite_inputs_give_nan_rows_and_empty_rows_stay_zero(keyed):
    """Which rows are empty follows from the layout: a NaN that a row sees (as an inf
    embedding gives with its inverse norm 1/|e| = 0, as in pne_loss) makes its lse NaN and
    must not pass for an empty row, while rows without columns stay 0."""
    m = 6
    # Tile 0: rows 0 and 1 see columns 3, 4, 5 (keyed: row 1 sees only column 5, whose
    # key is its own). Tile 1: row 2 sees no column (all biases -inf), then a padding row.
    rows = np.array([[[0, 1], [2, m]]], np.int32)
    cols = np.array([[[3, 4, 5], [3, 4, 5]]], np.int32)
    bias = np.array([[[0.0, 0.5, 1.0], [-np.inf] * 3]], np.float32)
    row_key = col_key = None
    if keyed:
        row_key = np.array([[[0, 1], [0, 0]]], np.int32)
        col_key = np.array([[[0, 0, 1], [0, 0, 0]]], np.int32)
    layout = TileLayout(rows, cols, bias, row_key, col_key, np.array([2], np.int32))
    rng = np.random.default_rng(5)
    clean = rng.normal(size=(1, m, 4)).astype(np.float32)

    @jax.jit
    def lse_jit(emb, layout):
        inv_norm = 1 / jnp.linalg.norm(emb, axis=-1)
        (lse,) = grouped_logsumexp(emb, inv_norm, (layout,), inv_temp=1.0, tiles_per_chunk=1)
        return lse

    def lse_of(emb, layout=layout):
        return np.asarray(lse_jit(emb, layout))

    inv_norm = 1 / np.linalg.norm(clean, axis=-1)
    _, _, want = _dense(clean, inv_norm, layout, 1.0, np.zeros(rows.shape))
    np.testing.assert_allclose(lse_of(clean), want, rtol=1e-6)
    assert np.all(np.isfinite(want[0, 0])) and np.all(want[0, 1] == 0)
    for bad in (np.nan, np.inf):
        emb = clean.copy()
        emb[0, 4, 1] = bad  # column 4: seen by row 0, and by row 1 unless keyed
        lse = lse_of(emb)
        assert np.isnan(lse[0, 0, 0]), bad
        assert np.isnan(lse[0, 0, 1]) != keyed, bad
        if keyed:
            np.testing.assert_allclose(lse[0, 0, 1], want[0, 0, 1], rtol=1e-6)
        np.testing.assert_array_equal(lse[0, 1], [0.0, 0.0])  # empty and padding rows
        emb[0, 2] = bad  # the empty row's own embedding: it still has nothing to sum
        assert lse_of(emb)[0, 1, 0] == 0.0
    # A NaN bias is a present column (a NaN weight), not an absent one: column 5 is seen
    # by row 1, and by row 0 unless keyed.
    nan_bias = bias.copy()
    nan_bias[0, 0, 2] = np.nan
    lse = lse_of(clean, layout._replace(col_bias=nan_bias))
    assert np.isnan(lse[0, 0, 1]) and np.isnan(lse[0, 0, 0]) != keyed
    np.testing.assert_array_equal(lse[0, 1], [0.0, 0.0])
