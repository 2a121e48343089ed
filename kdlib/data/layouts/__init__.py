"""Data-set layouts: one file each in this package, registered by name in :data:`LAYOUTS`.

A layout reads a data set as it is distributed, from ``root``, and returns a
:class:`LayoutScan`: class names and one :class:`ScannedImage` per image, whose ``split`` is the
data set's official one (``train`` / ``val`` / ``test``) or ``None`` where it defines none.
Readers are called as ``reader(root, staging=..., **options)``: layouts whose images are packed
(MNIST idx, CIFAR pickles) write them as image files under ``staging`` and return a scan rooted
there; file-based layouts ignore it. A layout declares, when it registers, its ``task``
(``multiclass`` or ``multilabel``: known before any file is read) and whether it draws a
subset itself (``seeded``: then it takes the data split seed as ``seed``), and what marks its
root (``root_marker``: paths that exist under the root, so :func:`find_layout_root` can find it
inside an extracted archive). Every module in this package is imported on first use of the
package, so adding a layout is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdlib.registry import Registry


@dataclass(frozen=True)
class ScannedImage:
    path: str  # relative to the scan's root, with forward slashes
    label: int  # class index; -1 for multi-label data sets
    split: str | None
    positives: tuple[int, ...] = ()  # multi-label: classes present in the image
    difficult: tuple[int, ...] = ()  # multi-label: classes present only as "difficult" objects
    #                                  (VOC): positive for training, ignored when scoring AP


@dataclass
class LayoutScan:
    root: Path
    classes: list[str]
    images: list[ScannedImage]
    task: str = "multiclass"  # or "multilabel"
    stored_size: int | None = None  # side of every image when all are square and equal (MNIST,
    #                                 CIFAR): then nothing needs resizing to that size


def require_root(root: Path | str, layout: str) -> Path:
    """``Path(root)`` when it is a directory, else FileNotFoundError naming the layout and path."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{layout} root {str(path)!r} is not a directory")
    return path


LayoutReader = Callable[..., LayoutScan]
LAYOUTS: Registry[LayoutReader] = Registry("dataset layout")


OptionsCheck = Callable[[dict], "list[tuple[str, str]]"]


def register_layout(name: str, *, task: str = "multiclass", seeded: bool = False,
                    check_options: OptionsCheck | None = None,
                    root_marker: tuple[str, ...] = ()) -> Callable[[LayoutReader], LayoutReader]:
    """Register a reader as layout ``name`` (see the module docstring for ``task`` and ``seeded``).
    ``check_options`` returns ``(option, "expected ...")`` per bad value among the reader's options,
    so a data-set preset is checked before any file is read. ``root_marker``: ``/``-separated
    relative paths (files or folders) that all exist under a root of this layout and rarely
    together elsewhere (``("images.txt", "images")`` for CUB); ``()``: none."""
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"layout {name!r}: task must be multiclass or multilabel, got {task!r}")
    bad = [m for m in root_marker if not m or m.startswith("/") or ".." in m.split("/")]
    if isinstance(root_marker, str) or bad:
        raise ValueError(f"layout {name!r}: root_marker must be a tuple of relative paths, got {root_marker!r}")

    def decorator(reader: LayoutReader) -> LayoutReader:
        reader.task = task  # type: ignore[attr-defined]
        reader.seeded = seeded  # type: ignore[attr-defined]
        reader.check_options = check_options  # type: ignore[attr-defined]
        reader.root_marker = tuple(root_marker)  # type: ignore[attr-defined]
        return LAYOUTS.register(name)(reader)

    return decorator


def option_problems(name: str, options: dict) -> list[tuple[str, str]]:
    """What is wrong with ``options`` for layout ``name``: keys its reader does not take (the
    split seed of a seeded layout is the run's, not an option), then the layout's own checks."""
    import inspect

    reader = LAYOUTS.get(name)
    taken = [p for p in inspect.signature(reader).parameters if p not in ("root", "staging")
             and not (p == "seed" and reader.seeded)]  # type: ignore[attr-defined]
    unknown = [k for k in options if k not in taken]
    if unknown:
        return [(k, f"unknown option of the {name} layout; it takes: {', '.join(taken) or 'none'}") for k in unknown]
    return reader.check_options(options) if reader.check_options else []  # type: ignore[attr-defined]


ROOT_SEARCH_DEPTH = 4  # real archives put the root at depth 0 to 2 (VOCdevkit/VOC2007)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def describe_tree(tree: Path, levels: int = 2, limit: int = 12) -> str:
    """The visible entries of ``tree``'s top ``levels`` levels, e.g. ``a/ (b/, c.txt), d.txt``;
    at most ``limit`` per folder."""
    def entries(folder: Path, level: int) -> str:
        try:
            children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except OSError:
            return ""
        shown = []
        for child in children[:limit]:
            if child.is_dir() and not child.is_symlink():
                inner = entries(child, level + 1) if level + 1 < levels else ""
                shown.append(f"{child.name}/" + (f" ({inner})" if inner else ""))
            else:
                shown.append(child.name)
        if len(children) > limit:
            shown.append(f"... {len(children) - limit} more")
        return ", ".join(shown)

    return entries(Path(tree), 0) or "nothing"


def find_layout_root(layout: str, tree: Path, subdir: str = "") -> Path:
    """Where the root of a ``layout`` data set lies in the extracted ``tree``.

    ``subdir`` (a preset's ``archive_subdir``) names it explicitly: ``tree/subdir``, which must
    be a folder. Otherwise, for a layout with a ``root_marker``, the shallowest folder (``tree``
    itself or one at most :data:`ROOT_SEARCH_DEPTH` levels down; hidden and linked folders are
    not searched) under which every marker path exists; for one without, the one folder ``tree``
    holds when it holds nothing else visible, else ``tree``. Raises ``FileNotFoundError`` listing
    what the tree's top levels hold when no folder (or the ``subdir``) is found, and
    ``ValueError`` listing them when several folders at the same depth qualify.
    """
    tree = Path(tree)
    if subdir:
        root = tree / subdir
        if not root.is_dir():
            raise FileNotFoundError(
                f"archive_subdir = {subdir!r}: {root} is not a folder of the extracted archive {tree}; "
                f"expected the {layout} root's path inside it. Its top levels hold: {describe_tree(tree)}"
            )
        return root
    marker: tuple[str, ...] = LAYOUTS.get(layout).root_marker  # type: ignore[attr-defined]
    if not marker:
        visible = [p for p in tree.iterdir() if not p.name.startswith(".")]
        if len(visible) == 1 and visible[0].is_dir() and not visible[0].is_symlink():
            return visible[0]
        return tree
    level = [tree]
    for _ in range(ROOT_SEARCH_DEPTH + 1):
        found = [folder for folder in level if all((folder / m).exists() for m in marker)]
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(
                f"{tree}: several folders hold the {layout} root's {', '.join(marker)}: "
                f"{', '.join(str(f.relative_to(tree)) for f in found)}; set archive_subdir to the one to read"
            )
        level = [child for folder in level for child in _visible_dirs(folder)]
        if not level:
            break
    raise FileNotFoundError(
        f"{tree}: no folder in the extracted archive (to depth {ROOT_SEARCH_DEPTH}) holds "
        f"{', '.join(marker)}, which mark a {layout} root. Its top levels hold: {describe_tree(tree)}. "
        "Set archive_subdir to the root's path inside the archive, or check that every archive of the "
        "data set is listed (and extracted `into` the right folder)"
    )


def layout_task(name: str) -> str:
    """``multiclass`` or ``multilabel``: the task of registered layout ``name``."""
    return LAYOUTS.get(name).task  # type: ignore[attr-defined]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
