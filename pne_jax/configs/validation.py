"""Checks an experiment config before anything is built or compiled.

The schema is what `common` builds (the demo config has every block; its defaults are the
only ones): a field it does not have is refused as a typo, and the values that would fail
late or silently (a crop that is not a pair, no steps, a model with other classes than its
dataset) are refused here, each with the field, the value and the fix. `model.*` keys are
checked by `pne_jax.models.build_model`, `optimizer.*` values by `pne_jax.optim`, and
`eval.*` by `pne_jax.evaluate.eval_options`; this module calls the last two's checks early.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# Blocks whose keys are free-form (builder options) or checked by the model builder.
FREE_FORM = ("data.options", "model")


class ConfigError(ValueError):
    """A config field with a value that cannot work; the message names the field and fix."""


def reference() -> ml_collections.ConfigDict:
    """A complete config as `common` builds it: the schema of field names."""
    from pne_jax.configs import demo

    return demo.get_config()


def _is_block(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _is_free(name: str) -> bool:
    return any(name == f or name.startswith(f"{f}.") for f in FREE_FORM)


def missing_field(block: str, key: str, fields: Sequence[str]) -> str:
    """'<block> has no field <key> (did you mean ...?); <block> has a, b, ...': the one
    wording for a field that is not there, from a config file or a --config override."""
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f" (did you mean {block}.{close[0]}?)" if close else ""
    known = f"; {block} has {', '.join(sorted(fields))}" if fields else ""
    return f"{block} has no field {key!r}{hint}{known}"


def unknown_fields(config: Any, schema: Any, prefix: str = "") -> list[str]:
    """The `missing_field` line of every field of `config` that `schema` lacks."""
    found = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if _is_free(name):
            continue
        if key not in schema:
            block = f"config.{prefix[:-1]}" if prefix else "config"
            found.append(missing_field(block, key, schema))
        elif _is_block(value) and _is_block(schema[key]):
            found.extend(unknown_fields(value, schema[key], f"{name}."))
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair_problem(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_int(v) and v > 0 for v in value)
    )
    if ok:
        return None
    return (
        f"config.{name}={value!r}: must be a pair of positive integers (height, width), "
        f"e.g. --config.{name}='(512, 1024)'" + (" or None" if optional else "")
    )


def _int_at_least(name: str, value: Any, minimum: int = 1) -> str | None:
    if _is_int(value) and value >= minimum:
        return None
    return f"config.{name}={value!r}: must be an integer >= {minimum}"


def value_problems(config: ml_collections.ConfigDict) -> list[str]:
    """One line per field value that cannot work (field, value, what is expected)."""
    problems = []
    train, data = config.train, config.data
    steps = train.steps
    if not (_is_int(steps) and steps > 0):
        problems.append(
            f"config.train.steps={steps!r}: must be a positive number of steps "
            "(e.g. --config.train.steps=1000)"
        )
    for field in ("global_batch_size", "grad_accum_steps", "log_every", "eval_every"):
        problems.append(_int_at_least(f"train.{field}", train[field]))
    problems.append(_int_at_least("train.checkpoint_every", train.checkpoint_every))
    problems.append(_int_at_least("train.keep_checkpoints", train.keep_checkpoints))
    micro, batch = train.grad_accum_steps, train.global_batch_size
    if _is_int(micro) and _is_int(batch) and micro > 0 and batch % micro:
        problems.append(
            f"config.train.grad_accum_steps={micro} does not divide "
            f"config.train.global_batch_size={batch}"
        )
    for field in ("crop_size", "base_size", "test_size"):
        problems.append(_pair_problem(f"data.{field}", data[field]))
    for field in ("eval_pad_size", "eval_label_pad_size"):
        problems.append(_pair_problem(f"data.{field}", data[field], optional=True))
    low_high = data.ratio_range
    if not (
        isinstance(low_high, (tuple, list))
        and len(low_high) == 2
        and 0 < low_high[0] <= low_high[1]
    ):
        problems.append(
            f"config.data.ratio_range={low_high!r}: must be (low, high), 0 < low <= high"
        )
    if not (_is_int(data.ignore_index) and 0 <= data.ignore_index <= 255):
        problems.append(f"config.data.ignore_index={data.ignore_index!r}: must be in [0, 255]")
    problems.append(_int_at_least("data.num_workers", data.num_workers, minimum=0))
    problems.append(_storage_problem(data))
    problems.append(_augment_on_problem(data))
    problems.append(_int_at_least("eval.global_batch_size", config.eval.global_batch_size))
    problems.append(_int_at_least("model.num_classes", config.model.num_classes))
    pne = config.pne
    if pne.enabled:
        problems.append(_int_at_least("pne.num_samples", pne.num_samples))
        if not (isinstance(pne.temperature, numbers.Real) and pne.temperature > 0):
            problems.append(f"config.pne.temperature={pne.temperature!r}: must be > 0")
        if not (isinstance(pne.loss_weight, numbers.Real) and math.isfinite(pne.loss_weight)):
            problems.append(f"config.pne.loss_weight={pne.loss_weight!r}: must be a finite number")
        gate = pne.gate
        if not (isinstance(gate, (tuple, list)) and len(gate) == 2 and gate[0] <= gate[1]):
            problems.append(f"config.pne.gate={gate!r}: must be (low, high) with low <= high")
    return [p for p in problems if p]


def _storage_problem(data: ml_collections.ConfigDict) -> str | None:
    from pne_jax import datasets

    if data.storage not in datasets.STORAGE_FORMS:
        return (
            f"config.data.storage={data.storage!r}: must be one of "
            f"{', '.join(datasets.STORAGE_FORMS)}"
        )
    if data.storage != datasets.DEFAULT_STORAGE and not (
        data.name and datasets.is_known_dataset(data.name)
    ):
        return (
            f"config.data.storage={data.storage!r} applies to pne-jax's datasets "
            f"({', '.join(datasets.DATASETS)}); a tfds dataset of your own is read as it is "
            f"prepared: set --config.data.storage={datasets.DEFAULT_STORAGE}"
        )
    return None


def _augment_on_problem(data: ml_collections.ConfigDict) -> str | None:
    from pne_jax import input_pipeline

    try:
        input_pipeline.device_source_size(ml_collections.ConfigDict({"data": data}))
    except ValueError as e:
        return str(e)
    return None


def class_count_problem(config: ml_collections.ConfigDict) -> str | None:
    """model.num_classes against the class count of one of `pne_jax.datasets`."""
    from pne_jax import datasets

    name = config.data.name
    if not name or not datasets.is_known_dataset(name):
        return None  # a tfds dataset of the user's: labels are checked on the device
    classes = datasets.dataset_meta(name).num_classes
    if config.model.num_classes == classes:
        return None
    return (
        f"config.model.num_classes={config.model.num_classes!r} but dataset {name!r} has "
        f"{classes} classes: set --config.model.num_classes={classes}"
    )


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError listing every problem of `config` (unknown fields, bad values, a
    class count that differs from the dataset's, an eval block that cannot run)."""
    problems = unknown_fields(config, reference())
    if not problems:
        problems = value_problems(config)
        problems.append(class_count_problem(config))
        problems = [p for p in problems if p]
    if not problems:
        from pne_jax import evaluate

        try:
            evaluate.eval_options(config.eval)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) > 1 else problems[0])
