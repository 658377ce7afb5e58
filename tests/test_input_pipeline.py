"""Sharding, determinism, resumption and batch formats of pne_jax/input_pipeline.py."""

import gc
import itertools
import os
import time

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from pne_jax import augment
from pne_jax import input_pipeline as ip
from pne_jax.configs import common

SIZES = [(40, 56), (36, 60), (48, 40), (30, 30)]


def fake_source(n, seed=0):
    """n examples of a few sizes; label pixels carry the example index (class i % 200)."""
    rng = np.random.default_rng(seed)
    source = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        label = np.where(rng.random((h, w)) < 0.5, i % 200, 201).astype(np.uint8)
        label[rng.random((h, w)) < 0.05] = 255
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        source.append({"image": image, "label": label, "name": f"ex{i}"})
    return source


def make_config(global_batch=4, **data):
    """A complete config from common.py's blocks: small sizes, in-process, no dataset name
    (tests pass source=...). The eval batch is the training one unless a test sets it."""
    config = ml_collections.ConfigDict()
    config.data = common.data("", base_size=(56, 40), crop_size=(24, 32), test_size=(64, 40))
    config.data.update(dict(num_workers=0, seed=3) | data)
    config.train = common.train(steps=1, global_batch_size=global_batch)
    config.eval = common.evaluation(config.data, global_batch_size=global_batch)
    return config


def take(iterator, n):
    batches = list(itertools.islice(iterator, n))
    iterator.close()
    return batches


def test_train_batch_shapes_and_dtypes():
    batch = next(ip.train_iterator(make_config(), source=fake_source(6), process_count=2))
    assert batch["image"].shape == (2, 24, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 24, 32) and batch["label"].dtype == np.int32
    assert set(batch) == {"image", "label"}


def test_device_augmentation_path_equals_the_host_path():
    """augment_on="device": the host's draws and source regions, augmented by the jitted
    `device_augment.augment_batch` (as the train step does), give the host path's batches:
    labels exactly, images to float32 rounding of the normalisation (levels are equal)."""
    from pne_jax import device_augment

    source = fake_source(10)
    host = make_config()
    device = make_config(augment_on="device", device_source_size=(48, 60))
    aug = ip.train_augment(device)
    augment_batch = jax.jit(device_augment.augment_batch, static_argnums=1)
    assert ip.device_source_size(host) is None and ip.device_source_size(device) == (48, 60)
    for p in range(2):
        want = take(ip.train_iterator(host, 2, source=source, process_index=p, process_count=2), 3)
        got = take(ip.train_iterator(device, 2, source=source, process_index=p, process_count=2), 3)
        for w, g in zip(want, got, strict=True):
            assert g["source"].shape == (2, 48, 60, 3) and g["source"].dtype == np.uint8
            out = jax.device_get(augment_batch(g, aug))
            np.testing.assert_array_equal(out["label"], w["label"])
            np.testing.assert_allclose(out["image"], w["image"], rtol=0, atol=1e-5)


def test_device_augmentation_config_checked_before_reading():
    config = make_config(augment_on="device", device_source_size=(16, 64))
    with pytest.raises(ValueError, match=r"crop_size \(24, 32\) does not fit in config.data"):
        ip.train_dataset(config, process_index=0, process_count=1)  # no source: checked first
    with pytest.raises(ValueError, match="config.data.augment_on='cpu': must be one of host"):
        ip.train_dataset(make_config(augment_on="cpu"), source=fake_source(2))


def test_global_batch_must_divide_by_process_count():
    with pytest.raises(ValueError, match="global batch size 5 .* process count 2"):
        ip.train_dataset(make_config(5), source=fake_source(6), process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index 2"):
        ip.train_dataset(make_config(4), source=fake_source(6), process_index=2, process_count=2)


@pytest.mark.parametrize("num_examples", [12, 10])
def test_train_shards_are_disjoint_and_cover_each_epoch(num_examples):
    kw = dict(num_examples=num_examples, global_batch_size=4, seed=3, process_count=2)
    steps = -(-3 * num_examples // 4)  # at least three epochs of stream positions
    shards = [
        np.concatenate([ip.train_indices(s, process_index=p, **kw)[0] for s in range(steps)])
        for p in range(2)
    ]
    epochs = [
        np.concatenate([ip.train_indices(s, process_index=p, **kw)[1] for s in range(steps)])
        for p in range(2)
    ]
    for e in range(3):
        parts = [shards[p][epochs[p] == e] for p in range(2)]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(np.concatenate(parts)) == list(range(num_examples))
    first, second = ip.epoch_permutation(3, 0, num_examples), ip.epoch_permutation(3, 1, 12)
    assert not np.array_equal(first, second)  # a new order each epoch


def test_pipeline_reads_the_examples_train_indices_names():
    # An identity augmentation (scale 1, full-size crop, no flip, no colour) exposes them.
    source = [dict(ex, label=np.full((24, 32), i, np.uint8)) for i, ex in enumerate(fake_source(9))]
    for ex in source:
        ex["image"] = np.zeros((24, 32, 3), np.uint8)
    config = make_config(
        base_size=(32, 24), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False
    )
    for p in range(2):
        batches = take(
            ip.train_iterator(config, source=source, process_index=p, process_count=2), 5
        )
        for step, batch in enumerate(batches):
            indices, _ = ip.train_indices(
                step, num_examples=9, global_batch_size=4, seed=3, process_index=p, process_count=2
            )
            assert list(batch["label"][:, 0, 0]) == list(indices)


def test_global_batch_does_not_depend_on_process_count():
    source, config = fake_source(7), make_config()
    one = take(ip.train_iterator(config, source=source, process_count=1, process_index=0), 3)
    two = [
        take(ip.train_iterator(config, source=source, process_count=2, process_index=p), 3)
        for p in range(2)
    ]
    for step in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([two[0][step][key], two[1][step][key]])
            np.testing.assert_array_equal(one[step][key], joined)


@pytest.mark.parametrize("start", [1, 4])
def test_resume_equals_uninterrupted_run(start):
    source, config = fake_source(10), make_config()  # 10 examples: batches straddle epochs
    full = take(ip.train_iterator(config, source=source, process_index=1, process_count=2), 10)
    resumed = take(
        ip.train_iterator(config, start, source=source, process_index=1, process_count=2), 6
    )
    for a, b in zip(full[start : start + 6], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other_seed = take(ip.train_iterator(make_config(seed=4), source=source, process_count=1), 1)
    assert not np.array_equal(other_seed[0]["label"][:2], full[0]["label"])


@pytest.mark.parametrize("workers,threads", [(2, 1), (0, 3)])
def test_workers_and_threads_give_the_same_batches(workers, threads):
    source = fake_source(10)
    config = make_config(num_workers=workers, num_threads=threads)
    batches = take(ip.train_iterator(config, 2, source=source, process_count=1), 4)
    ds = ip.train_dataset(make_config(), source=source, process_index=0, process_count=1)
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["image"], ds[2 + k]["image"])
        np.testing.assert_array_equal(batch["label"], ds[2 + k]["label"])


def _grain_shared_memory():
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory in /dev/shm")
def test_worker_shared_memory_is_freed_when_iteration_ends():
    """grain hands worker batches over in shared memory; a finished pass (and a closed
    training stream) must free it, not leave it to exit (a leak warning) or to a later
    garbage collection, which is switched off here."""
    source = fake_source(12)
    config = make_config(global_batch=2, num_workers=2)
    before = _grain_shared_memory()
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert len(list(ip.eval_iterator(config, source=source, process_count=1))) == 6
        take(ip.train_iterator(config, 0, source=source, process_count=1), 3)
        deadline = time.monotonic() + 20  # grain unlinks in a background thread
        while _grain_shared_memory() - before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _grain_shared_memory() - before
    finally:
        if enabled:
            gc.enable()


def test_train_labels_keep_source_values():
    source = fake_source(8)
    values = set().union(*(set(np.unique(ex["label"]).tolist()) for ex in source))
    for batch in take(ip.train_iterator(make_config(), source=source, process_count=1), 4):
        assert set(np.unique(batch["label"]).tolist()) <= values | {255}


@pytest.mark.parametrize("num_examples", [11, 1])
def test_eval_visits_every_example_once_with_masked_padding(num_examples):
    source = fake_source(num_examples)
    config = make_config(eval_pad_size=(48, 64), eval_label_pad_size=(50, 60))
    per_process = [
        list(ip.eval_iterator(config, source=source, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == ip.num_eval_batches(num_examples, 4, 2)
    seen = []
    for batch in itertools.chain(*per_process):
        assert batch["image"].shape == (2, 48, 64, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (2, 50, 60) and batch["label"].dtype == np.int32
        assert batch["image_size"].dtype == batch["label_size"].dtype == np.int32
        assert batch["mask"].dtype == bool
        for j in range(2):
            if not batch["mask"][j]:
                assert batch["index"][j] == -1 and np.all(batch["label"][j] == 255)
                assert np.all(batch["image"][j] == 0) and np.all(batch["image_size"][j] == 0)
                continue
            i = int(batch["index"][j])
            seen.append(i)
            label = source[i]["label"]
            (lh, lw), (ih, iw) = label.shape, augment.keep_ratio_size(label.shape, (64, 40))
            assert tuple(batch["label_size"][j]) == (lh, lw)
            assert tuple(batch["image_size"][j]) == (ih, iw)
            np.testing.assert_array_equal(batch["label"][j, :lh, :lw], label)
            assert np.all(batch["label"][j, lh:] == 255) and np.all(
                batch["label"][j, :, lw:] == 255
            )
            expected = augment.eval_transform(source[i]["image"], (64, 40))
            np.testing.assert_array_equal(batch["image"][j, :ih, :iw], expected)
            assert np.all(batch["image"][j, ih:] == 0) and np.all(batch["image"][j, :, iw:] == 0)
    assert sorted(seen) == list(range(num_examples))


def test_eval_pad_sizes_default_to_the_largest_and_too_small_raises():
    source = fake_source(5)
    batch = next(ip.eval_iterator(make_config(), source=source, process_count=1))
    test_sizes = [augment.keep_ratio_size(s, (64, 40)) for s in SIZES]
    assert batch["image"].shape[1:3] == tuple(np.max(test_sizes, axis=0))
    assert batch["label"].shape[1:] == tuple(np.max(SIZES, axis=0))
    config = make_config(eval_pad_size=(48, 64), eval_label_pad_size=(40, 40))
    with pytest.raises(ValueError, match="eval_label_pad_size"):
        next(ip.eval_iterator(config, source=source, process_count=1))


def test_eval_batch_size_from_eval_config():
    config = make_config(eval_pad_size=(48, 64), eval_label_pad_size=(50, 60))
    config.eval.global_batch_size = 6
    batches = list(ip.eval_iterator(config, source=fake_source(7), process_count=1))
    assert [b["mask"].sum() for b in batches] == [6, 1]


class CountingSource(list):
    """A list source that counts the examples read (each one decodes in a real source)."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_an_eval_dataset_built_once_scans_once_and_gives_the_same_passes():
    source = CountingSource(fake_source(5))
    ds = ip.eval_dataset(make_config(), source=source, process_count=1)
    assert source.reads == 5  # the size scan, once
    passes = [list(ip.eval_iterator(make_config(), dataset=ds)) for _ in range(2)]
    assert source.reads == 5 + 2 * 5  # each pass reads each example once, no new scan
    for a, b in zip(*passes, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    with pytest.raises(ValueError, match="either dataset= or source"):
        ip.eval_iterator(make_config(), dataset=ds, source=source)


def test_portrait_and_landscape_coco_images_fit_the_coco_config():
    """COCO-Stuff's config padded images to (512, 2048): a portrait 640 x 480 image, resized
    to fit (2048, 512), is 683 x 512 and did not fit. The pads now hold both orientations."""
    rng = np.random.default_rng(0)
    source = []
    for h, w in [(640, 480), (480, 640), (427, 640)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        source.append({"image": image, "label": np.zeros((h, w), np.uint8)})
    config = make_config(global_batch=3)
    config.data = common.coco_stuff()
    config.data.num_workers = 0
    (batch,) = ip.eval_iterator(config, source=source, process_count=1)
    assert [tuple(s) for s in batch["image_size"]] == [(683, 512), (512, 683), (512, 767)]
    assert batch["image"].shape[1:3] == (683, 767) and batch["label"].shape[1:] == (640, 640)


def test_missing_fields_name_the_field_and_where_a_complete_block_comes_from():
    config = make_config()
    del config.data["test_size"]
    with pytest.raises(ValueError, match=r"config.data.test_size is missing.*common.data\("):
        ip.eval_dataset(config, source=fake_source(2), process_count=1)
    config = make_config()
    del config["eval"]  # the eval batch no longer falls back to the training one
    with pytest.raises(ValueError, match=r"config.eval.global_batch_size .*evaluation\("):
        ip.eval_dataset(config, source=fake_source(2), process_count=1)
    with pytest.raises(ValueError, match=r"config.data.name is missing"):
        ip.open_source(ml_collections.ConfigDict({"train": {}}), "train")


def test_open_source_needs_a_name():
    with pytest.raises(ValueError, match="config.data.name"):
        ip.open_source(make_config(), "train")


def test_bad_examples_are_named():
    source = fake_source(3)
    source[1] = dict(source[1], label=source[1]["label"][:-1])
    with pytest.raises(ValueError, match="example 1 of the source"):
        ip.eval_dataset(make_config(), source=source, process_count=1)


def test_to_global_array_on_eight_devices():
    assert jax.device_count() == 8  # tests/conftest.py
    mesh = jax.make_mesh((8,), ("data",))
    batch = next(ip.train_iterator(make_config(8), source=fake_source(8), process_count=1))
    arrays = ip.to_global_array(batch, mesh)
    for key, value in batch.items():
        assert arrays[key].shape == value.shape and arrays[key].dtype == value.dtype
        assert arrays[key].sharding.spec == PartitionSpec("data")
        assert len(arrays[key].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(arrays[key]), value)


@pytest.fixture(scope="module")
def synthetic_config(tmp_path_factory):
    """A tiny prepared synthetic_semseg set (data/), read through open_source."""
    from pne_jax.datasets import prepare

    options = dict(num_train=8, num_validation=5, height=64, width=128)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare("synthetic", data_dir, **options)
    config = make_config(base_size=(128, 64), test_size=(128, 64), num_workers=1)
    config.data.update(name="synthetic", data_dir=data_dir, options=options)
    return config


def test_prepared_synthetic_set_end_to_end(synthetic_config):
    config = synthetic_config
    # A worker process reads the pickled tfds source; the batches equal in-process ones.
    batches = take(ip.train_iterator(config, 1, process_index=1, process_count=2), 2)
    ds = ip.train_dataset(config, process_index=1, process_count=2)
    for k, batch in enumerate(batches):
        assert batch["image"].shape == (2, 24, 32, 3) and batch["label"].shape == (2, 24, 32)
        np.testing.assert_array_equal(batch["image"], ds[1 + k]["image"])
        np.testing.assert_array_equal(batch["label"], ds[1 + k]["label"])
        assert set(np.unique(batch["label"]).tolist()) <= set(range(10)) | {255}
    config.data.num_workers = 0
    seen = []
    for p in range(2):
        for batch in ip.eval_iterator(config, process_index=p, process_count=2):
            assert batch["image"].shape == (2, 64, 128, 3) and batch["label"].shape == (2, 64, 128)
            seen += batch["index"][batch["mask"]].tolist()
    assert sorted(seen) == list(range(5))
    # TensorFlow is initialised by now and sees no accelerator; hiding again is harmless.
    tf = pytest.importorskip("tensorflow")
    ip.hide_accelerators_from_tf()
    assert not tf.config.get_visible_devices("GPU") and not tf.config.get_visible_devices("TPU")


def test_scanned_eval_sizes_are_cached_beside_the_prepared_data(synthetic_config, monkeypatch):
    config = synthetic_config
    path = ip.eval_sizes_cache_path(config)
    assert path.startswith(config.data.data_dir)
    if os.path.exists(path):
        os.remove(path)
    first = ip.eval_dataset(config, process_count=1)[0]
    assert os.path.exists(path)

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(ip, "scan_eval_sizes", no_scan)
    second = ip.eval_dataset(config, process_count=1)[0]
    assert second["image"].shape == first["image"].shape == (4, 64, 128, 3)
    assert second["label"].shape == first["label"].shape
    # A folder that cannot be written: scanned sizes still come back, a warning says so.
    monkeypatch.undo()
    blocked = os.path.join(config.data.data_dir, "not_a_folder")
    open(blocked, "w").close()
    sizes = ip.eval_pad_sizes(config, fake_source(3), os.path.join(blocked, "sizes.json"))
    assert sizes == ip.scan_eval_sizes(fake_source(3), config.data.test_size)
