"""Checkpoints of the training state: a thin wrapper around orbax's CheckpointManager.

* Asynchronous saves; each step's directory is committed atomically by orbax, so an
  interrupted save never looks like a complete checkpoint.
* Keeps the last `max_to_keep` checkpoints plus the best one by validation mIoU.
* Saves the experiment config beside the state; resuming with a config that differs in
  a field that changes the state or the trajectory is refused, naming the fields, and
  the existing checkpoints are left untouched.
* Restores into an abstract target carrying the current shardings, so a run can resume
  on a different number of devices.
* Before restoring, compares the saved array shapes (orbax metadata, no array is read) with
  the target's: a checkpoint of another model (other classes, other backbone) is refused
  with the parameters that differ, named by path with saved and expected shapes.
* `restore_variables` reads only the model variables of a state, for inference.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

# Config fields that may differ between the run that wrote a checkpoint and the one that
# resumes from it (bookkeeping, paths, evaluation); any other difference is refused.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_every",
    "train.keep_checkpoints",
    "data.data_dir",
    "data.num_workers",
    "eval",
)


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


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str] = RESUMABLE_CHANGES
) -> list[str]:
    """'field: saved -> current' for every field that differs and may not change."""
    a, b = flatten_config(saved), flatten_config(current)
    allowed = tuple(allowed)

    def may_change(name: str) -> bool:
        return any(name == p or name.startswith(f"{p}.") for p in allowed)

    return [
        f"{name}: {a.get(name, '<absent>')!r} -> {b.get(name, '<absent>')!r}"
        for name in sorted(set(a) | set(b))
        if a.get(name) != b.get(name) and not may_change(name)
    ]


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


class _QuietOrbax(logging.Filter):
    """Drops orbax's records below WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
    """Keeps orbax's info lines (one per save and restore) off the absl console handler, so
    that the console shows the progress report; for the CLIs."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_QuietOrbax())


class Checkpointer:
    """Saves and restores `{"state": pytree, "config": dict}` under `directory`."""

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
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "config")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        config: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Starts an (asynchronous) save of `state` at `step`; `metrics` may hold 'miou'."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(dict(config))
            ),
            metrics=dict(metrics) if metrics else None,
            force=True,
        )

    def saved_config(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return dict(restored.config)

    def restore(self, step: int, abstract_state: Any, config: Mapping[str, Any]) -> Any:
        """The state at `step`, laid out as `abstract_state` (shapes, dtypes, shardings).

        Raises ValueError, touching nothing, when `config` differs from the saved one in
        a field outside RESUMABLE_CHANGES.
        """
        differences = config_differences(self.saved_config(step), config)
        if differences:
            raise ValueError(
                f"{self.directory} holds a checkpoint (step {step}) of a different experiment; "
                "refusing to resume or overwrite it. Use another --workdir, or restore the "
                "config. Fields that differ (saved -> current):\n  " + "\n  ".join(differences)
            )
        self.check_shapes(step, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
        )
        return restored.state

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Path -> shape of every array of the state saved at `step` (metadata only)."""
        metadata = ocp.PyTreeCheckpointer().metadata(self._state_path(step))
        return tree_shapes(metadata.item_metadata.tree)

    def _state_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step), "state")

    def check_shapes(self, step: int, abstract: Any) -> None:
        """Raises ValueError naming each array of `abstract` (a state, or the top-level
        subtrees of one) whose shape differs from the saved one or is missing, and each
        saved array under those subtrees that `abstract` lacks."""
        expected = tree_shapes(abstract)
        if isinstance(abstract, Mapping):  # also its empty subtrees (a model without BN)
            roots = set(map(str, abstract))
        elif dataclasses.is_dataclass(abstract):
            roots = {field.name for field in dataclasses.fields(abstract)}
        else:
            roots = {path.split("/")[0] for path in expected}
        saved = {
            path: shape
            for path, shape in self.saved_shapes(step).items()
            if path.split("/")[0] in roots
        }
        lines = shape_mismatches(saved, expected)
        if lines:
            raise _mismatch_error(self.directory, step, lines)

    def restore_variables(self, step: int, abstract_variables: Mapping[str, Any]) -> dict:
        """Only the subtrees of the saved state named by `abstract_variables` (e.g. params and
        batch_stats, for inference), laid out as it says; the optimizer state is not read.

        Raises ValueError naming every array whose path or shape differs (saved vs expected).
        """
        self.check_shapes(step, abstract_variables)
        restored = ocp.PyTreeCheckpointer().restore(
            self._state_path(step),
            args=ocp.args.PyTreeRestore(
                item=dict(abstract_variables),
                restore_args=ocp.checkpoint_utils.construct_restore_args(dict(abstract_variables)),
                partial_restore=True,
            ),
        )
        return dict(restored)

    def read(self, step: int) -> Any:
        """The saved state as stored (no target layout, no config check): for inspection."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return restored.state

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a state pytree, for `Checkpointer.restore`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state,
    )
