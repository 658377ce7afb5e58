"""Checkpoints of the training state: a thin wrapper around orbax's CheckpointManager.

* Asynchronous saves; each step's directory is committed atomically by orbax, so an
  interrupted save never looks like a complete checkpoint.
* Keeps the last `max_to_keep` checkpoints plus the best one by validation mIoU.
* Saves the experiment config beside the state; resuming with a config that differs in
  a field that changes the state or the trajectory is refused, naming the fields, and
  the existing checkpoints are left untouched.
* Restores into an abstract target carrying the current shardings, so a run can resume
  on a different number of devices.
"""

from __future__ import annotations

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
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
        )
        return restored.state

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
