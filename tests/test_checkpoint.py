"""Checkpointer: round trips, resharding, retention, and refusing incompatible configs."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax.checkpoint import (
    Checkpointer,
    abstract_like,
    config_differences,
    shape_mismatches,
    tree_shapes,
)

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


# --------------------------------------------------------------------------------------
# Shapes checked before restoring; model variables for inference


def test_restore_names_arrays_whose_shapes_differ(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory)
    ckpt.save(5, _state(_mesh(1)), CONFIG)
    ckpt.close()
    other = _state(_mesh(1))
    other["params"]["w"] = jnp.zeros((8, 5))  # e.g. another number of classes
    other["params"]["extra"] = jnp.zeros(2)
    with pytest.raises(ValueError) as info:
        Checkpointer(directory).restore(5, abstract_like(other), CONFIG)
    message = str(info.value)
    assert f"checkpoint step 5 in {directory} does not match" in message
    assert "params/w: saved (8, 3) vs expected (8, 5)" in message
    assert "params/extra: not in the checkpoint (expected (2,))" in message
    assert "2 arrays differ" in message


def test_shape_mismatches_by_path():
    saved = tree_shapes({"params": {"a": jnp.zeros((2, 3)), "b": jnp.zeros(1)}})
    expected = tree_shapes({"params": {"a": jax.ShapeDtypeStruct((2, 4), jnp.float32)}})
    assert shape_mismatches(saved, expected) == [
        "params/a: saved (2, 3) vs expected (2, 4)",
        "params/b: saved (1,), not in this model",
    ]


def test_restore_variables_reads_only_the_model_variables(tmp_path):
    state = _state(_mesh(8), seed=2)
    state["batch_stats"] = {"mean": jnp.arange(3.0)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(4, state, CONFIG)
    ckpt.close()
    target = abstract_like({"params": state["params"], "batch_stats": state["batch_stats"]})
    variables = Checkpointer(str(tmp_path / "ckpt")).restore_variables(4, target)
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], [0, 1, 2])
    wrong = {"params": {"w": jax.ShapeDtypeStruct((8, 19), jnp.float32)}, "batch_stats": {}}
    with pytest.raises(ValueError, match=r"params/w: saved \(8, 3\) vs expected \(8, 19\)"):
        Checkpointer(str(tmp_path / "ckpt")).restore_variables(4, wrong)


def _save_demo_checkpoint(workdir, config, step):
    """A checkpoint of the demo model as training writes it (zeros: only shapes matter)."""
    from pne_jax import train
    from pne_jax.models import build_model

    model = build_model(config.model)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    state = {
        "step": jnp.int32(step),
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": [{"trace": variables["params"]}],
    }
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    ckpt.save(step, state, train._config_dict(config))
    ckpt.close()
    return variables


def test_load_variables_for_inference_and_bad_checkpoints(tmp_path):
    from pne_jax import train
    from pne_jax.configs import demo

    workdir = str(tmp_path / "run")
    config = demo.get_config()
    config.data.crop_size = (64, 64)
    # No checkpoint: a clear error naming the directory, which is not created.
    with pytest.raises(FileNotFoundError, match=r"no checkpoints in .*run/checkpoints: train"):
        train.load_variables(config, workdir)
    assert not os.path.exists(workdir)

    saved = _save_demo_checkpoint(workdir, config, step=7)
    variables, step = train.load_variables(config, workdir)
    assert step == 7 and set(variables) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(saved))
    assert variables["params"] and variables["batch_stats"]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 .* saved steps: \[7\]"):
        train.load_variables(config, workdir, step=3)

    # Another number of classes: the classifier's parameters are named, with both shapes,
    # and the config field behind them.
    config.model.num_classes = 5
    with pytest.raises(ValueError) as info:
        train.load_variables(config, workdir)
    message = str(info.value)
    assert "does not match the model of this config" in message
    assert re.search(
        r"params/\S+/kernel: saved \(1, 1, \d+, 10\) vs expected \(1, 1, \d+, 5\)", message
    )
    assert "model.num_classes: 10 -> 5" in message
