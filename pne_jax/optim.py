"""Optimizers and learning-rate schedules of the paper's configs, as optax transformations.

They reproduce MMSegmentation/MMCV's semantics:

* poly decay: `lr(t) = (base - min) * (1 - t / T) ** power + min` at 0-based step t
  (MMCV 0.x's, which the paper's MMSegmentation 0.13 used; 1.x's mmengine PolyLR with
  `end=T` decays over T - 1 steps: tests/test_mmseg_parity.py);
* linear warm-up over the first `warmup_steps`: the poly rate times a factor rising
  linearly from `warmup_ratio` to 1 (MMCV's `warmup='linear'`);
* SGD with L2 weight decay added to the gradient before momentum (PyTorch's SGD);
* AdamW with decoupled weight decay, skipped for parameters whose path contains one of
  `no_weight_decay` (MMSegmentation's `paramwise_cfg.custom_keys` with `decay_mult=0`,
  matched as substrings, e.g. "norm", "relative_position_bias_table").

`config.optimizer` fields: `name` ('sgd' | 'adamw'), `learning_rate`, `momentum` (sgd),
`b1`, `b2`, `eps` (adamw), `weight_decay`, `no_weight_decay` (substrings), `schedule`
('poly' | 'constant'), `power`, `min_learning_rate`, `warmup_steps`, `warmup_ratio`,
`grad_clip_norm` (0 or None: off). The total step count is `config.train.steps`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the 0-based step."""
    opt = config.optimizer
    base = float(opt.learning_rate)
    if opt.schedule == "poly":
        low, power = float(opt.min_learning_rate), float(opt.power)

        def regular(step):
            progress = jnp.minimum(step, total_steps) / max(total_steps, 1)
            return (base - low) * (1.0 - progress) ** power + low

    elif opt.schedule == "constant":

        def regular(step):
            return jnp.full((), base, jnp.float32)

    else:
        raise ValueError(f"optimizer.schedule must be 'poly' or 'constant', got {opt.schedule!r}")
    warmup = int(opt.get("warmup_steps", 0) or 0)
    if warmup <= 0:
        return regular
    ratio = float(opt.warmup_ratio)

    def with_warmup(step):
        # MMCV: regular * (1 - (1 - t / w) * (1 - ratio)), written without cancellation.
        return regular(step) * (ratio + (1.0 - ratio) * jnp.minimum(step, warmup) / warmup)

    return with_warmup


def weight_decay_mask(params, no_weight_decay: Sequence[str]):
    """True for the parameters that get weight decay (path has none of the substrings)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    mask = {path: not any(key in path for key in no_weight_decay) for path in flat}
    return traverse_util.unflatten_dict(mask, sep="/")


def build_optimizer(
    config: ml_collections.ConfigDict, params
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for `params` (used only for the weight-decay mask)."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config, int(config.train.steps))
    mask = weight_decay_mask(params, tuple(opt.get("no_weight_decay", ()) or ()))
    clip = float(opt.get("grad_clip_norm", 0) or 0)
    chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    if opt.name == "sgd":
        if opt.weight_decay:
            chain.append(optax.add_decayed_weights(float(opt.weight_decay), mask))
        chain.append(optax.sgd(schedule, momentum=float(opt.momentum) or None))
    elif opt.name == "adamw":
        chain.append(
            optax.adamw(
                schedule,
                b1=float(opt.b1),
                b2=float(opt.b2),
                eps=float(opt.eps),
                weight_decay=float(opt.weight_decay),
                mask=mask,
            )
        )
    else:
        raise ValueError(f"optimizer.name must be 'sgd' or 'adamw', got {opt.name!r}")
    return optax.chain(*chain), schedule
