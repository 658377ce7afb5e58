"""OCRNet-HRNetV2-W48 + PNE on COCO-Stuff-164k (171 classes), 512x512 crops, batch 16.

    pne-jax train --config=coco_stuff_ocrnet --workdir=runs/coco_ocrnet_80k
    pne-jax train --config=coco_stuff_ocrnet --config.pne.enabled=False

Trains on `train`, evaluates on `validation`. Hardware: one host with 8 GPUs/TPU cores.
Initialisation that reproduces the paper: `open-mmlab://msra/hrnetv2_w48`
(`--config.model.pretrained=hrnetv2_w48-d2186c55.pth`). Expected: the paper's figures for
baseline and PNE; ours once measured.
"""

import ml_collections

from pne_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg)
    steps = 160_000 if options.get("160k") else 80_000
    return common.experiment(
        model_config=common.model("hrnetv2_w48", "ocr", common.COCO_STUFF_CLASSES),
        data_config=common.coco_stuff(),
        optimizer=common.sgd_poly(learning_rate=0.01),
        train_config=common.train(steps=steps, global_batch_size=16),
    )
