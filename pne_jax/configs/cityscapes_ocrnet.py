"""OCRNet-HRNetV2-W48 + PNE on Cityscapes, 512x1024 crops, batch 8 (cascade: FCN stage as aux).

    pne-jax train --config=cityscapes_ocrnet --workdir=runs/cs_ocrnet_40k
    pne-jax train --config=cityscapes_ocrnet:80k     # or :160k
    pne-jax train --config=cityscapes_ocrnet --config.pne.enabled=False  # baseline

Hardware: one host with 8 GPUs/TPU cores. Initialisation that reproduces the
paper: `open-mmlab://msra/hrnetv2_w48` (`--config.model.pretrained=hrnetv2_w48-d2186c55.pth`;
timm's hrnet_w48 holds the same release).
Expected (single-scale val mIoU), baseline: MMSegmentation 80.58 (40k), 80.70 (80k), 81.35
(160k). With PNE: the paper's figure; ours once measured.
"""

import ml_collections

from pne_jax.configs import common

STEPS = {"40k": 40_000, "80k": 80_000, "160k": 160_000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg)
    steps = next((v for k, v in STEPS.items() if options.get(k)), 40_000)
    return common.experiment(
        model_config=common.model("hrnetv2_w48", "ocr", common.CITYSCAPES_CLASSES),
        data_config=common.cityscapes(),
        optimizer=common.sgd_poly(learning_rate=0.01),
        train_config=common.train(steps=steps, global_batch_size=8),
    )
