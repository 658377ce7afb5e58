"""The Positive-Negative Equal (PNE) contrastive loss, exact to the reference implementation.

Wang et al., *Positive-Negative Equal Contrastive Loss for Semantic Segmentation*,
Neurocomputing 2023 (arXiv 2207.01417); reference code `jingw193/PNE_Loss`,
`ReverseContrastiveLoss` with `cal_function='EQUAL'`, whose value and gradient this module
reproduces, quirks included. Per image, with `pred = argmax logits` (first maximum on ties)
and ignored pixels never correct and never anchors:

* for each class j in the labels and each true class k != j with pixels labelled k and
  predicted j, the pair (j, k) has anchors A_jk (those pixels), positives T_k (correct
  pixels of k) and negatives T_j (correct pixels of j; A_jk itself when T_j is empty);
  it is kept when T_k is non-empty and gate[0] <= |A_jk| <= gate[1];
* each set is brought to S entries (its first S pixels in raster order, or the list
  repeated cyclically), and each anchor entry a contributes
  `l_a = log(1 + sum_n exp(s(a,n)) / sum_p w_p exp(s(a,p)))`, with cosine similarity
  over temperature `s` and positive weights `w_p = max softmax(logits_p)`;
* over the whole batch, `loss = loss_weight * sum(l_a) * N / (P * S)^2` with P kept
  pairs and N the sum of their true anchor counts; 0 when P == 0.

Only the anchor embeddings receive gradient, through the dot products (anchor norms,
positives, negatives and weights are constants); the logits receive none.

Work and memory are O(B * h * w * S * D + B * C * S): each anchor pixel belongs to one
pair, its negatives depend only on its predicted class and its positives only on its
true class, so anchors are sorted into tiles that share a class bank
(`pne_layout.py`) and compared with one matmul per tile (`grouped_logsumexp.py`).

`loss_weight` and `temperature` are ordinary (traceable) arguments, so a schedule of
either compiles once; only S, the gate, the options and the shapes are static. The
per-image statistics (`PNEStats`) carry S in `num_entries`, so `pne_reduce` needs none,
and work inside `jax.shard_map` (sum them with `jax.lax.psum`, then reduce).

Norms are clamped from below by `NORM_EPSILON` (the reference divides by the raw norm
and gives NaN for a zero embedding; above the epsilon both agree). Label values other
than `ignore_index` must lie in [0, C): this cannot be checked inside `jit` without a
host sync; call `validate_labels` eagerly to check a batch.

Non-finite inputs give a NaN loss, so that a training loop's finite check names this
loss at the step where its input went bad: an image whose embeddings hold a NaN or inf
anywhere, or whose logits have no finite maximum at some pixel (a NaN or +inf logit, or
all -inf: the reference's prediction and softmax weight are meaningless there), gets a
NaN `term_sum`, whatever its pairs. Anywhere means ignored and unsampled pixels too: a
NaN in the network's output poisons its parameter gradients wherever it is, and the
answer should not depend on which pixels were sampled. -inf logits beside a finite
maximum are fine (probability 0, as in softmax). The check costs one reduction over the
embeddings; the logits' maximum is the prediction's own.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec

from pne_jax.losses.grouped_logsumexp import grouped_logsumexp
from pne_jax.losses.pne_layout import image_layout, layout_sizes

NORM_EPSILON = 1e-12
"""Embedding norms are clamped to at least this value (as `torch.nn.functional.normalize`)."""

_MAX_CLASSES = 46340  # pair keys pred * C + label must fit in int32


class PNEStats(NamedTuple):
    """Per-image PNE statistics; sum them over images (and devices) and call `pne_reduce`.

    Every field has the same shape: [B] from `pne_batch_stats`, [] from `pne_image_stats`,
    or whatever leading shape a `vmap` or a sum gives them. They are sums over pairs, so
    adding the statistics of several images, batches or devices and reducing once gives
    the loss of all of them together.

    Attributes:
      term_sum: float32, the sum of `l_a` over the S anchor entries of every kept pair;
        NaN for an image with non-finite inputs (module docstring).
      num_pairs: int32, the kept pairs (P).
      num_anchors: int32, the sum of the true anchor counts |A_jk| of the kept pairs (N).
      dropped_pairs: int32, pairs left out because of `max_pairs_per_image`.
      num_entries: int32, the anchor entries the reduction divides by: kept pairs x S.
    """

    term_sum: jax.Array
    num_pairs: jax.Array
    num_anchors: jax.Array
    dropped_pairs: jax.Array
    num_entries: jax.Array


PNEStats.term_sum.__doc__ = (
    "float32: sum of l_a over the S anchor entries of every kept pair (NaN: non-finite input)."
)
PNEStats.num_pairs.__doc__ = "int32: kept pairs (P)."
PNEStats.num_anchors.__doc__ = "int32: sum of the true anchor counts |A_jk| of kept pairs (N)."
PNEStats.dropped_pairs.__doc__ = "int32: pairs left out because of max_pairs_per_image."
PNEStats.num_entries.__doc__ = "int32: anchor entries of the kept pairs, P x S (the divisor)."


def _check_int(name: str, value, minimum: int) -> int:
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if as_int < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return as_int


def _check_scalar(name: str, value, *, positive: bool) -> jax.Array | np.float32:
    """A float32 scalar from a Python/NumPy number (checked: finite, > 0 if `positive`) or
    a JAX scalar (traced or not: its value is not read back, only its shape checked)."""
    want = "a finite float > 0" if positive else "a finite float"
    if isinstance(value, jax.Array):
        real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        if jnp.shape(value) != () or not real:
            raise ValueError(
                f"{name} must be {want} or a JAX scalar, got a {value.dtype} array of shape "
                f"{jnp.shape(value)}"
            )
        return value.astype(jnp.float32)
    try:
        if np.ndim(value) != 0:
            raise TypeError
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {want}, got {value!r}") from None
    if not math.isfinite(as_float) or (positive and not as_float > 0):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return np.float32(as_float)


def _check_options(num_samples, gate, ignore_index, max_pairs):
    """Validate and normalise the static hyper-parameters (at trace time)."""
    num_samples = _check_int("num_samples", num_samples, 1)
    try:
        low, high = (operator.index(g) for g in gate)
    except (TypeError, ValueError):
        raise ValueError(
            f"gate must be a pair of ints (min, max) anchor counts, got {gate!r}"
        ) from None
    if low > high:
        raise ValueError(f"gate must satisfy gate[0] <= gate[1], got {gate!r}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}") from None
    if max_pairs is not None:
        max_pairs = _check_int("max_pairs_per_image", max_pairs, 1)
    return num_samples, (low, high), ignore_index, max_pairs


def _check_arrays(logits, labels, embeddings, batched: bool, caller: str):
    """Shapes and dtypes, with the expected layout in the message."""
    lead = "B, " if batched else ""
    want = {"logits": 3 + batched, "labels": 2 + batched, "embeddings": 3 + batched}
    arrays = {"logits": logits, "labels": labels, "embeddings": embeddings}
    dims = {
        "logits": f"[{lead}h, w, C]",
        "labels": f"[{lead}h, w]",
        "embeddings": f"[{lead}h, w, D]",
    }
    for name, x in arrays.items():
        shape = jnp.shape(x)
        if len(shape) != want[name]:
            raise ValueError(f"{name} must have shape {dims[name]}, got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"labels must be an integer array of class ids, got dtype {jnp.result_type(labels)}"
            " (cast with labels.astype(jnp.int32))"
        )
    for name in ("logits", "embeddings"):
        if not jnp.issubdtype(jnp.result_type(arrays[name]), jnp.floating):
            raise ValueError(
                f"{name} must be a floating-point array, got dtype {jnp.result_type(arrays[name])}"
            )
    spatial = jnp.shape(labels)
    if jnp.shape(logits)[:-1] != spatial or jnp.shape(embeddings)[:-1] != spatial:
        raise ValueError(
            f"logits {jnp.shape(logits)}, labels {spatial} and embeddings "
            f"{jnp.shape(embeddings)} must agree on the {lead}h, w dimensions (resize the "
            "labels to the logits' resolution with resize_labels_nearest)"
        )
    num_classes = jnp.shape(logits)[-1]
    if not 1 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"logits must have 1 to {_MAX_CLASSES} classes, got {num_classes}")
    if jnp.shape(embeddings)[-1] < 1:
        raise ValueError("embeddings must have at least one channel")
    if 0 in spatial:
        images = "at least one image" if batched else "an image"
        raise ValueError(
            f"embeddings has an empty dimension: shape {jnp.shape(embeddings)}; {caller} needs "
            f"{images} of at least 1x1 pixels"
        )


_STATIC = ("num_samples", "gate", "positive_weighting", "ignore_index", "max_pairs_per_image")


def _batch_stats(logits, labels, embeddings, inv_temp, **options) -> PNEStats:
    """Per-image statistics [B]; under an Explicit mesh the body runs in Auto mode.

    `jax.make_mesh` gives Explicit axes by default, where JAX asks every gather for an
    output sharding. The loss is independent per image until the final sums, so it lets
    the compiler shard its body (batch-parallel) and returns stats sharded like the batch.
    """
    body = functools.partial(_batch_stats_body, **options)
    sharding = jax.typeof(logits).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return body(logits, labels, embeddings, inv_temp)
    explicit = tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    )
    if not explicit:
        return body(logits, labels, embeddings, inv_temp)
    batch = PartitionSpec(sharding.spec[0] if len(sharding.spec) else None)
    with jax.sharding.use_abstract_mesh(mesh):
        out_sharding = PNEStats(*[batch] * len(PNEStats._fields))
        auto = jax.sharding.auto_axes(body, axes=explicit, out_sharding=out_sharding)
        return auto(logits, labels, embeddings, inv_temp)


def _batch_stats_body(
    logits,
    labels,
    embeddings,
    inv_temp,
    *,
    num_samples,
    gate,
    positive_weighting,
    ignore_index,
    max_pairs_per_image,
):
    b, h, w, c = logits.shape
    m = h * w
    sizes = layout_sizes(m, c, num_samples, gate, max_pairs_per_image)
    # The loss never differentiates the logits (argmax, and weights that the reference
    # detaches); stop_gradient makes their gradient exactly zero.
    logits = jax.lax.stop_gradient(logits).reshape(b, m, c)
    layout = jax.vmap(
        functools.partial(
            image_layout,
            num_samples=num_samples,
            gate=gate,
            positive_weighting=positive_weighting,
            ignore_index=ignore_index,
            max_pairs_per_image=max_pairs_per_image,
            sizes=sizes,
        )
    )(logits, labels.reshape(b, m))

    # Cosine similarities with constant norms: gradient reaches an anchor only through
    # its dot products, as in the reference (which detaches the anchor norm).
    emb = embeddings.reshape(b, m, -1)
    norm = jnp.linalg.norm(jax.lax.stop_gradient(emb).astype(jnp.float32), axis=-1)
    inv_norm = 1.0 / jnp.maximum(norm, NORM_EPSILON)
    neg_lse, fb_lse, pos_lse = (
        x.reshape(b, -1)
        for x in grouped_logsumexp(
            emb,
            inv_norm,
            (layout.neg, layout.fallback, layout.pos),
            inv_temp=inv_temp,
            tiles_per_chunk=sizes.tiles_per_chunk,
        )
    )

    pairs = layout.pairs
    # Non-finite inputs anywhere in an image make its term_sum NaN (module docstring);
    # where they are finite this is the identity, value and gradient.
    finite = pairs.finite_logits & jnp.all(jnp.isfinite(emb), axis=(1, 2))
    take = lambda x, i: jnp.take_along_axis(x, i, axis=1, mode="clip")  # noqa: E731
    neg = jnp.where(pairs.is_fallback, take(fb_lse, pairs.neg_slot), take(neg_lse, pairs.neg_slot))
    pos = take(pos_lse, pairs.pos_slot)
    # l_a = log(1 + exp(neg - pos)) = softplus(neg - pos), each entry counted as often as
    # the anchor appears among its pair's S entries.
    term = jax.nn.softplus(jnp.where(pairs.kept, neg - pos, 0.0))
    term_sum = jnp.sum(jnp.where(pairs.kept, pairs.multiplicity * term, 0.0), axis=1)
    return PNEStats(
        jnp.where(finite, term_sum, jnp.nan),
        pairs.num_pairs,
        pairs.num_anchors,
        pairs.dropped_pairs,
        pairs.num_pairs * jnp.int32(num_samples),
    )


def _reduce(stats: PNEStats, loss_weight) -> jax.Array:
    total = jnp.sum(stats.term_sum)
    num_anchors = jnp.sum(stats.num_anchors).astype(jnp.float32)
    # Summed in float32: exact below 2^24 entries, and no int32 overflow on huge batches.
    entries = jnp.sum(jnp.asarray(stats.num_entries).astype(jnp.float32))
    scale = jnp.where(entries > 0, loss_weight * num_anchors / jnp.maximum(entries, 1.0) ** 2, 0.0)
    return total * scale


@functools.partial(jax.jit, static_argnames=_STATIC)
def _batch_stats_jit(logits, labels, embeddings, inv_temp, **options):
    return _batch_stats(logits, labels, embeddings, inv_temp, **options)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _loss_jit(logits, labels, embeddings, inv_temp, loss_weight, **options):
    return _reduce(_batch_stats(logits, labels, embeddings, inv_temp, **options), loss_weight)


def _options(logits, labels, embeddings, *, batched: bool, caller: str, temperature, **kwargs):
    """Checks the inputs; returns the static options of the jitted functions and 1 / T."""
    _check_arrays(logits, labels, embeddings, batched=batched, caller=caller)
    num_samples, gate, ignore_index, max_pairs = _check_options(
        kwargs["num_samples"], kwargs["gate"], kwargs["ignore_index"], kwargs["max_pairs_per_image"]
    )
    options = dict(
        num_samples=num_samples,
        gate=gate,
        positive_weighting=bool(kwargs["positive_weighting"]),
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs,
    )
    temperature = _check_scalar("temperature", temperature, positive=True)
    if isinstance(temperature, jax.Array):
        inv_temp = 1.0 / temperature
    else:  # 1 / T rounded once, from float64, as when it was a compile-time constant
        inv_temp = np.float32(1.0 / float(temperature))
    return options, inv_temp  # grouped_logsumexp stops its gradient


def pne_batch_stats(
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    num_samples: int = 100,
    temperature: float | jax.Array = 1.0,
    gate: tuple[int, int] = (0, 199),
    positive_weighting: bool = True,
    ignore_index: int = 255,
    max_pairs_per_image: int | None = None,
) -> PNEStats:
    """Per-image PNE statistics of a batch, to reduce yourself with `pne_reduce`.

    Sum the fields over any number of images, batches, devices or hosts (for example
    `jax.lax.psum` inside `jax.shard_map`) and pass them to `pne_reduce`; `pne_loss` does
    exactly that for one batch.

    Args:
      logits: [B, h, w, C] segmentation logits at the embeddings' resolution.
      labels: [B, h, w] int class ids at that resolution, `ignore_index` for ignored pixels.
      embeddings: [B, h, w, D] projection-head output (any float dtype; computed in f32).
      num_samples, temperature, gate, positive_weighting, ignore_index,
        max_pairs_per_image: as in `pne_loss`.

    Returns:
      `PNEStats` whose fields have shape [B]; `term_sum` is differentiable with respect to
      `embeddings` (only), and NaN for an image with non-finite inputs (module
      docstring); the counts are int32.

    Example:
    >>> import numpy as np
    >>> labels = np.array([[[0, 0], [1, 1]]])  # [B=1, h=2, w=2]: classes 0 and 1
    >>> # [1, 2, 2, C=2]: the pixel at (1, 0) is labelled 1 but predicted 0, the only anchor
    >>> logits = np.array([[[[2, 0], [2, 0]], [[2, 0], [0, 2]]]], np.float32)
    >>> emb = np.array([[[[1, 0], [0, 1]], [[1, 1], [0, 1]]]], np.float32)  # [1, 2, 2, D=2]
    >>> stats = pne_batch_stats(logits, labels, emb, num_samples=3)
    >>> stats.num_pairs.tolist(), stats.num_anchors.tolist(), stats.num_entries.tolist()
    ([1], [1], [3])
    >>> round(float(stats.term_sum[0]), 4)  # 3 entries of l_a = log(1 + 1 / 0.8808)
    2.2759
    """
    options, inv_temp = _options(
        logits,
        labels,
        embeddings,
        batched=True,
        caller="pne_batch_stats",
        num_samples=num_samples,
        temperature=temperature,
        gate=gate,
        positive_weighting=positive_weighting,
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs_per_image,
    )
    return _batch_stats_jit(logits, labels, embeddings, inv_temp, **options)


def pne_image_stats(
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    num_samples: int = 100,
    temperature: float | jax.Array = 1.0,
    gate: tuple[int, int] = (0, 199),
    positive_weighting: bool = True,
    ignore_index: int = 255,
    max_pairs_per_image: int | None = None,
) -> PNEStats:
    """PNE statistics of one image; pure and `vmap`-able.

    `pne_reduce(jax.vmap(pne_image_stats)(logits, labels, emb))` equals
    `pne_loss(logits, labels, emb)`; `pne_batch_stats` gives the same statistics faster.

    Args:
      logits: [h, w, C] segmentation logits at the embeddings' resolution.
      labels: [h, w] int class ids at that resolution, `ignore_index` for ignored pixels.
      embeddings: [h, w, D] projection-head output (any float dtype; computed in f32).
      num_samples, temperature, gate, positive_weighting, ignore_index,
        max_pairs_per_image: as in `pne_loss`.

    Returns:
      `PNEStats` of scalar fields ([] each; [B] under `vmap`).

    Example:
    >>> import numpy as np
    >>> labels = np.array([[[0, 0], [1, 1]]])  # [B=1, h=2, w=2]: classes 0 and 1
    >>> # [1, 2, 2, C=2]: the pixel at (1, 0) is labelled 1 but predicted 0, the only anchor
    >>> logits = np.array([[[[2, 0], [2, 0]], [[2, 0], [0, 2]]]], np.float32)
    >>> emb = np.array([[[[1, 0], [0, 1]], [[1, 1], [0, 1]]]], np.float32)  # [1, 2, 2, D=2]
    >>> stats = jax.vmap(lambda *x: pne_image_stats(*x, num_samples=3))(logits, labels, emb)
    >>> stats.num_pairs.shape
    (1,)
    >>> bool(np.isclose(pne_reduce(stats), pne_loss(logits, labels, emb, num_samples=3)))
    True
    """
    options, inv_temp = _options(
        logits,
        labels,
        embeddings,
        batched=False,
        caller="pne_image_stats",
        num_samples=num_samples,
        temperature=temperature,
        gate=gate,
        positive_weighting=positive_weighting,
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs_per_image,
    )
    stats = _batch_stats_jit(logits[None], labels[None], embeddings[None], inv_temp, **options)
    return jax.tree.map(lambda x: x[0], stats)


def pne_reduce(stats: PNEStats, *, loss_weight: float | jax.Array = 1.3, **removed) -> jax.Array:
    """The loss from statistics summed over all images: `w * sum(l_a) * N / E^2`.

    With `E = sum(num_entries)` = P x S, this is the reference's
    `loss_weight * sum(l_a) * N / (P * S)^2`; the statistics carry S (in `num_entries`),
    so a reduction cannot use another S than the one they were made with.

    Args:
      stats: `PNEStats` whose fields have any leading shape (all of it is summed), e.g.
        [B] from `pne_batch_stats`, or already summed over devices with `jax.lax.psum`.
      loss_weight: multiplies the loss: a Python/NumPy number (checked finite) or a JAX
        scalar, traced or not (e.g. a warm-up schedule's value inside a jitted step; new
        values do not compile again).

    Returns:
      [] float32 loss; 0 when no pair was kept, with a zero gradient.

    Raises:
      TypeError: for `num_samples=` (the statistics carry it since `num_entries`) or any
        other unknown keyword.

    Example:
    >>> import numpy as np
    >>> labels = np.array([[[0, 0], [1, 1]]])  # [B=1, h=2, w=2]: classes 0 and 1
    >>> # [1, 2, 2, C=2]: the pixel at (1, 0) is labelled 1 but predicted 0, the only anchor
    >>> logits = np.array([[[[2, 0], [2, 0]], [[2, 0], [0, 2]]]], np.float32)
    >>> emb = np.array([[[[1, 0], [0, 1]], [[1, 1], [0, 1]]]], np.float32)  # [1, 2, 2, D=2]
    >>> stats = pne_batch_stats(logits, labels, emb, num_samples=3)
    >>> both = jax.tree.map(lambda x: np.concatenate([x, x]), stats)  # two batches, [2]
    >>> round(float(pne_reduce(both, loss_weight=1.0)), 4)  # 2 * 2.2759 * 2 / 6^2
    0.2529
    >>> pne_reduce(stats, num_samples=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: pne_reduce() takes no num_samples argument: the statistics carry it ...
    """
    if "num_samples" in removed:
        raise TypeError(
            "pne_reduce() takes no num_samples argument: the statistics carry it "
            "(PNEStats.num_entries = kept pairs x num_samples, set by pne_batch_stats or "
            "pne_image_stats); remove num_samples="
        )
    if removed:
        raise TypeError(f"pne_reduce() got an unexpected keyword argument {next(iter(removed))!r}")
    if not isinstance(stats, PNEStats):
        raise TypeError(
            f"stats must be a PNEStats (from pne_batch_stats or pne_image_stats), got "
            f"{type(stats).__name__}"
        )
    return _reduce(stats, _check_scalar("loss_weight", loss_weight, positive=False))


def pne_loss(
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    num_samples: int = 100,
    temperature: float | jax.Array = 1.0,
    loss_weight: float | jax.Array = 1.3,
    gate: tuple[int, int] = (0, 199),
    positive_weighting: bool = True,
    ignore_index: int = 255,
    max_pairs_per_image: int | None = None,
) -> jax.Array:
    """PNE contrastive loss of a batch (module docstring), reduced over the whole batch.

    Args:
      logits: [B, h, w, C] segmentation logits at the embeddings' resolution.
      labels: [B, h, w] int class ids at that resolution (`resize_labels_nearest`),
        `ignore_index` for ignored pixels.
      embeddings: [B, h, w, D] projection-head output (f32 or bf16; computed in f32).
      num_samples: S, the entries each anchor/positive/negative set is brought to (static:
        it sets the shapes).
      temperature: similarities are cosine / temperature. A Python/NumPy number (checked
        finite and > 0) or a JAX scalar, traced or not (then its value is not checked);
        new values do not compile again. It receives no gradient (stop_gradient).
      loss_weight: multiplies the loss; a number (checked finite) or a JAX scalar, traced
        or not, as for `pne_reduce`.
      gate: (min, max) true anchor count |A_jk| for a pair to be kept.
      positive_weighting: weight positives by their confidence (the reference always does).
      ignore_index: label of ignored pixels.
      max_pairs_per_image: keep at most this many pairs per image, in the reference's
        visiting order; the rest are counted in `PNEStats.dropped_pairs`. None keeps all
        (exact; the sizes then follow from the static shapes).

    Returns:
      [] float32 loss. Its gradient reaches `embeddings` (and `loss_weight`) only. NaN
      when an embedding is NaN or inf or a pixel's logits have no finite maximum (module
      docstring), even with no pair kept, so that a training loop's finite check names
      this loss at that step.

    Raises:
      ValueError: at trace time, for bad shapes (an empty batch or image included),
        dtypes or options, naming the argument and the value.

    Example:
    >>> import numpy as np
    >>> labels = np.array([[[0, 0], [1, 1]]])  # [B=1, h=2, w=2]: classes 0 and 1
    >>> # [1, 2, 2, C=2]: the pixel at (1, 0) is labelled 1 but predicted 0, the only anchor
    >>> logits = np.array([[[[2, 0], [2, 0]], [[2, 0], [0, 2]]]], np.float32)
    >>> emb = np.array([[[[1, 0], [0, 1]], [[1, 1], [0, 1]]]], np.float32)  # [1, 2, 2, D=2]
    >>> # S = 1: one anchor entry, l_a = log(1 + e^s(a,n) / (w_p e^s(a,p))) with equal cosines
    >>> # (both 1/sqrt(2)) and w_p = max softmax([0, 2]) = 0.8808; P = N = 1.
    >>> round(float(pne_loss(logits, labels, emb, num_samples=1)), 4)  # 1.3 log(1 + 1/0.8808)
    0.9862
    >>> step = jax.jit(lambda w: pne_loss(logits, labels, emb, num_samples=1, loss_weight=w))
    >>> round(float(step(1.0)), 4), round(float(step(0.5)), 4)  # traced weight: one compile
    (0.7586, 0.3793)
    """
    options, inv_temp = _options(
        logits,
        labels,
        embeddings,
        batched=True,
        caller="pne_loss",
        num_samples=num_samples,
        temperature=temperature,
        gate=gate,
        positive_weighting=positive_weighting,
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs_per_image,
    )
    loss_weight = _check_scalar("loss_weight", loss_weight, positive=False)
    return _loss_jit(logits, labels, embeddings, inv_temp, loss_weight, **options)


def resize_labels_nearest(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize labels to `size` with PyTorch's `mode='nearest'` rule, as the reference does.

    Output pixel i takes input pixel `floor(i * (H / h))` (the scale in float32, as
    PyTorch computes it), the rule the reference uses to feed labels to the loss; for an
    integer factor f this is `labels[..., ::f, ::f]`. `jax.image.resize(..., 'nearest')`
    samples pixel centres instead and picks different anchors.

    Args:
      labels: [..., H, W] integer labels (any leading dimensions, e.g. [B, H, W]).
      size: (h, w), the output height and width (e.g. `logits.shape[1:3]`).

    Returns:
      [..., h, w] labels of `labels`' dtype.

    Example:
    >>> import numpy as np
    >>> labels = np.arange(16).reshape(4, 4)
    >>> resize_labels_nearest(labels, (2, 2)).tolist()  # labels[::2, ::2]
    [[0, 2], [8, 10]]
    >>> resize_labels_nearest(labels, (3, 3)).tolist()  # rows and columns floor(i * 4 / 3)
    [[0, 1, 2], [4, 5, 6], [8, 9, 10]]
    """
    shape = jnp.shape(labels)
    if len(shape) < 2 or 0 in shape[-2:]:
        raise ValueError(f"labels must have shape [..., H, W] with H, W >= 1, got shape {shape}")
    in_h, in_w = shape[-2:]
    out_h, out_w = (_check_int("size", s, 1) for s in size)

    def source(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(idx, n_in - 1)

    labels = jnp.take(labels, source(in_h, out_h), axis=-2)
    return jnp.take(labels, source(in_w, out_w), axis=-1)


def validate_labels(
    labels: jax.Array | np.ndarray, num_classes: int, ignore_index: int = 255
) -> None:
    """Eagerly check that every label is in [0, num_classes) or `ignore_index`.

    The loss cannot check this inside `jit` without a host sync; this reads the values on
    the host, so call it outside `jit` (for example on a batch from a new data set).

    Args:
      labels: integer labels of any shape (e.g. [B, H, W]), a NumPy or concrete JAX array.
      num_classes: C, the number of classes.
      ignore_index: the label of ignored pixels, allowed besides [0, C).

    Returns:
      None.

    Raises:
      ValueError: naming up to ten offending values.

    Example:
    >>> import numpy as np
    >>> validate_labels(np.array([[0, 18, 255]]), num_classes=19)
    >>> validate_labels(np.array([[0, 19, 255]]), num_classes=19)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: labels contain values [19] outside [0, 19) that are not ignore_index=255; ...
    """
    values = np.unique(np.asarray(labels))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        raise ValueError(
            f"labels contain values {bad[:10].tolist()} outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index}; map them to a class or to {ignore_index}"
        )
