"""The pixel-wise contrastive loss of Wang, Zhou et al., ICCV 2021 (no memory bank).

*Exploring Cross-Image Pixel Contrast for Semantic Segmentation* (arXiv 2101.11939);
reference code `tfzhou/ContrastiveSeg`, `lib/loss/loss_contrast.py`, `PixelContrastLoss`,
whose value this module computes in static shapes (the random choice of anchors aside,
which comes from an explicit `key`). Defaults are the official Cityscapes configs'
(`configs/cityscapes/H_48_D_4.json`, key "contrast"): temperature 0.1, base temperature
0.07, `max_samples` 1024, `max_views` 100, loss weight 0.1.

With `pred = argmax logits` (first maximum on ties) and `labels` the ground truth:

* per image, the candidate classes are the labelled classes (not `ignore_index`) with
  more than `max_views` pixels; `total` counts the (image, class) candidates of the whole
  batch (global, also when the batch is sharded), and every candidate gives
  `n_view = min(max_samples // total, max_views)` anchors (none if `total` is 0);
* a candidate's hard pixels are labelled c and predicted otherwise, its easy pixels are
  labelled and predicted c. With H hard and E easy pixels (H + E > max_views >= n_view)
  it keeps n_view // 2 hard and the rest easy if both H, E >= n_view / 2; otherwise all
  of the short kind and the rest from the other. Which ones: uniformly at random without
  replacement (the smallest of per-pixel random keys), a pure function of `key`, the
  inputs and the image's index in the global batch (not of how the batch is sharded);
* the N = total * n_view anchors (feature vectors L2-normalised as `F.normalize`, eps
  1e-12, unless `normalize=False`) are contrasted with each other: s_ij = f_i . f_j / T,
  same class positive (itself excluded), other class negative, and
  `l_i = -mean_{j in pos(i)} [s_ij - log(exp(s_ij) + sum_{k in neg(i)} exp(s_ik))]`
  (computed as `softplus(logsumexp_neg(i) - s_ij)`; 0 when i has no negative);
* `loss = loss_weight * (T / base_temperature) * mean_i l_i`.

Deviations from the official code, where it crashes or gives NaN: no candidate (an
all-ignored batch, or only classes of at most `max_views` pixels) or n_view == 0 (more
candidates than `max_samples`) gives 0 with a zero gradient; an anchor without a
positive (n_view == 1 and its class in one image only) is left out of the mean (and
counted apart in the statistics); 0 if no anchor has one. Labels outside [0, C) other
than `ignore_index` are ignored here (the official code would sample them as all-hard
classes; check a batch eagerly with `validate_labels`). The official gather buffer is
[total, n_view, D]; here it is `max_samples` rows (N <= max_samples), the rows beyond N
masked, so shapes are static and nothing is read back to the host.

Only `embeddings` get gradient (through the normalisation); logits and the temperatures
get none (stop_gradient), `loss_weight` a linear one. `temperature`, `base_temperature`
and `loss_weight` may be traced scalars (one compilation for all values); `max_views`,
`max_samples`, `ignore_index` and `normalize` are static. Non-finite embeddings matter
only where they are sampled (they give NaN there).

Cost: O(B h w log(h w)) for the sampling (one sort of each image's pixels by class,
hardness and random key) plus O(max_samples^2 D) for the contrast, whose matrix is
[max_samples, max_samples] whatever N is.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec

from pne_jax.losses.pne import NORM_EPSILON, _check_int, _check_scalar


class PixelContrastSample(NamedTuple):
    """The anchors `pixel_contrast_sample` chooses, in a buffer of `max_samples` rows.

    Rows [0, N) hold the anchors, N = num_candidates * n_view, candidate by candidate in
    (image, class) order, each candidate's hard pixels first; the other rows are 0 and
    `valid` is False there.

    Attributes:
      image: int32 [max_samples], the anchor's image (index in the global batch).
      pixel: int32 [max_samples], the anchor's flat pixel index in its image (row * w + col).
      label: int32 [max_samples], the anchor's class (its ground-truth label).
      hard: bool [max_samples], whether the anchor is mispredicted (prediction != label).
      valid: bool [max_samples], the rows that hold an anchor (row < N).
      n_view: int32 [], anchors per candidate class.
      num_candidates: int32 [], (image, class) candidates in the batch (official `total_classes`).
    """

    image: jax.Array
    pixel: jax.Array
    label: jax.Array
    hard: jax.Array
    valid: jax.Array
    n_view: jax.Array
    num_candidates: jax.Array


class PixelContrastStats(NamedTuple):
    """Statistics of one batch's contrast; `pixel_contrast_reduce` turns them into the loss.

    All fields are scalars. The contrast is global over the batch, so these are not
    per-image statistics: summing the statistics of two batches and reducing gives the
    mean over the anchors of both, each batch contrasted only within itself (not the loss
    of one batch made of both).

    Attributes:
      term_sum: float32, (T / base_temperature) * sum of l_i over the anchors with a
        positive (differentiable with respect to the embeddings).
      num_anchors: int32, anchors with at least one positive (the divisor).
      num_sampled: int32, all anchors N = num_candidates * n_view (with or without positive).
      num_candidates: int32, (image, class) candidates (official `total_classes`).
      n_view: int32, anchors per candidate (a sum of n_views once batches are summed).
    """

    term_sum: jax.Array
    num_anchors: jax.Array
    num_sampled: jax.Array
    num_candidates: jax.Array
    n_view: jax.Array


def _check_key(key) -> None:
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.shape(key) == ():
            return
    elif dtype == jnp.uint32 and jnp.ndim(key) == 1:
        return
    raise ValueError(
        "key must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got "
        f"{type(key).__name__} of shape {jnp.shape(key)} and dtype {dtype}"
    )


def _check_arrays(logits, labels, embeddings=None) -> None:
    arrays = {"logits": (logits, "[B, h, w, C]"), "labels": (labels, "[B, h, w]")}
    if embeddings is not None:
        arrays["embeddings"] = (embeddings, "[B, h, w, D]")
    for name, (x, dims) in arrays.items():
        if len(jnp.shape(x)) != dims.count(",") + 1:
            raise ValueError(f"{name} must have shape {dims}, got shape {jnp.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"labels must be an integer array of class ids, got dtype {jnp.result_type(labels)}"
            " (cast with labels.astype(jnp.int32))"
        )
    for name in ("logits", "embeddings")[: len(arrays) - 1]:
        dtype = jnp.result_type(arrays[name][0])
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {dtype}")
    spatial = jnp.shape(labels)
    others = [jnp.shape(logits)] + ([] if embeddings is None else [jnp.shape(embeddings)])
    if any(shape[:-1] != spatial for shape in others):
        raise ValueError(
            f"logits {jnp.shape(logits)}, labels {spatial}"
            + ("" if embeddings is None else f" and embeddings {jnp.shape(embeddings)}")
            + " must agree on the B, h, w dimensions (resize the labels to the features' "
            "resolution with resize_labels_nearest)"
        )
    if 0 in spatial or jnp.shape(logits)[-1] < 1:
        raise ValueError(
            f"logits has an empty dimension: shape {jnp.shape(logits)}; the loss needs at "
            "least one image of at least 1x1 pixels and one class"
        )
    if embeddings is not None and jnp.shape(embeddings)[-1] < 1:
        raise ValueError("embeddings must have at least one channel")


def _check_options(max_views, max_samples, ignore_index) -> dict:
    max_views = _check_int("max_views", max_views, 1)
    max_samples = _check_int("max_samples", max_samples, 1)
    if max_views > max_samples:
        raise ValueError(
            f"max_views={max_views} must be <= max_samples={max_samples} (at most max_samples "
            "anchors are contrasted); lower max_views or raise max_samples"
        )
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}") from None
    return dict(max_views=max_views, max_samples=max_samples, ignore_index=ignore_index)


def _image_order(key, index, logits, labels, *, ignore_index):
    """One image's pixels sorted by (class, easiness, random key): group g = 2 c + easy.

    Returns the sorted flat pixel indices [m], the start of each group in that order
    [2C + 1] (the last group: ignored pixels) and the group sizes [2C + 1].
    """
    m, c = logits.shape
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
    easy = (pred == labels).astype(jnp.int32)
    group = jnp.where(valid, 2 * labels + easy, 2 * c).astype(jnp.int32)
    # The image's own key from its global index: the same bits however the batch is split.
    bits = jax.random.bits(jax.random.fold_in(key, index), (m,), jnp.uint32)
    iota = jnp.arange(m, dtype=jnp.int32)
    _, _, order = jax.lax.sort((group, bits, iota), num_keys=3)
    sizes = jnp.zeros(2 * c + 1, jnp.int32).at[group].add(1)
    starts = jnp.cumsum(sizes) - sizes
    return order, starts, sizes


def _sample_body(key, logits, labels, *, max_views, max_samples, ignore_index):
    b, h, w, c = logits.shape
    m = h * w
    logits = jax.lax.stop_gradient(logits).reshape(b, m, c)
    labels = labels.reshape(b, m).astype(jnp.int32)
    order, starts, sizes = jax.vmap(
        functools.partial(_image_order, ignore_index=ignore_index), in_axes=(None, 0, 0, 0)
    )(key, jnp.arange(b, dtype=jnp.int32), logits, labels)
    num_hard, num_easy = sizes[:, 0 : 2 * c : 2], sizes[:, 1 : 2 * c : 2]  # [B, C]

    candidate = (num_hard + num_easy > max_views).reshape(-1)  # [B * C], (image, class) order
    total = jnp.sum(candidate, dtype=jnp.int32)
    n_view = jnp.where(total > 0, jnp.minimum(max_samples // jnp.maximum(total, 1), max_views), 0)
    # The keep rule, in integers (x >= n_view / 2 is 2 x >= n_view).
    enough_hard, enough_easy = 2 * num_hard >= n_view, 2 * num_easy >= n_view
    keep_hard = jnp.where(
        enough_hard & enough_easy, n_view // 2, jnp.where(enough_hard, n_view - num_easy, num_hard)
    ).reshape(-1)

    # Row r of the buffer: candidate k = r // n_view (the k-th True of `candidate`), its
    # view v = r % n_view: hard pixel v, or easy pixel v - keep_hard.
    rows = jnp.arange(max_samples, dtype=jnp.int32)
    valid = rows < total * n_view
    k = rows // jnp.maximum(n_view, 1)
    flat = jnp.searchsorted(jnp.cumsum(candidate, dtype=jnp.int32), k, side="right")
    flat = jnp.where(valid, jnp.minimum(flat, b * c - 1), 0).astype(jnp.int32)
    image, label = flat // c, flat % c
    view = rows - k * n_view
    hard = valid & (view < keep_hard[flat])
    group = 2 * label + jnp.where(hard, 0, 1)
    position = starts[image, group] + jnp.where(hard, view, view - keep_hard[flat])
    pixel = _per_image_take(order, image, jnp.clip(position, 0, m - 1))
    zero = jnp.zeros_like(rows)
    return PixelContrastSample(
        image=jnp.where(valid, image, zero),
        pixel=jnp.where(valid, pixel, zero),
        label=jnp.where(valid, label, zero),
        hard=hard,
        valid=valid,
        n_view=n_view.astype(jnp.int32),
        num_candidates=total,
    )


def _per_image_take(x, image, index):
    """`x[image[r], index[r]]` for x [B, m, ...], as B local gathers and a sum over B.

    Each image (device, when the batch is sharded) gathers from its own rows; the sum
    over the batch is one small reduction of [S, ...], never a gather of the whole x.
    """
    taken = jnp.take(x, index, axis=1, mode="clip")  # [B, S, ...]
    mine = image[None, :] == jnp.arange(x.shape[0], dtype=image.dtype)[:, None]  # [B, S]
    mine = mine.reshape(mine.shape + (1,) * (taken.ndim - 2))
    return jnp.sum(jnp.where(mine, taken, jnp.zeros((), taken.dtype)), axis=0)


def _stats_body(
    key, logits, labels, embeddings, inv_temp, ratio, *, normalize, **options
) -> tuple[PixelContrastStats, PixelContrastSample]:
    sample = _sample_body(key, logits, labels, **options)
    b, h, w, d = embeddings.shape
    feats = _per_image_take(embeddings.reshape(b, h * w, d), sample.image, sample.pixel)
    feats = feats.astype(jnp.float32)  # [S, D]
    if normalize:  # x / max(|x|, eps) as F.normalize; no NaN gradient at x = 0
        sq = jnp.sum(feats * feats, axis=-1, keepdims=True)
        feats = feats * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPSILON**2))
    valid = sample.valid
    feats = jnp.where(valid[:, None], feats, 0.0)
    sim = jnp.dot(feats, feats.T, precision=jax.lax.Precision.HIGHEST) * inv_temp  # [S, S]

    pair = valid[:, None] & valid[None, :]
    same = sample.label[:, None] == sample.label[None, :]
    positive = pair & same & ~jnp.eye(valid.shape[0], dtype=bool)
    negative = pair & ~same
    # log(exp(s_ij) + sum_neg exp(s_ik)) - s_ij = softplus(lse_neg_i - s_ij), the lse
    # shifted by the negatives' own (constant) maximum.
    has_neg = jnp.any(negative, axis=1)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(negative, sim, -jnp.inf), axis=1))
    top = jnp.where(has_neg, top, 0.0)
    total_neg = jnp.sum(jnp.exp(jnp.where(negative, sim - top[:, None], -jnp.inf)), axis=1)
    lse_neg = top + jnp.log(jnp.where(has_neg, total_neg, 1.0))
    term = jnp.where(positive & has_neg[:, None], jax.nn.softplus(lse_neg[:, None] - sim), 0.0)
    num_pos = jnp.sum(positive, axis=1, dtype=jnp.int32)
    has_pos = num_pos > 0
    per_anchor = jnp.sum(term, axis=1) / jnp.maximum(num_pos, 1).astype(jnp.float32)
    term_sum = ratio * jnp.sum(jnp.where(has_pos, per_anchor, 0.0))
    stats = PixelContrastStats(
        term_sum=term_sum,
        num_anchors=jnp.sum(has_pos, dtype=jnp.int32),
        num_sampled=jnp.sum(valid, dtype=jnp.int32),
        num_candidates=sample.num_candidates,
        n_view=sample.n_view,
    )
    return stats, sample


def _replicated(body, first, num_outputs_like):
    """Runs `body` in Auto mode under an Explicit mesh (as pne.py), outputs replicated.

    `jax.make_mesh` gives Explicit axes by default, where every gather would need an
    output sharding; the compiler shards the per-image work like the batch instead.
    """
    sharding = jax.typeof(first).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return body
    explicit = tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    )
    if not explicit:
        return body

    def run(*args):
        with jax.sharding.use_abstract_mesh(mesh):
            out = jax.tree.map(lambda _: PartitionSpec(), num_outputs_like)
            return jax.sharding.auto_axes(body, axes=explicit, out_sharding=out)(*args)

    return run


_SAMPLE_STATIC = ("max_views", "max_samples", "ignore_index")
_STATIC = (*_SAMPLE_STATIC, "normalize")


def _sample_like(max_samples):
    rows = jax.ShapeDtypeStruct((max_samples,), jnp.int32)
    return PixelContrastSample(rows, rows, rows, rows, rows, rows, rows)


@functools.partial(jax.jit, static_argnames=_SAMPLE_STATIC)
def _sample_jit(key, logits, labels, **options):
    body = functools.partial(_sample_body, **options)
    return _replicated(body, logits, _sample_like(options["max_samples"]))(key, logits, labels)


def _stats(key, logits, labels, embeddings, inv_temp, ratio, **options):
    body = functools.partial(_stats_body, **options)
    like = (PixelContrastStats(*[0] * 5), _sample_like(options["max_samples"]))
    stats, _ = _replicated(body, logits, like)(key, logits, labels, embeddings, inv_temp, ratio)
    return stats


def _reduce(stats: PixelContrastStats, loss_weight) -> jax.Array:
    count = jnp.sum(stats.num_anchors).astype(jnp.float32)
    total = jnp.sum(stats.term_sum)
    return jnp.where(count > 0, loss_weight * total / jnp.maximum(count, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _stats_jit(key, logits, labels, embeddings, inv_temp, ratio, **options):
    return _stats(key, logits, labels, embeddings, inv_temp, ratio, **options)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _loss_jit(key, logits, labels, embeddings, inv_temp, ratio, loss_weight, **options):
    return _reduce(_stats(key, logits, labels, embeddings, inv_temp, ratio, **options), loss_weight)


def _temperatures(temperature, base_temperature):
    """1 / T and T / base_T, with no gradient to either temperature."""
    t = _check_scalar("temperature", temperature, positive=True)
    base = _check_scalar("base_temperature", base_temperature, positive=True)
    if isinstance(t, jax.Array) or isinstance(base, jax.Array):
        t, base = jax.lax.stop_gradient(t), jax.lax.stop_gradient(base)
        return 1.0 / t, t / base
    # Rounded once from float64, as compile-time constants would be.
    return np.float32(1.0 / float(t)), np.float32(float(t) / float(base))


def pixel_contrast_sample(
    key: jax.Array,
    logits: jax.Array,
    labels: jax.Array,
    *,
    max_views: int = 100,
    max_samples: int = 1024,
    ignore_index: int = 255,
) -> PixelContrastSample:
    """The anchors the loss contrasts for this `key` (module docstring: the sampling).

    `pixel_contrast_stats` and `pixel_contrast_loss` with the same key, inputs and
    options contrast exactly these anchors.

    Args:
      key: a PRNG key (`jax.random.key(seed)`); image i uses `fold_in(key, i)`.
      logits: [B, h, w, C] segmentation logits at the features' resolution.
      labels: [B, h, w] int ground truth at that resolution, `ignore_index` for ignored.
      max_views: a class needs more than this many pixels in an image to be a candidate,
        and gives at most this many anchors (static).
      max_samples: at most this many anchors in all, the buffer's rows (static).
      ignore_index: label of ignored pixels.

    Returns:
      `PixelContrastSample` with [max_samples] rows.

    Example:
    >>> import numpy as np
    >>> labels = np.array([[[0, 0, 0], [1, 1, 1]]])  # [B=1, h=2, w=3]
    >>> logits = np.array([[[[1, 0]] * 3, [[0, 1], [0, 1], [1, 0]]]], np.float32)
    >>> s = pixel_contrast_sample(jax.random.key(0), logits, labels, max_views=2, max_samples=4)
    >>> int(s.num_candidates), int(s.n_view), s.valid.tolist(), s.label.tolist()
    (2, 2, [True, True, True, True], [0, 0, 1, 1])
    >>> bool(s.hard[2]), int(s.pixel[2])  # class 1: one hard pixel (5), kept, and one easy
    (True, 5)
    """
    _check_key(key)
    _check_arrays(logits, labels)
    options = _check_options(max_views, max_samples, ignore_index)
    return _sample_jit(key, logits, labels, **options)


def pixel_contrast_stats(
    key: jax.Array,
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    base_temperature: float | jax.Array = 0.07,
    max_views: int = 100,
    max_samples: int = 1024,
    ignore_index: int = 255,
    normalize: bool = True,
) -> PixelContrastStats:
    """Statistics of the batch's contrast, to reduce with `pixel_contrast_reduce`.

    The statistics carry the factor T / base_temperature (in `term_sum`), so the
    reduction needs only the loss weight. Summing the statistics of several batches
    averages over all their anchors, each batch contrasted within itself.

    Args:
      key, logits, labels, embeddings, temperature, base_temperature, max_views,
        max_samples, ignore_index, normalize: as in `pixel_contrast_loss`.

    Returns:
      `PixelContrastStats` of scalars; `term_sum` is differentiable with respect to
      `embeddings` only.
    """
    _check_key(key)
    _check_arrays(logits, labels, embeddings)
    options = _check_options(max_views, max_samples, ignore_index)
    inv_temp, ratio = _temperatures(temperature, base_temperature)
    return _stats_jit(
        key, logits, labels, embeddings, inv_temp, ratio, normalize=bool(normalize), **options
    )


def pixel_contrast_reduce(
    stats: PixelContrastStats, *, loss_weight: float | jax.Array = 0.1
) -> jax.Array:
    """`loss_weight * sum(term_sum) / sum(num_anchors)`; 0 (zero gradient) without anchors.

    Args:
      stats: `PixelContrastStats` of any leading shape (all of it is summed).
      loss_weight: a number (checked finite) or a JAX scalar, traced or not.

    Returns:
      [] float32 loss.
    """
    if not isinstance(stats, PixelContrastStats):
        raise TypeError(
            f"stats must be a PixelContrastStats (from pixel_contrast_stats), got "
            f"{type(stats).__name__}"
        )
    return _reduce(stats, _check_scalar("loss_weight", loss_weight, positive=False))


def pixel_contrast_loss(
    key: jax.Array,
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    temperature: float | jax.Array = 0.1,
    base_temperature: float | jax.Array = 0.07,
    loss_weight: float | jax.Array = 0.1,
    max_views: int = 100,
    max_samples: int = 1024,
    ignore_index: int = 255,
    normalize: bool = True,
) -> jax.Array:
    """Pixel-wise contrastive loss of a batch (module docstring), anchors from `key`.

    Args:
      key: a PRNG key (`jax.random.key(seed)`); a new one each step.
      logits: [B, h, w, C] segmentation logits at the embeddings' resolution (only their
        argmax is used; no gradient).
      labels: [B, h, w] int ground truth at that resolution (`resize_labels_nearest`),
        `ignore_index` for ignored pixels.
      embeddings: [B, h, w, D] projection-head output (f32 or bf16; computed in f32).
      temperature: T of the similarities; a number (checked finite, > 0) or a JAX scalar.
      base_temperature: the loss is scaled by T / base_temperature; as `temperature`.
      loss_weight: multiplies the loss; a number (checked finite) or a JAX scalar.
      max_views: a class needs more than this many pixels in an image to be sampled, and
        gives at most this many anchors (static).
      max_samples: at most this many anchors in all (static; the contrast is
        [max_samples, max_samples]).
      ignore_index: label of ignored pixels (static).
      normalize: L2-normalise the embeddings first (static; the official projection head
        does it, so pass False if yours already did).

    Returns:
      [] float32 loss; 0 with a zero gradient when no anchor has a positive.

    Raises:
      ValueError: at trace time, for bad shapes, dtypes, keys or options.

    Example:
    >>> import numpy as np
    >>> labels = np.array([[[0, 0, 0], [1, 1, 1]]])  # [B=1, h=2, w=3]
    >>> logits = np.array([[[[1, 0]] * 3, [[0, 1]] * 3]], np.float32)  # all correct
    >>> emb = np.array([[[[1, 0]] * 3, [[0, 1]] * 3]], np.float32)  # classes orthogonal
    >>> # 4 anchors, 1 positive and 2 negatives each: (T / T_b) log(1 + 2 e^{-1 / T})
    >>> loss = pixel_contrast_loss(jax.random.key(0), logits, labels, emb, max_views=2,
    ...                            max_samples=4, temperature=0.5, base_temperature=0.5,
    ...                            loss_weight=1.0)
    >>> round(float(loss), 5), round(float(np.log1p(2 * np.exp(-2))), 5)
    (0.23954, 0.23954)
    """
    _check_key(key)
    _check_arrays(logits, labels, embeddings)
    options = _check_options(max_views, max_samples, ignore_index)
    inv_temp, ratio = _temperatures(temperature, base_temperature)
    loss_weight = _check_scalar("loss_weight", loss_weight, positive=False)
    return _loss_jit(
        key,
        logits,
        labels,
        embeddings,
        inv_temp,
        ratio,
        loss_weight,
        normalize=bool(normalize),
        **options,
    )
