"""pixel_contrast_loss against the float64 NumPy reference, its sampling rules, sharding."""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax.losses import (
    PixelContrastSample,
    PixelContrastStats,
    pixel_contrast,
    pixel_contrast_loss,
    pixel_contrast_reduce,
    pixel_contrast_sample,
    pixel_contrast_stats,
)
from tests.compile_count import COMPILES
from tests.pixel_contrast_reference import check_sample, pixel_contrast_reference

# --------------------------------------------------------------------------------------
# Random cases

SHAPE = (3, 8, 10, 5, 8)  # B, h, w, C, D


def random_case(rng, b, h, w, c, d, *, scenario, emb_dtype=np.float32):
    """Labels from a few classes per image (uneven sizes), logits right with probability
    ~0.6 (or always / never, per scenario), embeddings Gaussian."""
    labels = np.empty((b, h * w), np.int64)
    for i in range(b):
        k = int(rng.integers(1, c + 1))
        present = rng.choice(c, size=k, replace=False)
        weights = rng.dirichlet(np.ones(k) * 0.7)
        labels[i] = rng.choice(present, size=h * w, p=weights)
    labels[rng.random(labels.shape) < 0.1] = 255
    correct = rng.random(labels.shape) < 0.6
    if scenario == "no_hard":
        correct[:] = True
    elif scenario == "no_easy":
        correct[:] = False
    elif scenario == "one_class":
        labels = np.where(labels == 255, 255, 2)
    elif scenario == "ignored_images":
        labels[rng.random(b) < 0.5] = 255
        labels[0] = np.where(labels[0] == 255, 1, labels[0])  # at least one image with labels
    elif scenario == "all_ignored":
        labels[:] = 255
    elif scenario == "singletons":  # classes in one image only, but for class 0
        for i in range(b):
            labels[i] = np.where(labels[i] == 255, 255, (np.arange(h * w) % 2 + 2 * i) % c)
            labels[i, rng.random(h * w) < 0.3] = 255
    logits = rng.normal(size=(b, h * w, c)).astype(np.float32)
    target = np.where(labels == 255, 0, labels)
    wrong = (target + rng.integers(1, c, size=target.shape)) % c
    pred = np.where(correct, target, wrong)
    np.put_along_axis(logits, pred[..., None], logits.max(-1, keepdims=True) + 1.0, axis=-1)
    emb = rng.normal(size=(b, h * w, d)).astype(emb_dtype)
    if scenario == "zero_embeddings":
        emb[0, :7] = 0
    return (
        logits.reshape(b, h, w, c),
        labels.reshape(b, h, w).astype(np.int32),
        emb.reshape(b, h, w, d),
    )


# name: (scenario, options, number of seeds)
CASES = {
    "plain": ("plain", dict(max_views=5, max_samples=48), 14),
    "small_classes": ("plain", dict(max_views=12, max_samples=48), 10),
    "no_hard": ("no_hard", dict(max_views=5, max_samples=48), 10),
    "no_easy": ("no_easy", dict(max_views=5, max_samples=48), 10),
    "ignored_images": ("ignored_images", dict(max_views=5, max_samples=48), 10),
    "all_ignored": ("all_ignored", dict(max_views=5, max_samples=48), 4),
    "one_class": ("one_class", dict(max_views=5, max_samples=48), 8),
    "n_view_zero": ("plain", dict(max_views=1, max_samples=3), 8),
    "n_view_one_singletons": ("singletons", dict(max_views=3, max_samples=7), 10),
    "n_view_one": ("plain", dict(max_views=2, max_samples=9), 8),
    "zero_embeddings": ("zero_embeddings", dict(max_views=5, max_samples=48), 6),
    "unnormalized": ("plain", dict(max_views=5, max_samples=48, normalize=False), 6),
    "bf16": ("plain", dict(max_views=5, max_samples=48), 6),
}


@functools.partial(jax.jit, static_argnames=("max_views", "max_samples", "normalize"))
def _value_and_grad(key, logits, labels, emb, t, bt, lw, **options):
    """(loss, stats), d loss / d emb through pixel_contrast_stats and _reduce."""

    def loss(e):
        stats = pixel_contrast_stats(
            key, logits, labels, e, temperature=t, base_temperature=bt, **options
        )
        return pixel_contrast_reduce(stats, loss_weight=lw), stats

    return jax.value_and_grad(loss, has_aux=True)(emb)


def _anchors(sample):
    valid = np.asarray(sample.valid)
    image, pixel = (np.asarray(x)[valid].tolist() for x in (sample.image, sample.pixel))
    return list(zip(image, pixel, strict=True))


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_cases_match_float64_reference(name):
    scenario, options, seeds = CASES[name]
    options = dict(options)
    normalize = options.pop("normalize", True)
    emb_dtype = jnp.bfloat16 if name == "bf16" else np.float32

    sampled = nonzero = 0
    for seed in range(seeds):
        rng = np.random.default_rng(1000 * len(name) + seed)
        logits, labels, emb = random_case(rng, *SHAPE, scenario=scenario, emb_dtype=emb_dtype)
        if not normalize:
            emb = emb * 0.3
        key = jax.random.key(seed)
        t, bt, lw = rng.uniform(0.07, 0.5), rng.uniform(0.05, 0.5), rng.uniform(0.1, 2.0)
        sample = pixel_contrast_sample(key, logits, labels, **options)
        check_sample(sample, logits, labels, **options)
        want, want_grad, want_stats = pixel_contrast_reference(
            labels, np.asarray(emb, np.float64), _anchors(sample), temperature=t,
            base_temperature=bt, loss_weight=lw, normalize=normalize,
        )  # fmt: skip
        (got, stats), grad = _value_and_grad(
            key, logits, labels, emb, t, bt, lw, normalize=normalize, **options
        )
        assert int(stats.num_anchors) == want_stats["num_anchors"]
        assert int(stats.num_sampled) == want_stats["num_sampled"]
        assert grad.dtype == emb.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        grad = np.asarray(grad, np.float64)
        scale = np.abs(want_grad).max()
        if emb_dtype == jnp.bfloat16:  # the gradient is rounded to bf16 on the way out
            np.testing.assert_allclose(grad, want_grad, rtol=1e-2, atol=1e-2 * scale)
        else:
            np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5 * scale + 1e-9)
        assert np.all(np.isfinite(grad))
        if name == "n_view_one_singletons":
            assert 0 < want_stats["num_anchors"] < want_stats["num_sampled"]
        sampled += want_stats["num_sampled"] > 0
        nonzero += want != 0
    # Each scenario reaches what it is named for.
    if name in ("all_ignored", "n_view_zero"):
        assert sampled == 0 and nonzero == 0
    elif name == "one_class":  # no negatives anywhere: every log_prob is 0
        assert sampled == seeds and nonzero == 0
    else:
        assert nonzero >= seeds // 2, (name, nonzero)


def test_there_are_at_least_100_random_cases():
    assert sum(seeds for _, _, seeds in CASES.values()) >= 100


def test_scenarios_hit_their_edge_cases():
    rng = np.random.default_rng(5)
    hits = {"n_view_one_singletons": 0, "n_view_one": 0, "small_classes": 0}
    for name in hits:
        scenario, options, seeds = CASES[name]
        for _ in range(seeds):
            logits, labels, _ = random_case(rng, *SHAPE, scenario=scenario)
            sample = pixel_contrast_sample(jax.random.key(0), logits, labels, **options)
            found, n_view = check_sample(sample, logits, labels, **options)
            if name == "small_classes":
                counts = [np.sum(labels[i] == c) for i in range(3) for c in range(5)]
                hits[name] += any(0 < n <= options["max_views"] for n in counts) and bool(found)
            else:
                hits[name] += n_view == 1
    assert all(v >= 3 for v in hits.values()), hits


def test_reference_gradient_matches_central_differences():
    rng = np.random.default_rng(3)
    logits, labels, emb = random_case(rng, 2, 6, 6, 3, 4, scenario="plain")
    options = dict(max_views=3, max_samples=16)
    anchors = _anchors(pixel_contrast_sample(jax.random.key(1), logits, labels, **options))
    emb = emb.astype(np.float64)
    for normalize in (True, False):
        kw = dict(temperature=0.2, base_temperature=0.1, loss_weight=0.7, normalize=normalize)
        value, grad, _ = pixel_contrast_reference(labels, emb, anchors, **kw)
        assert value > 0
        eps = 1e-6
        for i, p in anchors[:6]:
            for ch in range(4):
                bumped = [emb.copy(), emb.copy()]
                bumped[0].reshape(2, 36, 4)[i, p, ch] += eps
                bumped[1].reshape(2, 36, 4)[i, p, ch] -= eps
                up, down = (pixel_contrast_reference(labels, e, anchors, **kw)[0] for e in bumped)
                fd = (up - down) / (2 * eps)
                np.testing.assert_allclose(
                    grad.reshape(2, 36, 4)[i, p, ch], fd, rtol=1e-5, atol=1e-9
                )


# --------------------------------------------------------------------------------------
# Sampling


def test_sampling_follows_the_rules_for_many_inputs():
    rng = np.random.default_rng(11)
    for seed in range(30):
        scenario = ["plain", "no_hard", "no_easy", "ignored_images", "singletons"][seed % 5]
        logits, labels, _ = random_case(rng, *SHAPE, scenario=scenario)
        options = [dict(max_views=3, max_samples=17), dict(max_views=7, max_samples=64)][seed % 2]
        sample = pixel_contrast_sample(jax.random.key(seed), logits, labels, **options)
        check_sample(sample, logits, labels, **options)


def test_sampling_is_spread_over_the_eligible_pixels():
    # One image: class 0 on 40 pixels (12 mispredicted), class 1 on 24 (all right).
    labels = np.array([0] * 40 + [1] * 24, np.int32).reshape(1, 8, 8)
    pred = np.array([1] * 12 + [0] * 28 + [1] * 24)
    logits = np.eye(2, dtype=np.float32)[pred].reshape(1, 8, 8, 2)
    options = dict(max_views=10, max_samples=64)  # 2 candidates, n_view 10
    keys = jax.random.split(jax.random.key(7), 400)
    samples = jax.vmap(lambda k: pixel_contrast_sample(k, logits, labels, **options))(keys)
    counts = np.zeros(64)
    for r in range(400):
        one = jax.tree.map(lambda x, r=r: x[r], samples)
        if r < 20:
            check_sample(one, logits, labels, **options)
        np.add.at(counts, np.asarray(one.pixel)[np.asarray(one.valid)], 1)
    # Class 0 keeps 5 of 12 hard and 5 of 28 easy pixels; class 1 10 of 24 easy ones.
    expected = np.array([400 * 5 / 12] * 12 + [400 * 5 / 28] * 28 + [400 * 10 / 24] * 24)
    assert counts.min() > 0, "some eligible pixel is never chosen"
    np.testing.assert_allclose(counts, expected, rtol=0.35)
    assert counts.sum() == 400 * 20


def test_sampling_depends_on_the_key_only_through_the_key():
    rng = np.random.default_rng(2)
    logits, labels, _ = random_case(rng, *SHAPE, scenario="plain")
    options = dict(max_views=3, max_samples=30)
    a, b, c = (
        pixel_contrast_sample(jax.random.key(k), logits, labels, **options) for k in (0, 0, 1)
    )
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    assert not np.array_equal(a.pixel, c.pixel)
    # A raw uint32 key works too and gives the same choice as the typed key it wraps.
    raw = pixel_contrast_sample(jax.random.PRNGKey(0), logits, labels, **options)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, raw))
    # Each image draws its own keys: two copies of one image get different anchors.
    twice = [np.concatenate([x[:1], x[:1]]) for x in (logits, labels)]
    s = pixel_contrast_sample(jax.random.key(0), *twice, **options)
    assert int(s.n_view) >= 2
    chosen = [
        set(np.asarray(s.pixel)[np.asarray(s.valid) & (np.asarray(s.image) == i)]) for i in (0, 1)
    ]
    assert chosen[0] != chosen[1]


# --------------------------------------------------------------------------------------
# Closed forms and edge cases


def test_closed_form_two_orthogonal_classes():
    # Two images, two classes each, constant orthogonal embeddings per class: every
    # anchor has 2 * n_view - 1 positives at s = 1/T and 2 * n_view negatives at s = 0.
    labels = np.repeat(np.array([0] * 8 + [1] * 8, np.int32)[None], 2, 0).reshape(2, 4, 4)
    logits = np.eye(2, dtype=np.float32)[labels]
    emb = np.eye(3, dtype=np.float32)[labels] * 2.5
    t, bt = 0.2, 0.1
    loss = pixel_contrast_loss(
        jax.random.key(0), logits, labels, emb, max_views=4, max_samples=12, temperature=t,
        base_temperature=bt, loss_weight=0.5,
    )  # fmt: skip
    n_view = min(12 // 4, 4)
    want = 0.5 * (t / bt) * np.log1p(2 * n_view * np.exp(-1 / t))
    np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize("case", ["all_ignored", "only_small_classes", "n_view_zero"])
def test_no_anchors_give_zero_loss_and_zero_gradient(case):
    rng = np.random.default_rng(4)
    logits, labels, emb = random_case(rng, *SHAPE, scenario="plain")
    options = dict(max_views=5, max_samples=40)
    if case == "all_ignored":
        labels[:] = 255
    elif case == "only_small_classes":
        options = dict(max_views=80, max_samples=80)  # 80 pixels per image: none has more
    else:
        options = dict(max_views=1, max_samples=2)
    loss, grad = jax.value_and_grad(
        lambda e: pixel_contrast_loss(jax.random.key(0), logits, labels, e, **options)
    )(emb)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_anchor_without_positive_is_left_out_of_the_mean():
    # n_view 1: image 0 has classes 0 and 1, image 1 class 0 only: class 1's anchor has
    # no positive; the two class-0 anchors each have one positive and one negative.
    labels = np.array([[0] * 8 + [1] * 8, [0] * 16], np.int32).reshape(2, 4, 4)
    logits = np.eye(2, dtype=np.float32)[labels]
    emb = np.random.default_rng(0).normal(size=(2, 4, 4, 5)).astype(np.float32)
    kw = dict(max_views=1, max_samples=3, temperature=0.5, base_temperature=0.5)
    key = jax.random.key(3)
    stats = pixel_contrast_stats(key, logits, labels, emb, **kw)
    assert (int(stats.num_sampled), int(stats.num_anchors), int(stats.n_view)) == (3, 2, 1)
    sample = pixel_contrast_sample(key, logits, labels, max_views=1, max_samples=3)
    want, _, _ = pixel_contrast_reference(
        labels, emb, _anchors(sample), temperature=0.5, base_temperature=0.5, loss_weight=1.0
    )
    np.testing.assert_allclose(pixel_contrast_reduce(stats, loss_weight=1.0), want, rtol=1e-6)
    assert want > 0
    # Only singletons (no class in two images): no anchor has a positive, loss 0.
    labels[1] = 2
    stats = pixel_contrast_stats(key, np.eye(3, dtype=np.float32)[labels], labels, emb, **kw)
    assert int(stats.num_anchors) == 0 and int(stats.num_sampled) == 3
    assert float(pixel_contrast_reduce(stats)) == 0.0


def test_logits_and_temperatures_get_zero_gradient_loss_weight_a_linear_one():
    rng = np.random.default_rng(9)
    logits, labels, emb = random_case(rng, *SHAPE, scenario="plain")
    key = jax.random.key(0)

    def loss(lg, t, bt, w):
        return pixel_contrast_loss(key, lg, labels, emb, temperature=t, base_temperature=bt,
                                   loss_weight=w, max_views=5, max_samples=48)  # fmt: skip

    value = loss(logits, 0.1, 0.07, 1.0)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(logits, 0.1, 0.07, 1.0)
    assert np.all(np.asarray(grads[0]) == 0) and float(grads[1]) == float(grads[2]) == 0.0
    np.testing.assert_allclose(grads[3], value, rtol=1e-6)


def test_summed_stats_of_two_batches_average_their_anchors():
    rng = np.random.default_rng(12)
    options = dict(max_views=5, max_samples=48)
    batches = [random_case(rng, *SHAPE, scenario="plain") for _ in range(2)]
    stats = [pixel_contrast_stats(jax.random.key(i), *x, **options) for i, x in enumerate(batches)]
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), *stats)
    want = (stats[0].term_sum + stats[1].term_sum) / (stats[0].num_anchors + stats[1].num_anchors)
    np.testing.assert_allclose(pixel_contrast_reduce(both, loss_weight=1.0), want, rtol=1e-6)


def test_docstring_examples_run():
    result = doctest.testmod(pixel_contrast, extraglobs={"jax": jax}, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


# --------------------------------------------------------------------------------------
# Sharding, compilation, host round-trips


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharded_batch_equals_single_device(axis_type):
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
    rng = np.random.default_rng(6)
    logits, labels, emb = random_case(rng, 8, 8, 10, 5, 8, scenario="plain")
    labels[3] = 255  # one image without candidates
    options = dict(max_views=4, max_samples=64, temperature=0.2)
    key = jax.random.key(42)

    def run(lg, lb, e):
        value, grad = jax.value_and_grad(
            lambda e: pixel_contrast_loss(key, lg, lb, e, **options)
        )(e)  # fmt: skip
        sample = pixel_contrast_sample(key, lg, lb, max_views=4, max_samples=64)
        return value, grad, sample

    want, want_grad, want_sample = jax.jit(run)(logits, labels, emb)
    assert int(want_sample.n_view) >= 2 and float(want) > 0
    kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(x, shard) for x in (logits, labels, emb)]
    with jax.set_mesh(mesh):
        value, grad, sample = jax.jit(run)(*args)
    assert grad.sharding.is_equivalent_to(shard, grad.ndim)
    assert jax.tree.all(jax.tree.map(np.array_equal, sample, want_sample))
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6 * np.abs(want_grad).max())


def test_one_compilation_per_shape_and_no_host_callbacks():
    rng = np.random.default_rng(8)
    options = dict(max_views=5, max_samples=48)
    batches = [random_case(rng, *SHAPE, scenario=s) for s in ("plain", "no_easy", "one_class")]
    batches = [tuple(jax.device_put(x) for x in batch) for batch in batches]

    @jax.jit
    def step(key, lg, lb, e, t, bt, w):
        loss = lambda e: pixel_contrast_loss(  # noqa: E731
            key, lg, lb, e, temperature=t, base_temperature=bt, loss_weight=w, **options
        )
        return jax.value_and_grad(loss)(e)

    scalars = [jax.device_put(np.float32(v)) for v in (0.1, 0.07, 0.1)]
    key = jax.device_put(jax.random.key(0))
    jax.block_until_ready(step(key, *batches[0], *scalars))  # compiles
    jax.block_until_ready(pixel_contrast_loss(key, *batches[0], **options))  # compiles
    news = [[jax.device_put(np.float32(v)) for v in (0.2 + i, 0.1 * (i + 1), i)] for i in range(3)]
    keys = [jax.device_put(jax.random.key(i + 1)) for i in range(3)]
    with COMPILES as compiles, jax.transfer_guard("disallow"):
        for batch, new, key in zip(batches, news, keys, strict=True):
            jax.block_until_ready(step(key, *batch, *new))
    assert compiles.count == 0, "a new key, batch or scalar values compiled the step again"
    with COMPILES as compiles:
        for i, batch in enumerate(batches):  # eagerly: Python scalars become arguments
            pixel_contrast_loss(jax.random.key(i), *batch, temperature=0.3 + i, **options)
    assert compiles.count == 0, "pixel_contrast_loss recompiled for inputs of the same shape"

    lowered = step.lower(key, *batches[0], *scalars)
    text = lowered.as_text() + str(jax.make_jaxpr(step)(key, *batches[0], *scalars))
    assert "callback" not in text.lower()


# --------------------------------------------------------------------------------------
# Bad input


def _good():
    rng = np.random.default_rng(0)
    return random_case(rng, 2, 4, 4, 3, 4, scenario="plain")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_views=50, max_samples=40), "max_views=50 must be <= max_samples=40"),
        (dict(max_views=0), "max_views must be an int >= 1"),
        (dict(max_samples=0, max_views=1), "max_samples must be an int >= 1"),
        (dict(max_views=2.5), "max_views must be an int"),
        (dict(ignore_index="x"), "ignore_index must be an int"),
        (dict(temperature=0.0), "temperature must be a finite float > 0"),
        (dict(base_temperature=-1.0), "base_temperature must be a finite float > 0"),
        (dict(loss_weight=float("nan")), "loss_weight must be a finite float"),
    ],
)
def test_bad_options_raise_one_line_value_error(change, message):
    logits, labels, emb = _good()
    kw = dict(max_views=2, max_samples=8) | change
    with pytest.raises(ValueError, match=message) as info:
        pixel_contrast_loss(jax.random.key(0), logits, labels, emb, **kw)
    assert "\n" not in str(info.value)
    if "max_samples=40" in message:
        assert "lower max_views or raise max_samples" in str(info.value)


@pytest.mark.parametrize(
    "which, message",
    [
        ("logits_rank", r"logits must have shape \[B, h, w, C\]"),
        ("labels_rank", r"labels must have shape \[B, h, w\]"),
        ("emb_rank", r"embeddings must have shape \[B, h, w, D\]"),
        ("labels_float", "labels must be an integer array"),
        ("emb_int", "embeddings must be a floating-point array"),
        ("mismatch", "must agree on the B, h, w dimensions"),
        ("empty", "empty dimension"),
        ("key", "key must be one PRNG key"),
    ],
)
def test_bad_arrays_raise_one_line_value_error(which, message):
    logits, labels, emb = _good()
    key = jax.random.key(0)
    if which == "logits_rank":
        logits = logits[0]
    elif which == "labels_rank":
        labels = labels[..., None]
    elif which == "emb_rank":
        emb = emb[0]
    elif which == "labels_float":
        labels = labels.astype(np.float32)
    elif which == "emb_int":
        emb = emb.astype(np.int32)
    elif which == "mismatch":
        emb = emb[:, :3]
    elif which == "empty":
        logits, labels, emb = logits[:, :0], labels[:, :0], emb[:, :0]
    else:
        key = jax.random.split(key, 2)
    with pytest.raises(ValueError, match=message) as info:
        pixel_contrast_loss(key, logits, labels, emb, max_views=2, max_samples=8)
    assert "\n" not in str(info.value)


def test_bad_input_raises_at_trace_time_inside_jit():
    logits, labels, emb = _good()
    with pytest.raises(ValueError, match="max_views=9 must be <= max_samples=8"):
        jax.jit(
            lambda e: pixel_contrast_loss(
                jax.random.key(0), logits, labels, e, max_views=9, max_samples=8
            )
        )(emb)
    with pytest.raises(TypeError, match="PixelContrastStats"):
        pixel_contrast_reduce((1.0, 2))


def test_public_types():
    assert PixelContrastSample._fields[:2] == ("image", "pixel")
    assert "term_sum" in PixelContrastStats._fields
