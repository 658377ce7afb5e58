"""pne_loss against the float64 NumPy reference, closed forms, and JAX transformations."""

from __future__ import annotations

import doctest
import io
import math
import pydoc
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax import pne_loss
from pne_jax.losses import (
    PNEStats,
    pne_batch_stats,
    pne_image_stats,
    pne_reduce,
    resize_labels_nearest,
    validate_labels,
)
from tests import compile_count
from tests.pne_reference import pne_reference

_BACKEND_COMPILES: list[str] = []


def backend_compiles() -> list[str]:
    """The XLA compilations so far (a list that grows), from JAX's monitoring events: the
    backend's compilations and the persistent cache's hits (tests/compile_count.py)."""
    if not getattr(backend_compiles, "registered", False):

        def listener(event, *duration, **kwargs):
            if event in compile_count.EVENTS:
                _BACKEND_COMPILES.append(event)

        jax.monitoring.register_event_duration_secs_listener(listener)
        jax.monitoring.register_event_listener(listener)
        backend_compiles.registered = True
    return _BACKEND_COMPILES


# --------------------------------------------------------------------------------------
# Random cases


def random_case(rng, b, h, w, c, d, *, scenario, emb_dtype=np.float32):
    """Labels as blobs, logits mostly right with misclassified pixels, per scenario."""
    present = rng.choice(c, size=min(c, int(rng.integers(2, 7))), replace=False)
    # Blobs: each pixel takes the class of its nearest seed.
    seed_class = rng.choice(present, size=8)
    yy, xx = np.mgrid[:h, :w]
    labels = np.empty((b, h, w), np.int64)
    for i in range(b):
        seeds = rng.integers(0, [h, w], size=(8, 2))
        dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        labels[i] = rng.permutation(seed_class)[np.argmin(dist, axis=-1)]
    pred = labels.copy()
    wrong = rng.random(labels.shape) < rng.uniform(0.1, 0.5)
    pred[wrong] = rng.integers(0, c, size=wrong.sum())
    if scenario == "absent":  # predictions of classes that occur in no label
        absent = np.setdiff1d(np.arange(c), present)
        if absent.size:
            pred[rng.random(labels.shape) < 0.2] = rng.choice(absent)
    if scenario == "fallback":  # every pixel of one class misclassified: empty T_j
        victim = labels[0, 0, 0]
        pred[labels == victim] = (victim + 1) % c
    if scenario == "no_positives":  # one class never correct, but predicted elsewhere
        victim = labels[-1, -1, -1]
        pred[labels == victim] = (victim + 2) % c
    ignore = rng.random(labels.shape) < (0.3 if scenario == "ignore" else 0.05)
    labels[ignore] = 255
    if scenario == "all_correct":
        pred = np.where(labels == 255, pred, labels)
    if scenario == "all_ignored":
        labels[:] = 255
    if scenario == "ties":  # integer logits with exact ties; argmax takes the first
        logits = rng.integers(0, 3, size=(b, h, w, c)).astype(np.float32)
        logits[..., 0] = np.maximum(logits[..., 0], 1)
    else:
        logits = rng.normal(size=(b, h, w, c)).astype(np.float32)
        onehot = np.eye(c, dtype=np.float32)[np.where(pred < c, pred, 0)]
        logits += 3.0 * onehot
    emb = rng.normal(size=(b, h, w, d))
    if scenario == "norms":  # norms from 1e-4 to 1e4
        emb *= 10.0 ** rng.uniform(-4, 4, size=(b, h, w, 1))
    if scenario == "correct_only_in_one_image":
        labels[1:] = 255
    return logits, labels.astype(np.int32), emb.astype(emb_dtype)


# (name, (b, h, w, c, d), options, dtype, seeds): 14 families x 15 seeds = 210 cases.
FAMILIES = [
    ("s1", (2, 6, 7, 4, 8), dict(num_samples=1), np.float32, 15),
    ("s5_gate", (2, 8, 8, 5, 8), dict(num_samples=5, gate=(2, 6)), np.float32, 15),
    ("s17_t05", (2, 9, 10, 6, 16), dict(num_samples=17, temperature=0.5), np.float32, 15),
    ("s100", (2, 12, 12, 5, 16), dict(num_samples=100), np.float32, 15),
    ("s100_big_sets", (1, 24, 24, 3, 8), dict(num_samples=100), np.float32, 15),
    ("c19", (2, 16, 16, 19, 16), dict(num_samples=17, loss_weight=0.7), np.float32, 15),
    ("c150", (2, 16, 16, 150, 8), dict(num_samples=5, temperature=2.0), np.float32, 15),
    ("c171", (2, 16, 16, 171, 8), dict(num_samples=17, loss_weight=2.0), np.float32, 15),
    ("unweighted", (2, 8, 9, 4, 8), dict(num_samples=5, positive_weighting=False), np.float32, 15),
    ("t01", (2, 8, 8, 4, 8), dict(num_samples=17, temperature=0.1), np.float32, 15),
    ("bf16", (2, 8, 8, 4, 16), dict(num_samples=5), jnp.bfloat16, 15),
    ("gate_tight", (2, 10, 10, 3, 8), dict(num_samples=5, gate=(3, 3)), np.float32, 15),
    ("ignore_other", (2, 8, 8, 4, 8), dict(num_samples=5, ignore_index=3), np.float32, 15),
    ("capped", (2, 10, 10, 5, 8), dict(num_samples=5, max_pairs_per_image=2), np.float32, 15),
]
SCENARIOS = [
    "plain",
    "ignore",
    "absent",
    "fallback",
    "no_positives",
    "ties",
    "norms",
    "all_correct",
    "all_ignored",
    "correct_only_in_one_image",
]


def assert_matches_reference(logits, labels, emb, loss_and_grad, **options):
    value, grad, stats = loss_and_grad(logits, labels, emb)
    emb64 = np.asarray(jnp.asarray(emb).astype(jnp.float32), np.float64)
    want, want_grad, want_stats = pne_reference(logits, labels, emb64, **options)
    for key, got in stats._asdict().items():
        if key != "term_sum":
            assert int(np.sum(got)) == want_stats[key], key
    np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-30)
    # Compare gradients in the units of the unit-norm embeddings, so that tiny- and
    # huge-norm pixels weigh the same; atol covers entries that cancel to ~0.
    # A bf16 input gets a bf16 gradient (JAX gives cotangents the input's dtype), so it
    # can only match to bf16 resolution (8 bits of mantissa).
    rtol = 1e-5 if jnp.asarray(emb).dtype == jnp.float32 else 2.0**-7
    norms = np.maximum(np.linalg.norm(emb64, axis=-1, keepdims=True), 1e-12)
    got_u, want_u = np.asarray(grad, np.float64) * norms, want_grad * norms
    atol = rtol / 10 * max(np.abs(want_u).max(), 1e-30)
    np.testing.assert_allclose(got_u, want_u, rtol=rtol, atol=atol)
    return want_stats


@pytest.mark.parametrize("name,shape,options,dtype,seeds", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_random_cases_match_float64_reference(name, shape, options, dtype, seeds):
    ignore_index = options.get("ignore_index", 255)

    @jax.jit
    def loss_and_grad(logits, labels, emb):
        def f(e):
            stats = pne_batch_stats(
                logits, labels, e, **{k: v for k, v in options.items() if k != "loss_weight"}
            )
            loss = pne_reduce(stats, loss_weight=options.get("loss_weight", 1.3))
            return loss, stats

        (value, stats), grad = jax.value_and_grad(f, has_aux=True)(emb)
        return value, grad, stats

    # crc32, not hash(): str hashes change per process, and a failure must replay.
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    pairs_seen = 0
    for seed in range(seeds):
        scenario = SCENARIOS[seed % len(SCENARIOS)]
        logits, labels, emb = random_case(rng, *shape, scenario=scenario, emb_dtype=dtype)
        if ignore_index != 255:
            labels = np.where(labels == 255, ignore_index, labels)
        try:
            stats = assert_matches_reference(logits, labels, emb, loss_and_grad, **options)
        except AssertionError as error:
            raise AssertionError(f"{name}, case {seed} ({scenario}): {error}") from None
        pairs_seen += stats["num_pairs"]
    assert pairs_seen > 0, "the family never produced a pair: it tests nothing"


def test_pne_loss_matches_reference_with_defaults():
    rng = np.random.default_rng(0)
    logits, labels, emb = random_case(rng, 2, 16, 16, 19, 32, scenario="plain")
    value, grad = jax.value_and_grad(lambda e: pne_loss(logits, labels, e))(emb)
    want, want_grad, stats = pne_reference(logits, labels, emb)
    assert stats["num_pairs"] > 3
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())


def test_logits_get_exactly_zero_gradient():
    rng = np.random.default_rng(1)
    logits, labels, emb = random_case(rng, 2, 8, 8, 4, 8, scenario="plain")
    grad = jax.grad(lambda lg: pne_loss(lg, labels, emb, num_samples=5))(logits)
    assert pne_loss(logits, labels, emb, num_samples=5) > 0
    assert np.all(np.asarray(grad) == 0)


# --------------------------------------------------------------------------------------
# Closed forms on 2x2 and 1x4 images, written out by hand.

# Labels [[0, 0], [1, 1]]; pixel (1, 0) is a 1 predicted as 0: the only pair, (0, 1).
# Negatives T_0 = {(0,0), (0,1)}, positives T_1 = {(1,1)} with confidence 3/4.
LABELS_2X2 = np.array([[[0, 0], [1, 1]]], np.int32)
LOGITS_2X2 = np.array([[[[1, 0], [1, 0]], [[1, 0], [0, math.log(3)]]]], np.float32)
# Anchor e=(2,0) has cosine 1 with the first negative, 0 with the second and the positive.
EMB_2X2 = np.array([[[[1, 0], [0, 1]], [[2, 0], [0, 3]]]], np.float32)


def test_closed_form_single_entry():
    # S=1: l = log(1 + e^1 / (3/4 e^0)); P = N = 1, loss = 1.3 l.
    loss, grad = jax.value_and_grad(lambda e: pne_loss(LOGITS_2X2, LABELS_2X2, e, num_samples=1))(
        EMB_2X2
    )
    r = 4 * math.e / 3
    np.testing.assert_allclose(loss, 1.3 * math.log1p(r), rtol=1e-6)
    # d l / d e_a = r / (1 + r) * (unit(neg) - unit(pos)) / |e_a|, with |e_a| = 2.
    want = np.zeros_like(EMB_2X2)
    want[0, 1, 0] = 1.3 * r / (1 + r) * np.array([1, -1]) / 2
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-7)


def test_closed_form_cyclic_tiling_temperature_and_weighting():
    # S=3: anchors [a, a, a]; positives [p, p, p]; negatives T_0 tiled = [n0, n1, n0].
    # With temperature 1/2: each entry l = log(1 + (2 e^2 + e^0) / (3 * 3/4 * e^0)).
    kw = dict(num_samples=3, temperature=0.5)
    loss = pne_loss(LOGITS_2X2, LABELS_2X2, EMB_2X2, **kw)
    l_entry = math.log1p((2 * math.e**2 + 1) / (3 * 0.75))
    # Sum of 3 entries times N / (P S)^2 = 1 / 9.
    np.testing.assert_allclose(loss, 1.3 * 3 * l_entry / 9, rtol=1e-6)
    # Without positive weighting the weight 3/4 becomes 1.
    unweighted = pne_loss(LOGITS_2X2, LABELS_2X2, EMB_2X2, positive_weighting=False, **kw)
    np.testing.assert_allclose(
        unweighted, 1.3 * 3 * math.log1p((2 * math.e**2 + 1) / 3) / 9, rtol=1e-6
    )


def test_closed_form_fallback_negatives_and_skipped_pair():
    # 1x4 image, labels [0, 0, 1, 1], predictions [1, 1, 1, 0]: class 0 is never correct.
    # Pair (0, 1): anchor pixel 3, positive pixel 2, negatives fall back to the anchor
    # itself (cosine 1). Pair (1, 0) has no positives (T_0 empty) and is skipped.
    labels = np.array([[[0, 0, 1, 1]]], np.int32)
    logits = np.array([[[[0, 1], [0, 1], [0, 2], [1, 0]]]], np.float32)
    emb = np.array([[[[1, 1], [1, -1], [0, 1], [1, 0]]]], np.float32)
    stats = pne_batch_stats(logits, labels, emb, num_samples=1)
    assert int(stats.num_pairs[0]) == 1 and int(stats.num_anchors[0]) == 1
    conf = 1 / (1 + math.exp(-2))  # softmax max of logits [0, 2]
    loss = pne_loss(logits, labels, emb, num_samples=1)
    np.testing.assert_allclose(loss, 1.3 * math.log1p(math.e / conf), rtol=1e-6)


def test_closed_form_reduction_over_images_is_global():
    # Two copies of the 2x2 image plus one without pairs: P = N = 2, the sum of terms
    # doubles, so the loss is 2 l * 2 / 2^2 = l (times the weight).
    logits = np.concatenate([LOGITS_2X2, LOGITS_2X2, LOGITS_2X2])
    labels = np.concatenate([LABELS_2X2, LABELS_2X2, np.full_like(LABELS_2X2, 255)])
    emb = np.concatenate([EMB_2X2, EMB_2X2, EMB_2X2])
    loss = pne_loss(logits, labels, emb, num_samples=1, loss_weight=1.0)
    np.testing.assert_allclose(loss, math.log1p(4 * math.e / 3), rtol=1e-6)


def test_no_pairs_gives_zero_and_finite_zero_gradient():
    labels = np.array([[[0, 1], [1, 0]]], np.int32)
    logits = np.eye(2, dtype=np.float32)[labels] * 5  # everything correct
    emb = np.zeros((1, 2, 2, 4), np.float32)  # zero norms too
    loss, grad = jax.value_and_grad(lambda e: pne_loss(logits, labels, e))(emb)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0)


def test_gate_boundaries_are_inclusive():
    # One image, 1x15, with pairs of 2, 3 and 4 anchors: (0, 1) x2, (0, 2) x3, (0, 3) x4;
    # classes 1-3 each also have one correct pixel and class 0 three.
    labels = np.array([[[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3]]], np.int32)
    pred = np.array([[[0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0]]])
    logits = np.eye(4, dtype=np.float32)[pred] * 2
    emb = np.random.default_rng(0).normal(size=(1, 1, 15, 4)).astype(np.float32)
    for gate, pairs in [((2, 4), 3), ((3, 3), 1), ((2, 3), 2), ((3, 4), 2), ((5, 9), 0)]:
        stats = pne_batch_stats(logits, labels, emb, num_samples=3, gate=gate)
        want, _, ref = pne_reference(logits, labels, emb, num_samples=3, gate=gate)
        assert int(stats.num_pairs[0]) == ref["num_pairs"] == pairs, gate
        got = pne_loss(logits, labels, emb, num_samples=3, gate=gate)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_max_pairs_cap_counts_what_it_drops():
    rng = np.random.default_rng(5)
    logits, labels, emb = random_case(rng, 2, 12, 12, 6, 8, scenario="plain")
    full = pne_batch_stats(logits, labels, emb, num_samples=5)
    assert int(full.dropped_pairs.sum()) == 0
    most = int(full.num_pairs.max())
    assert most >= 3
    capped = pne_batch_stats(logits, labels, emb, num_samples=5, max_pairs_per_image=2)
    np.testing.assert_array_equal(capped.num_pairs, np.minimum(full.num_pairs, 2))
    np.testing.assert_array_equal(capped.dropped_pairs, full.num_pairs - capped.num_pairs)
    # A cap at or above the pair count is exact.
    roomy = pne_loss(logits, labels, emb, num_samples=5, max_pairs_per_image=most)
    np.testing.assert_allclose(roomy, pne_loss(logits, labels, emb, num_samples=5), rtol=1e-6)


# --------------------------------------------------------------------------------------
# Numerics


def test_small_temperature_is_stable():
    # Unit-norm embeddings, temperature 0.01: similarities reach 100, and exp(100)
    # overflows float32, so only a log-sum-exp formulation stays finite.
    rng = np.random.default_rng(2)
    logits, labels, _ = random_case(rng, 2, 10, 10, 4, 16, scenario="plain")
    direction = rng.normal(size=(4, 16))
    emb = direction[np.where(labels == 255, 0, labels)] + 0.05 * rng.normal(size=(2, 10, 10, 16))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb.astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(np.float32(100.0)))
    value, grad = jax.value_and_grad(lambda e: pne_loss(logits, labels, e, temperature=0.01))(emb)
    want, want_grad, stats = pne_reference(logits, labels, emb, temperature=0.01)
    assert stats["num_pairs"] > 0 and np.isfinite(float(value))
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5 * np.abs(want_grad).max())


def test_zero_norm_embeddings_are_finite():
    rng = np.random.default_rng(3)
    logits, labels, emb = random_case(rng, 2, 8, 8, 4, 8, scenario="plain")
    emb[:, ::2] = 0.0
    value, grad = jax.value_and_grad(lambda e: pne_loss(logits, labels, e, num_samples=5))(emb)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    want, _, _ = pne_reference(logits, labels, emb, num_samples=5)
    np.testing.assert_allclose(value, want, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Non-finite inputs: a NaN loss, so that a trainer's finite check names this loss.

# In the 2x2 case with S = 1: (0, 0) is the negative, (1, 0) the anchor, (1, 1) the
# positive; (0, 1) is a correct pixel that S = 1 never samples.
ROLES = {"negative": (0, 0), "anchor": (1, 0), "positive": (1, 1), "unsampled": (0, 1)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("role", list(ROLES))
def test_non_finite_embedding_gives_nan_loss(role, bad):
    emb = EMB_2X2.copy()
    emb[(0, *ROLES[role], 1)] = bad
    loss = pne_loss(LOGITS_2X2, LABELS_2X2, emb, num_samples=1)
    assert np.isnan(float(loss)), (role, bad, float(loss))


def test_non_finite_embedding_anywhere_poisons_only_its_image():
    # Image 0 is the 2x2 case; image 1 has its pairs too, but a NaN at an ignored pixel;
    # image 2 has no pair at all, and an inf. Only their term_sum turns NaN.
    logits = np.concatenate([LOGITS_2X2] * 3)
    labels = np.concatenate([LABELS_2X2, LABELS_2X2, np.full_like(LABELS_2X2, 255)])
    labels[1, 0, 1] = 255
    emb = np.concatenate([EMB_2X2] * 3)
    clean = pne_batch_stats(logits, labels, emb, num_samples=1)
    emb = emb.copy()  # not in place: on CPU, jax may still be reading the first array
    emb[1, 0, 1, 0] = np.nan
    emb[2, 1, 1, 1] = np.inf
    stats = pne_batch_stats(logits, labels, emb, num_samples=1)
    assert float(stats.term_sum[0]) == float(clean.term_sum[0]) > 0
    assert np.isfinite(float(clean.term_sum[1])) and float(clean.term_sum[2]) == 0.0
    assert np.isnan(np.asarray(stats.term_sum[1:])).all()
    for key in ("num_pairs", "num_anchors", "num_entries"):
        np.testing.assert_array_equal(getattr(stats, key), getattr(clean, key))
    assert np.isnan(float(pne_reduce(stats)))
    # A batch without any pair is NaN too, not 0.
    assert np.isnan(float(pne_loss(logits[2:], labels[2:], emb[2:], num_samples=1)))


@pytest.mark.parametrize(
    "pixel,values",
    [
        ((1, 1), [np.nan, 0.0]),  # the positive: its weight is undefined
        ((0, 1), [np.nan, np.nan]),  # a negative: its prediction is undefined
        ((0, 0), [np.inf, 0.0]),  # +inf: softmax is NaN
        ((1, 0), [-np.inf, -np.inf]),  # the anchor, all -inf: no maximum
    ],
)
def test_logits_without_a_finite_maximum_give_nan_loss(pixel, values):
    logits = LOGITS_2X2.copy()
    logits[(0, *pixel)] = values
    loss = pne_loss(logits, LABELS_2X2, EMB_2X2, num_samples=3)
    assert np.isnan(float(loss)), (pixel, values)
    # At an ignored pixel too: its logits are still the network's output.
    labels = LABELS_2X2.copy()
    labels[(0, *pixel)] = 255
    assert np.isnan(float(pne_loss(logits, labels, EMB_2X2, num_samples=3)))
    assert float(pne_loss(LOGITS_2X2, labels, EMB_2X2, num_samples=3)) >= 0  # finite


def test_minus_inf_logits_beside_a_finite_maximum_are_probability_zero():
    # As in softmax: the prediction and weight are those of the finite logits.
    rng = np.random.default_rng(14)
    logits, labels, emb = random_case(rng, 2, 8, 8, 4, 8, scenario="plain")
    logits[rng.random(logits.shape) < 0.3] = -np.inf
    logits[..., 0] = np.maximum(logits[..., 0], -5.0)  # a finite maximum everywhere
    value, grad = jax.value_and_grad(lambda e: pne_loss(logits, labels, e, num_samples=5))(emb)
    want, want_grad, ref = pne_reference(logits, labels, emb, num_samples=5)
    assert ref["num_pairs"] > 0
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())


# --------------------------------------------------------------------------------------
# Transformations


def test_vmap_of_image_stats_plus_reduce_equals_batched_loss():
    rng = np.random.default_rng(4)
    logits, labels, emb = random_case(rng, 4, 10, 12, 5, 8, scenario="fallback")
    kw = dict(num_samples=17, temperature=0.5)

    def via_vmap(e):
        stats = jax.vmap(lambda lg, lb, em: pne_image_stats(lg, lb, em, **kw))(logits, labels, e)
        assert isinstance(stats, PNEStats) and stats.term_sum.shape == (4,)
        return pne_reduce(stats, loss_weight=0.9)

    got, got_grad = jax.jit(jax.value_and_grad(via_vmap))(emb)
    want, want_grad = jax.value_and_grad(
        lambda e: pne_loss(logits, labels, e, loss_weight=0.9, **kw)
    )(emb)
    assert float(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6 * np.abs(want_grad).max())


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharded_batch_equals_unsharded(axis_type):
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
    rng = np.random.default_rng(6)
    logits, labels, emb = random_case(rng, 8, 12, 16, 19, 16, scenario="plain")

    def loss_fn(lg, lb, e):
        return pne_loss(lg, lb, e, num_samples=17)

    want, want_grad = jax.value_and_grad(loss_fn, argnums=2)(logits, labels, emb)
    assert float(want) > 0
    # jax.make_mesh gives Explicit axes by default (the usual user set-up, under
    # jax.set_mesh); Auto axes are what most existing trainers use.
    kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, shard) for x in (logits, labels, emb)]
    with jax.set_mesh(mesh):
        value, grad = jax.jit(jax.value_and_grad(loss_fn, argnums=2))(*args)
        stats = jax.jit(lambda *a: pne_batch_stats(*a, num_samples=17))(*args)
    assert grad.sharding.is_equivalent_to(shard, grad.ndim)
    assert stats.term_sum.sharding.is_equivalent_to(shard, 1)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6 * np.abs(want_grad).max())


def test_one_compilation_per_shape_and_no_host_transfers():
    compiles = backend_compiles()
    rng = np.random.default_rng(8)
    batches = [random_case(rng, 2, 9, 11, 7, 8, scenario=s) for s in ("plain", "fallback", "ties")]
    batches = [tuple(jax.device_put(x) for x in batch) for batch in batches]
    kw = dict(num_samples=7, temperature=0.3)
    jax.block_until_ready(pne_loss(*batches[0], **kw))  # compiles
    step = jax.jit(lambda lg, lb, e, w: pne_loss(lg, lb, e, loss_weight=w, **kw))
    weight = jax.device_put(np.float32(0.7))
    jax.block_until_ready(step(*batches[0], weight))  # compiles
    before = len(compiles)
    # Called eagerly, only the scalar hyper-parameters go to the device; nothing comes back.
    with jax.transfer_guard_device_to_host("disallow"):
        for batch in batches:
            jax.block_until_ready(pne_loss(*batch, **kw))
    # Inside a jitted step whose inputs are on the device, nothing moves at all.
    with jax.transfer_guard("disallow"):
        for batch in batches:
            jax.block_until_ready(step(*batch, weight))
    assert len(compiles) == before, "pne_loss recompiled for inputs of the same shape"


def test_traced_loss_weight_and_temperature_compile_once():
    rng = np.random.default_rng(12)
    logits, labels, emb = random_case(rng, 2, 8, 9, 4, 8, scenario="plain")
    args = [jax.device_put(x) for x in (logits, labels, emb)]
    step = jax.jit(
        lambda lg, lb, e, w, t: pne_loss(lg, lb, e, num_samples=5, loss_weight=w, temperature=t)
    )
    reduce = jax.jit(lambda stats, w: pne_reduce(stats, loss_weight=w))
    compiles = backend_compiles()
    # Compile each function once: the user's step, pne_loss, pne_batch_stats, pne_reduce.
    jax.block_until_ready(step(*args, 1.3, 1.0))
    jax.block_until_ready(pne_loss(*args, num_samples=5, loss_weight=1.3, temperature=1.0))
    jax.block_until_ready(reduce(pne_batch_stats(*args, num_samples=5, temperature=1.0), 1.3))
    before = len(compiles)
    pairs = 0
    for w, t in [(0.0, 0.5), (0.65, 0.25), (2.0, 3.0), (-1.0, 0.1)]:
        want, _, ref = pne_reference(
            logits, labels, emb, num_samples=5, loss_weight=w, temperature=t
        )
        pairs += ref["num_pairs"]
        got = step(*args, w, t)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)
        eager = pne_loss(*args, num_samples=5, loss_weight=w, temperature=t)
        np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-30)
        reduced = reduce(pne_batch_stats(*args, num_samples=5, temperature=t), w)
        np.testing.assert_allclose(reduced, want, rtol=1e-5, atol=1e-30)
    assert pairs > 0
    assert len(compiles) == before, "new loss_weight or temperature values compiled again"


def test_temperature_gets_no_gradient_and_loss_weight_a_linear_one():
    rng = np.random.default_rng(13)
    logits, labels, emb = random_case(rng, 2, 8, 8, 4, 8, scenario="plain")

    def loss(w, t):
        return pne_loss(logits, labels, emb, num_samples=5, loss_weight=w, temperature=t)

    grad_w, grad_t = jax.grad(loss, argnums=(0, 1))(1.3, 0.5)
    assert float(loss(1.3, 0.5)) > 0
    assert float(grad_t) == 0.0
    np.testing.assert_allclose(grad_w, loss(1.0, 0.5), rtol=1e-6)


def test_traced_loss_weight_and_temperature_must_be_scalars():
    logits, labels, emb = _good()
    with pytest.raises(ValueError, match=r"loss_weight must be .* JAX scalar, got a float32 array"):
        jax.jit(lambda w: pne_loss(logits, labels, emb, loss_weight=w))(jnp.ones(2))
    with pytest.raises(ValueError, match=r"temperature must be .* JAX scalar.*shape \(1, 1\)"):
        jax.jit(lambda t: pne_loss(logits, labels, emb, temperature=t))(jnp.ones((1, 1)))
    stats = pne_batch_stats(logits, labels, emb)
    with pytest.raises(ValueError, match=r"loss_weight must be .* JAX scalar"):
        jax.jit(lambda w: pne_reduce(stats, loss_weight=w))(jnp.ones(3))


# --------------------------------------------------------------------------------------
# The reduction


def test_reduce_uses_the_num_samples_of_the_statistics():
    rng = np.random.default_rng(11)
    logits, labels, emb = random_case(rng, 3, 10, 10, 5, 8, scenario="plain")
    stats = pne_batch_stats(logits, labels, emb, num_samples=7)
    want, _, ref = pne_reference(logits, labels, emb, num_samples=7, loss_weight=0.8)
    assert ref["num_pairs"] > 2
    np.testing.assert_array_equal(stats.num_entries, 7 * np.asarray(stats.num_pairs))
    assert int(np.sum(stats.num_entries)) == ref["num_entries"]
    got = pne_reduce(stats, loss_weight=0.8)
    assert float(got) == float(pne_loss(logits, labels, emb, num_samples=7, loss_weight=0.8))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The formula in float64 on the statistics themselves: w * sum(l_a) * N / E^2.
    t, n, e = (
        np.sum(np.asarray(x, np.float64))
        for x in (stats.term_sum, stats.num_anchors, stats.num_entries)
    )
    np.testing.assert_allclose(got, 0.8 * t * n / e**2, rtol=1e-6)


def test_reduce_rejects_num_samples_and_other_keywords():
    stats = pne_batch_stats(LOGITS_2X2, LABELS_2X2, EMB_2X2, num_samples=3)
    with pytest.raises(TypeError, match=r"takes no num_samples argument: the statistics carry it"):
        pne_reduce(stats, num_samples=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'weight'"):
        pne_reduce(stats, weight=1.0)
    with pytest.raises(TypeError, match=r"stats must be a PNEStats .* got tuple"):
        pne_reduce(tuple(stats))
    with pytest.raises(ValueError, match=r"loss_weight must be a finite float, got inf"):
        pne_reduce(stats, loss_weight=np.inf)


# --------------------------------------------------------------------------------------
# Documentation


def test_pne_stats_fields_are_documented():
    shown = pydoc.render_doc(PNEStats, renderer=pydoc.plaintext)
    assert PNEStats._fields[-1] == "num_entries"
    for name in PNEStats._fields:
        doc = getattr(PNEStats, name).__doc__
        assert not doc.startswith("Alias for field number"), name
        assert doc in shown, name
        assert f"\n      {name}: " in PNEStats.__doc__, f"{name} missing from Attributes"


def test_docstring_examples_run():
    import pne_jax.losses.pne as module

    public = {
        "pne_loss",
        "pne_batch_stats",
        "pne_image_stats",
        "pne_reduce",
        "resize_labels_nearest",
        "validate_labels",
    }
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    with_examples = {t.name.rsplit(".", 1)[-1] for t in tests}
    assert public <= with_examples, f"no examples in {sorted(public - with_examples)}"
    report = io.StringIO()
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test, out=report.write)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted >= len(public) and failed == 0, report.getvalue()


def test_inside_user_jit_and_grad_of_grad_free_paths():
    # A user's jitted step adds its own term; its gradient is the loss's plus the term's,
    # and the grad-free paths (logits, temperature) get exactly zero.
    rng = np.random.default_rng(9)
    logits, labels, emb = random_case(rng, 2, 8, 8, 4, 8, scenario="plain")

    def user_loss(logits, emb, temperature):
        loss = pne_loss(logits, labels, emb, num_samples=5, temperature=temperature)
        return 0.5 * jnp.sum(emb**2) + loss

    step = jax.jit(jax.value_and_grad(user_loss, argnums=(0, 1, 2)))
    value, (g_logits, g_emb, g_temp) = step(logits, emb, jnp.float32(1.0))
    want, want_grad, ref = pne_reference(logits, labels, emb, num_samples=5)
    assert ref["num_pairs"] > 0
    np.testing.assert_allclose(value, 0.5 * np.sum(emb.astype(np.float64) ** 2) + want, rtol=1e-5)
    scale = np.abs(want_grad).max()
    np.testing.assert_allclose(g_emb, emb + want_grad, rtol=1e-5, atol=1e-6 * scale)
    alone = jax.grad(lambda e: pne_loss(logits, labels, e, num_samples=5))(emb)
    np.testing.assert_allclose(g_emb, emb + alone, rtol=1e-6, atol=1e-7 * scale)
    assert np.all(np.asarray(g_logits) == 0) and float(g_temp) == 0.0


# --------------------------------------------------------------------------------------
# Labels


def test_resize_labels_nearest_integer_factor_takes_top_left():
    labels = np.random.default_rng(0).integers(0, 19, (2, 64, 128))
    out = resize_labels_nearest(labels, (8, 16))
    np.testing.assert_array_equal(out, labels[:, ::8, ::8])


def test_resize_labels_nearest_follows_floor_rule():
    labels = np.arange(7 * 5).reshape(7, 5)
    out = np.asarray(resize_labels_nearest(labels, (3, 4)))
    rows = [math.floor(i * 7 / 3) for i in range(3)]
    cols = [math.floor(j * 5 / 4) for j in range(4)]
    np.testing.assert_array_equal(out, labels[np.ix_(rows, cols)])
    up = np.asarray(resize_labels_nearest(labels, (14, 10)))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(labels, 2, 0), 2, 1))


def test_validate_labels():
    validate_labels(np.array([[0, 18, 255]]), 19)
    with pytest.raises(ValueError, match=r"\[19, 254\].*outside \[0, 19\)"):
        validate_labels(np.array([[0, 19, 254, 255]]), 19)


# --------------------------------------------------------------------------------------
# Bad input


def _good():
    rng = np.random.default_rng(0)
    return random_case(rng, 1, 4, 4, 3, 4, scenario="plain")


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(num_samples=0), r"num_samples must be an int >= 1, got 0"),
        (dict(num_samples=2.5), r"num_samples must be an int >= 1, got 2.5"),
        (dict(temperature=0.0), r"temperature must be a finite float > 0, got 0.0"),
        (dict(temperature=-1), r"temperature must be a finite float > 0, got -1"),
        (dict(gate=(5, 2)), r"gate must satisfy gate\[0\] <= gate\[1\], got \(5, 2\)"),
        (dict(gate=3), r"gate must be a pair of ints"),
        (dict(max_pairs_per_image=0), r"max_pairs_per_image must be an int >= 1, got 0"),
        (dict(loss_weight=float("nan")), r"loss_weight must be a finite float, got nan"),
        (dict(loss_weight=np.ones(2)), r"loss_weight must be a finite float, got array"),
        (dict(temperature=np.float32("inf")), r"temperature must be a finite float > 0, got .*inf"),
        (dict(temperature=jnp.ones(3)), r"temperature must be .* or a JAX scalar.*shape \(3,\)"),
    ],
)
def test_bad_options_raise_value_error(change, message):
    logits, labels, emb = _good()
    with pytest.raises(ValueError, match=message):
        pne_loss(logits, labels, emb, **change)


@pytest.mark.parametrize(
    "which,bad,message",
    [
        ("logits", lambda x: x[0], r"logits must have shape \[B, h, w, C\], got shape \(4, 4, 3\)"),
        ("labels", lambda x: x[..., None], r"labels must have shape \[B, h, w\], got shape"),
        ("labels", lambda x: x.astype(np.float32), r"labels must be an integer array.*float32"),
        ("embeddings", lambda x: x[:, :3], r"must agree on the B, h, w dimensions"),
        ("logits", lambda x: x.astype(np.int32), r"logits must be a floating-point array"),
    ],
)
def test_bad_arrays_raise_value_error(which, bad, message):
    args = dict(zip(("logits", "labels", "embeddings"), _good(), strict=True))
    args[which] = bad(args[which])
    with pytest.raises(ValueError, match=message):
        pne_loss(args["logits"], args["labels"], args["embeddings"])


@pytest.mark.parametrize("shape", [(0, 4, 5), (2, 0, 5), (2, 4, 0)])
def test_empty_dimensions_raise_value_error(shape):
    logits = np.zeros((*shape, 3), np.float32)
    labels = np.zeros(shape, np.int32)
    emb = np.zeros((*shape, 4), np.float32)
    message = re.escape(f"embeddings has an empty dimension: shape {(*shape, 4)}; ")
    for fn in (pne_loss, pne_batch_stats):
        want = message + f"{fn.__name__} needs at least one image of at least 1x1 pixels"
        with pytest.raises(ValueError, match=want):
            fn(logits, labels, emb)
        with pytest.raises(ValueError, match=want):  # at trace time
            jax.jit(lambda e, fn=fn: fn(logits, labels, e))(emb)
    if shape[0]:
        image = re.escape(f"embeddings has an empty dimension: shape {(*shape[1:], 4)}; ")
        with pytest.raises(ValueError, match=image + "pne_image_stats needs an image of at"):
            pne_image_stats(logits[0], labels[0], emb[0])


def test_resize_labels_nearest_rejects_empty_or_flat_labels():
    with pytest.raises(ValueError, match=r"labels must have shape \[\.\.\., H, W\] with H, W >= 1"):
        resize_labels_nearest(np.zeros((2, 3, 0), np.int32), (2, 2))
    with pytest.raises(ValueError, match=r"with H, W >= 1, got shape \(7,\)"):
        resize_labels_nearest(np.zeros(7, np.int32), (2, 2))
    assert resize_labels_nearest(np.zeros((0, 4, 4), np.int32), (2, 2)).shape == (0, 2, 2)


def test_bad_input_raises_at_trace_time_inside_jit():
    logits, labels, emb = _good()
    with pytest.raises(ValueError, match="temperature"):
        jax.jit(lambda e: pne_loss(logits, labels, e, temperature=0))(emb)
    with pytest.raises(ValueError, match=r"logits must have shape \[h, w, C\], got shape \(4, 3\)"):
        jax.vmap(lambda lg, lb, e: pne_image_stats(lg[0], lb, e))(logits, labels, emb)
