"""The demo with and without PNE over several seeds: mean and spread of the validation mIoU,
and the learning curves of every run (docs/demo_seeds.png).

    python -m benchmarks.demo_seeds              # 5 seeds x (PNE, no PNE), ~2 h on 2 cores
    python -m benchmarks.demo_seeds --plot_only  # table and figure from finished runs
    python -m benchmarks.demo_seeds --seeds=2 --steps=60 --eval_every=30 --root=/tmp/s

Seed s sets `config.seed` (initialisation, dropout) and `config.data.seed` (order and
augmentation) to s. Each run is `pne-jax train --config=demo` in `<root>/<pne|base>_s<s>`,
evaluating every `--eval_every` steps; a finished run is not trained again (a killed one
resumes), so the command can be repeated. The table and the curves are read from the runs'
`metrics.jsonl` alone. The figure needs matplotlib (requirements-bench.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUNS = (("pne", True), ("base", False))


def run_dir(root: str, kind: str, seed: int) -> str:
    return os.path.join(root, f"{kind}_s{seed}")


def eval_curve(workdir: str) -> dict[int, float]:
    """{step: validation mIoU in percent} from a run's metrics.jsonl (empty if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: 100 * r["eval/miou"] for r in records if "eval/miou" in r}


def train(root: str, kind: str, pne: bool, seed: int, args: argparse.Namespace) -> None:
    workdir = run_dir(root, kind, seed)
    if args.steps in eval_curve(workdir):
        print(f"{workdir}: finished", flush=True)
        return
    command = [sys.executable, "-m", "pne_jax", "train", "--config=demo", f"--workdir={workdir}"]
    command += [f"--config.seed={seed}", f"--config.data.seed={seed}"]
    command += [f"--config.pne.enabled={pne}", f"--config.train.steps={args.steps}"]
    command += [f"--config.train.eval_every={args.eval_every}"]
    command += [f"--config.train.checkpoint_every={args.eval_every}", *args.overrides]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def summary(root: str, seeds: int, steps: int) -> str:
    """A markdown table: each kind's final mIoU per seed, mean and standard deviation."""
    rows = ["| run | " + " | ".join(f"seed {s}" for s in range(seeds)) + " | mean | std |"]
    rows.append("|---" * (seeds + 3) + "|")
    for kind, pne in RUNS:
        finals = [eval_curve(run_dir(root, kind, s)).get(steps) for s in range(seeds)]
        done = [v for v in finals if v is not None]
        mean = f"{statistics.mean(done):.2f}" if done else "-"
        std = f"{statistics.stdev(done):.2f}" if len(done) > 1 else "-"
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in finals)
        rows.append(f"| {'with PNE' if pne else 'without PNE'} | {cells} | {mean} | {std} |")
    return "\n".join(rows)


def plot(root: str, seeds: int, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for (kind, pne), colour in zip(RUNS, ("tab:red", "tab:blue"), strict=True):
        for s in range(seeds):
            curve = sorted(eval_curve(run_dir(root, kind, s)).items())
            if curve:
                label = ("with PNE" if pne else "without PNE") if s == 0 else None
                ax.plot(*zip(*curve, strict=True), color=colour, alpha=0.7, marker=".", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation mIoU (%)")
    ax.set_title(f"Demo (configs/demo.py), {seeds} seeds each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1200, help="the demo's train.steps")
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--root", default="runs/demo_seeds")
    parser.add_argument("--figure", default="docs/demo_seeds.png")
    parser.add_argument("--plot_only", action="store_true")
    args, args.overrides = parser.parse_known_args(argv)  # --config.x=y: for every run
    if not args.plot_only:
        for seed in range(args.seeds):
            for kind, pne in RUNS:
                train(args.root, kind, pne, seed, args)
    print(summary(args.root, args.seeds, args.steps))
    plot(args.root, args.seeds, args.figure)


if __name__ == "__main__":
    main()
