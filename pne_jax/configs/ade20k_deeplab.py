"""DeepLabV3-R101-D8 + PNE on ADE20K (150 classes), 512x512 crops, batch 16.

    pne-jax train --config=ade20k_deeplab --workdir=runs/ade_deeplab_80k
    pne-jax train --config=ade20k_deeplab:160k
    pne-jax train --config=ade20k_deeplab --config.pne.enabled=False  # baseline

Hardware: one host with 8 GPUs/TPU cores (2 images each). Initialisation that reproduces the
paper: MMCV's `open-mmlab://resnet101_v1c` (`--config.model.pretrained=resnet101_v1c-e67eebb6.pth`).
Expected (single-scale val mIoU), baseline: MMSegmentation 44.08 (80k), 45.00 (160k). With
PNE: the paper's figure; ours once measured.
"""

import ml_collections

from pne_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg)
    steps = 160_000 if options.get("160k") else 80_000
    return common.experiment(
        model_config=common.model("resnet101_v1c", "aspp", common.ADE20K_CLASSES, output_stride=8),
        data_config=common.ade20k(),
        optimizer=common.sgd_poly(learning_rate=0.01),
        train_config=common.train(steps=steps, global_batch_size=16),
    )
