"""The experiment configs: one module per paper experiment, built from the blocks of `common`.

    from pne_jax import configs

    configs.names()                                   # ('ade20k_deeplab', ..., 'demo')
    config = configs.get_config("cityscapes_deeplab:80k")   # a shipped config, name[:arg]
    config = configs.get_config("my_configs/run.py:arg")    # or a file of your own

A config is `get_config(arg=None) -> ml_collections.ConfigDict`; the arg after ":" picks a
variant. The command line takes the same specs (`pne-jax train --config=demo`), with
`--config.x=y` overrides.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil

import ml_collections

NOT_EXPERIMENTS = ("common", "validation")


def names() -> tuple[str, ...]:
    """The shipped experiment configs, sorted."""
    found = (m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg)
    return tuple(sorted(n for n in found if n not in NOT_EXPERIMENTS))


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def resolve(spec: str) -> tuple[str, str | None]:
    """`name[:arg]` or `path.py[:arg]` -> (the config file, arg or None).

    Raises ValueError for an unknown name (listing the shipped ones) and FileNotFoundError
    for a path that does not exist.
    """
    target, sep, arg = spec.partition(":")
    if _is_path(target):
        path = os.path.expanduser(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {target} does not exist")
        return os.path.abspath(path), arg if sep else None
    if target not in names():
        raise ValueError(
            f"unknown config {target!r}; shipped configs: {', '.join(names())} "
            "(a path to your own config file, e.g. my_config.py, also works)"
        )
    return os.path.join(os.path.dirname(__file__), f"{target}.py"), arg if sep else None


def get_config(spec: str) -> ml_collections.ConfigDict:
    """The config of a shipped name or a file of your own, `name[:arg]` or `path.py[:arg]`."""
    path, arg = resolve(spec)
    if not _is_path(spec.partition(":")[0]):  # shipped: import it as part of the package
        module = importlib.import_module(f"{__name__}.{os.path.basename(path)[:-3]}")
    else:
        name = f"_pne_jax_user_config_{os.path.splitext(os.path.basename(path))[0]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config(arg=None) function")
    return module.get_config(arg) if arg is not None else module.get_config()
