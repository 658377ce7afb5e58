"""The timm checkpoint converter: naming, layouts, error reports, files and the CLI.

These tests need no torch: they build a timm-style state dict for ResNet-50c from timm's
published key layout (`conv1.{0,1,3,4,6}` deep stem, `bn1`, `layer{1-4}.{b}.conv/bn{1-3}`,
`downsample.{0,1}`, `fc`). The opt-in parity tests in test_resnet.py use timm itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pne_jax import pretrained
from pne_jax.models import build_backbone


def _bn(prefix, c, rng):
    return {
        f"{prefix}.weight": rng.random(c, dtype=np.float32) + 0.5,
        f"{prefix}.bias": rng.normal(size=c).astype(np.float32),
        f"{prefix}.running_mean": rng.normal(size=c).astype(np.float32),
        f"{prefix}.running_var": rng.random(c, dtype=np.float32) + 0.5,
        f"{prefix}.num_batches_tracked": np.array(7),
    }


def timm_resnet50c_state_dict(seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape):  # fan-in scaled, so that 50 layers stay finite
        return (rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    sd = {"conv1.0.weight": w(32, 3, 3, 3), "conv1.3.weight": w(32, 32, 3, 3)}
    sd["conv1.6.weight"] = w(64, 32, 3, 3)
    sd |= _bn("conv1.1", 32, rng) | _bn("conv1.4", 32, rng) | _bn("bn1", 64, rng)
    inplanes = 64
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            sd[f"{p}.conv1.weight"] = w(planes, inplanes, 1, 1)
            sd[f"{p}.conv2.weight"] = w(planes, planes, 3, 3)
            sd[f"{p}.conv3.weight"] = w(planes * 4, planes, 1, 1)
            sd |= _bn(f"{p}.bn1", planes, rng) | _bn(f"{p}.bn2", planes, rng)
            sd |= _bn(f"{p}.bn3", planes * 4, rng)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = w(planes * 4, inplanes, 1, 1)
                sd |= _bn(f"{p}.downsample.1", planes * 4, rng)
            inplanes = planes * 4
    sd["fc.weight"], sd["fc.bias"] = w(1000, 2048), w(1000)
    return sd


def test_names_and_layouts():
    sd = timm_resnet50c_state_dict()
    variables = pretrained.convert_timm("resnet50c", sd)
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        params["layer2_0"]["conv2"]["kernel"], sd["layer2.0.conv2.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["layer1_0"]["downsample_1"]["scale"], sd["layer1.0.downsample.1.weight"]
    )
    np.testing.assert_array_equal(params["conv1_4"]["bias"], sd["conv1.4.bias"])
    np.testing.assert_array_equal(stats["bn1"]["mean"], sd["bn1.running_mean"])
    np.testing.assert_array_equal(stats["layer4_2"]["bn3"]["var"], sd["layer4.2.bn3.running_var"])
    # Everything but fc and num_batches_tracked is used, once.
    used = sum(np.size(x) for x in jax.tree.leaves(variables))
    expected = sum(
        v.size for k, v in sd.items() if not k.startswith("fc.") and "num_batches" not in k
    )
    assert used == expected
    # The converted variables run in the model.
    model = build_backbone("resnet50_v1c")
    out = model.apply(variables, jnp.ones((1, 32, 32, 3)), train=False)
    assert all(np.isfinite(np.asarray(o)).all() for o in out)


def test_every_problem_is_reported_at_once():
    sd = timm_resnet50c_state_dict()
    del sd["layer3.5.conv2.weight"], sd["bn1.running_var"]
    sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    sd["layer1.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(ValueError) as error:
        pretrained.convert_timm("resnet50c", sd)
    message = str(error.value)
    assert "1 keys in the checkpoint that match no variable:\n    layer5.0.conv1.weight" in message
    assert "2 variables the checkpoint does not provide" in message
    assert "params/layer3_5/conv2/kernel" in message and "batch_stats/bn1/var" in message
    assert (
        "layer1.0.conv1.weight -> params/layer1_0/conv1/kernel: (3, 3, 64, 64) vs (1, 1, 64, 64)"
        in message
    )


def test_wrong_architecture_names_missing_and_unexpected_keys():
    with pytest.raises(ValueError, match="checkpoint does not fit resnet101c") as error:
        pretrained.convert_timm("resnet101c", timm_resnet50c_state_dict())
    message = str(error.value)  # blocks 6-22 of stage 3 are missing: 17 x 15 variables
    assert "255 variables the checkpoint does not provide" in message
    assert "batch_stats/layer3_10/bn1/mean" in message and "... and 243 more" in message


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet18'.*resnet50c"):
        pretrained.convert_timm("resnet18", {})


def test_files_cli_and_loading_into_a_model(tmp_path):
    from safetensors.numpy import save_file

    sd = timm_resnet50c_state_dict(seed=3)
    checkpoint = tmp_path / "resnet50c.safetensors"
    save_file(sd, str(checkpoint))
    out = tmp_path / "r50.npz"
    pretrained.main(["--arch=resnet50c", f"--checkpoint={checkpoint}", f"--out={out}"])
    loaded = pretrained.load_variables(str(out))
    want = pretrained.convert_timm("resnet50c", sd)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    # Merged under a segmentor's backbone submodule, the rest keeps its values.
    model_vars = {
        "params": {
            "backbone": jax.tree.map(np.zeros_like, want["params"]),
            "head": {"w": np.ones(3)},
        },
        "batch_stats": {"backbone": jax.tree.map(np.zeros_like, want["batch_stats"])},
    }
    merged = pretrained.load_backbone(model_vars, loaded)
    np.testing.assert_array_equal(merged["params"]["backbone"]["bn1"]["scale"], sd["bn1.weight"])
    np.testing.assert_array_equal(merged["params"]["head"]["w"], np.ones(3))
    model_vars["params"]["backbone"]["bn1"]["scale"] = np.zeros(5)
    with pytest.raises(
        ValueError, match="backbone/bn1/scale has shape \\(64,\\), the model expects \\(5,\\)"
    ):
        pretrained.load_backbone(model_vars, loaded)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.safetensors does not exist"):
        pretrained.read_state_dict(str(tmp_path / "does-not-exist.safetensors"))
