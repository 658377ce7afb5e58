"""Log-sum-exp of cosine similarities between tiles of rows and one bank of columns per tile.

The PNE loss needs, for each anchor pixel, a log-sum-exp of its similarities to the at
most S positives (or negatives) of one class. Anchors are laid out in tiles of T rows
that share one bank of W columns (`TileLayout`), so the work is a batched matmul per
tile, proportional to rows x W x D and never to classes x pixels.

For every layout, image b, tile t and row r:

    lse[b, t, r] = logsumexp_w( cos(e[rows[b,t,r]], e[cols[b,t,w]]) * inv_temp + col_bias[b,t,w] )

over the columns with `col_key == row_key` (all of them when the keys are None), where
`cos` uses the given inverse norms. Padding rows and rows with no column give 0; which
rows those are follows from the layout, not from the values, so a NaN that a row sees
(a NaN bias, a NaN embedding, or an inf one with its inverse norm 1/inf = 0) makes its
lse NaN instead of passing for an empty row. Tiles
are visited in chunks by a `fori_loop` that stops after the last used tile of the batch,
so the cost follows the pairs actually present rather than the static bound.

The hand-written VJP sends gradient to the row embeddings only, through the dot product
(norms, columns and the temperature are constants, as in the reference loss). It
recomputes each used chunk's softmax rather than storing it for every tile, and adds the
gradients of all layouts into one [B, M, D] buffer in place: the op is memory-bound, not
FLOP-bound. Forward and backward run inside `jax.shard_map` with `check_vma=True`: their
loop carries vary over the manual axes as the inputs do.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


class TileLayout(NamedTuple):
    """Rows (anchors) and their column banks, tile by tile, for a batch of B images.

    Pixel indices equal to M (the number of pixels) mark padding.
    """

    rows: jax.Array  # [B, n_tiles, T] int32 pixel index of each row
    cols: jax.Array  # [B, n_tiles, W] int32 pixel index of each bank column
    col_bias: jax.Array  # [B, n_tiles, W] f32 added to the logit (-inf: no column)
    row_key: jax.Array | None  # [B, n_tiles, T] int32, or None for "every column"
    col_key: jax.Array | None  # [B, n_tiles, W] int32
    tiles_used: jax.Array  # [B] int32: tiles [0, tiles_used) hold all the rows


_PER_IMAGE = TileLayout(0, 0, 0, 0, 0, None)  # vmap axes of a chunk: tiles_used stays whole


def _num_active_chunks(layout: TileLayout, tiles_per_chunk: int) -> jax.Array:
    return (jnp.max(layout.tiles_used) + tiles_per_chunk - 1) // tiles_per_chunk


def _slice_tiles(x: jax.Array, i: jax.Array, tiles_per_chunk: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, i * tiles_per_chunk, tiles_per_chunk, axis=1)


def _chunk(layout: TileLayout, i: jax.Array, tiles_per_chunk: int) -> TileLayout:
    """Tiles [i * q, (i + 1) * q) of every image."""
    parts = (None if x is None else _slice_tiles(x, i, tiles_per_chunk) for x in layout[:5])
    return TileLayout(*parts, layout.tiles_used)


def _gather_units(emb, inv_norm, pixels):
    """Unit embeddings [..., D] in f32 of the given pixels (M = padding gives zeros)."""
    e = emb.at[pixels].get(mode="fill", fill_value=0).astype(jnp.float32)
    return e * inv_norm.at[pixels].get(mode="fill", fill_value=0)[..., None]


def _chunk_logits(emb, inv_norm, tiles: TileLayout, inv_temp):
    """One image, one chunk: masked logits [q, T, W] and the unit columns [q, W, D]."""
    a = _gather_units(emb, inv_norm, tiles.rows)  # [q, T, D]
    x = _gather_units(emb, inv_norm, tiles.cols)  # [q, W, D]
    s = jnp.einsum("qtd,qwd->qtw", a, x, precision=_HIGHEST) * inv_temp
    s = s + tiles.col_bias[:, None, :]
    if tiles.row_key is not None:
        s = jnp.where(tiles.row_key[:, :, None] == tiles.col_key[:, None, :], s, -jnp.inf)
    return s, x


def _has_column(emb, tiles: TileLayout):
    """[q, T] bool: the row is a pixel and sees at least one column.

    Decided from the layout alone (a column is absent only where its bias is -inf or its
    key differs), never from the values: a NaN similarity must give a NaN lse, not pass
    for an empty row.
    """
    present = tiles.col_bias != -jnp.inf  # [q, W]; a NaN bias is a present column
    if tiles.row_key is None:
        seen = jnp.any(present, axis=-1)[:, None]
    else:
        same = tiles.row_key[:, :, None] == tiles.col_key[:, None, :]
        seen = jnp.any(same & present[:, None, :], axis=-1)
    return seen & (tiles.rows < emb.shape[0])


def _chunk_lse(emb, inv_norm, tiles: TileLayout, inv_temp):
    """One image, one chunk: lse [q, T], 0 for padding rows and rows without columns."""
    s, _ = _chunk_logits(emb, inv_norm, tiles, inv_temp)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.where(_has_column(emb, tiles), lse, 0.0)


def _chunk_grad(grad, emb, inv_norm, tiles: TileLayout, lse, g, inv_temp):
    """One image, one chunk: adds d(sum g * lse) / d(row embeddings) into grad [M, D]."""
    s, x = _chunk_logits(emb, inv_norm, tiles, inv_temp)
    p = jnp.where(jnp.isfinite(s), jnp.exp(s - lse[..., None]), 0.0)
    d_units = jnp.einsum("qtw,qwd->qtd", p * g[..., None], x, precision=_HIGHEST)
    row_scale = inv_temp * inv_norm.at[tiles.rows].get(mode="fill", fill_value=0)
    return grad.at[tiles.rows].add(d_units * row_scale[..., None], mode="drop")


def _varying_zeros(shape, *like) -> jax.Array:
    """float32 zeros of `shape` that vary over every manual mesh axis that `like` varies over.

    Under `jax.shard_map` (with its default `check_vma=True`) a loop's initial carry must
    have the type of the body's output, which varies over the manual axes wherever the
    loop's inputs do; `jnp.zeros` varies over none. `full_like` takes its input's variance
    in every JAX this package supports, where the explicit cast is not one API (`lax.pvary`
    was removed in 0.10, `lax.pcast` is newer than 0.8.0). The compiled program is the
    same as with `jnp.zeros`: XLA folds the added zeros away.
    """
    out = jnp.zeros(shape, jnp.float32)
    for x in jax.tree.leaves(like):
        out = out + lax.full_like(x, 0, jnp.float32, shape=())
    return out


def _forward(tiles_per_chunk, inv_temp, emb, inv_norm, layouts):
    lse_fn = jax.vmap(_chunk_lse, (0, 0, _PER_IMAGE, None))
    results = []
    for layout in layouts:

        def body(i, lse, layout=layout):
            chunk = lse_fn(emb, inv_norm, _chunk(layout, i, tiles_per_chunk), inv_temp)
            return lax.dynamic_update_slice_in_dim(lse, chunk, i * tiles_per_chunk, axis=1)

        lse = _varying_zeros(layout.rows.shape, inv_temp, emb, inv_norm, layout)
        active = _num_active_chunks(layout, tiles_per_chunk)
        results.append(lax.fori_loop(0, active, body, lse))
    return tuple(results)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_logsumexp(tiles_per_chunk, inv_temp, emb, inv_norm, layouts):
    return _forward(tiles_per_chunk, inv_temp, emb, inv_norm, layouts)


def _grouped_logsumexp_fwd(tiles_per_chunk, inv_temp, emb, inv_norm, layouts):
    lse = _forward(tiles_per_chunk, inv_temp, emb, inv_norm, layouts)
    return lse, (inv_temp, emb, inv_norm, layouts, lse)


def _grouped_logsumexp_bwd(tiles_per_chunk, residuals, g):
    inv_temp, emb, inv_norm, layouts, lse = residuals
    grad_fn = jax.vmap(_chunk_grad, (0, 0, 0, _PER_IMAGE, 0, 0, None))
    grad = _varying_zeros(emb.shape, inv_temp, emb, inv_norm, layouts, lse, g)
    for layout, lse_l, g_l in zip(layouts, lse, g, strict=True):

        def body(i, grad, layout=layout, lse_l=lse_l, g_l=g_l):
            tiles = _chunk(layout, i, tiles_per_chunk)
            lse_i = _slice_tiles(lse_l, i, tiles_per_chunk)
            g_i = _slice_tiles(g_l, i, tiles_per_chunk)
            return grad_fn(grad, emb, inv_norm, tiles, lse_i, g_i, inv_temp)

        grad = lax.fori_loop(0, _num_active_chunks(layout, tiles_per_chunk), body, grad)
    # No gradient for the temperature, the norms or the layouts (module docstring).
    return None, grad.astype(emb.dtype), None, None


_grouped_logsumexp.defvjp(_grouped_logsumexp_fwd, _grouped_logsumexp_bwd)


def grouped_logsumexp(
    embeddings: jax.Array,
    inv_norm: jax.Array,
    layouts: tuple[TileLayout, ...],
    *,
    inv_temp: float | jax.Array,
    tiles_per_chunk: int,
) -> tuple[jax.Array, ...]:
    """Per-row log-sum-exp over each tile's column bank, for each layout (module docstring).

    Args:
      embeddings: [B, M, D] embeddings of all pixels (any float dtype; computed in f32).
        Gradient flows to the rows only, through the dot product.
      inv_norm: [B, M] f32 inverse norms, treated as constants.
      layouts: the tiles; each `n_tiles` must be a multiple of `tiles_per_chunk`.
      inv_temp: 1 / temperature: a Python float (a compile-time constant) or a traced f32
        scalar; it receives no gradient.
      tiles_per_chunk: tiles computed together per loop step.

    Returns:
      One [B, n_tiles, T] float32 array per layout; 0 for padding rows and rows that see
      no column (from the layout: a NaN among a row's inputs gives NaN).
    """
    for layout in layouts:
        if layout.rows.shape[1] % tiles_per_chunk:
            raise ValueError(
                f"n_tiles={layout.rows.shape[1]} is not a multiple of "
                f"tiles_per_chunk={tiles_per_chunk}"
            )
    inv_norm = lax.stop_gradient(inv_norm.astype(jnp.float32))
    if isinstance(inv_temp, jax.Array):
        inv_temp = lax.stop_gradient(inv_temp.astype(jnp.float32))
    else:
        inv_temp = float(inv_temp)  # a compile-time constant, as XLA can fold it
    return _grouped_logsumexp(int(tiles_per_chunk), inv_temp, embeddings, inv_norm, tuple(layouts))
