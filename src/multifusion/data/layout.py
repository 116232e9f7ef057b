"""Find the labelled image files under a data root, and say what was passed over.

Two layouts:
- NFFA-style ``<root>/<Class>/**/*``: every top-level folder is a class;
- already split ``<root>/{train,val,test}/<Class>/**/*`` (any case), kept as given: used
  only when the split folders are ALL the top level holds. Split-named folders beside
  other folders are ambiguous (a class called ``Test``, or classes left outside the
  split?): :class:`LayoutError` names them and the two ways out.

Nothing usable is dropped silently: :class:`Scan` lists every passed-over path with the
reason: a file with another extension, an image outside any class folder, an empty class
folder, a broken symbolic link, a symbolic-link loop, an unreadable folder, a special
file. Hidden files and folders (``.git``, ``.ipynb_checkpoints``, ``.DS_Store``) are
ignored, as are non-image files at the top level (README, LICENSE). Symbolic links to
folders are followed unless they lead back into the walk.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from multifusion.core.errors import UserError
from multifusion.data.split import SPLITS

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


class LayoutError(UserError, ValueError):
    """A data root whose layout cannot be read one way only; the message names the folders."""


@dataclass
class Scan:
    """Labelled files found under a root, and what was passed over with the reason."""

    files: list[tuple[str, str, str | None]] = field(default_factory=list)  # (path, class, given split)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {path, reason}

    def skip(self, path: Path | str, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})


def link_problem(path: Path) -> str | None:
    """Why the symbolic link ``path`` cannot be followed, or None when its target exists."""
    try:
        os.stat(path)
        return None
    except OSError as err:
        target = os.readlink(path)
        if err.errno == errno.ELOOP:
            return f"symbolic link loop (-> {target}); remove the link"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"broken symbolic link: its target {target} does not exist; fix or remove the link"
        return f"unreadable symbolic link (-> {target}: {err.strerror})"


def entries(folder: Path, scan: Scan) -> list[os.DirEntry]:
    """The visible entries of ``folder`` by name; broken links and loops go to scan.skipped."""
    try:
        with os.scandir(folder) as it:
            found = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        scan.skip(folder, f"unreadable folder ({err.strerror}); check its permissions")
        return []
    usable = []
    for entry in found:
        problem = link_problem(Path(entry.path)) if entry.is_symlink() else None
        if problem:
            scan.skip(entry.path, problem)
        else:
            usable.append(entry)
    return usable


def _file(entry: os.DirEntry, scan: Scan, class_name: str, split: str | None) -> bool:
    """Record one file of a class folder; True when it is an image to decode."""
    path = Path(entry.path)
    if not entry.is_file():
        scan.skip(path, "not a regular file (a socket, pipe or device); remove it")
        return False
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        scan.skip(path, f"unsupported extension '{path.suffix}' (use one of {', '.join(IMAGE_EXTENSIONS)})")
        return False
    scan.files.append((str(path), class_name, split))
    return True


def walk_class(folder: Path, class_name: str, split: str | None, scan: Scan, ancestors: frozenset[str]) -> int:
    """Add the image files under a class folder (recursively, sorted by path) to ``scan``;
    ``ancestors``: real paths of the folders above, to stop at links leading back up.
    Returns how many image files were found."""
    found = 0
    for entry in entries(folder, scan):
        if not entry.is_dir():
            found += _file(entry, scan, class_name, split)
            continue
        real = os.path.realpath(entry.path)
        if any(a == real or a.startswith(real + os.sep) for a in ancestors):
            scan.skip(entry.path, f"symbolic link loop: leads back to {real}, a folder above it; remove the link")
            continue
        found += walk_class(Path(entry.path), class_name, split, scan, ancestors | {real})
    return found


def class_folders(folder: Path, scan: Scan) -> list[Path]:
    """The folders at the top of ``folder``; image files lying there are listed as skipped."""
    folders = []
    for entry in entries(folder, scan):
        if entry.is_dir():
            folders.append(Path(entry.path))
        elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            scan.skip(entry.path, f"image outside any class folder; move it into {folder}/<Class>/")
    return folders


def split_layout(root: Path, top: list[Path]) -> list[tuple[Path, str | None]]:
    """[(folder holding class folders, given split)]: the pre-split layout only when every
    top-level folder is a split; split-named folders beside others raise LayoutError."""
    split_dirs = [p for p in top if p.name.lower() in SPLITS]
    if not split_dirs:
        return [(root, None)]
    others = [p for p in top if p not in split_dirs]
    names = ", ".join(p.name for p in split_dirs)
    one = len(split_dirs) == 1
    if others:
        shown = ", ".join(p.name for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise LayoutError(
            f"{root}: the folder{'' if one else 's'} {names} {'names a split' if one else 'name splits'} (train/val/test) "
            f"but {'sits' if one else 'sit'} beside the folder(s) {shown}; either move every class folder under "
            f"train/ val/ test/ (<root>/<split>/<Class>/*), or, if {names} {'is a class, rename it' if one else 'are classes, rename them'} "
            f"(e.g. {split_dirs[0].name}_class)"
        )
    by_split: dict[str, list[Path]] = {}
    for p in split_dirs:
        by_split.setdefault(p.name.lower(), []).append(p)
    for split, folders in by_split.items():
        if len(folders) > 1:
            raise LayoutError(f"{root}: {', '.join(p.name for p in folders)} all name the {split} split; merge them into one")
    for needed in ("train", "test"):
        if needed not in by_split:
            raise LayoutError(f"{root}: split folders {names} but no {needed}/; a split layout needs train/ and test/ "
                              "(val/ is optional: it is carved from train), or put the class folders at the top level")
    return [(by_split[s][0], s) for s in SPLITS if s in by_split]


def scan_folder(root: str | Path) -> Scan:
    """Find ``<root>/<Class>/**/*`` or ``<root>/{train,val,test}/<Class>/**/*`` image files.

    Raises FileNotFoundError when root is missing, NotADirectoryError when it is a file,
    LayoutError when split folders sit beside other folders or a class of val/ or test/
    has no image in train/."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: data root is a file, not a folder; set data.root in params.yaml to the "
                                 "folder holding <Class>/ (or train/ val/ test/) sub-folders")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root does not exist; set data.root in params.yaml "
                                "(or run `dvc repro synthesize/dvc.yaml` for the default synthetic set)")
    scan = Scan()
    top = class_folders(root, scan)
    for folder, split in split_layout(root, top):
        for class_dir in top if split is None else class_folders(folder, scan):
            if walk_class(class_dir, class_dir.name, split, scan, frozenset({os.path.realpath(class_dir)})) == 0:
                scan.skip(class_dir, "empty class folder: no image files; add images or remove the folder")
    check_train_classes(root, [(c, s) for _, c, s in scan.files])
    return scan


def check_train_classes(root: Path | str, labelled: list[tuple[str, str | None]]) -> None:
    """In a split layout, every class of val/ or test/ must have images in train/: a class
    the model never sees in training would be scored all the same. ``labelled``: (class,
    given split) of each usable file. Raises LayoutError naming the classes."""
    given = {split for _, split in labelled}
    if given == {None} or not given:
        return
    trained = {c for c, split in labelled if split == "train"}
    missing: dict[str, set[str]] = {}
    for class_name, split in labelled:
        if split in ("val", "test") and class_name not in trained:
            missing.setdefault(class_name, set()).add(split)
    if missing:
        shown = ", ".join(f"{c} (in {'/'.join(sorted(s))})" for c, s in sorted(missing.items()))
        raise LayoutError(f"{root}: class(es) {shown} have no usable image in train/: the model would never learn them "
                          f"but be scored on them; add their images under {Path(root) / 'train'}/<Class>/, or remove "
                          "those folders from val/ and test/")


def check_data_root(root: str | Path) -> dict[str, object]:
    """The layout checks ``prepare`` makes before it writes, without decoding an image:
    the root is a folder, its layout is unambiguous, it holds image files of at least two
    classes, and every val/test class is in train/. Raises LayoutError (or the path errors
    of :func:`scan_folder`) with the same messages; returns a summary that depends only on
    the layout: ``{"root", "split_layout", "classes"}``."""
    scan = scan_folder(root)
    if not scan.files:
        raise LayoutError(f"{root}: no image files found in <root>/<Class>/ or <root>/{{train,val,test}}/<Class>/; "
                          "point data.root at a folder of class sub-folders")
    classes = sorted({c for _, c, _ in scan.files})
    if len(classes) < 2:
        raise LayoutError(f"{root}: only {len(classes)} class with image files ({', '.join(classes)}); "
                          "a classifier needs at least 2 class folders")
    return {"root": str(root), "split_layout": any(s for _, _, s in scan.files), "classes": classes}
