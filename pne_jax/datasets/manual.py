"""Manual downloads: read a dataset's files from its zip, or from where the zip was extracted.

The real datasets need registration, so they are never downloaded here. A builder names the
archives it needs (`Archive`); `open_archives` finds each one in the manual dir, as the zip
itself or as an extracted copy, and reports every missing one at once with where to get it.
Files are read straight from the zip (no extraction, no second copy on disk).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path


class MissingManualFilesError(FileNotFoundError):
    """A manual download is missing: the message names each file, the folder and the URL."""


class BadSourceFileError(ValueError):
    """A source file is unreadable or holds unexpected content; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Archive:
    """One manual download.

    zip_name: the file as downloaded, e.g. "gtFine_trainvaltest.zip".
    inner: the folder at the top of the zip that holds the data ("" = the zip's root).
    extracted: folders, relative to the manual dir, where an extracted copy of `inner` may be.
    probe: a folder inside `inner` that must exist in an extracted copy for it to count, and
        `probe_suffix`, if set, a file ending that must occur directly inside that folder.
    """

    zip_name: str
    inner: str
    extracted: tuple[str, ...]
    probe: str = ""
    probe_suffix: str | None = None

    def describe(self) -> str:
        folders = " or ".join(f"{f or '.'}/" for f in self.extracted)
        return f"{self.zip_name}, or its extracted folder {folders}"


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """A file inside an opened archive; `str()` says where it is, for error messages."""

    tree: ArchiveTree
    path: str  # relative to the archive's `inner` folder, with "/" separators

    def read_bytes(self) -> bytes:
        return self.tree.read(self.path)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def __str__(self) -> str:
        return self.tree.where(self.path)


class ArchiveTree:
    """The files of one archive, from the zip or from an extracted folder."""

    def __init__(self, archive: Archive, location: Path, is_zip: bool):
        self.archive = archive
        self.location = location
        self.is_zip = is_zip
        self._lock = threading.Lock()
        self._zip: zipfile.ZipFile | None = None
        self._names: list[str] | None = None
        if is_zip:
            try:
                self._zip = zipfile.ZipFile(location)
                names = self._zip.namelist()
            except (zipfile.BadZipFile, OSError) as e:
                raise BadSourceFileError(
                    f"{location} is not a readable zip file ({e}); download it again"
                ) from e
            prefix = f"{archive.inner}/" if archive.inner else ""
            self._names = sorted(
                n[len(prefix) :] for n in names if n.startswith(prefix) and not n.endswith("/")
            )
            if not self._names:
                raise BadSourceFileError(
                    f"{location} has no folder {archive.inner}/ at its top; "
                    f"is it the right file ({archive.zip_name})?"
                )

    def files(self, under: str, suffix: str) -> list[SourceFile]:
        """Files below folder `under` (recursively) whose names end with `suffix`, sorted."""
        under = under.strip("/")
        if self._names is not None:
            prefix = f"{under}/" if under else ""
            found = [n for n in self._names if n.startswith(prefix) and n.endswith(suffix)]
        else:
            root = self.location / under
            found = []
            for folder, _, names in os.walk(root):
                rel = Path(folder).relative_to(self.location).as_posix()
                rel = "" if rel == "." else f"{rel}/"
                found += [rel + n for n in names if n.endswith(suffix)]
            found.sort()
        return [SourceFile(self, n) for n in found]

    def read(self, path: str) -> bytes:
        if self._zip is None:
            try:
                return (self.location / path).read_bytes()
            except OSError as e:
                raise BadSourceFileError(f"cannot read {self.where(path)}: {e}") from e
        member = f"{self.archive.inner}/{path}" if self.archive.inner else path
        try:
            # ZipFile serialises access to its file object; the lock keeps the seeks simple.
            with self._lock:
                return self._zip.read(member)
        except (zipfile.BadZipFile, OSError, KeyError) as e:
            raise BadSourceFileError(f"cannot read {self.where(path)}: {e}") from e

    def where(self, path: str) -> str:
        if self.is_zip:
            member = f"{self.archive.inner}/{path}" if self.archive.inner else path
            return f"{self.location}:{member}"
        return str(self.location / path)

    def __repr__(self) -> str:
        return f"ArchiveTree({self.location})"


def _extracted_copy(manual_dir: Path, archive: Archive) -> Path | None:
    for folder in archive.extracted:
        root = manual_dir / folder
        probe = root / archive.probe
        if not probe.is_dir():
            continue
        if archive.probe_suffix is None:
            return root
        with os.scandir(probe) as entries:
            if any(e.name.endswith(archive.probe_suffix) for e in entries):
                return root
    return None


def open_archives(
    manual_dir: str | os.PathLike,
    archives: Sequence[Archive],
    *,
    dataset: str,
    instructions: str,
) -> list[ArchiveTree]:
    """Opens every archive (the zip if present, else an extracted copy), or raises one
    `MissingManualFilesError` that names each missing archive, the folder searched and
    `instructions` (where to obtain them)."""
    manual = Path(manual_dir).expanduser()
    trees: list[ArchiveTree] = []
    missing: list[Archive] = []
    for archive in archives:
        zip_path = manual / archive.zip_name
        if zip_path.is_file():
            trees.append(ArchiveTree(archive, zip_path, is_zip=True))
        elif (root := _extracted_copy(manual, archive)) is not None:
            trees.append(ArchiveTree(archive, root, is_zip=False))
        else:
            missing.append(archive)
    if missing:
        lines = "\n".join(f"  - {a.describe()}" for a in missing)
        state = "" if manual.is_dir() else " (the folder does not exist)"
        raise MissingManualFilesError(
            f"{dataset}: missing manual download(s) in {manual}{state}:\n{lines}\n"
            f"{instructions.strip()}\nPut the zip files (or their extracted folders) there, or\n"
            "point --manual_dir (Python: manual_dir=) at the folder that holds them."
        )
    return trees
