"""Demo: a tiny ResNet-V1c + ASPP with PNE on the synthetic dataset, on a laptop CPU.

    pne-jax train --config=demo --workdir=runs/demo
    pne-jax train --config=demo --workdir=runs/demo_baseline --config.pne.enabled=False

Hardware: any CPU (2 cores: about 5 minutes). The synthetic set (no download) is prepared on
first use. Expected: validation mIoU in the README's demo table (with and without PNE).
"""

import ml_collections

from pne_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    data = common.data(
        "synthetic",
        base_size=(256, 128),
        crop_size=(128, 128),
        test_size=(256, 128),
        eval_pad_size=(128, 256),
        eval_label_pad_size=(128, 256),
        device_source_size=(128, 256),
    )
    data.options = dict(num_train=400, num_validation=100, height=128, width=256, seed=0)
    model = common.model(
        "resnet_tiny_v1c",
        "aspp",
        10,
        output_stride=8,
        channels=64,
        aspp_dilations=(1, 2, 4, 6),
        aux_head=dict(channels=32),
        projection=dict(enabled=True, hidden=64, out=32, feature="decode"),
    )
    train = common.train(steps=1200, global_batch_size=8)
    train.update(log_every=100, eval_every=600, checkpoint_every=600)
    return common.experiment(
        model_config=model,
        data_config=data,
        optimizer=common.sgd_poly(learning_rate=0.05),
        train_config=train,
        eval_batch=20,
    )
