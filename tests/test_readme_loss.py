"""The python blocks of the README's "## Using the loss" section run as written, in order."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the loss"
SUBSECTIONS = ("### Per-image statistics, your own reduction", "### Sharded batches")


def section_blocks(text: str, heading: str) -> list[tuple[int, str, str]]:
    """(line number, subsection heading, code) of each ```python block under `heading`.

    The section runs from its heading to the next heading of the same or a higher level;
    fences may be indented (a block inside a list item) and are dedented.
    """
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == heading]
    if len(starts) != 1:
        raise AssertionError(f"README.md has {len(starts)} {heading!r} headings, expected 1")
    blocks, current, code, first = [], heading, None, 0
    for i in range(starts[0] + 1, len(lines)):
        line = lines[i]
        stripped = line.strip()
        if code is None and line.startswith("#"):
            hashes = len(line) - len(line.lstrip("#"))
            if line[hashes : hashes + 1] == " " and hashes <= level:
                break
            current = line.rstrip()
        elif code is None and stripped.startswith("```python"):
            code, first = [], i + 2  # 1-based number of the block's first line
        elif code is not None and stripped == "```":
            blocks.append((first, current, textwrap.dedent("\n".join(code))))
            code = None
        elif code is not None:
            code.append(line)
    if code is not None:
        raise AssertionError(f"unclosed ```python block at README.md line {first - 1}")
    return blocks


def test_section_blocks_finds_fences_and_stops_at_the_next_section():
    text = textwrap.dedent(
        """\
        ## Using the loss
        ```python
        a = 1
        ```
        - item:
          ```python
          b = a + 1
          ```
        ### Sub
        ```python
        # a comment, not a heading
        c = b
        ```
        ```bash
        echo skipped
        ```
        ## Next
        ```python
        raise SystemExit
        ```
        """
    )
    blocks = section_blocks(text, "## Using the loss")
    assert [(n, h) for n, h, _ in blocks] == [
        (3, "## Using the loss"),
        (7, "## Using the loss"),
        (11, "### Sub"),
    ]
    assert [code for *_, code in blocks] == [
        "a = 1",
        "b = a + 1",
        "# a comment, not a heading\nc = b",
    ]


def test_readme_loss_blocks_run():
    blocks = section_blocks(README.read_text(encoding="utf-8"), SECTION)
    assert blocks, f"no ```python blocks under {SECTION!r} in README.md"
    for heading in (SECTION, *SUBSECTIONS):
        assert any(h == heading for _, h, _ in blocks), f"no ```python block under {heading!r}"
    namespace: dict = {"__name__": "readme"}
    for line, heading, code in blocks:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(
                f"the README block at line {line} ({heading}) raised {error!r}:\n{code}",
                pytrace=True,
            )
