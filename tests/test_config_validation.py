"""Configs refused before anything is built, the run's console, and its metrics file."""

from __future__ import annotations

import json
import logging

import pytest

from pne_jax import cli, configs, console, train
from pne_jax.configs import validation


@pytest.mark.parametrize("spec", [*configs.names(), "cityscapes_deeplab:80k"])
def test_every_shipped_config_passes(spec):
    validation.check(configs.get_config(spec))


def _with(**changes):
    """The demo config with `block__field=value` changes."""
    config = configs.get_config("demo")
    for dotted, value in changes.items():
        *blocks, field = dotted.split("__")
        node = config
        for block in blocks:
            node = node[block]
        node[field] = value
    return config


def _refused(**changes) -> str:
    with pytest.raises(validation.ConfigError) as error:
        validation.check(_with(**changes))
    return str(error.value)


def test_unknown_fields_are_named_with_a_suggestion():
    message = _refused(train__checkpoint_evry=10)
    assert message.startswith(
        "config.train has no field 'checkpoint_evry' (did you mean config.train.checkpoint_every?)"
    )
    assert "config.train has checkpoint_every, eval_every" in message
    assert "config has no field 'extra'" in _refused(extra=1)
    validation.check(_with(data__options__anything=1))  # builder options are free-form


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"train__steps": -5}, "config.train.steps=-5: must be a positive number of steps"),
        ({"train__steps": 0}, "config.train.steps=0"),
        ({"data__crop_size": (128,)}, "config.data.crop_size=(128,): must be a pair"),
        ({"data__crop_size": (128, 0)}, "config.data.crop_size=(128, 0)"),
        ({"data__eval_pad_size": (1, 2, 3)}, "config.data.eval_pad_size=(1, 2, 3)"),
        ({"model__num_classes": 5}, "config.model.num_classes=5 but dataset 'synthetic' has 10"),
        ({"train__grad_accum_steps": 3}, "grad_accum_steps=3 does not divide"),
        ({"train__log_every": 0}, "config.train.log_every=0: must be an integer >= 1"),
        ({"pne__temperature": 0.0}, "config.pne.temperature=0.0: must be > 0"),
        ({"eval__mode": "tiles"}, "config.eval.mode must be one of"),
        ({"data__storage": "png"}, "config.data.storage='png': must be one of encoded, raw"),
        ({"data__augment_on": "gpu"}, "config.data.augment_on='gpu': must be one of host, device"),
        (
            {"data__augment_on": "device", "data__device_source_size": (64, 256)},
            "config.data.crop_size (128, 128) does not fit in config.data.device_source_size "
            "(64, 256): make device_source_size at least crop_size",
        ),
        (
            {"data__augment_on": "device", "data__device_source_size": None},
            "config.data.augment_on='device' needs config.data.device_source_size",
        ),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_fix(changes, expected):
    assert expected in _refused(**changes)


def test_several_problems_are_reported_together():
    message = _refused(train__steps=-1, data__crop_size=(1,))
    assert "config.train.steps=-1" in message and "config.data.crop_size=(1,)" in message
    assert "\n" not in message


def test_an_override_of_a_missing_field_is_described():
    argv = ["pne-jax train", "--config=demo", "--config.train.steps=3", "--config.data.cropsize=3"]
    assert cli.override_problem(argv) == (
        "--config.data.cropsize=3: config.data has no field 'cropsize' (did you mean "
        "config.data.crop_size?); config.data has augment_on, base_size, cat_max_ratio, "
        "crop_size, data_dir, device_source_size, eval_label_pad_size, eval_pad_size, "
        "eval_split, flip_prob, ignore_index, name, num_threads, num_workers, options, "
        "photometric, ratio_range, seed, storage, test_size, train_split, worker_buffer_size"
    )
    assert cli.override_problem(["x", "--config=demo", "--config.train.steps=3"]) is None


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(train.WorkdirError, match=f"cannot write to --workdir={path}: "):
        train.make_workdir(str(path))


def test_metrics_log_keeps_one_record_per_step_and_kind(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for step in range(1, 8):
            f.write(json.dumps({"step": step, "train/loss": float(step)}) + "\n")
        f.write(json.dumps({"step": 4, "eval/miou": 0.5}) + "\n")
        f.write('{"step": 8, "train/lo')  # torn by a SIGKILL
    log = train.MetricsLog(path, resume_step=4)  # steps 5.. are trained again
    log.write(5, {"train/loss": 50.0})
    log.write(4, {"eval/miou": 0.75})  # evaluated again: replaces the earlier record
    with open(path) as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], next(k for k in r if k != "step")) for r in records] == [
        (1, "train/loss"),
        (2, "train/loss"),
        (3, "train/loss"),
        (4, "train/loss"),
        (5, "train/loss"),
        (4, "eval/miou"),
    ]
    assert records[-1]["eval/miou"] == 0.75 and records[4]["train/loss"] == 50.0


@pytest.fixture
def routed():
    """Removes the handlers `console.setup` adds, after the test."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pne_jax", False)]:
        root.removeHandler(handler)
        handler.close()


def test_console_shows_our_records_and_the_log_file_everything(tmp_path, capsys, routed):
    log_file = str(tmp_path / "run.log")
    console.setup(log_file, verbosity=0)
    logging.getLogger("tensorflow_datasets").warning("Using custom data configuration")
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    ours = logging.getLogger("pne_jax.train")  # (pne-jax's modules: by their path)
    ours.info("step 1/2 loss=1")
    ours.info("config: ...", extra={"file_only": True})
    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        ours.error("%s", e, exc_info=True)
    shown = capsys.readouterr().err.splitlines()
    assert shown == ["step 1/2 loss=1", "error: [Errno 28] No space left on device"]
    with open(log_file) as f:
        text = f.read()
    for line in ("Using custom data", "Unable to initialize", "config: ...", "Traceback"):
        assert line in text


def test_a_progress_bar_replaces_the_step_lines_on_a_terminal(capsys, routed):
    console.setup(None, verbosity=0)
    ours = logging.getLogger("pne_jax.train")
    with console.Progress(total=4, initial=1, enabled=True) as bar:
        ours.info("step 2/4 loss=1", extra={"progress": True})  # the bar shows it
        bar.update(2, 1.0, 12.5)
        ours.info("eval  step    mIoU")  # other lines are printed above the bar
    ours.info("step 4/4 loss=1", extra={"progress": True})  # no bar: printed
    err = capsys.readouterr().err
    assert "step 2/4" not in err and "2/4" in err and "loss=1 12.5 img/s" in err
    assert "eval  step    mIoU" in err and "step 4/4 loss=1" in err
