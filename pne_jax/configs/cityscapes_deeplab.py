"""DeepLabV3-R101-D8 + PNE on Cityscapes, 512x1024 crops, batch 8: the paper's main run.

    pne-jax train --config=cityscapes_deeplab --workdir=runs/cs_deeplab_40k
    pne-jax train --config=cityscapes_deeplab:80k --workdir=runs/cs_deeplab_80k
    pne-jax train --config=cityscapes_deeplab --config.pne.enabled=False  # baseline

Hardware: one host with 8 GPUs/TPU cores (1 image each), or fewer with the same global batch.
Initialisation that reproduces the paper: MMCV's `open-mmlab://resnet101_v1c` (the official
PNE config's `pretrained`), `--config.model.pretrained=resnet101_v1c-e67eebb6.pth`; timm's
`resnet101c.gluon_in1k` (`pne-jax convert --arch=resnet101c`) is other weights, another
baseline. `--config.model.init_from=<MMSegmentation zoo .pth>` starts from a trained model.
Expected (single-scale val mIoU), baseline: MMSegmentation 77.12 (40k), 80.20 (80k).
With PNE: the paper's figure (arXiv 2207.01417); ours once measured, in the README.
"""

import ml_collections

from pne_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg)
    steps = 80_000 if options.get("80k") else 40_000
    return common.experiment(
        model_config=common.model(
            "resnet101_v1c", "aspp", common.CITYSCAPES_CLASSES, output_stride=8
        ),
        data_config=common.cityscapes(),
        optimizer=common.sgd_poly(learning_rate=0.01),
        train_config=common.train(steps=steps, global_batch_size=8),
    )
