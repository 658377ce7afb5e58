"""DeepLabV3-R101-D8 + PNE on COCO-Stuff-164k (171 classes), 512x512 crops, batch 16.

    pne-jax train --config=coco_stuff_deeplab --workdir=runs/coco_deeplab_80k
    pne-jax train --config=coco_stuff_deeplab:160k
    pne-jax train --config=coco_stuff_deeplab --config.pne.enabled=False

Trains on `train` (118k), evaluates on `validation` (5k). Hardware: one host with 8 GPUs/TPU
cores. Initialisation that reproduces the paper: MMCV's `open-mmlab://resnet101_v1c`
(`--config.model.pretrained=resnet101_v1c-e67eebb6.pth`). Expected: MMSegmentation's model zoo
(configs/deeplabv3) for the baseline, the paper's figure with PNE; ours once measured.
"""

import ml_collections

from pne_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg)
    steps = 160_000 if options.get("160k") else 80_000
    return common.experiment(
        model_config=common.model(
            "resnet101_v1c", "aspp", common.COCO_STUFF_CLASSES, output_stride=8
        ),
        data_config=common.coco_stuff(),
        optimizer=common.sgd_poly(learning_rate=0.01),
        train_config=common.train(steps=steps, global_batch_size=16),
    )
