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

Norms are clamped from below by `NORM_EPSILON` (the reference divides by the raw norm
and gives NaN for a zero embedding; above the epsilon both agree). Label values other
than `ignore_index` must lie in [0, C): this cannot be checked inside `jit` without a
host sync; call `validate_labels` eagerly to check a batch.
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
    """Per-image PNE statistics; sum them over images (and devices) and call `pne_reduce`."""

    term_sum: jax.Array  # f32: sum of l_a over the S anchor entries of every kept pair
    num_pairs: jax.Array  # int32: kept pairs (P)
    num_anchors: jax.Array  # int32: sum of the true anchor counts |A_jk| of kept pairs (N)
    dropped_pairs: jax.Array  # int32: pairs left out because of max_pairs_per_image


def _check_int(name: str, value, minimum: int) -> int:
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if as_int < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return as_int


def _check_options(num_samples, temperature, loss_weight, gate, ignore_index, max_pairs):
    """Validate and normalise the hyper-parameters (at trace time); returns hashable ones."""
    num_samples = _check_int("num_samples", num_samples, 1)
    try:
        temperature = float(temperature)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"temperature must be a Python float > 0, got {temperature!r}") from None
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    try:
        loss_weight = float(loss_weight)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"loss_weight must be a Python float, got {loss_weight!r}") from None
    if not math.isfinite(loss_weight):
        raise ValueError(f"loss_weight must be finite, got {loss_weight!r}")
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
    return num_samples, temperature, loss_weight, (low, high), ignore_index, max_pairs


def _check_arrays(logits, labels, embeddings, batched: bool):
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


_STATIC = (
    "num_samples",
    "temperature",
    "gate",
    "positive_weighting",
    "ignore_index",
    "max_pairs_per_image",
)


def _batch_stats(logits, labels, embeddings, **options) -> PNEStats:
    """Per-image statistics [B]; under an Explicit mesh the body runs in Auto mode.

    `jax.make_mesh` gives Explicit axes by default, where JAX asks every gather for an
    output sharding. The loss is independent per image until the final sums, so it lets
    the compiler shard its body (batch-parallel) and returns stats sharded like the batch.
    """
    body = functools.partial(_batch_stats_body, **options)
    sharding = jax.typeof(logits).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return body(logits, labels, embeddings)
    explicit = tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    )
    if not explicit:
        return body(logits, labels, embeddings)
    batch = PartitionSpec(sharding.spec[0] if len(sharding.spec) else None)
    with jax.sharding.use_abstract_mesh(mesh):
        auto = jax.sharding.auto_axes(body, axes=explicit, out_sharding=PNEStats(*[batch] * 4))
        return auto(logits, labels, embeddings)


def _batch_stats_body(
    logits,
    labels,
    embeddings,
    *,
    num_samples,
    temperature,
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
            inv_temp=1.0 / temperature,
            tiles_per_chunk=sizes.tiles_per_chunk,
        )
    )

    pairs = layout.pairs
    take = lambda x, i: jnp.take_along_axis(x, i, axis=1, mode="clip")  # noqa: E731
    neg = jnp.where(pairs.is_fallback, take(fb_lse, pairs.neg_slot), take(neg_lse, pairs.neg_slot))
    pos = take(pos_lse, pairs.pos_slot)
    # l_a = log(1 + exp(neg - pos)) = softplus(neg - pos), each entry counted as often as
    # the anchor appears among its pair's S entries.
    term = jax.nn.softplus(jnp.where(pairs.kept, neg - pos, 0.0))
    term_sum = jnp.sum(jnp.where(pairs.kept, pairs.multiplicity * term, 0.0), axis=1)
    return PNEStats(term_sum, pairs.num_pairs, pairs.num_anchors, pairs.dropped_pairs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _batch_stats_jit(logits, labels, embeddings, **options):
    return _batch_stats(logits, labels, embeddings, **options)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "loss_weight"))
def _loss_jit(logits, labels, embeddings, *, loss_weight, **options):
    stats = _batch_stats(logits, labels, embeddings, **options)
    return pne_reduce(stats, num_samples=options["num_samples"], loss_weight=loss_weight)


def _options(logits, labels, embeddings, *, batched: bool, **kwargs):
    """Checks the inputs; returns the hashable options of the jitted functions and the weight."""
    _check_arrays(logits, labels, embeddings, batched=batched)
    num_samples, temperature, loss_weight, gate, ignore_index, max_pairs = _check_options(
        kwargs["num_samples"],
        kwargs["temperature"],
        kwargs.get("loss_weight", 1.0),
        kwargs["gate"],
        kwargs["ignore_index"],
        kwargs["max_pairs_per_image"],
    )
    options = dict(
        num_samples=num_samples,
        temperature=temperature,
        gate=gate,
        positive_weighting=bool(kwargs["positive_weighting"]),
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs,
    )
    return options, loss_weight


def pne_batch_stats(
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    num_samples: int = 100,
    temperature: float = 1.0,
    gate: tuple[int, int] = (0, 199),
    positive_weighting: bool = True,
    ignore_index: int = 255,
    max_pairs_per_image: int | None = None,
) -> PNEStats:
    """Per-image PNE statistics of a batch, each field of shape [B].

    Args are those of `pne_loss` (logits [B, h, w, C], labels [B, h, w], embeddings
    [B, h, w, D]). Sum the fields over any number of images, devices or hosts and pass
    them to `pne_reduce`; `pne_loss` does exactly that for one batch.
    """
    options, _ = _options(
        logits,
        labels,
        embeddings,
        batched=True,
        num_samples=num_samples,
        temperature=temperature,
        gate=gate,
        positive_weighting=positive_weighting,
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs_per_image,
    )
    return _batch_stats_jit(logits, labels, embeddings, **options)


def pne_image_stats(
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    num_samples: int = 100,
    temperature: float = 1.0,
    gate: tuple[int, int] = (0, 199),
    positive_weighting: bool = True,
    ignore_index: int = 255,
    max_pairs_per_image: int | None = None,
) -> PNEStats:
    """PNE statistics of one image (logits [h, w, C], labels [h, w], embeddings [h, w, D]).

    Pure and `vmap`-able: `pne_reduce(jax.vmap(pne_image_stats)(logits, labels, emb))`
    equals `pne_loss(logits, labels, emb)`.
    """
    options, _ = _options(
        logits,
        labels,
        embeddings,
        batched=False,
        num_samples=num_samples,
        temperature=temperature,
        gate=gate,
        positive_weighting=positive_weighting,
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs_per_image,
    )
    stats = _batch_stats_jit(logits[None], labels[None], embeddings[None], **options)
    return jax.tree.map(lambda x: x[0], stats)


def pne_reduce(stats: PNEStats, *, num_samples: int = 100, loss_weight: float = 1.3) -> jax.Array:
    """The loss from statistics summed over all images: `w * sum(l_a) * N / (P * S)^2`.

    Fields may have any leading shape (they are summed); 0 when no pair was kept, with a
    zero gradient.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    total = jnp.sum(stats.term_sum)
    num_pairs = jnp.sum(stats.num_pairs)
    num_anchors = jnp.sum(stats.num_anchors).astype(jnp.float32)
    entries = num_pairs.astype(jnp.float32) * num_samples
    scale = jnp.where(
        num_pairs > 0, loss_weight * num_anchors / jnp.maximum(entries, 1.0) ** 2, 0.0
    )
    return total * scale


def pne_loss(
    logits: jax.Array,
    labels: jax.Array,
    embeddings: jax.Array,
    *,
    num_samples: int = 100,
    temperature: float = 1.0,
    loss_weight: float = 1.3,
    gate: tuple[int, int] = (0, 199),
    positive_weighting: bool = True,
    ignore_index: int = 255,
    max_pairs_per_image: int | None = None,
) -> jax.Array:
    """PNE contrastive loss of a batch, a float32 scalar.

    Args:
      logits: [B, h, w, C] segmentation logits at the embeddings' resolution.
      labels: [B, h, w] int class ids at that resolution (`resize_labels_nearest`),
        `ignore_index` for ignored pixels.
      embeddings: [B, h, w, D] projection-head output (f32 or bf16; computed in f32).
      num_samples: S, the entries each anchor/positive/negative set is brought to.
      temperature: similarities are cosine / temperature.
      loss_weight: multiplies the loss.
      gate: (min, max) true anchor count |A_jk| for a pair to be kept.
      positive_weighting: weight positives by their confidence (the reference always does).
      ignore_index: label of ignored pixels.
      max_pairs_per_image: keep at most this many pairs per image, in the reference's
        visiting order; the rest are counted in `PNEStats.dropped_pairs`. None keeps all
        (exact; the sizes then follow from the static shapes).

    Returns:
      The loss. The gradient reaches `embeddings` only.
    """
    options, loss_weight = _options(
        logits,
        labels,
        embeddings,
        batched=True,
        num_samples=num_samples,
        temperature=temperature,
        loss_weight=loss_weight,
        gate=gate,
        positive_weighting=positive_weighting,
        ignore_index=ignore_index,
        max_pairs_per_image=max_pairs_per_image,
    )
    return _loss_jit(logits, labels, embeddings, loss_weight=loss_weight, **options)


def resize_labels_nearest(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize [..., H, W] labels to [..., h, w] with PyTorch's `mode='nearest'` rule.

    Output pixel i takes input pixel `floor(i * (H / h))` (the scale in float32, as
    PyTorch computes it), the rule the reference uses to feed labels to the loss; for an
    integer factor f this is `labels[..., ::f, ::f]`. `jax.image.resize(..., 'nearest')`
    samples pixel centres instead and picks different anchors.
    """
    in_h, in_w = jnp.shape(labels)[-2:]
    out_h, out_w = (_check_int("size", s, 1) for s in size)

    def source(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(idx, n_in - 1)

    labels = jnp.take(labels, source(in_h, out_h), axis=-2)
    return jnp.take(labels, source(in_w, out_w), axis=-1)


def validate_labels(labels, num_classes: int, ignore_index: int = 255) -> None:
    """Eagerly check that every label is in [0, num_classes) or `ignore_index`.

    Outside `jit` only (it reads the values on the host); raises ValueError naming the
    offending values.
    """
    values = np.unique(np.asarray(labels))
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        raise ValueError(
            f"labels contain values {bad[:10].tolist()} outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index}; map them to a class or to {ignore_index}"
        )
