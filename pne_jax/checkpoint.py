"""Checkpoints of the training state: a thin wrapper around orbax's CheckpointManager.

* Asynchronous saves; each step's directory is committed atomically by orbax, so an
  interrupted save never looks like a complete checkpoint.
* Keeps the last `max_to_keep` checkpoints plus the best one by validation mIoU.
* Every committed step gets a manifest (`<step>/pne_jax_manifest.json`: each file's path,
  size and CRC-32; `checkpoint_manifest`), written as soon as orbax has committed the
  step, in its finalize thread and before it deletes older steps (`_SealingManager`). Every read
  verifies the step first; a changed, truncated, missing or unlisted file, missing orbax
  metadata, an empty step folder, or any error orbax raises while reading it is a
  one-line `DamagedCheckpointError`. A step without a manifest (written before manifests,
  or killed between commit and manifest) is restored unverified, with a warning.
* `restore_latest` resumes from the newest intact step: damaged ones are moved aside to
  `<workdir>/damaged_checkpoints/` (never deleted), out of orbax's view, so that its
  retention can never rotate out an intact step in favour of a damaged one.
* I/O failures while creating the directory, saving, waiting or closing are a one-line
  `CheckpointWriteError` naming the step, the path and the cause (e.g. a full disk); the
  steps committed before stay intact.
* Saves the experiment config beside the state; resuming with a config that differs in
  a field that changes the state or the trajectory (anything outside RESUMABLE_CHANGES,
  e.g. `train.steps`, which sets the learning-rate schedule) is refused, naming the
  fields, both values and the fix, and the existing checkpoints are left untouched.
* Restores into an abstract target carrying the current shardings, so a run can resume
  on a different number of devices.
* Before restoring, compares the saved array shapes (orbax metadata, no array is read) with
  the target's: a checkpoint of another model (other classes, other backbone) is refused
  with the parameters that differ, named by path with saved and expected shapes.
* `restore_variables` reads only the model variables of a state, for inference.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from pne_jax.checkpoint_manifest import (
    MANIFEST,
    is_io_error,
    one_line,
    step_damage,
    write_manifest,
)

T = TypeVar("T")

# Config fields that may differ between the run that wrote a checkpoint and the one that
# resumes from it: bookkeeping (how often to log, evaluate and checkpoint, how many
# checkpoints to keep), where the data lives, how many loader processes build the
# (ordered, so identical) batches, the storage form (`raw` reads back the `encoded` pixels)
# and the device's source size (a region that does not fit is resized on the host to the
# same pixels), and evaluation. None of them changes the state or the sequence of updates;
# any other difference is refused. `train.steps` is not here: it sets the length of the
# poly learning-rate schedule, so it changes every update.
RESUMABLE_CHANGES = (
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.keep_checkpoints",
    "data.data_dir",
    "data.num_workers",
    "data.storage",
    "data.device_source_size",
    "eval",
)

# Fields added to the configs after checkpoints were first written, with the value that
# the code before them behaved as: a saved config without one reads as having that value,
# so a run started by an earlier pne-jax resumes unless the field is set otherwise.
ADDED_FIELDS = {"data.augment_on": "host"}

DAMAGED_DIR = "damaged_checkpoints"


class CheckpointError(Exception):
    """A checkpoint could not be read or written."""


class DamagedCheckpointError(CheckpointError):
    """Checkpoint `step` in `directory` cannot be trusted: `reason` (one line)."""

    def __init__(self, step: int, reason: str, *, directory: str, hint: str = ""):
        self.step, self.reason, self.directory = step, reason, directory
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}{hint}")


class CheckpointWriteError(CheckpointError):
    """Writing under `directory` failed with `cause` (one line), e.g. a full disk; `step`
    is the step being written (None: creating the directory)."""

    def __init__(self, directory: str, cause: str, *, step: int | None = None):
        self.directory, self.cause, self.step = directory, cause, step
        what = "create checkpoint directory" if step is None else f"write checkpoint step {step} to"
        super().__init__(f"could not {what} {directory}: {cause}")


# --------------------------------------------------------------------------------------
# Configs and shapes


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists (as in JSON)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _flat_saved(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """`saved` flattened, with the `ADDED_FIELDS` that it lacks and `current` has."""
    have = flatten_config(current)
    return {k: v for k, v in ADDED_FIELDS.items() if k in have} | flatten_config(saved)


def differing_fields(
    saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str] = RESUMABLE_CHANGES
) -> list[str]:
    """The flattened names of the fields that differ and may not change, sorted (a field
    absent from `saved` reads as its value in `ADDED_FIELDS`)."""
    a, b = _flat_saved(saved, current), flatten_config(current)
    allowed = tuple(allowed)

    def may_change(name: str) -> bool:
        return any(name == p or name.startswith(f"{p}.") for p in allowed)

    return [
        name
        for name in sorted(set(a) | set(b))
        if a.get(name) != b.get(name) and not may_change(name)
    ]


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str] = RESUMABLE_CHANGES
) -> list[str]:
    """'field: saved -> current' for every field that differs and may not change."""
    a, b = _flat_saved(saved, current), flatten_config(current)
    return [
        f"{name}: {a.get(name, '<absent>')!r} -> {b.get(name, '<absent>')!r}"
        for name in differing_fields(saved, current, allowed)
    ]


def _setting(name: str, flat: Mapping[str, Any]) -> str:
    """How to set `name` back to its value in `flat` ('train.steps=40000')."""
    if name not in flat:
        return f"remove {name}"
    value = flat[name]
    if isinstance(value, list):
        value = tuple(value)
    return f"{name}={value if isinstance(value, str) else repr(value)}"


def refusal_message(
    directory: str, step: int, saved: Mapping[str, Any], current: Mapping[str, Any]
) -> str | None:
    """Why resuming checkpoint `step` of `directory` (saved config `saved`) with `current`
    is refused (each field with both values, and the fix), or None when it is allowed."""
    names = differing_fields(saved, current)
    if not names:
        return None
    differences = config_differences(saved, current)
    flat = _flat_saved(saved, current)
    fix = ", ".join(_setting(name, flat) for name in names)
    if len(differences) == 1:
        return (
            f"{directory} holds a checkpoint (step {step}) of a different experiment "
            f"({differences[0]}, saved -> current); refusing to resume or overwrite it: "
            f"restore {fix}, or use another --workdir"
        )
    return (
        f"{directory} holds a checkpoint (step {step}) of a different experiment; refusing "
        f"to resume or overwrite it: restore {fix}, or use another --workdir. Fields that "
        "differ (saved -> current):\n  " + "\n  ".join(differences)
    )


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/head/kernel': shape} for every array leaf of `tree` (arrays, ShapeDtypeStructs
    or orbax ArrayMetadata); dataclass fields, dict keys and sequence indices alike become
    path parts, so a saved tree and its restore target compare by path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def shape_mismatches(
    saved: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """One line per path whose shape differs or that only one side has (sorted)."""
    lines = []
    for path in sorted(set(saved) | set(expected)):
        if path not in saved:
            lines.append(f"{path}: not in the checkpoint (expected {expected[path]})")
        elif path not in expected:
            lines.append(f"{path}: saved {saved[path]}, not in this model")
        elif tuple(saved[path]) != tuple(expected[path]):
            lines.append(f"{path}: saved {saved[path]} vs expected {expected[path]}")
    return lines


def _mismatch_error(directory: str, step: int, lines: list[str], limit: int = 25) -> ValueError:
    shown = lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
    return ValueError(
        f"checkpoint step {step} in {directory} does not match the model of this config "
        f"({len(lines)} arrays differ; is it from another experiment, with other classes or "
        "another backbone?):\n  " + "\n  ".join(shown)
    )


class _SealingManager(ocp.CheckpointManager):
    """orbax's CheckpointManager, writing each step's manifest as soon as orbax has
    committed it: in its finalize step (its finalize thread when saving asynchronously),
    after the step directory is renamed into place and before old steps are deleted.

    orbax 0.12.8's public `post_finalization_callback` runs before that rename (and before
    `commit_success.txt` and the commit time are written) and is not told the step, so the
    hook is `_finalize_checkpoint`; `Checkpointer` also seals at its next save, `wait` and
    `close`, should a future orbax no longer call it."""

    def _finalize_checkpoint(self, step: int) -> None:
        super()._finalize_checkpoint(step)
        seal_step(os.path.join(os.fspath(self.directory), str(step)))


def seal_step(step_dir: str) -> None:
    """Writes the manifest of committed `step_dir` unless it has one (the first process
    only: one writer on shared storage)."""
    if (
        jax.process_index() == 0
        and os.path.isdir(step_dir)
        and not os.path.exists(os.path.join(step_dir, MANIFEST))
    ):
        write_manifest(step_dir)


class Checkpointer:
    """Saves and restores `{"state": pytree, "config": dict}` under `directory`, verifying
    every step it reads against the manifest written when the step was committed."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, asynchronous: bool = True):
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=max_to_keep),
                policies.BestN(
                    get_metric_fn=lambda m: m["miou"], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        self.directory = os.path.abspath(directory)
        self._asynchronous = asynchronous
        self._unsealed: list[int] = []  # saved by this object, no manifest yet
        self._checked: dict[int, bool] = {}  # step -> has a manifest (verified this session)
        self._unreadable: dict[int, str] = {}  # step -> why orbax could not read it
        try:
            if os.path.exists(self.directory) and not os.path.isdir(self.directory):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", self.directory)
            self._manager = _SealingManager(
                self.directory, options=options, item_names=("state", "config")
            )
        except Exception as e:
            if is_io_error(e):
                raise CheckpointWriteError(self.directory, one_line(e)) from e
            raise

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # ----------------------------------------------------------------------------------
    # Writing

    def save(
        self,
        step: int,
        state: Any,
        config: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Starts an (asynchronous) save of `state` at `step`; `metrics` may hold 'miou'.

        Raises CheckpointWriteError (one line: step, path, cause) when this save or the
        previous asynchronous one fails to write; the steps committed before stay intact.
        """
        self._finish()  # the previous save: its errors and its manifest
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(dict(config))
                ),
                metrics=dict(metrics) if metrics else None,
                force=True,
            )
        except Exception as e:
            if is_io_error(e):
                raise CheckpointWriteError(self.directory, one_line(e), step=step) from e
            raise
        self._checked.pop(step, None)
        self._unreadable.pop(step, None)
        self._unsealed.append(step)
        if not self._asynchronous:
            self._finish()

    def _finish(self) -> None:
        """Waits for the pending save, then makes sure the steps this object saved that
        orbax has committed (and not already rotated out) have their manifest."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # the background save of the last step failed
            step = self._unsealed[-1] if self._unsealed else self.latest_step()
            self._unsealed = []
            raise CheckpointWriteError(self.directory, one_line(e), step=step or 0) from e
        committed = set(self._manager.all_steps())
        while self._unsealed:
            step = self._unsealed[0]
            if step in committed:
                try:
                    seal_step(self.step_dir(step))
                except OSError as e:
                    raise CheckpointWriteError(self.directory, one_line(e), step=step) from e
            self._unsealed.pop(0)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed and have manifests;
        raises CheckpointWriteError when one failed."""
        self._finish()

    def close(self) -> None:
        """`wait`, then releases orbax's threads (also when the wait failed)."""
        try:
            self._finish()
        finally:
            self._manager.close()

    # ----------------------------------------------------------------------------------
    # Verifying

    def verify(self, step: int) -> bool:
        """Checks the files of `step` against its manifest: True when they match, False
        (with a warning) when it has none but holds orbax's metadata (unverified); raises
        DamagedCheckpointError (one line: step, path, reason) otherwise."""
        return self._verify(step, read_only=False)

    def _verify(self, step: int, read_only: bool) -> bool:
        if step in self._unsealed:
            self._finish()
        if step in self._unreadable:
            raise self._damaged(step, self._unreadable[step], read_only)
        if step in self._checked:
            return self._checked[step]
        reason, has_manifest = step_damage(self.step_dir(step))
        if reason is not None:
            raise self._damaged(step, reason, read_only)
        if not has_manifest:
            logging.warning(
                "checkpoint step %d in %s has no manifest (saved before pne-jax verified "
                "checkpoints, or the run was killed right after saving it): using it unverified",
                step,
                self.directory,
            )
        self._checked[step] = has_manifest
        return has_manifest

    def intact_steps(self, exclude: Iterable[int] = ()) -> list[int]:
        """The saved steps (but `exclude`) that verify or are unverified, sorted."""
        intact = []
        for step in sorted(set(self.all_steps()) - set(exclude)):
            try:
                self._verify(step, read_only=False)
            except DamagedCheckpointError:
                continue  # not intact: that is the answer for this step
            intact.append(step)
        return intact

    def _damaged(self, step: int, reason: str, read_only: bool) -> DamagedCheckpointError:
        hint = ""
        if read_only:
            intact = self.intact_steps(exclude=[step])
            hint = (
                f"; intact steps: {', '.join(map(str, intact))}; evaluate one with "
                f"--config.eval.checkpoint={intact[-1]}"
                if intact
                else "; no other saved step is intact"
            )
        return DamagedCheckpointError(step, reason, directory=self.directory, hint=hint)

    def _read(self, step: int, read: Callable[[], T], read_only: bool) -> T:
        """`read()` of verified (or unverified) `step`; any error orbax raises while
        reading becomes a DamagedCheckpointError with its cause in one line."""
        self._verify(step, read_only)
        try:
            return read()
        except Exception as e:
            self._unreadable[step] = f"orbax cannot read it ({one_line(e)})"
            raise self._damaged(step, self._unreadable[step], read_only) from e

    # ----------------------------------------------------------------------------------
    # Reading

    def saved_config(self, step: int) -> dict:
        """The config saved with `step`; raises DamagedCheckpointError (naming the intact
        steps) when the step is damaged."""
        return self._saved_config(step, read_only=True)

    def _saved_config(self, step: int, read_only: bool) -> dict:
        restored = self._read(
            step,
            lambda: self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            ),
            read_only,
        )
        return dict(restored.config)

    def check_config(self, step: int, config: Mapping[str, Any]) -> None:
        """Raises ValueError, touching nothing, when `config` differs from the one saved
        with `step` in a field outside RESUMABLE_CHANGES (naming each field, both values
        and the fix); DamagedCheckpointError when the step is damaged."""
        message = refusal_message(
            self.directory, step, self._saved_config(step, read_only=False), config
        )
        if message:
            raise ValueError(message)

    def restore(self, step: int, abstract_state: Any, config: Mapping[str, Any]) -> Any:
        """The state at `step`, laid out as `abstract_state` (shapes, dtypes, shardings).

        Raises ValueError, touching nothing, when `config` differs from the saved one in
        a field outside RESUMABLE_CHANGES (naming the field, both values and the fix), or
        the shapes differ; DamagedCheckpointError when the step is damaged.
        """
        self.check_config(step, config)
        self._check_shapes(step, abstract_state, read_only=False)
        restored = self._read(
            step,
            lambda: self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
            ),
            read_only=False,
        )
        return restored.state

    def restore_latest(
        self, abstract_state: Any, config: Mapping[str, Any]
    ) -> tuple[int | None, Any]:
        """(step, state) of the newest intact step, laid out as `abstract_state`, or
        (None, None) when there is none (start from scratch).

        Each damaged step on the way is reported in one warning and moved aside to
        `<directory>/../damaged_checkpoints/` (kept, but out of orbax's view, so that it is
        never counted among the checkpoints to keep). A ValueError (another config or
        model) propagates at once: that is another experiment, not damage.
        """
        self._finish()
        steps = sorted(self.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                return step, self.restore(step, abstract_state, config)
            except DamagedCheckpointError as e:
                moved = self._move_aside(step)
                older = steps[i + 1] if i + 1 < len(steps) else None
                logging.warning(
                    "%s; moved it to %s; %s",
                    e,
                    moved,
                    f"falling back to step {older}"
                    if older is not None
                    else "no intact checkpoint is left: starting from scratch",
                )
        return None, None

    def _move_aside(self, step: int) -> str:
        """Moves step `step` to `<directory>/../damaged_checkpoints/<step>[-n]` and makes
        orbax forget it; returns the new path."""
        parent = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        target, n = os.path.join(parent, str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(parent, f"{step}-{n}"), n + 1
        try:
            os.makedirs(parent, exist_ok=True)
            os.rename(self.step_dir(step), target)
        except OSError as e:
            raise CheckpointWriteError(
                self.directory,
                f"moving the damaged step aside to {target}: {one_line(e)}",
                step=step,
            ) from e
        self._checked.pop(step, None)
        self._unreadable.pop(step, None)
        self._manager.reload()
        return target

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Path -> shape of every array of the state saved at `step` (metadata only)."""
        return self._saved_shapes(step, read_only=True)

    def _saved_shapes(self, step: int, read_only: bool) -> dict[str, tuple[int, ...]]:
        return self._read(
            step,
            lambda: tree_shapes(
                ocp.PyTreeCheckpointer().metadata(self._state_path(step)).item_metadata.tree
            ),
            read_only,
        )

    def _state_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step), "state")

    def check_shapes(self, step: int, abstract: Any) -> None:
        """Raises ValueError naming each array of `abstract` (a state, or the top-level
        subtrees of one) whose shape differs from the saved one or is missing, and each
        saved array under those subtrees that `abstract` lacks."""
        self._check_shapes(step, abstract, read_only=True)

    def _check_shapes(self, step: int, abstract: Any, read_only: bool) -> None:
        expected = tree_shapes(abstract)
        if isinstance(abstract, Mapping):  # also its empty subtrees (a model without BN)
            roots = set(map(str, abstract))
        elif dataclasses.is_dataclass(abstract):
            roots = {field.name for field in dataclasses.fields(abstract)}
        else:
            roots = {path.split("/")[0] for path in expected}
        saved = {
            path: shape
            for path, shape in self._saved_shapes(step, read_only).items()
            if path.split("/")[0] in roots
        }
        lines = shape_mismatches(saved, expected)
        if lines:
            raise _mismatch_error(self.directory, step, lines)

    def restore_variables(self, step: int, abstract_variables: Mapping[str, Any]) -> dict:
        """Only the subtrees of the saved state named by `abstract_variables` (e.g. params and
        batch_stats, for inference), laid out as it says; the optimizer state is not read.
        Moves nothing.

        Raises ValueError naming every array whose path or shape differs (saved vs expected),
        and DamagedCheckpointError naming the intact steps when `step` is damaged.
        """
        self._check_shapes(step, abstract_variables, read_only=True)
        target = dict(abstract_variables)
        restored = self._read(
            step,
            lambda: ocp.PyTreeCheckpointer().restore(
                self._state_path(step),
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            ),
            read_only=True,
        )
        return dict(restored)

    def read(self, step: int) -> Any:
        """The saved state as stored (no target layout, no config check): for inspection.
        Raises DamagedCheckpointError naming the intact steps when `step` is damaged."""
        restored = self._read(
            step,
            lambda: self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            ),
            read_only=True,
        )
        return restored.state


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a state pytree, for `Checkpointer.restore`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )
