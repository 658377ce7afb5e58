"""Checkpoint manifests: each file's size and CRC-32, written when a step is committed and
compared on every read, so changed, truncated or missing files are found before orbax
reads them. Pure comparisons at the core (`manifest_problems`), file walking at the edge.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

MANIFEST = "pne_jax_manifest.json"
# Files every complete step holds (orbax's metadata of the state and of the config).
REQUIRED_FILES = ("state/_METADATA", "config/metadata")
_CHUNK = 1 << 20


def one_line(error: BaseException, limit: int = 300) -> str:
    """The cause of `error` in one line: the innermost OSError of its chain if any (its
    errno and text), else its type and the first line of its message."""
    seen, chain = set(), error
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, OSError):
            return _first_line(str(chain), limit)
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return _first_line(f"{type(error).__name__}: {error}", limit)


def _first_line(text: str, limit: int) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), text.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_IO_TEXT = re.compile(
    r"errno|os error|no space left|read-only file system|permission denied|not a directory",
    re.IGNORECASE,
)


def is_io_error(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is an I/O failure: an OSError, or
    a library error (tensorstore's ValueErrors) whose message quotes one."""
    seen, chain = set(), error
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, OSError) or _IO_TEXT.search(str(chain)):
            return True
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return False


def file_crc32(path: str) -> int:
    """CRC-32 of the file at `path`, read in 1 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def step_file_sizes(step_dir: str) -> dict[str, int]:
    """{relative path: size} of every file under `step_dir` but the manifest (and its
    temporary file), with '/' separators."""
    sizes = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir).replace(os.sep, "/")
            if not rel.startswith(MANIFEST):
                sizes[rel] = os.path.getsize(path)
    return sizes


def build_manifest(step_dir: str) -> dict[str, Any]:
    """{'format': 1, 'files': {path: {'size', 'crc32'}}} of the files of `step_dir`."""
    files = {
        rel: {"size": size, "crc32": file_crc32(os.path.join(step_dir, rel))}
        for rel, size in sorted(step_file_sizes(step_dir).items())
    }
    return {"format": 1, "files": files}


def write_manifest(step_dir: str) -> None:
    """Writes `step_dir`'s manifest atomically (a temporary file renamed into place)."""
    manifest = build_manifest(step_dir)
    path = os.path.join(step_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def manifest_problems(
    listed: Mapping[str, Mapping[str, int]],
    sizes: Mapping[str, int],
    crc32: Callable[[str], int],
) -> list[str]:
    """One line per file whose presence, size or checksum differs from the manifest
    (`listed`: path -> {'size', 'crc32'}; `sizes`: the files found; `crc32`: the checksum
    of a found file, only asked for when the sizes agree), sorted by path."""
    problems = []
    for rel in sorted(set(listed) | set(sizes)):
        if rel not in sizes:
            problems.append(f"{rel}: missing ({listed[rel]['size']} bytes in the manifest)")
        elif rel not in listed:
            problems.append(f"{rel}: {sizes[rel]} bytes, not in the manifest")
        elif sizes[rel] != listed[rel]["size"]:
            problems.append(f"{rel}: {sizes[rel]} bytes, manifest says {listed[rel]['size']}")
        elif crc32(rel) != listed[rel]["crc32"]:
            problems.append(f"{rel}: contents differ from the manifest (same size, other bytes)")
    return problems


def step_damage(step_dir: str) -> tuple[str | None, bool]:
    """(why the step in `step_dir` is damaged, or None; whether it has a manifest)."""
    if not os.path.isdir(step_dir):
        return "the step folder is missing", False
    sizes = step_file_sizes(step_dir)
    if not sizes:
        return "the step folder is empty", False
    problems: list[str] = []
    manifest_path = os.path.join(step_dir, MANIFEST)
    has_manifest = os.path.exists(manifest_path)
    if has_manifest:
        try:
            with open(manifest_path) as f:
                listed = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{MANIFEST}: unreadable ({one_line(e)})", True
        problems = manifest_problems(
            listed, sizes, lambda rel: file_crc32(os.path.join(step_dir, rel))
        )
    named = {line.split(":")[0] for line in problems}
    problems = [
        f"{rel}: missing (orbax metadata)"
        for rel in REQUIRED_FILES
        if rel not in sizes and rel not in named
    ] + problems
    if not problems:
        return None, has_manifest
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more, has_manifest
