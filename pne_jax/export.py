"""Export a `Segmenter` to run without pne-jax: StableHLO for jax alone, and a TF SavedModel.

    pne-jax export --workdir=runs/demo --out=exported --sizes=128x256,96x128
    pne-jax export --config=cityscapes_deeplab --checkpoint=runs/cs/checkpoints/40000 \\
        --out=exported --sizes=1024x2048 --platforms=cpu,cuda

(or `python -m pne_jax.export ...`). What is exported is the Segmenter's own function:
device-side preprocessing (resize to fit `config.data.test_size`, normalise, pad), the
config's test mode, the argmax, for uint8 images. One program per (bucket, canvas) of the
`--sizes` asked for (the Segmenter's size buckets: each program serves every image of its
bucket and aspect, not only that size), for each platform of `--platforms`
(jax.export's multi-platform lowering; a platform needs no device here).

The folder:
- `pne_export.json`: classes, palette, input contract (dtype, layout, test size, the
  programs and their sizes), the test mode, the pne-jax version, the whole config;
- `stablehlo/*.jax` (`jax.export` serialisations with a symbolic batch) and
  `stablehlo/weights.npz` (the weights, once for all programs, as the programs' first
  argument), run by `pne_exported.py` (a copy of `pne_jax.export_runtime`: jax and NumPy);
- `saved_model/` (`--formats` with saved_model): jax2tf with native serialisation, serving
  signature `serving_default`: `image` uint8 [H, W, 3] -> `labels` int32 [H, W] for the
  images of the exported programs (others are refused, naming the exported sizes);
  `tf.saved_model.load` and TF Serving run it with TensorFlow alone.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import pne_jax
from pne_jax import export_runtime
from pne_jax.segmenter import Segmenter

FORMATS = ("stablehlo", "saved_model")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
RUNTIME_NAME = "pne_exported.py"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024x2048,512x1024' -> [(1024, 2048), (512, 1024)] (height x width)."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: {part!r} is not HEIGHTxWIDTH, e.g. 1024x2048") from None
        if not (1 <= h <= export_runtime.LARGEST_SIDE and 1 <= w <= export_runtime.LARGEST_SIDE):
            raise ValueError(f"--sizes: {part!r} is outside 1..{export_runtime.LARGEST_SIDE}")
        sizes.append((h, w))
    if not sizes:
        raise ValueError("--sizes: give at least one image size, e.g. --sizes=1024x2048")
    return sizes


def default_sizes(segmenter: Segmenter) -> list[tuple[int, int]]:
    """The image size the test size names, landscape: (short, long) edge."""
    return [(min(segmenter.test_size), max(segmenter.test_size))]


def export(
    segmenter: Segmenter,
    out: str,
    sizes: Sequence[tuple[int, int]],
    *,
    platforms: Sequence[str] = ("cpu",),
    formats: Sequence[str] = FORMATS,
) -> dict[str, Any]:
    """Writes the folder described in the module docstring to `out` (which must not exist
    or be empty) and returns its manifest. The test mode is the Segmenter's config's."""
    platforms, formats = (
        _choices(platforms, PLATFORMS, "platforms"),
        _choices(formats, FORMATS, "formats"),
    )
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty: export into a new folder")
    options = segmenter.options()
    programs = sorted({segmenter.program_of(tuple(s)) for s in sizes})
    leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, segmenter.variables))

    def flat(bucket, canvas):
        predict = segmenter.function("labels", options, bucket, canvas)
        return lambda weights, images, sizes: predict(
            jax.tree.unflatten(treedef, weights), images, sizes
        )

    staging = f"{out.rstrip(os.sep)}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(os.path.join(staging, "stablehlo"))
        weight_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        (batch,) = jax.export.symbolic_shape("b")
        entries = []
        for bucket, canvas in programs:
            name = f"stablehlo/{bucket[0]}x{bucket[1]}_canvas{canvas[0]}x{canvas[1]}.jax"
            exported = jax.export.export(jax.jit(flat(bucket, canvas)), platforms=platforms)(
                weight_specs,
                jax.ShapeDtypeStruct((batch, *bucket, 3), jnp.uint8),
                jax.ShapeDtypeStruct((batch, 2), jnp.int32),
            )
            with open(os.path.join(staging, name), "wb") as f:
                f.write(exported.serialize())
            entries.append({"bucket": list(bucket), "canvas": list(canvas), "file": name})
            logging.info("exported %s for %s", name, ", ".join(platforms))
        weights = {str(i): x for i, x in enumerate(leaves)}
        np.savez(os.path.join(staging, "stablehlo", "weights.npz"), **weights)
        shutil.copyfile(export_runtime.__file__, os.path.join(staging, RUNTIME_NAME))
        manifest = _manifest(segmenter, options, entries, platforms, sizes)
        if "saved_model" in formats:
            _saved_model(
                os.path.join(staging, "saved_model"), leaves, programs, flat, platforms, segmenter
            )
            manifest["saved_model"] = {
                "path": "saved_model",
                "signature": "serving_default",
                "inputs": {"image": "uint8 [H, W, 3]"},
                "outputs": {"labels": "int32 [H, W]"},
            }
        with open(os.path.join(staging, export_runtime.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    except BaseException:  # nothing half-written is left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(out):
        os.rmdir(out)
    os.replace(staging, out)  # the folder appears whole, or not at all
    return manifest


def _choices(values: Sequence[str], allowed: Sequence[str], name: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(v.strip().lower() for v in values if v.strip()))
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        given = ", ".join(unknown) or "none given"
        raise ValueError(f"--{name}: {given}; choose one or more of {', '.join(allowed)}")
    return values


def _manifest(segmenter, options, entries, platforms, sizes) -> dict[str, Any]:
    classes = segmenter.class_names or [str(i) for i in range(segmenter.num_classes)]
    try:
        palette = segmenter.palette.tolist()
    except ValueError:  # a dataset pne-jax does not know: a fixed random palette
        palette = np.random.default_rng(0).integers(0, 256, (segmenter.num_classes, 3)).tolist()
    return {
        "format_version": export_runtime.FORMAT_VERSION,
        "pne_jax_version": pne_jax.__version__,
        "jax_version": jax.__version__,
        "classes": classes,
        "palette": palette,
        "input": {
            "dtype": "uint8",
            "layout": "[H, W, 3] RGB; batches: [b, *bucket, 3] with each image at the top left",
            "sizes": "int32 [b, 2]: each image's (h, w)",
            "test_size": list(segmenter.test_size),
            "size_buckets": segmenter.size_buckets,
            "exported_for": [list(s) for s in sizes],
        },
        "output": {"dtype": "int32", "layout": "[H, W] class index (batches: [b, *bucket])"},
        "test_mode": {
            "mode": options.mode,
            "scales": list(options.scales),
            "flip": options.flip,
        },
        "stablehlo": {
            "programs": entries,
            "weights": "stablehlo/weights.npz",
            "platforms": list(platforms),
            "runtime": RUNTIME_NAME,
        },
        "config": json.loads(segmenter.config.to_json_best_effort()),
    }


def _saved_model(path, leaves, programs, flat, platforms, segmenter: Segmenter) -> None:
    """A TF SavedModel whose serving signature takes one uint8 image of any size, picks its
    program by the runtime's rules (in TF ops), pads it, runs it, and crops the labels."""
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise ValueError(
            f"the SavedModel needs TensorFlow ({e}): pip install tensorflow, or export "
            "--formats=stablehlo alone"
        ) from e

    module = tf.Module()
    module.weights = [tf.Variable(x, trainable=False) for x in leaves]
    ladder = tf.constant(export_runtime.LADDER, tf.int32)
    test_size, size_buckets = segmenter.test_size, segmenter.size_buckets
    converted = [
        jax2tf.convert(
            flat(bucket, canvas), with_gradient=False, native_serialization_platforms=platforms
        )
        for bucket, canvas in programs
    ]

    def bucket_of(n):
        if not size_buckets:
            return n
        return tf.gather(ladder, tf.searchsorted(ladder, tf.reshape(n, [1])))[0]

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")],
        autograph=False,
    )
    def serve(image):
        shape = tf.shape(image)
        rank = tf.debugging.Assert(
            # the product of the shape catches other ranks (its static rank folds away)
            tf.logical_and(
                tf.equal(shape[-1], 3), tf.equal(tf.reduce_prod(shape), shape[0] * shape[1] * 3)
            ),
            ["image must be uint8 [H, W, 3] RGB; got shape", shape],
        )
        with tf.control_dependencies([rank]):
            h, w = tf.identity(shape[0]), tf.identity(shape[1])
        rh, rw = _tf_resized(h, w, test_size)
        key = tf.stack([bucket_of(h), bucket_of(w), bucket_of(rh), bucket_of(rw)])
        table = tf.constant([[*b, *c] for b, c in programs], tf.int32)
        matches = tf.reduce_all(tf.equal(table, key[None]), axis=1)
        known = ", ".join(f"{b[0]}x{b[1]} (canvas {c[0]}x{c[1]})" for b, c in programs)
        check = tf.debugging.Assert(
            tf.reduce_any(matches),
            [
                f"no exported program for this image size; exported: {known}; export again "
                "with its size in --sizes. Image size:",
                h,
                w,
            ],
        )
        with tf.control_dependencies([check]):
            index = tf.argmax(tf.cast(matches, tf.int32), output_type=tf.int32)

        def branch(i, bucket):
            def run():
                padded = tf.pad(image, [[0, bucket[0] - h], [0, bucket[1] - w], [0, 0]])
                padded = tf.ensure_shape(padded, [*bucket, 3])
                labels = converted[i](module.weights, padded[None], tf.stack([h, w])[None])
                return labels[0, :h, :w]

            return run

        labels = tf.switch_case(index, [branch(i, b) for i, (b, _) in enumerate(programs)])
        return {"labels": labels}

    module.serve = serve
    tf.saved_model.save(module, path, signatures={"serving_default": serve})


def _tf_resized(h, w, test_size):
    """`export_runtime.resized_size` in TF ops (int32)."""
    import tensorflow as tf

    long_edge, short_edge = max(test_size), min(test_size)
    longer, shorter = tf.maximum(h, w), tf.minimum(h, w)
    by_long = long_edge * shorter <= short_edge * longer
    num = tf.where(by_long, long_edge, short_edge)
    den = tf.where(by_long, longer, shorter)
    return tuple(tf.maximum((2 * n * num + den) // (2 * den), 1) for n in (h, w))


def define_flags() -> None:
    """The CLI's flags; defined only by the command (`pne-jax export`), never on import."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "A shipped config name or a file (default: the config saved in --workdir's checkpoint).",
    )
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
    flags.DEFINE_integer("step", None, "The checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Instead of --workdir: a step folder (<workdir>/checkpoints/<step>) or a whole model's "
        "weights file (.npz, .safetensors, an MMSegmentation .pth); needs --config.",
    )
    flags.DEFINE_string("out", None, "The folder to write (must not exist or be empty).")
    flags.DEFINE_string(
        "sizes",
        None,
        "Image sizes to serve, HEIGHTxWIDTH,... (default: the size config.data.test_size "
        "names, landscape). Each adds the program of its size bucket.",
    )
    flags.DEFINE_list("platforms", ["cpu"], f"Platforms to lower for: {', '.join(PLATFORMS)}.")
    flags.DEFINE_list("formats", list(FORMATS), f"Formats to write: {', '.join(FORMATS)}.")
    flags.mark_flags_as_required(["out"])


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from pne_jax import checkpoint, console

    FLAGS = flags.FLAGS
    console.setup(None, FLAGS.verbosity)
    try:
        if FLAGS.checkpoint and FLAGS.workdir:
            raise ValueError("give --workdir or --checkpoint, not both")
        if FLAGS.checkpoint or (FLAGS.workdir and FLAGS.config is not None):
            if FLAGS.config is None:
                raise ValueError("--checkpoint needs --config (the model the weights are for)")
            path = FLAGS.checkpoint or FLAGS.workdir
            if FLAGS.step is not None:
                path = os.path.join(path, "checkpoints", str(FLAGS.step))
            segmenter = Segmenter.from_checkpoint(FLAGS.config, path)
        elif FLAGS.workdir:
            segmenter = Segmenter.from_workdir(FLAGS.workdir, FLAGS.step)
        else:
            raise ValueError("give --workdir (a trained run) or --config and --checkpoint")
        sizes = parse_sizes(FLAGS.sizes) if FLAGS.sizes else default_sizes(segmenter)
        manifest = export(
            segmenter, FLAGS.out, sizes, platforms=FLAGS.platforms, formats=FLAGS.formats
        )
    except (FileNotFoundError, FileExistsError, ValueError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e
    programs = ", ".join(
        f"{p['bucket'][0]}x{p['bucket'][1]}" for p in manifest["stablehlo"]["programs"]
    )
    formats = "StableHLO" + (" and a SavedModel" if "saved_model" in manifest else "")
    print(
        f"exported {formats} for {', '.join(manifest['stablehlo']['platforms'])} to {FLAGS.out} "
        f"(programs for images up to {programs}; {export_runtime.MANIFEST} says what is inside)",
        flush=True,
    )


if __name__ == "__main__":
    import sys

    from pne_jax import cli

    cli.run("export", sys.argv[1:], program="python -m pne_jax.export")
