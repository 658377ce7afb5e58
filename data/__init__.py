"""Where a checkout prepares its data: `python -m data.prepare` (the same as `pne-jax prepare`).

The dataset builders, label tables and palettes live in the package (`pne_jax/datasets/`), so
that a pip install has them too; README.md ("Data") lists each dataset's downloads.
"""
