"""Which pixels of one image are PNE anchors, and how they are tiled for the matmuls.

This is the data-dependent half of the PNE loss (defined in `pne_jax/losses/pne.py`).
Everything has static shapes: per-pixel masks, counts from sorting, and three
`TileLayout`s whose sizes are fixed by the image size, the class count and S:

* **pairs**: anchors sorted by pair key `(pred j, label k)`, i.e. the reference's class
  visiting order; each kept pair contributes its first `min(|A_jk|, S)` anchors, each
  with the multiplicity that cyclic tiling to S entries gives it.
* **banks**: the first `min(|T_c|, S)` correct pixels of each class c (raster order),
  with their tiling multiplicities. Bank c is the negatives of pairs led by c and the
  positives of pairs whose true class is c.
* **neg** tiles hold anchors grouped by predicted class (bank j), **pos** tiles anchors
  grouped by true class (bank k), and **fallback** tiles the anchors of pairs whose
  class j has no correct pixel: their negatives are their own pair's anchors, which sit
  within the same or a neighbouring tile because a pair keeps at most S <= T anchors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pne_jax.losses.grouped_logsumexp import TileLayout


class LayoutSizes(NamedTuple):
    """Static sizes of the tiling, chosen from the static shapes (see `layout_sizes`)."""

    tile_rows: int  # T: rows per tile, >= S so that a pair spans at most two tiles
    tiles_per_chunk: int  # tiles per step of the scan
    class_tiles: int  # tiles of the neg and pos layouts
    fallback_tiles: int  # tiles of the fallback layout


class PairRows(NamedTuple):
    """Per-anchor quantities of one image, in pair order ([M] each) plus its counts."""

    kept: jax.Array  # anchor entry of a kept pair (its first S anchors)
    multiplicity: jax.Array  # how often it appears among the pair's S anchor entries
    neg_slot: jax.Array  # flat row index in the neg tiles (or fallback tiles)
    is_fallback: jax.Array  # its negatives are its own pair's anchors
    pos_slot: jax.Array  # flat row index in the pos tiles
    num_pairs: jax.Array  # [] kept pairs
    num_anchors: jax.Array  # [] sum of |A_jk| over kept pairs
    dropped_pairs: jax.Array  # [] pairs left out by max_pairs_per_image
    finite_logits: jax.Array  # [] bool: every pixel's maximum logit is finite


class ImageLayout(NamedTuple):
    pairs: PairRows
    neg: TileLayout
    pos: TileLayout
    fallback: TileLayout


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def layout_sizes(
    num_pixels: int,
    num_classes: int,
    num_samples: int,
    gate: tuple[int, int],
    max_pairs_per_image: int | None,
) -> LayoutSizes:
    """Static tile counts that can hold every kept anchor of any image of this shape.

    A kept pair has at most min(S, gate[1]) kept anchors and an image has at most
    C * (C - 1) pairs (or max_pairs_per_image), and never more anchors than pixels;
    grouping rows by class wastes less than one tile per class.
    """
    tile = _round_up(max(num_samples, 8), 8)
    pairs = num_classes * (num_classes - 1)
    if max_pairs_per_image is not None:
        pairs = min(pairs, max_pairs_per_image)
    rows = max(1, min(num_pixels, pairs * min(num_samples, max(gate[1], 0))))
    row_tiles = math.ceil(rows / tile)
    tiles_per_chunk = max(1, min(512 // tile, row_tiles))  # about 512 rows per image per step
    class_tiles = _round_up(row_tiles + min(num_classes, rows), tiles_per_chunk)
    fallback_tiles = _round_up(row_tiles, tiles_per_chunk)
    return LayoutSizes(tile, tiles_per_chunk, class_tiles, fallback_tiles)


def _ceil_div(a: jax.Array, b: jax.Array) -> jax.Array:
    return (a + b - 1) // b


def predict(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First argmax and log max-softmax over the last axis of float32 logits.

    Equal to `jnp.argmax` (first maximum on ties) and `max - logsumexp`, but 3x faster on
    XLA:CPU, which is slow at argmax's (value, index) reduction and at compare-and-select
    reductions: `ceil(min(max - x, 1))` is 0 exactly where x equals the maximum and 1
    elsewhere, so the first maximum is a plain float `min`. Non-finite logits (where the
    reference's weights are NaN) still give a class in [0, C).
    """
    c = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    differs = jnp.ceil(jnp.minimum(top - logits, 1.0))
    first = jnp.min(jnp.arange(c, dtype=jnp.float32) + c * differs, axis=-1)
    pred = jnp.fmax(jnp.fmin(first, c - 1), 0).astype(jnp.int32)
    # A separate logsumexp keeps XLA from materialising the [..., C] gaps for both sums.
    log_conf = top[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return pred, log_conf


def stable_order(key: jax.Array, max_key: int) -> jax.Array:
    """The permutation that sorts int `key` (values in [0, max_key]) stably, [M] int32.

    When (max_key + 1) * M fits in 32 bits, the key and the position are packed into one
    uint32 and sorted as a single operand, which XLA sorts several times faster than
    `argsort`'s (key, index) pair; otherwise it falls back to `argsort`.
    """
    m = key.shape[0]
    if (max_key + 1) * m > 2**32:
        return jnp.argsort(key, stable=True).astype(jnp.int32)
    packed = key.astype(jnp.uint32) * jnp.uint32(m) + jnp.arange(m, dtype=jnp.uint32)
    return (lax.sort(packed) % jnp.uint32(m)).astype(jnp.int32)


def _group_slots(flag, group, num_groups, tile, n_tiles):
    """Slots for the flagged rows when each tile holds rows of a single group.

    Returns (slot [M], tile_group [n_tiles], tiles_used []); unflagged rows get the
    out-of-range slot n_tiles * tile, which scatters drop.
    """
    m = flag.shape[0]
    order = stable_order(jnp.where(flag, group, num_groups), num_groups)
    position = jnp.zeros(m, jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
    count = jnp.zeros(num_groups, jnp.int32).at[group].add(flag.astype(jnp.int32))
    first_row = jnp.cumsum(count) - count
    tiles = _ceil_div(count, tile)
    tile_end = jnp.cumsum(tiles)
    first_tile = tile_end - tiles
    slot = first_tile[group] * tile + position - first_row[group]
    slot = jnp.where(flag, slot, n_tiles * tile)
    tile_ids = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_group = jnp.minimum(jnp.searchsorted(tile_end, tile_ids, side="right"), num_groups - 1)
    return slot, tile_group.astype(jnp.int32), tile_end[-1]


def _scatter_rows(slot, values, size, fill):
    return jnp.full((size,), fill, values.dtype).at[slot].set(values, mode="drop")


def image_layout(
    logits: jax.Array,
    labels: jax.Array,
    *,
    num_samples: int,
    gate: tuple[int, int],
    positive_weighting: bool,
    ignore_index: int,
    max_pairs_per_image: int | None,
    sizes: LayoutSizes,
) -> ImageLayout:
    """Anchors, banks and tiles of one image. logits [M, C] float, labels [M] int."""
    m, c = logits.shape
    s = num_samples
    tile = sizes.tile_rows
    pixel = jnp.arange(m, dtype=jnp.int32)
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)

    # pred: first maximum on ties; log_conf: log max_c softmax, the weight of a positive.
    pred, log_conf = predict(logits)
    # Where a pixel's maximum logit is NaN or inf (a NaN or +inf logit, or all -inf), its
    # prediction and weight are undefined (the reference's softmax is NaN); the caller
    # makes the image's loss NaN. The max is predict's own, merged by XLA: no extra pass.
    finite_logits = jnp.all(jnp.isfinite(jnp.max(logits, axis=-1)))
    valid = labels != ignore_index
    label = jnp.where(valid, labels, 0)
    correct = valid & (pred == labels)
    in_image = jnp.zeros(c, jnp.int32).at[label].add(valid.astype(jnp.int32)) > 0
    num_true = jnp.zeros(c, jnp.int32).at[label].add(correct.astype(jnp.int32))  # |T_c|

    # Banks: the first min(|T_c|, S) correct pixels of each class, in raster order.
    by_class = stable_order(jnp.where(correct, labels, c), c)
    first_true = jnp.cumsum(num_true) - num_true
    entry = jnp.arange(s, dtype=jnp.int32)
    in_bank = entry[None, :] < num_true[:, None]  # [C, S]
    bank_pixel = by_class[jnp.minimum(first_true[:, None] + entry[None, :], m - 1)]
    bank_pixel = jnp.where(in_bank, bank_pixel, m)
    bank_mult = _ceil_div(s - entry[None, :], jnp.maximum(num_true[:, None], 1))
    bank_log_mult = jnp.where(in_bank, jnp.log(bank_mult.astype(jnp.float32)), -jnp.inf)
    bank_log_weight = bank_log_mult
    if positive_weighting:
        bank_log_weight = bank_log_mult + log_conf.at[bank_pixel].get(mode="fill", fill_value=0)

    # Pairs: misclassified pixels whose predicted class occurs in the labels, sorted by
    # (pred, label) with raster order inside a pair (stable sort).
    anchor = valid & ~correct & in_image[pred]
    no_pair = c * c
    key = jnp.where(anchor, pred * c + labels, no_pair)
    order = stable_order(key, no_pair)
    key = key[order]
    first = jnp.concatenate([jnp.ones(1, bool), key[1:] != key[:-1]])
    last = jnp.concatenate([key[1:] != key[:-1], jnp.ones(1, bool)])
    run_start = lax.cummax(jnp.where(first, pixel, 0))
    run_end = lax.cummin(jnp.where(last, pixel, m - 1), reverse=True)
    size = run_end - run_start + 1  # |A_jk|
    rank = pixel - run_start
    pred_class = jnp.minimum(key // c, c - 1)
    true_class = key % c
    pair_ok = (key < no_pair) & (num_true[true_class] > 0) & (gate[0] <= size) & (size <= gate[1])
    dropped = jnp.zeros((), jnp.int32)
    if max_pairs_per_image is not None:
        ordinal = jnp.cumsum((first & pair_ok).astype(jnp.int32)) - 1
        over = pair_ok & (ordinal >= max_pairs_per_image)
        dropped = jnp.sum(first & over, dtype=jnp.int32)
        pair_ok = pair_ok & ~over
    kept = pair_ok & (rank < s)
    multiplicity = jnp.where(kept, _ceil_div(s - rank, size), 0)
    log_mult = jnp.where(kept, jnp.log(jnp.maximum(multiplicity, 1).astype(jnp.float32)), -jnp.inf)
    fallback = num_true[pred_class] == 0
    anchor_pixel = order.astype(jnp.int32)

    def class_tiles(flag, group, log_weight):
        slot, tile_group, used = _group_slots(flag, group, c, tile, sizes.class_tiles)
        rows = _scatter_rows(slot, anchor_pixel, sizes.class_tiles * tile, m)
        tiles = TileLayout(
            rows=rows.reshape(sizes.class_tiles, tile),
            cols=bank_pixel[tile_group],
            col_bias=log_weight[tile_group],
            row_key=None,
            col_key=None,
            tiles_used=used,
        )
        return slot, tiles

    neg_slot, neg = class_tiles(kept & ~fallback, pred_class, bank_log_mult)
    pos_slot, pos = class_tiles(kept, true_class, bank_log_weight)

    # Fallback anchors stay in pair order, packed; a tile's bank is its own rows and
    # those of both neighbours, restricted to the same pair by the keys.
    in_fallback = kept & fallback
    n_fb = sizes.fallback_tiles * tile
    fb_slot = jnp.where(in_fallback, jnp.cumsum(in_fallback.astype(jnp.int32)) - 1, n_fb)
    fb_count = jnp.sum(in_fallback, dtype=jnp.int32)

    def neighbourhood(values, fill):
        tiles = _scatter_rows(fb_slot, values, n_fb, fill).reshape(sizes.fallback_tiles, tile)
        padded = jnp.pad(tiles, ((1, 1), (0, 0)), constant_values=fill)
        return tiles, jnp.concatenate([padded[:-2], padded[1:-1], padded[2:]], axis=-1)

    fb_rows, fb_cols = neighbourhood(anchor_pixel, m)
    fb_row_key, fb_col_key = neighbourhood(key, no_pair)
    _, fb_bias = neighbourhood(log_mult, -jnp.inf)
    fb = TileLayout(fb_rows, fb_cols, fb_bias, fb_row_key, fb_col_key, _ceil_div(fb_count, tile))

    first_kept = first & pair_ok
    pairs = PairRows(
        kept=kept,
        multiplicity=multiplicity,
        neg_slot=jnp.where(fallback, fb_slot, neg_slot),
        is_fallback=fallback,
        pos_slot=pos_slot,
        num_pairs=jnp.sum(first_kept, dtype=jnp.int32),
        num_anchors=jnp.sum(jnp.where(first_kept, size, 0), dtype=jnp.int32),
        dropped_pairs=dropped,
        finite_logits=finite_logits,
    )
    return ImageLayout(pairs, neg, pos, fb)
