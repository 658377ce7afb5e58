"""Variables of a model drawn in NumPy: for tests and benchmarks, where the weights' values do
not matter but their shapes do. Jitting `model.init` spends most of its time compiling the
random number generator (23 s for the demo model, against 1.3 s for its forward pass)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np


def random_variables(model: nn.Module, x: Any, seed: int = 0) -> Any:
    """NumPy variables shaped as `model.init(key, x)` gives them: kernels N(0, 1/fan_in),
    BatchNorm scales about 1, running variances in [0.5, 1.5], the rest small."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name.endswith("['var']"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name.endswith("['scale']"):
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return np.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
