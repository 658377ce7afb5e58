"""`pne_jax.export`: the exported StableHLO, run in a fresh process by jax alone, and the
SavedModel, run in a fresh process by TensorFlow alone, give `Segmenter.segment`'s labels;
each refuses wrong inputs in one clear error. The tiny model of tests/test_segmenter.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pne_jax import Segmenter, export, export_runtime, preprocess
from pne_jax.segmenter import size_bucket
from tests import compilation_cache
from tests.test_segmenter import _config, _images, variables  # noqa: F401 (a fixture)

SIZES = [(40, 60), (44, 62), (30, 30), (20, 70)]  # the first two share a program
EXPORTED_FOR = [(40, 60), (30, 30), (20, 70)]

# A consumer imports nothing of the other stack: the names below cannot be imported there.
BLOCK = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name + " is not installed for this consumer")
sys.meta_path.insert(0, _Blocked())
"""


@pytest.fixture(scope="module")
def exported(variables, tmp_path_factory):  # noqa: F811
    """(folder, images, the Segmenter's labels of them)."""
    segmenter = Segmenter(_config(), variables)
    out = str(tmp_path_factory.mktemp("export") / "model")
    manifest = export.export(segmenter, out, EXPORTED_FOR, platforms=("cpu", "cuda"))
    images = _images(SIZES, seed=4)
    labels = segmenter.segment(images)
    data = tmp_path_factory.mktemp("data")
    np.savez(data / "images.npz", *images)
    np.savez(data / "labels.npz", *labels)
    assert all(len(np.unique(label)) > 1 for label in labels)  # the comparison can fail
    return out, str(data), manifest


def _consumer(script: str, blocked: set[str], cwd: str) -> dict:
    """Runs `script` in a fresh Python where `blocked` packages cannot be imported; the
    script prints one JSON line last."""
    code = BLOCK.format(blocked=blocked) + textwrap.dedent(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(compilation_cache.ENV)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_manifest_says_what_was_exported(exported):
    out, _, manifest = exported
    with open(os.path.join(out, export_runtime.MANIFEST)) as f:
        assert json.load(f) == manifest
    assert manifest["classes"][:3] == ["sky", "vegetation", "road"]
    assert len(manifest["palette"]) == len(manifest["classes"]) == 10
    assert manifest["input"]["test_size"] == [96, 48] and manifest["input"]["dtype"] == "uint8"
    assert manifest["test_mode"] == {"mode": "whole", "scales": [1.0], "flip": False}
    assert manifest["stablehlo"]["platforms"] == ["cpu", "cuda"]
    assert manifest["config"]["model"]["channels"] == 16
    programs = {(tuple(p["bucket"]), tuple(p["canvas"])) for p in manifest["stablehlo"]["programs"]}
    assert programs == {((48, 64), (48, 96)), ((32, 32), (48, 48)), ((32, 96), (32, 96))}
    for p in manifest["stablehlo"]["programs"]:
        assert os.path.isfile(os.path.join(out, p["file"]))
    assert os.path.isfile(os.path.join(out, "pne_exported.py"))
    assert not os.path.exists(out + ".partial")
    with pytest.raises(FileExistsError, match="not empty"):
        export.export(None, out, EXPORTED_FOR)


def test_stablehlo_in_a_process_with_jax_alone(exported):
    out, data, _ = exported
    blocked = {"pne_jax", "flax", "tensorflow", "optax", "orbax"}
    result = _consumer(
        f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, {out!r})
        import pne_exported

        model = pne_exported.load({out!r})
        images = list(np.load("images.npz").values())
        want = list(np.load("labels.npz").values())
        got = model.segment(images)  # two images share a program: a batch of two
        alone = model.segment(images[2])
        errors = []
        unexported = np.zeros((90, 30, 3), np.uint8)
        for bad in (images[0].astype(np.float32), images[0][..., 0], unexported):
            try:
                model.segment(bad)
            except ValueError as e:
                errors.append(str(e))
        print(json.dumps({{
            "equal": [bool(np.array_equal(g, w)) for g, w in zip(got, want)],
            "alone": bool(np.array_equal(alone, want[2])),
            "dtype": str(got[0].dtype),
            "classes": len(model.classes),
            "errors": errors,
            "imported": sorted({{m.split(".")[0] for m in sys.modules}} & {blocked!r}),
        }}))
        """,
        blocked,
        data,
    )
    assert result["equal"] == [True] * len(SIZES) and result["alone"]
    assert result["dtype"] == "int32" and result["classes"] == 10 and result["imported"] == []
    float_image, grey, unexported = result["errors"]
    assert "expected uint8 [H, W, 3] RGB, got a float32 array of shape (40, 60, 3)" in float_image
    assert "got a uint8 array of shape (40, 60)" in grey
    assert "no exported program for images up to 96x32" in unexported
    assert "--sizes" in unexported and "48x64 (canvas 48x96)" in unexported


def test_saved_model_in_a_process_with_tensorflow_alone(exported):
    out, data, _ = exported
    blocked = {"pne_jax", "jax", "jaxlib", "flax"}
    result = _consumer(
        f"""
        import json, sys
        import numpy as np
        import tensorflow as tf

        loaded = tf.saved_model.load({os.path.join(out, "saved_model")!r})
        serve = loaded.signatures["serving_default"]
        images = list(np.load("images.npz").values())
        want = list(np.load("labels.npz").values())
        got = [serve(image=tf.constant(image))["labels"].numpy() for image in images]
        errors = []
        for bad in (images[0][..., 0], images[0][None], images[0].astype(np.float32),
                    np.zeros((90, 30, 3), np.uint8)):
            try:
                serve(image=tf.constant(bad))
                errors.append("no error")
            except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
                errors.append(str(e))
        print(json.dumps({{
            "equal": [bool(np.array_equal(g, w)) for g, w in zip(got, want)],
            "dtype": str(got[0].dtype),
            "errors": errors,
            "imported": sorted({{m.split(".")[0] for m in sys.modules}} & {blocked!r}),
        }}))
        """,
        blocked,
        data,
    )
    assert result["equal"] == [True] * len(SIZES)
    assert result["dtype"] == "int32" and result["imported"] == []
    grey, batched, float_image, unexported = result["errors"]
    assert "image must be uint8 [H, W, 3] RGB; got shape" in grey
    assert "image must be uint8 [H, W, 3] RGB; got shape" in batched
    assert "expected to be a uint8 tensor but is a float tensor" in float_image
    assert "no exported program for this image size" in unexported and "--sizes" in unexported


def test_the_runtime_rules_are_the_segmenters():
    """pne_exported.py restates the Segmenter's bucket and resize rules without pne-jax."""
    for n in range(1, 5000):
        assert export_runtime.size_bucket(n) == size_bucket(n)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, (3000, 2)):
        for test_size in ((96, 48), (2048, 1024), (1333, 800)):
            want = preprocess.resized_size((int(h), int(w)), test_size)
            assert export_runtime.resized_size((h, w), test_size) == want
    assert export_runtime.LADDER[-1] >= export_runtime.LARGEST_SIDE == preprocess.LARGEST_SIDE


def test_bad_arguments():
    with pytest.raises(ValueError, match="'12y4' is not HEIGHTxWIDTH"):
        export.parse_sizes("12x4,12y4")
    with pytest.raises(ValueError, match="outside 1..16384"):
        export.parse_sizes("0x4")
    assert export.parse_sizes("1024x2048, 512X1024") == [(1024, 2048), (512, 1024)]
    with pytest.raises(ValueError, match="--platforms: gpu; choose one or more of cpu, cuda"):
        export._choices(["cpu", "gpu"], export.PLATFORMS, "platforms")


def test_a_failed_export_leaves_nothing(variables, tmp_path, monkeypatch):  # noqa: F811
    def fail(*args, **kwargs):
        raise RuntimeError("TensorFlow fell over")

    monkeypatch.setattr(export, "_saved_model", fail)
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="fell over"):
        export.export(Segmenter(_config(), variables), str(out), [(30, 30)])
    assert sorted(os.listdir(tmp_path)) == []
