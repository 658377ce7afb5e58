"""Checkpointer: round trips, resharding, retention, and refusing incompatible configs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax.checkpoint import Checkpointer, abstract_like, config_differences

CONFIG = {"model": {"backbone": "resnet50_v1c"}, "train": {"steps": 10, "log_every": 5}}


def _mesh(n):
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )


def _state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    return {
        "step": jax.device_put(np.int32(seed), replicated),
        "params": {"w": jax.device_put(rng.normal(size=(8, 3)).astype(np.float32), replicated)},
        "sharded": jax.device_put(rng.normal(size=(8, 2)).astype(np.float32), sharded),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
    }


def test_round_trip_onto_a_different_device_count(tmp_path):
    saved = _state(_mesh(8), seed=3)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, saved, CONFIG)
    ckpt.close()
    target = abstract_like(_state(_mesh(2)))  # 2 devices now
    restored = Checkpointer(str(tmp_path / "ckpt")).restore(7, target, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(saved))
    assert restored["sharded"].sharding.mesh.devices.size == 2


def test_keeps_latest_and_best(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    state = _state(_mesh(1))
    for step, miou in [(1, 0.5), (2, None), (3, 0.9), (4, 0.1), (5, None), (6, None)]:
        ckpt.save(step, state, CONFIG, metrics=None if miou is None else {"miou": miou})
        ckpt.wait()
    # The last two (5, 6) and the best by mIoU (3).
    assert sorted(ckpt.all_steps()) == [3, 5, 6]
    ckpt.close()


def test_incompatible_config_is_refused_and_left_untouched(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory)
    ckpt.save(5, _state(_mesh(1)), CONFIG)
    ckpt.close()
    before = sorted(os.listdir(directory))
    other = {"model": {"backbone": "resnet101_v1c"}, "train": {"steps": 99, "log_every": 1}}
    with pytest.raises(ValueError, match="model.backbone: 'resnet50_v1c' -> 'resnet101_v1c'"):
        Checkpointer(directory).restore(5, abstract_like(_state(_mesh(1))), other)
    assert sorted(os.listdir(directory)) == before
    # Changing only bookkeeping fields (steps, logging) is allowed.
    longer = {"model": {"backbone": "resnet50_v1c"}, "train": {"steps": 99, "log_every": 1}}
    restored = Checkpointer(directory).restore(5, abstract_like(_state(_mesh(1))), longer)
    assert int(restored["step"]) == 0


def test_config_differences_flattens_and_reports_absent_fields():
    diffs = config_differences({"a": {"b": 1}, "c": (1, 2)}, {"a": {"b": 2}, "c": [1, 2], "d": 0})
    assert diffs == ["a.b: 1 -> 2", "d: '<absent>' -> 0"]


def test_abstract_like_keeps_shardings():
    state = _state(_mesh(8))
    abstract = abstract_like(state)
    assert abstract["sharded"].sharding == state["sharded"].sharding
    assert abstract["params"]["w"].shape == (8, 3) and abstract["step"].dtype == jnp.int32
