"""Checkpointer: round trips, resharding, retention, refusing incompatible configs, verifying
manifests, falling back from damaged steps, and one-line write errors."""

import errno
import json
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    DamagedCheckpointError,
    abstract_like,
    config_differences,
    shape_mismatches,
    tree_shapes,
)
from pne_jax.checkpoint_manifest import manifest_problems

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
    # Changing only bookkeeping fields (logging) is allowed.
    chattier = {"model": {"backbone": "resnet50_v1c"}, "train": {"steps": 10, "log_every": 1}}
    restored = Checkpointer(directory).restore(5, abstract_like(_state(_mesh(1))), chattier)
    assert int(restored["step"]) == 0


def test_config_differences_flattens_and_reports_absent_fields():
    diffs = config_differences({"a": {"b": 1}, "c": (1, 2)}, {"a": {"b": 2}, "c": [1, 2], "d": 0})
    assert diffs == ["a.b: 1 -> 2", "d: '<absent>' -> 0"]


def test_a_run_from_before_the_input_options_resumes(tmp_path):
    """A checkpoint whose config predates data.storage, data.augment_on and
    data.device_source_size (pne-jax before issue 17) resumes with today's defaults and with
    another storage form (the same pixels); switching the augmentation to the device, which
    changes the normalisation's float rounding, is refused with the fix."""
    from pne_jax import configs
    from pne_jax.train import _config_dict

    current = _config_dict(configs.get_config("demo"))
    old = json.loads(json.dumps(current))
    for field in ("storage", "augment_on", "device_source_size"):
        del old["data"][field]
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory)
    ckpt.save(5, _state(_mesh(1)), old)
    ckpt.check_config(5, current)
    current["data"]["storage"] = "raw"
    current["data"]["device_source_size"] = [256, 512]
    ckpt.check_config(5, current)
    current["data"]["augment_on"] = "device"
    with pytest.raises(
        ValueError,
        match="data.augment_on: 'host' -> 'device'.*restore "
        "data.augment_on=host, or use another --workdir",
    ):
        ckpt.check_config(5, current)
    ckpt.close()


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


# --------------------------------------------------------------------------------------
# Manifests, damaged checkpoints and falling back; write errors; trajectory fields


def _saved(tmp_path, steps=(1, 2), max_to_keep=3):
    """A checkpoint directory holding `steps` of tiny states (step s: seed s)."""
    directory = str(tmp_path / "run" / "checkpoints")
    ckpt = Checkpointer(directory, max_to_keep=max_to_keep)
    for step in steps:
        ckpt.save(step, _state(_mesh(1), seed=step), CONFIG)
    ckpt.close()
    return directory


def _largest_state_file(step_dir):
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
    ]
    return max(files, key=os.path.getsize)


def _our_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "root" and r.levelno >= 30]


def _target():
    return abstract_like(_state(_mesh(1)))


def test_committed_steps_get_a_manifest_that_verifies(tmp_path):
    directory = _saved(tmp_path)
    for step in (1, 2):
        assert os.path.exists(os.path.join(directory, str(step), MANIFEST))
    assert Checkpointer(directory).verify(2) is True


def test_the_manifest_is_written_on_commit_without_waiting(tmp_path):
    """As soon as orbax commits a step (a run killed right after still has it)."""
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, _state(_mesh(1)), CONFIG)
    manifest = tmp_path / "ckpt" / "1" / MANIFEST
    deadline = time.time() + 20
    while not manifest.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert manifest.exists() and (tmp_path / "ckpt" / "1" / "commit_success.txt").exists()
    ckpt.close()
    assert Checkpointer(str(tmp_path / "ckpt")).verify(1) is True


def test_a_full_disk_while_writing_the_manifest_keeps_the_older_steps(tmp_path, monkeypatch):
    from pne_jax import checkpoint

    directory = _saved(tmp_path, steps=(1, 2), max_to_keep=2)

    def no_space(step_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_manifest", no_space)
    ckpt = Checkpointer(directory, max_to_keep=2)
    ckpt.save(3, _state(_mesh(1), seed=3), CONFIG)
    with pytest.raises(
        CheckpointWriteError,
        match=r"^could not write checkpoint step 3 to .*: \[Errno 28\] No space left on device$",
    ):
        ckpt.close()
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # 1 not rotated out for 3


def test_overwritten_bytes_in_the_latest_step_fall_back_to_the_older_one(tmp_path, caplog):
    directory = _saved(tmp_path)
    path = _largest_state_file(os.path.join(directory, "2"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same size, other bytes
        f.seek(size // 2)
        f.write(b"\xff" * min(16, size - size // 2))
    assert os.path.getsize(path) == size
    ckpt = Checkpointer(directory)
    with caplog.at_level(logging.WARNING):
        step, state = ckpt.restore_latest(_target(), CONFIG)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, state, jax.device_get(_state(_mesh(1), seed=1)))
    (line,) = _our_warnings(caplog)
    rel = os.path.relpath(path, os.path.join(directory, "2"))
    assert f"checkpoint step 2 in {directory} is damaged: {rel}: contents differ" in line
    assert "falling back to step 1" in line and "\n" not in line
    moved = os.path.join(tmp_path, "run", "damaged_checkpoints", "2")
    assert f"moved it to {moved}" in line and os.path.isdir(moved)
    assert ckpt.all_steps() == [1] and Checkpointer(directory).all_steps() == [1]
    ckpt.close()


def test_a_truncated_file_is_named_with_both_sizes(tmp_path):
    directory = _saved(tmp_path)
    path = _largest_state_file(os.path.join(directory, "2"))
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    rel = os.path.relpath(path, os.path.join(directory, "2"))
    message = (
        f"checkpoint step 2 in {directory} is damaged: "
        f"{rel}: {size // 2} bytes, manifest says {size}"
    )
    with pytest.raises(DamagedCheckpointError, match=re.escape(message)) as info:
        Checkpointer(directory).restore(2, _target(), CONFIG)
    assert info.value.step == 2 and isinstance(info.value, CheckpointError)


@pytest.mark.parametrize("legacy", [False, True], ids=["manifest", "no-manifest"])
def test_missing_orbax_metadata_is_damage(tmp_path, legacy):
    directory = _saved(tmp_path)
    if legacy:
        os.remove(os.path.join(directory, "2", MANIFEST))
    os.remove(os.path.join(directory, "2", "state", "_METADATA"))
    ckpt = Checkpointer(directory)
    with pytest.raises(DamagedCheckpointError, match="is damaged: state/_METADATA: missing"):
        ckpt.restore(2, _target(), CONFIG)
    assert ckpt.restore_latest(_target(), CONFIG)[0] == 1
    ckpt.close()


def test_an_empty_step_folder_is_damage_and_skipped(tmp_path):
    directory = _saved(tmp_path)
    os.makedirs(os.path.join(directory, "3"))
    ckpt = Checkpointer(directory)
    assert ckpt.all_steps() == [1, 2, 3]  # orbax lists it
    with pytest.raises(
        DamagedCheckpointError, match="step 3 .* is damaged: the step folder is empty"
    ):
        ckpt.saved_config(3)
    assert ckpt.restore_latest(_target(), CONFIG)[0] == 2
    ckpt.close()


def test_all_steps_damaged_starts_from_scratch(tmp_path, caplog):
    directory = _saved(tmp_path)
    for step in (1, 2):
        os.remove(os.path.join(directory, str(step), "config", "metadata"))
    ckpt = Checkpointer(directory)
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore_latest(_target(), CONFIG) == (None, None)
    lines = _our_warnings(caplog)
    assert len(lines) == 2 and "falling back to step 1" in lines[0]
    assert "no intact checkpoint is left: starting from scratch" in lines[1]
    assert ckpt.all_steps() == [] and ckpt.latest_step() is None
    assert sorted(os.listdir(tmp_path / "run" / "damaged_checkpoints")) == ["1", "2"]
    ckpt.close()


def test_an_unverified_legacy_step_restores_with_a_warning(tmp_path, caplog):
    directory = _saved(tmp_path)
    os.remove(os.path.join(directory, "2", MANIFEST))
    ckpt = Checkpointer(directory)
    with caplog.at_level(logging.WARNING):
        step, state = ckpt.restore_latest(_target(), CONFIG)
    assert step == 2 and int(state["step"]) == 2
    (line,) = _our_warnings(caplog)
    assert f"checkpoint step 2 in {directory} has no manifest" in line and "unverified" in line
    assert ckpt.verify(2) is False and ckpt.verify(1) is True
    ckpt.close()


def test_orbax_read_errors_of_an_unverified_step_become_one_line_damage(tmp_path):
    directory = _saved(tmp_path)
    os.remove(os.path.join(directory, "2", MANIFEST))
    with open(os.path.join(directory, "2", "state", "_METADATA"), "w") as f:
        f.write("{not json")
    ckpt = Checkpointer(directory)
    with pytest.raises(DamagedCheckpointError, match="is damaged: orbax cannot read it") as info:
        ckpt.restore(2, _target(), CONFIG)
    assert "\n" not in str(info.value) and info.value.__cause__ is not None
    assert ckpt.restore_latest(_target(), CONFIG)[0] == 1
    ckpt.close()


def test_restore_variables_of_a_damaged_step_names_the_intact_ones(tmp_path):
    directory = _saved(tmp_path, steps=(4, 8, 12))
    os.truncate(_largest_state_file(os.path.join(directory, "12")), 1)
    before = sorted(os.listdir(directory))
    target = abstract_like({"params": _state(_mesh(1))["params"]})
    ckpt = Checkpointer(directory)
    with pytest.raises(DamagedCheckpointError) as info:
        ckpt.restore_variables(12, target)
    message = str(info.value)
    assert message.startswith(f"checkpoint step 12 in {directory} is damaged: ")
    assert message.endswith("; intact steps: 4, 8; evaluate one with --config.eval.checkpoint=8")
    assert "\n" not in message
    assert sorted(os.listdir(directory)) == before and ckpt.all_steps() == [4, 8, 12]
    assert not os.path.exists(tmp_path / "run" / "damaged_checkpoints")
    np.testing.assert_array_equal(
        ckpt.restore_variables(8, target)["params"]["w"], _state(_mesh(1), seed=8)["params"]["w"]
    )
    ckpt.close()


def test_retention_never_rotates_out_an_intact_step_for_a_damaged_one(tmp_path):
    directory = _saved(tmp_path, steps=(1, 2), max_to_keep=2)
    with open(_largest_state_file(os.path.join(directory, "2")), "r+b") as f:
        f.write(b"\x00\x01\x02")
    ckpt = Checkpointer(directory, max_to_keep=2)
    step, _ = ckpt.restore_latest(_target(), CONFIG)
    assert step == 1 and ckpt.all_steps() == [1]
    ckpt.save(3, _state(_mesh(1), seed=3), CONFIG)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 3]  # step 1 kept: the damaged 2 does not count
    ckpt.save(4, _state(_mesh(1), seed=4), CONFIG)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]  # 1 rotates out normally, as the oldest
    assert ckpt.intact_steps() == [3, 4]
    assert os.path.isdir(tmp_path / "run" / "damaged_checkpoints" / "2")
    ckpt.close()


def test_manifest_problems_name_each_file():
    listed = {
        "a": {"size": 3, "crc32": 1},
        "b": {"size": 2, "crc32": 5},
        "c": {"size": 1, "crc32": 0},
    }
    sizes = {"a": 3, "b": 4, "d": 9}
    assert manifest_problems(listed, sizes, lambda rel: 2) == [
        "a: contents differ from the manifest (same size, other bytes)",
        "b: 4 bytes, manifest says 2",
        "c: missing (1 bytes in the manifest)",
        "d: 9 bytes, not in the manifest",
    ]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_is_one_line_and_earlier_steps_survive(tmp_path, monkeypatch, code):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    directory = _saved(tmp_path, steps=(1, 2), max_to_keep=2)

    async def no_space(self, x, directory):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    ckpt = Checkpointer(directory, max_to_keep=2)
    ckpt.save(3, _state(_mesh(1), seed=3), CONFIG)  # fails in the background
    with pytest.raises(CheckpointWriteError) as info:
        ckpt.wait()
    assert str(info.value) == (
        f"could not write checkpoint step 3 to {directory}: [Errno {code}] {os.strerror(code)}"
    )
    assert isinstance(info.value.__cause__, Exception) and info.value.step == 3
    ckpt.close()
    monkeypatch.undo()
    ckpt = Checkpointer(directory, max_to_keep=2)
    assert ckpt.all_steps() == [1, 2]  # nothing rotated out for the failed step
    step, state = ckpt.restore_latest(_target(), CONFIG)
    assert step == 2 and int(state["step"]) == 2
    assert ckpt.verify(1) is True
    ckpt.close()


def test_a_failed_asynchronous_save_surfaces_at_the_next_save(tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    directory = _saved(tmp_path, steps=(1,))

    async def no_space(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    ckpt = Checkpointer(directory)
    ckpt.save(2, _state(_mesh(1)), CONFIG)
    with pytest.raises(
        CheckpointWriteError, match=r"step 2 .*\[Errno 28\] No space left on device$"
    ):
        ckpt.save(3, _state(_mesh(1)), CONFIG)
    ckpt.close()


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    directory = str(workdir / "checkpoints")
    with pytest.raises(CheckpointWriteError) as info:
        Checkpointer(directory)
    message = str(info.value)
    assert message.startswith(f"could not create checkpoint directory {directory}: [Errno ")
    assert "\n" not in message
    with pytest.raises(CheckpointWriteError, match=r": \[Errno 20\] Not a directory: "):
        Checkpointer(str(workdir))  # the checkpoint directory itself is a file


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; read-only is patched")
def test_a_read_only_workdir_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match=r"Errno 13\] Permission denied"):
            Checkpointer(str(workdir / "checkpoints"))
    finally:
        workdir.chmod(0o755)


def test_a_read_only_filesystem_at_creation_is_one_line(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "mkdir", read_only)
    directory = str(tmp_path / "run" / "checkpoints")
    with pytest.raises(CheckpointWriteError) as info:
        Checkpointer(directory)
    assert str(info.value).startswith(
        f"could not create checkpoint directory {directory}: [Errno 30] Read-only file system"
    )


def test_resuming_with_other_train_steps_is_refused_and_untouched(tmp_path):
    directory = _saved(tmp_path)
    before = {
        os.path.join(root, name): os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    }
    longer = {"model": {"backbone": "resnet50_v1c"}, "train": {"steps": 40000, "log_every": 5}}
    ckpt = Checkpointer(directory)
    with pytest.raises(ValueError, match="train.steps: 10 -> 40000"):
        ckpt.check_config(2, longer)
    ckpt.check_config(2, CONFIG)
    with pytest.raises(ValueError) as info:
        ckpt.restore_latest(_target(), longer)
    message = str(info.value)
    assert "train.steps: 10 -> 40000" in message
    assert message.endswith("restore train.steps=10, or use another --workdir")
    assert not isinstance(info.value, CheckpointError)
    ckpt.close()
    after = {
        os.path.join(root, name): os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    }
    assert after == before
    assert not os.path.exists(tmp_path / "run" / "damaged_checkpoints")
