"""`python -m pne_jax COMMAND [flags]`: the same as the `pne-jax` console script."""

from pne_jax import cli

if __name__ == "__main__":
    cli.main()
