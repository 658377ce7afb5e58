"""notebooks/quickstart.ipynb runs top to bottom (opt-in: `pytest -m parity`).

It needs nbclient, nbformat and ipykernel (requirements-bench.txt) and about two minutes on
2 CPU cores, so it shares the opt-in `parity` marker rather than slowing the default suite.
The notebook's parameter cell is replaced by tiny settings: 2 training steps on a 16-image
synthetic set with 64x64 crops, no install.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


@pytest.mark.parity
def test_quickstart_runs_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and nb.cells.index(params[0]) <= 1, "parameters come first"
    workdir = tmp_path / "run"
    tiny = f"""
STEPS = 2
WORKDIR = {str(workdir)!r}
DATA_DIR = {str(tmp_path / "tfds")!r}
INSTALL = False
REPO_URL = "unused"
NUM_SHOWN = 2
OVERRIDES = {{
    "data.crop_size": (64, 64),
    "data.num_workers": 0,
    "data.options.num_train": 16,
    "data.options.num_validation": 4,
    "eval.global_batch_size": 4,
}}
"""
    # The test sets every parameter the notebook has, and no other.
    assert _assigned_names(tiny) == _assigned_names(params[0].source)
    params[0].source = tiny
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "CpuDevice" in text or "cpu" in text.lower()
    assert "validation mIoU after 2 steps" in text
    assert "mIoU" in text and "step 2:" in text  # evaluate_checkpoint's summary line
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "one figure: predictions next to the ground truth"
    assert sorted(os.listdir(workdir / "predictions")) == [
        f"validation_{i:04d}{suffix}.png" for i in range(2) for suffix in ("", "_color", "_overlay")
    ]
