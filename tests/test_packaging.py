"""The wheel, installed outside the checkout, works as a user's pip install does.

The wheel is built from the package files alone, installed without dependencies into a
temporary folder (the stack already installed here provides them), and used from a working
directory outside the checkout that holds a user's own `data/` package and `configs.py`
(decoys that record any import of them): every module imports without defining absl flags;
every official palette colours a map; the console command prepares the synthetic set,
trains the demo config for two steps, evaluates and predicts (colour, overlay and Cityscapes
submission files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from pne_jax import datasets
from tests import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = dict(num_train=16, num_validation=4, height=64, width=128, seed=0)
TINY = {
    "train.steps": 2,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.eval_every": 2,
    "train.global_batch_size": 2,
    "eval.global_batch_size": 2,
    "data.num_workers": 0,
    "data.crop_size": (64, 64),
    "data.base_size": (128, 64),
    "data.test_size": (128, 64),
    "data.eval_pad_size": (64, 128),
    "data.eval_label_pad_size": (64, 128),
    **{f"data.options.{k}": v for k, v in SYNTHETIC.items()},
}
DECOY = """import os
with open(os.environ["DECOY_MARKER"], "a") as f:
    f.write(__name__ + "\\n")
dataset_meta = data_source = get_config = None
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder holding the installed wheel, the wheel's path)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(
        os.path.join(ROOT, "pne_jax"),
        source / "pne_jax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    dist = tmp / "dist"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("pne_jax-*.whl")
    site = tmp / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    return site, wheel


@pytest.fixture(scope="module")
def user(installed, tmp_path_factory):
    """run(args) -> CompletedProcess: python in a working folder outside the checkout, with a
    user's own `data/` package and `configs.py`, and only the installed wheel of pne-jax."""
    site, _ = installed
    work = tmp_path_factory.mktemp("user")
    (work / "data").mkdir()
    (work / "data" / "__init__.py").write_text(DECOY)
    (work / "configs.py").write_text(DECOY)
    marker = work / "decoys_imported.txt"
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "PYTHONHOME")
    }
    env.update(PYTHONPATH=str(site), DECOY_MARKER=str(marker), JAX_PLATFORMS="cpu")
    # The commands compile the same programs (eval in train and in eval, predict twice).
    env.update(compilation_cache.ENV)

    def run(args, check=True, timeout=600):
        result = subprocess.run(
            args, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode:
            raise AssertionError(
                f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-6000:]}"
            )
        assert not marker.exists(), f"a decoy was imported: {marker.read_text()}"
        return result

    run.work, run.site = work, site
    return run


def test_wheel_holds_the_package_and_its_metadata(installed):
    _, wheel = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(metadata).decode()
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(entry_points).decode()
    for path in (
        "pne_jax/py.typed",
        "pne_jax/cli.py",
        "pne_jax/datasets/labels.py",
        "pne_jax/datasets/cityscapes.py",
        "pne_jax/configs/common.py",
        "pne_jax/configs/cityscapes_deeplab.py",
        "pne_jax/losses/pne.py",
    ):
        assert path in names, path
    assert not any(n.startswith(("data/", "configs/", "tests/", "benchmarks/")) for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    import pne_jax

    assert f"Version: {pne_jax.__version__}\n" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert sorted(r.split()[1].split(">")[0] for r in core) == ["jax", "numpy"], core
    assert 'extra == "train"' in meta and 'extra == "bench"' in meta
    assert "License-Expression: Apache-2.0" in meta
    assert "pne-jax = pne_jax.cli:main" in scripts


def test_every_module_imports_without_flags_or_the_checkout(user):
    script = """
import pkgutil, sys
from absl import flags
import pne_jax
assert pne_jax.__file__.startswith(sys.argv[1]), pne_jax.__file__
names = [m.name for m in pkgutil.walk_packages(pne_jax.__path__, "pne_jax.")]
for name in names:
    __import__(name)
ours = {m: f for m, f in flags.FLAGS.flags_by_module_dict().items() if "pne_jax" in m}
assert not ours, ours  # libraries (grain, orbax, tfds) define their own; pne_jax none
assert "data" not in sys.modules and "configs" not in sys.modules
print(len(names))
"""
    result = user([sys.executable, "-c", script, str(user.site)])
    assert int(result.stdout.split()[-1]) > 30


def test_palettes_and_label_tables_need_no_tensorflow(user):
    script = """
import sys
import numpy as np
from pne_jax import datasets, visualize
for name, meta in datasets.DATASETS.items():
    labels = np.arange(meta.num_classes).reshape(1, -1)
    colours = visualize.colorize(labels, visualize.palette(name))
    assert (colours[0] == np.array(meta.palette, np.uint8)).all(), name
assert "tensorflow" not in sys.modules
print(sorted(datasets.DATASETS))
"""
    result = user([sys.executable, "-c", script])
    assert "'cityscapes'" in result.stdout and "'synthetic'" in result.stdout


def test_console_command_help_and_bad_configs(user):
    script = os.path.join(user.site, "bin", "pne-jax")
    result = user([script, "--help"])
    for command in ("train", "eval", "predict", "export", "prepare", "convert"):
        assert f"  {command} " in result.stdout
    assert "--workdir" in user([script, "train", "--help"]).stdout
    assert "--images" in user([script, "predict", "--help"]).stdout
    bad = user([script, "train", "--config=cityscapes_deeplap"], check=False)
    assert bad.returncode != 0 and "shipped configs: ade20k_deeplab" in bad.stderr
    assert "also works" in bad.stderr and "Traceback" not in bad.stderr
    missing = user([script, "eval", "--config=mine/run.py"], check=False)
    assert missing.returncode != 0 and "config file mine/run.py does not exist" in missing.stderr
    typo = user([script, "train", "--config=demo", "--config.train.nosuchkey=3"], check=False)
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    assert "--config.train.nosuchkey=3: config.train has no field 'nosuchkey'" in typo.stderr
    # Refused before anything is built, every problem named, one line, no traceback.
    values = ["--config.train.steps=-5", "--config.data.crop_size=(128,)"]
    values += ["--config.model.num_classes=5", f"--workdir={user.work}/bad"]
    bad = user([script, "train", "--config=demo", *values], check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stdout + bad.stderr, bad.stderr
    for text in (
        "config.train.steps=-5: must be a positive",
        "config.data.crop_size=(128,)",
        "config.model.num_classes=5 but dataset 'synthetic' has 10 classes",
    ):
        assert text in bad.stderr, bad.stderr


def test_prepare_train_evaluate_predict_from_the_install(user, tmp_path):
    python_m = [sys.executable, "-m", "pne_jax"]
    data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
    options = [f"--{k}={v}" for k, v in SYNTHETIC.items()]
    user([*python_m, "prepare", "--dataset=synthetic", f"--data_dir={data_dir}", *options])
    overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
    common = ["--config=demo", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
    trained = user([*python_m, "train", *common, *overrides])
    assert "validation mIoU" in trained.stdout
    assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints" / "2").is_dir()
    evaluated = user([*python_m, "eval", *common, *overrides])
    assert "eval  step    mIoU" in evaluated.stdout and (workdir / "eval_2.json").exists()

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "aachen_000000_000019_leftImg8bit.png"):
        Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(images / name)
    out, submission = tmp_path / "predictions", tmp_path / "submission"
    predict = [*python_m, "predict", *common, *overrides, "--batch_size=2"]
    user([*predict, f"--images={images}/*.png", f"--out={out}"])
    assert sorted(os.listdir(out)) == sorted(
        f"{stem}{suffix}.png"
        for stem in ("a", "aachen_000000_000019_leftImg8bit")
        for suffix in ("", "_color", "_overlay")
    )
    label = np.asarray(Image.open(out / "a.png"))
    palette = np.array(datasets.dataset_meta("synthetic").palette, np.uint8)
    assert label.shape == (64, 128) and label.max() < 10
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a_color.png")), palette[label])
    user(
        [
            *predict,
            f"--images={images}/aachen*.png",
            f"--out={submission}",
            "--cityscapes_submission",
        ]
    )
    (written,) = os.listdir(submission)
    assert written == "aachen_000000_000019_leftImg8bit.png"
    label_ids = np.asarray(Image.open(submission / written))
    # cityscapesScripts: train ids 0..9 are label ids 7, 8, 11, 12, 13, 17, 19, 20, 21, 22.
    official = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22], np.uint8)
    same_image = np.asarray(Image.open(out / written))  # its train ids, from the first run
    np.testing.assert_array_equal(label_ids, official[same_image])

    # Exported from the install, run by the copy of the runtime the export wrote.
    exported = tmp_path / "exported"
    export = [*python_m, "export", f"--workdir={workdir}", f"--out={exported}"]
    user([*export, "--sizes=64x128", "--formats=stablehlo"])
    runtime = (
        f"import sys, numpy as np; from PIL import Image; sys.path.insert(0, {str(exported)!r})\n"
        "import pne_exported\n"
        f"model = pne_exported.load({str(exported)!r})\n"
        f"image = np.asarray(Image.open({str(images / 'a.png')!r}))\n"
        f"np.save({str(tmp_path / 'exported.npy')!r}, model.segment(image))\n"
    )
    user([sys.executable, "-c", runtime])
    np.testing.assert_array_equal(np.load(tmp_path / "exported.npy"), label)
