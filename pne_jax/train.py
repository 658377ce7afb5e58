"""Training: the pure, sharded train step and the loop around it (`train_and_evaluate`).

The step is one `jax.jit` program over a 1-D mesh of every device of every host: the batch
is sharded along "data", the state replicated, its buffers donated. BatchNorm statistics and
the PNE reduction are therefore global over the batch (the reference's SyncBN and loss).
Loss = cross-entropy of the logits upsampled to the crop + `aux_weight` x the auxiliary
head's + PNE on the feature-resolution logits, with labels resized by PyTorch's nearest rule
(`resize_labels_nearest`), exactly as the reference feeds it.

The loop keeps side effects at the edge: input, logging, evaluation, checkpoints, signals.
A non-finite loss, and labels outside [0, num_classes) that are not `ignore_index`, are
recorded inside the step (first step and which part) and checked at every log and before
every checkpoint, so training stops with an error naming them before a checkpoint of that
state is written, without a host sync per step.

Every run ends with its last step saved: at the end, and on SIGTERM or a first Ctrl-C
(SIGINT), which stop at the next step boundary (a second Ctrl-C stops at once, without
saving). `metrics.jsonl` holds one record per step (and per evaluation): resuming drops
the records of steps after the checkpoint it resumes from, which are trained again.

Gradient accumulation (`train.grad_accum_steps` = k) runs the k micro-batches one after
another: BatchNorm's batch statistics and PNE's pairs then come from each micro-batch on
its own (as MMSegmentation's `GradientCumulativeOptimizerHook`), so k micro-batches of b
images are not the same as one batch of k*b; the averaged gradient and the cross-entropy
are.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pne_jax import (
    checkpoint,
    console,
    datasets,
    device_augment,
    evaluate,
    input_pipeline,
    optim,
    pretrained,
    run_lock,
)
from pne_jax.configs import validation
from pne_jax.losses import pne
from pne_jax.losses.cross_entropy import (
    cross_entropy,
    upsample_factor,
    upsampled_cross_entropy,
)
from pne_jax.models import build_model
from pne_jax.models.layers import resize

LOSS_PARTS = ("ce", "aux", "pne")
# Bits of TrainState.bad_parts: a non-finite loss part, or labels outside the classes.
HEALTH_FLAGS = (*LOSS_PARTS, "labels")


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 [], steps done
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data: dropout / drop-path randomness, folded with the step
    bad_step: jax.Array  # int32 [], first step with a HEALTH_FLAGS problem, -1 if none
    bad_parts: jax.Array  # int32 [], bit i set: HEALTH_FLAGS[i] went wrong at bad_step


def make_mesh(devices=None) -> Mesh:
    """A 1-D "data" mesh over all devices (of all hosts), Auto axes."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    if global_batch_size % mesh.size:
        raise ValueError(
            f"config.train.global_batch_size={global_batch_size} is not divisible by the "
            f"{mesh.size} devices; use a multiple of {mesh.size}"
        )


def pne_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of `pne_batch_stats` from `config.pne`."""
    cfg = config.pne
    return dict(
        num_samples=cfg.num_samples,
        temperature=cfg.temperature,
        gate=tuple(cfg.gate),
        positive_weighting=cfg.positive_weighting,
        ignore_index=config.data.ignore_index,
        max_pairs_per_image=cfg.max_pairs_per_image,
    )


def losses(
    outputs: dict[str, jax.Array], labels: jax.Array, config: ml_collections.ConfigDict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts (plus PNE pair counts) for one batch of model outputs."""
    size = labels.shape[1:3]
    average = config.loss.average_over_valid
    ignore = config.data.ignore_index
    logits = outputs["logits"]

    fused = config.loss.get("fused_upsampling", False)

    def upsampled_ce(x: jax.Array) -> jax.Array:
        # With `loss.fused_upsampling`, upsampling + CE fused when the crop is an integer
        # multiple of the map (always, for the paper's models): the same value within float32
        # rounding, no full-resolution logits (the CE part 1.35x faster on CPU).
        if fused and upsample_factor(x.shape, labels.shape) is not None:
            return upsampled_cross_entropy(
                x, labels, ignore_index=ignore, average_over_valid=average
            )
        return cross_entropy(
            resize(x, size), labels, ignore_index=ignore, average_over_valid=average
        )

    # Named scopes label the ops of each part in profiles (benchmarks/profile_step.py).
    with jax.named_scope("loss_ce"):
        parts = {"ce": upsampled_ce(logits)}
    zero = jnp.zeros((), jnp.float32)
    parts["aux"] = zero
    if outputs.get("aux_logits") is not None:
        with jax.named_scope("loss_aux"):
            parts["aux"] = upsampled_ce(outputs["aux_logits"])
    parts["pne"] = zero
    counts = {"pne_pairs": zero, "pne_anchors": zero, "pne_dropped_pairs": zero}
    if config.pne.enabled:
        with jax.named_scope("loss_pne"):
            small = pne.resize_labels_nearest(labels, logits.shape[1:3])
            stats = pne.pne_batch_stats(logits, small, outputs["embeddings"], **pne_options(config))
            parts["pne"] = pne.pne_reduce(stats, loss_weight=config.pne.loss_weight)
            counts = {
                "pne_pairs": jnp.sum(stats.num_pairs).astype(jnp.float32),
                "pne_anchors": jnp.sum(stats.num_anchors).astype(jnp.float32),
                "pne_dropped_pairs": jnp.sum(stats.dropped_pairs).astype(jnp.float32),
            }
    total = parts["ce"] + config.loss.aux_weight * parts["aux"] + parts["pne"]
    return total, parts | counts


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step (state, batch) -> (state, metrics); `grad_accum_steps` micro-batches
    are processed in sequence (BatchNorm and PNE then see each micro-batch alone). With
    `config.data.augment_on="device"` the batch is `input_pipeline.train_dataset`'s draws
    and source regions, augmented first (`device_augment.augment_batch`)."""
    micro = int(config.train.grad_accum_steps)
    on_device = input_pipeline.device_source_size(config) is not None
    aug = input_pipeline.train_augment(config) if on_device else None

    def grads_of(params, batch_stats, images, labels, rng):
        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            total, parts = losses(outputs, labels, config)
            return total, (parts, updates["batch_stats"])

        (total, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, new_stats, parts | {"loss": total}

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        extra = {}
        if on_device:  # the host sent draws and source regions: augment them here
            extra["augment_fallback"] = jnp.mean(batch["fallback"].astype(jnp.float32))
            with jax.named_scope("augment"):
                batch = device_augment.augment_batch(batch, aug)
        images, labels = batch["image"], batch["label"]
        if micro == 1:
            grads, batch_stats, parts = grads_of(
                state.params, state.batch_stats, images, labels, rng
            )
        else:
            split = lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:])  # noqa: E731

            def body(carry, xs):
                grads, stats = carry
                i, im, lb = xs
                g, stats, parts = grads_of(state.params, stats, im, lb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, grads, g), stats), parts

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, batch_stats), parts = jax.lax.scan(
                body, (zeros, state.batch_stats), (jnp.arange(micro), split(images), split(labels))
            )
            grads = jax.tree.map(lambda g: g / micro, grads)
            parts = jax.tree.map(jnp.mean, parts)
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        valid = labels != config.data.ignore_index
        outside = jnp.any(valid & ((labels < 0) | (labels >= config.model.num_classes)))
        ok = jnp.stack([*(jnp.isfinite(parts[k]) for k in LOSS_PARTS), ~outside])
        bits = jnp.sum(jnp.where(ok, 0, 2 ** jnp.arange(len(HEALTH_FLAGS))))
        first_bad = (state.bad_step < 0) & (bits > 0)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            bad_step=jnp.where(first_bad, state.step, state.bad_step),
            bad_parts=jnp.where(first_bad, bits, state.bad_parts),
        )
        metrics = (
            parts
            | extra
            | {
                "learning_rate": schedule(state.step),
                "grad_norm": optax.tree.norm(grads),
            }
        )
        return new_state, metrics

    return step


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> TrainState:
    """The initial, replicated state: the backbone from `config.model.pretrained` or the
    whole model from `config.model.init_from`, if set (`pretrained` explains both)."""
    crop = tuple(config.data.crop_size)
    image = jnp.zeros((1, *crop, 3), jnp.float32)
    replicated = NamedSharding(mesh, P())
    key = jax.random.key(config.seed)

    def init(key):
        init_key, state_key = jax.random.split(key)
        variables = model.init(init_key, image, train=False)
        return variables, jax.random.key_data(state_key)

    variables, rng = jax.jit(init, out_shardings=replicated)(key)
    variables = jax.device_put(initial_weights(variables, config.model), replicated)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    minus_one = jax.device_put(jnp.int32(-1), replicated)
    return TrainState(
        step=jax.device_put(jnp.int32(0), replicated),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=rng,
        bad_step=minus_one,
        bad_parts=jax.device_put(jnp.int32(0), replicated),
    )


def _weight_files(model_config: ml_collections.ConfigDict) -> tuple[str | None, str | None]:
    """(model.pretrained, model.init_from); ValueError if both are set."""
    backbone_file, model_file = model_config.get("pretrained"), model_config.get("init_from")
    if backbone_file and model_file:
        raise ValueError(
            "set one of model.pretrained (a backbone) and model.init_from (a whole model, "
            "backbone included), not both"
        )
    return backbone_file, model_file


def initial_weights(variables: dict, model_config: ml_collections.ConfigDict) -> dict:
    """`variables` (a fresh init) with `model_config.pretrained` (an ImageNet backbone) or
    `model_config.init_from` (a whole model) loaded: a converted .npz or a checkpoint."""
    backbone_file, model_file = _weight_files(model_config)
    if backbone_file:
        converted = pretrained.backbone_variables(backbone_file, model_config.backbone)
        return pretrained.load_backbone(variables, converted)
    if model_file:
        return pretrained.merge_variables(
            variables, pretrained.model_variables(model_file, model_config)
        )
    return variables


def check_health(state: TrainState, num_classes: int, ignore_index: int = 255) -> None:
    """Raises, naming the first bad step, if a batch had labels outside [0, num_classes)
    that are not `ignore_index` (ValueError) or a loss part was not finite
    (FloatingPointError, naming the parts)."""
    bad_step, bad_parts = (int(x) for x in jax.device_get((state.bad_step, state.bad_parts)))
    if bad_step < 0:
        return
    if bad_parts & (1 << HEALTH_FLAGS.index("labels")):
        raise ValueError(
            f"the batch of step {bad_step + 1} has labels outside [0, {num_classes}) that are "
            f"not ignore_index={ignore_index}: does config.model.num_classes={num_classes} "
            "match the dataset's classes? Stopping before any checkpoint of it is written"
        )
    parts = [name for i, name in enumerate(LOSS_PARTS) if bad_parts & (1 << i)]
    raise FloatingPointError(
        f"non-finite loss at step {bad_step + 1} in {', '.join(parts)}; stopping before "
        "any checkpoint of it is written (lower optimizer.learning_rate, or look for NaN in "
        "the inputs)"
    )


class _Preemption:
    """SIGTERM or a first SIGINT (Ctrl-C) -> stop at the next step boundary, saving it (single
    host; pods use JAX's preemption sync point); a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if jax.process_count() == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        if signum == signal.SIGINT:  # the next Ctrl-C stops at once
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.SIG_DFL))
            logging.warning("interrupted: saving at the end of this step (Ctrl-C again: stop now)")

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Sets the default `data_dir` (`datasets.DEFAULT_DATA_DIR`), prepares the synthetic set if
    needed (no download), and fails early, naming the command, for an unprepared dataset
    (`datasets.NotPreparedError`)."""
    if not config.data.data_dir:
        config.data.data_dir = os.path.expanduser(datasets.DEFAULT_DATA_DIR)
    if not datasets.is_known_dataset(config.data.name):
        import tensorflow_datasets as tfds

        builder = config.data.name.split("/")[0].split(":")[0]  # name[/config][:version]
        if builder not in tfds.list_builders(with_community_datasets=False):
            raise ValueError(
                f"unknown dataset config.data.name={config.data.name!r}; pne-jax's datasets: "
                f"{', '.join(datasets.DATASETS)}, or the name of a tfds dataset registered in "
                "this process (import its builder in your config file)"
            )
        return  # a prepared tfds dataset of the user's
    options = {**config.data.options, "storage": config.data.storage}
    if datasets.dataset_name(config.data.name) == "synthetic":
        if jax.process_index() == 0:
            _prepare_quietly(config.data.name, config.data.data_dir, options)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("prepare_data")
    datasets.load_builder(config.data.name, config.data.data_dir, **options)


def _prepare_quietly(name: str, data_dir: str, options: dict) -> None:
    """`datasets.prepare`, with tfds's progress bars and prints sent to the log file."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        datasets.prepare(name, data_dir, **options)
    lines = out.getvalue().strip().splitlines()
    for line in lines[:-1]:
        logging.info("%s", line, extra={"file_only": True})
    if lines:
        done = "nothing to do" in lines[-1]
        logging.info("%s", lines[-1], extra={"file_only": done})


def _config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _log_line(step: int, total: int, scalars: dict[str, float], rate: float, eta: float) -> str:
    parts = " ".join(
        f"{k}={scalars[k]:.4g}"
        for k in (
            "loss",
            *LOSS_PARTS,
            "pne_pairs",
            "pne_anchors",
            "pne_dropped_pairs",
            "learning_rate",
        )
        if k in scalars
    )
    return f"step {step}/{total} {parts} {rate:.1f} img/s eta {eta / 60:.1f} min"


def eval_summary(step: int, results: dict[str, Any]) -> str:
    """The short table of an evaluation: mIoU, mAcc and aAcc in percent."""
    values = "".join(f"{100 * float(results[k]):7.2f}" for k in ("miou", "macc", "aacc"))
    return f"eval  step    mIoU   mAcc   aAcc\n      {step:>4d} {values}"


def class_table(names: list[str], results: dict[str, Any]) -> str:
    """Per-class IoU and accuracy in percent, one row per class."""
    rows = "\n".join(
        f"{name:>24} {100 * iou:6.2f} {100 * acc:6.2f}"
        for name, iou, acc in zip(names, results["iou"], results["acc"], strict=True)
    )
    return f"{'class':>24} {'IoU':>6} {'Acc':>6}\n{rows}"


class WorkdirError(OSError):
    """The workdir cannot be created or written; the message names the path and the cause."""


def _workdir_error(workdir: str, error: OSError) -> WorkdirError:
    where = error.filename or workdir
    return WorkdirError(
        f"cannot write to --workdir={workdir}: {error.strerror or error} ({where}); pass a "
        "writable folder"
    )


def make_workdir(workdir: str) -> None:
    """Creates `workdir`; WorkdirError (one line) if it is a file or not writable."""
    try:
        os.makedirs(workdir, exist_ok=True)
        if not os.access(workdir, os.W_OK):
            raise PermissionError(13, "Permission denied", workdir)
    except OSError as e:
        raise _workdir_error(workdir, e) from e


class MetricsLog:
    """`metrics.jsonl`: one JSON record per step and kind (train or eval scalars), in order.

    Opening it for a run that resumes from `resume_step` drops the records of later steps
    (a torn last line of a killed run too), which the run trains again; a second record of
    the same step and kind replaces the first (e.g. a run evaluated again at its end).
    """

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.records: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        logging.info("%s:%d: dropped a torn record %r", path, number, line[:80])
                        continue
                    if int(record.get("step", 0)) <= resume_step:
                        self.records.append(record)
        self._rewrite()

    @staticmethod
    def _kind(record: dict) -> str:
        return "eval" if any(k.startswith("eval/") for k in record) else "train"

    def _rewrite(self) -> None:
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        os.replace(temporary, self.path)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        record = {"step": step, **scalars}
        kind = self._kind(record)
        kept = [r for r in self.records if not (r["step"] == step and self._kind(r) == kind)]
        replaced = len(kept) != len(self.records)
        self.records = [*kept, record]
        if replaced:
            self._rewrite()
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def _check_resumable(ckpt: checkpoint.Checkpointer, saved_config: dict) -> None:
    """Refuses, before anything compiles, a config that differs from the latest checkpoint's
    in a field that changes the trajectory (a damaged latest one is left to `restore_latest`)."""
    latest = ckpt.latest_step()
    if latest is None:
        return
    try:
        ckpt.check_config(latest, saved_config)
    except checkpoint.DamagedCheckpointError:
        return


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, evaluate_during_training: bool = True
) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its newest intact checkpoint), evaluating
    every `train.eval_every` steps and at the end (unless `evaluate_during_training` is
    False), and saves the last step. Returns the last evaluation's metrics.

    Refused before anything compiles: a config that `configs.validation` refuses, a workdir
    in use by another run (`run_lock.WorkdirLockedError`) or not writable (`WorkdirError`),
    a config that differs from the checkpoint's in a field that changes the trajectory.
    """
    validation.check(config)
    make_workdir(workdir)
    holder = run_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
    with holder or contextlib.nullcontext():
        if jax.process_index() == 0:
            try:
                with open(os.path.join(workdir, "config.json"), "w") as f:
                    json.dump(_config_dict(config), f, indent=1, sort_keys=True)
            except OSError as e:
                raise _workdir_error(workdir, e) from e
        return _train(config, workdir, evaluate_during_training)


def _train(
    config: ml_collections.ConfigDict, workdir: str, evaluate_during_training: bool
) -> dict[str, Any]:
    mesh = make_mesh()
    check_batch_size(config.train.global_batch_size, mesh)
    model = build_model(config.model)
    replicated = NamedSharding(mesh, P())
    abstract_params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *config.data.crop_size, 3)))
    )["params"]
    tx, schedule = optim.build_optimizer(config, abstract_params)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints
    )
    saved_config = _config_dict(config)
    num_classes, ignore = int(config.model.num_classes), int(config.data.ignore_index)
    try:
        _check_resumable(ckpt, saved_config)
        state = init_state(model, tx, config, mesh)
        latest, restored = ckpt.restore_latest(checkpoint.abstract_like(state), saved_config)
        if latest is not None:
            state = restored
            logging.info("resumed from step %d (%s)", latest, ckpt.directory)
        start = int(jax.device_get(state.step))
        train_step = jax.jit(
            make_train_step(model, tx, schedule, config),
            in_shardings=(replicated, NamedSharding(mesh, P("data"))),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        class_names = datasets.class_names_for(config.data.name, config.model.num_classes)
        writer = jsonl = None
        if jax.process_index() == 0:
            writer = metric_writers.SummaryWriter(workdir)  # TensorBoard; the console: below
            try:
                jsonl = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start)
            except OSError as e:
                raise _workdir_error(workdir, e) from e
        evaluator = evaluate.Evaluator(
            model,
            num_classes,
            place=functools.partial(input_pipeline.to_global_array, mesh=mesh),
            eval_config=config.eval,
            class_names=class_names,
            ignore_index=ignore,
        )
        eval_data = None
    except BaseException:
        ckpt.close()
        raise

    def write(step: int, scalars: dict[str, float]) -> None:
        if writer is not None:
            writer.write_scalars(step, scalars)
            writer.flush()
        if jsonl is not None:
            jsonl.write(step, scalars)

    def run_eval(step: int) -> dict[str, Any]:
        nonlocal eval_data
        if eval_data is None:  # built once: a split without pad sizes is scanned once
            eval_data = input_pipeline.eval_dataset(config)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        results = evaluator(variables, input_pipeline.eval_iterator(config, dataset=eval_data))
        write(step, {f"eval/{k}": float(v) for k, v in results.items() if np.ndim(v) == 0})
        logging.info("%s", eval_summary(step, results))
        names = class_names or [str(i) for i in range(len(results["iou"]))]
        logging.info("%s", class_table(names, results), extra={"file_only": True})
        return results

    def save(step: int, metrics: dict[str, float] | None = None) -> None:
        check_health(state, num_classes, ignore)
        ckpt.save(step, state, saved_config, metrics=metrics)

    total_steps = int(config.train.steps)
    global_batch = int(config.train.global_batch_size)
    batches = input_pipeline.train_iterator(config, start_step=start)
    results: dict[str, Any] = {}
    last_time, last_step = time.perf_counter(), start
    try:
        with _Preemption() as preemption, console.Progress(total_steps, start) as progress:
            step = start
            while step < total_steps:
                if preemption.reached(step):
                    if ckpt.latest_step() != step:
                        save(step)
                    ckpt.wait()
                    logging.warning("stopped early: saved step %d in %s", step, ckpt.directory)
                    return results
                batch = input_pipeline.to_global_array(next(batches), mesh)
                state, step_metrics = train_step(state, batch)
                step += 1
                if step % config.train.log_every == 0 or step == total_steps:
                    check_health(state, num_classes, ignore)
                    scalars = {
                        f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()
                    }
                    now = time.perf_counter()
                    rate = (step - last_step) * global_batch / max(now - last_time, 1e-9)
                    eta = (total_steps - step) * global_batch / max(rate, 1e-9)
                    write(step, scalars | {"train/images_per_second": rate})
                    plain = {k[6:]: v for k, v in scalars.items()}
                    logging.info(
                        "%s",
                        _log_line(step, total_steps, plain, rate, eta),
                        extra={"progress": True},
                    )
                    progress.update(step, plain["loss"], rate)
                    last_time, last_step = now, step
                evaluated = evaluate_during_training and (
                    step % config.train.eval_every == 0 or step == total_steps
                )
                if evaluated:
                    results = run_eval(step)
                if evaluated or step % config.train.checkpoint_every == 0:
                    save(step, {"miou": float(results["miou"])} if evaluated else None)
            if ckpt.latest_step() != step:  # the last step, whatever checkpoint_every says
                save(step)
            if not results and evaluate_during_training:  # already trained: report it
                results = run_eval(step)
    finally:
        batches.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    return results


def load_variables(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> tuple[dict, int]:
    """The model variables {"params", "batch_stats"} of checkpoint `step` of `workdir`
    (default `config.eval.checkpoint`, else the latest), replicated over all devices, and
    that step. Only the variables are read, not the optimizer state.

    Without any checkpoint in `workdir` (and no step asked for), a whole model given as
    `config.model.init_from` (e.g. an MMSegmentation model-zoo checkpoint) is loaded
    instead, as step 0. Raises FileNotFoundError when there is no such checkpoint, and
    ValueError naming the parameters (path, saved vs expected shape) when it holds
    another model than `config.model` builds (other classes, other backbone).
    """
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    no_checkpoint = FileNotFoundError(
        f"no checkpoints in {directory}: train first (pne-jax train --config=... "
        f"--workdir={workdir}), pass the --workdir of a trained run, or set "
        "--config.model.init_from to a whole model's weights"
    )
    asked = step is not None or config.get("eval", {}).get("checkpoint") is not None
    if not os.path.isdir(directory) or not os.listdir(directory):
        if config.model.get("init_from") and not asked:
            return whole_model_variables(config), 0
        raise no_checkpoint
    ckpt = checkpoint.Checkpointer(directory)
    try:
        steps = ckpt.all_steps()
        if step is None:
            step = config.get("eval", {}).get("checkpoint")
        if step is None:
            step = ckpt.latest_step()
        if step is None:
            if config.model.get("init_from") and not asked:
                return whole_model_variables(config), 0
            raise no_checkpoint
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {directory}; saved steps: {sorted(steps)}"
            )
        step = int(step)
        variables = restore_model_variables(ckpt, config, step)
    finally:
        ckpt.close()
    return variables, step


def restore_model_variables(
    ckpt: checkpoint.Checkpointer, config: ml_collections.ConfigDict, step: int
) -> dict:
    """The model variables of saved `step` of an open checkpointer, replicated over all
    devices; ValueError naming the parameters when they are another model's, with the
    model config fields that differ from the saved ones."""
    model = build_model(config.model)
    replicated = NamedSharding(make_mesh(), P())
    image = jnp.zeros((1, *config.data.crop_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})},
    )
    differences = checkpoint.config_differences(
        {"model": ckpt.saved_config(step).get("model", {})},
        {"model": _config_dict(config)["model"]},
        allowed=("model.pretrained", "model.init_from", "model.dtype"),
    )
    try:
        variables = ckpt.restore_variables(step, abstract)
    except ValueError as e:
        if not differences:
            raise
        raise ValueError(
            f"{e}\nModel config fields that differ (saved -> current):\n  "
            + "\n  ".join(differences)
        ) from None
    if differences:
        logging.warning(
            "checkpoint step %d was trained with other model settings (saved -> current), "
            "its parameters fit this model:\n  %s",
            step,
            "\n  ".join(differences),
        )
    return variables


def whole_model_variables(config: ml_collections.ConfigDict) -> dict:
    """The variables of `config.model.init_from` alone, replicated (no checkpoint)."""
    _weight_files(config.model)
    logging.info("no checkpoint: using the weights of model.init_from=%s", config.model.init_from)
    model = build_model(config.model)
    image = jnp.zeros((1, *config.data.crop_size, 3), jnp.float32)
    variables = jax.jit(lambda: model.init(jax.random.key(0), image, train=False))()
    variables = initial_weights(variables, config.model)
    replicated = NamedSharding(make_mesh(), P())
    return jax.device_put(
        {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
        replicated,
    )


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates `config.eval.checkpoint` (a step; default the latest) of `workdir` on the
    evaluation split (inference as `config.eval` says), prints a per-class table and writes
    `workdir/eval_<step>.json`."""
    validation.check(config)
    mesh = make_mesh()
    model = build_model(config.model)
    variables, step = load_variables(config, workdir)
    class_names = datasets.class_names_for(config.data.name, config.model.num_classes)
    results = evaluate.evaluate(
        model,
        variables,
        input_pipeline.eval_iterator(config),
        int(config.model.num_classes),
        place=functools.partial(input_pipeline.to_global_array, mesh=mesh),
        eval_config=config.eval,
        class_names=class_names,
        ignore_index=config.data.ignore_index,
    )
    names = class_names or [str(i) for i in range(len(results["iou"]))]
    print(class_table(names, results))
    print(eval_summary(step, results), flush=True)
    if jax.process_index() == 0:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in results.items()}
        path = os.path.join(workdir, f"eval_{int(step)}.json")
        try:
            with open(path, "w") as f:
                json.dump({"step": int(step), "class_names": names, **out}, f, indent=1)
        except OSError as e:
            raise _workdir_error(workdir, e) from e
    return results
