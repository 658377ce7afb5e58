"""UperNet-Swin + PNE on ADE20K (150 classes), 512x512 crops, batch 16, 160k steps.

    pne-jax train --config=ade20k_upernet_swin:tiny --workdir=runs/ade_swin_t
    pne-jax train --config=ade20k_upernet_swin:base --workdir=runs/ade_swin_b
    pne-jax train --config=ade20k_upernet_swin:tiny --config.pne.enabled=False

Hardware: one host with 8 GPUs/TPU cores (2 images each). Initialisation that reproduces
the paper: the original Swin release, `--config.model.pretrained=swin_tiny_patch4_window7_224.pth`
/ `swin_base_patch4_window12_384_22k.pth` (or timm's `--arch=swin_tiny_patch4_window7_224` /
`swin_base_patch4_window12_384`, the same weights). AdamW 6e-5, weight decay 0.01 (none on
norms and position tables), linear warm-up 1500 steps multiplying a poly decay over all
steps: MMSegmentation 0.x's schedule, which the paper (0.13) used; 1.x chains LinearLR and
then PolyLR from step 1500 instead.
Expected (single-scale val mIoU), baseline: MMSegmentation 44.41 (Swin-T, ImageNet-1K),
50.76 (Swin-B 384, ImageNet-22K). With PNE: the paper's figure; ours once measured.
"""

import ml_collections

from pne_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg)
    backbone = "swin_base" if options.get("base") else "swin_tiny"
    model = common.model(backbone, "uper", common.ADE20K_CLASSES, drop_path_rate=0.3)
    return common.experiment(
        model_config=model,
        data_config=common.ade20k(),
        optimizer=common.adamw_swin(),
        train_config=common.train(steps=160_000, global_batch_size=16),
    )
