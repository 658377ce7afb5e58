"""Shared blocks of the experiment configs: one place for each recipe of the paper.

Each experiment file calls `experiment(...)` with its dataset, model and schedule blocks;
every field is named after what it does and can be overridden on the command line
(`--config.train.steps=100`). Defaults follow MMSegmentation 0.13's configs, which the
paper's code uses.

This module is the one place for every default: `input_pipeline`, `augment.TrainAugment` and
`evaluate.eval_options` read the fields and have none of their own, so a config built by hand
must have every field of `data(...)` and `evaluation(...)` (build them here, then override).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from pne_jax import datasets

CITYSCAPES_CLASSES, ADE20K_CLASSES, COCO_STUFF_CLASSES = 19, 150, 171


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'80k,base' or 'steps=80000' -> {'80k': True, 'base': True} / {'steps': '80000'}."""
    options = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        options[key] = value if value else True
    return options


def pne(enabled: bool = True) -> ml_collections.ConfigDict:
    """The paper's PNE settings (Cityscapes DeepLabV3-R101): S=100, temperature 1, weight 1.3,
    gate (0, 199), positive weighting. `--config.pne.enabled=False` is the baseline."""
    return ml_collections.ConfigDict(
        dict(
            enabled=enabled,
            num_samples=100,
            temperature=1.0,
            loss_weight=1.3,
            gate=(0, 199),
            positive_weighting=True,
            max_pairs_per_image=placeholder(int),
        )
    )


def loss(aux_weight: float = 0.4) -> ml_collections.ConfigDict:
    """Cross-entropy averaged over all pixels (MMSegmentation 0.13), aux head weight 0.4.

    `fused_upsampling` computes the CE of the bilinearly upsampled logits without
    materialising them (`cross_entropy.upsampled_cross_entropy`): 1.35x faster for the CE
    part on CPU, but that part is 0.2% of the step and its sums run in another order, so the
    default is resize + CE, as MMSegmentation."""
    return ml_collections.ConfigDict(
        dict(aux_weight=aux_weight, average_over_valid=False, fused_upsampling=False)
    )


def sgd_poly(learning_rate: float = 0.01, weight_decay: float = 5e-4) -> ml_collections.ConfigDict:
    """MMSegmentation's CNN schedule: SGD momentum 0.9, poly decay (power 0.9) to 1e-4."""
    return ml_collections.ConfigDict(
        dict(
            name="sgd",
            learning_rate=learning_rate,
            momentum=0.9,
            weight_decay=weight_decay,
            no_weight_decay=(),
            schedule="poly",
            power=0.9,
            min_learning_rate=1e-4,
            warmup_steps=0,
            warmup_ratio=1e-6,
            grad_clip_norm=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
        )
    )


def adamw_swin() -> ml_collections.ConfigDict:
    """UperNet-Swin's schedule: AdamW 6e-5, weight decay 0.01 (none on norms and position
    tables), linear warm-up over 1500 steps from 1e-6 x, then poly decay (power 1) to 0."""
    config = sgd_poly(learning_rate=6e-5, weight_decay=0.01)
    config.update(
        dict(
            name="adamw",
            no_weight_decay=("norm", "relative_position_bias_table", "absolute_pos_embed"),
            power=1.0,
            min_learning_rate=0.0,
            warmup_steps=1500,
        )
    )
    return config


def train(steps: int, global_batch_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            global_batch_size=global_batch_size,
            grad_accum_steps=1,
            log_every=50,
            eval_every=4000,
            checkpoint_every=4000,
            keep_checkpoints=3,
        )
    )


def data(
    name: str,
    *,
    base_size: tuple[int, int],
    crop_size: tuple[int, int],
    test_size: tuple[int, int],
    eval_pad_size=None,
    eval_label_pad_size=None,
    device_source_size=None,
) -> ml_collections.ConfigDict:
    """A prepared dataset and MMSegmentation's standard pipeline (rescale 0.5-2.0, crop with
    cat_max_ratio 0.75, flip, photometric distortion). Sizes: base/test (long, short edge),
    crop and pads (height, width).

    Evaluation batches have one static shape: images (resized to fit `test_size`) are padded
    to `eval_pad_size`, labels (original resolution) to `eval_label_pad_size`. A pad size
    must hold every image of the split in either orientation. Left None, it is the split's
    largest (h, w), found by `input_pipeline.scan_eval_sizes` on first use and cached in the
    prepared data's folder (`input_pipeline.eval_sizes_cache_path`), so a split is scanned
    once, not per run or per evaluation.

    `augment_on="device"` leaves the augmentation's pixel work to the train step
    (`pne_jax.device_augment`): the host sends each example's source region padded to
    `device_source_size` (height, width), which should hold the dataset's images (larger
    regions are resized on the host, counted in `train/augment_fallback`).
    """
    return ml_collections.ConfigDict(
        dict(
            name=name,
            data_dir=placeholder(str),
            options={},
            storage=datasets.DEFAULT_STORAGE,
            train_split="train",
            eval_split="validation",
            base_size=base_size,
            crop_size=crop_size,
            ratio_range=(0.5, 2.0),
            cat_max_ratio=0.75,
            flip_prob=0.5,
            photometric=True,
            augment_on="host",
            device_source_size=device_source_size or placeholder(tuple),
            test_size=test_size,
            eval_pad_size=eval_pad_size or placeholder(tuple),
            eval_label_pad_size=eval_label_pad_size or placeholder(tuple),
            ignore_index=255,
            seed=0,
            num_workers=2,
            num_threads=1,
            worker_buffer_size=2,
        )
    )


def cityscapes(crop_size=(512, 1024)) -> ml_collections.ConfigDict:
    """Every Cityscapes image is 1024 x 2048, the test scale: fixed pads, no scan."""
    return data(
        "cityscapes",
        base_size=(2048, 1024),
        crop_size=crop_size,
        test_size=(2048, 1024),
        eval_pad_size=(1024, 2048),
        eval_label_pad_size=(1024, 2048),
        device_source_size=(1024, 2048),
    )


def ade20k() -> ml_collections.ConfigDict:
    """ADE20K's validation images have many sizes, landscape and portrait: resized to fit
    (2048, 512), a landscape image is 512 high and up to 2048 wide, a portrait one the
    transpose, and the labels' original sizes have no published bound. The only fixed image
    pad that holds both orientations is (2048, 2048), 16x the pixels of a 512 x 512 image in
    whole mode, so both pads are the split's largest sizes, scanned once and cached."""
    return data(
        "ade20k",
        base_size=(2048, 512),
        crop_size=(512, 512),
        test_size=(2048, 512),
        device_source_size=(1024, 1024),  # most images; larger regions resize on the host
    )


def coco_stuff() -> ml_collections.ConfigDict:
    """COCO images are at most 640 px on a side, hence the label pad (640, 640). Resized to
    fit (2048, 512), their short edge becomes 512 and the long one 512 x the aspect ratio:
    a portrait 640 x 480 image becomes 683 x 512, so the image pad (512, 2048) that held
    only landscape images is wrong, and a fixed one for both orientations would be
    (2048, 2048); the image pad is the split's largest size, scanned once and cached."""
    return data(
        "coco_stuff164k",
        base_size=(2048, 512),
        crop_size=(512, 512),
        test_size=(2048, 512),
        eval_label_pad_size=(640, 640),
        device_source_size=(640, 640),
    )


def model(
    backbone: str, decode_head: str, num_classes: int, **options
) -> ml_collections.ConfigDict:
    """A `pne_jax.models.build_model` config; options override MMSegmentation's defaults."""
    config = dict(
        backbone=backbone,
        decode_head=decode_head,
        num_classes=num_classes,
        pretrained=placeholder(str),
        init_from=placeholder(str),
        dtype="float32",
        projection=dict(enabled=True, hidden=512, out=256, feature="decode"),
    )
    config.update(options)
    return ml_collections.ConfigDict(config)


def experiment(
    *, model_config, data_config, optimizer, train_config, pne_config=None, eval_batch: int = 8
) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config
    config.data = data_config
    config.optimizer = optimizer
    config.train = train_config
    config.loss = loss()
    config.pne = pne_config or pne()
    config.eval = evaluation(data_config, eval_batch)
    return config


def evaluation(data_config, global_batch_size: int = 8) -> ml_collections.ConfigDict:
    """Test-time inference (`pne_jax.evaluate`): MMSegmentation 0.13's modes.

    mode 'whole' (the default, as in the paper's configs) runs the model on the whole image
    at the test scale; 'slide' on `crop_size` (h, w) windows every `stride` (h, w), averaging
    overlapping logits, `windows_per_step` windows per image at a time (bounds memory).
    `scales` (ratios of the test scale) and `flip` give multi-scale + flip testing, averaging
    softmax probabilities (MMSegmentation's ms+flip: scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    flip=True). `checkpoint`: the step `--mode=eval` evaluates (default the latest).
    """
    crop = tuple(int(c) for c in data_config.crop_size)
    return ml_collections.ConfigDict(
        dict(
            global_batch_size=global_batch_size,
            mode="whole",
            crop_size=crop,
            stride=tuple(max(1, 2 * c // 3) for c in crop),
            windows_per_step=2,
            scales=(1.0,),
            flip=False,
            checkpoint=placeholder(int),
        )
    )
