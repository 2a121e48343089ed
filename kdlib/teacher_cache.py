"""The teacher-output cache: the teacher run once over ``K`` replayable views of every training image.

Distillation with a frozen teacher spends most of its time in the teacher's forward pass, and
that pass gives the same answer every epoch for the same input. The cache runs it once, over
``K`` augmented views of each of the ``N`` training images, and stores what distillation needs:

* the logits, ``(N, K, C)`` float32 exactly, or top-k compressed when classes are many
  (below);
* the pooled penultimate features ``(N, K, D)`` in float16, for feature-mimicking methods;
* the outputs of the teacher layers a feature-map method reads (FitNet, AT, ...: its
  :class:`~kdlib.taps.LayerPlan`), one ``(N, K, *shape)`` float16 table per layer, in the order
  the method reads them (``"pre_logits"`` included: ``forward_head(pre_logits=True)``). They
  are often far larger than the logits, ``N × K × Σ numel × 2`` bytes
  (:func:`layer_table_bytes`), so the caller decides up front whether they fit; when they do
  not, the cache directory holds a marker saying why (:func:`save_skipped`) and distillation
  runs the teacher online;
* optionally the LSH bias of :mod:`kdlib.losses.lsh` (its weights are rebuilt from a seed);
* the ``(N, K)`` view seeds that rebuild every view (:mod:`kdlib.data.views`).

**Why views, not images.** Caching by image index alone while the student trains on fresh
augmentations pairs the student's view with the teacher's answer for *another* view (stale
targets; torchdistill's cache does this). Here a view is a pure function of its seed, so the
distillation loop trains on exactly the views the cache holds, view ``(e − 1) mod K`` in epoch
``e`` (FKD, Shen & Xing, ECCV 2022, replays stored crop boxes and flips the same way; a seed
rebuilds every parameter of any preset, RandAugment included). :func:`build_teacher_cache`
runs the very pipeline the training loop runs per batch, so the cached output belongs to the
tensor the student sees::

    uint8 view (per-image transform under seeds[i, k])
      → train_set.batch_transform(batch, seeds of the batch)   (may be None)
      → normalizer                                              (BatchNormalizer)
      → teacher                                                 (OnlineTeacher: renorm, resize)

MixUp/CutMix mix images across the batch, so the teacher must see the mixed batch: such runs
cannot use a cache (the stage refuses them).

**Top-k compression ("marginal smoothing", FKD).** With many classes most of the ``C`` logits
carry little information. For each view the ``k`` largest logits ``z_j, j ∈ S`` are kept, and
the other ``C − k`` share one *fill* value chosen so that, at temperature 1, the tail keeps
exactly its softmax mass::

    fill = log( Σ_{j∉S} e^{z_j} / (C − k) ) = logsumexp_{j∉S}(z_j) − log(C − k)

so ``(C − k)·e^{fill} = Σ_{j∉S} e^{z_j}`` and the expanded logits ``ẑ`` (``ẑ_j = z_j`` on
``S``, ``fill`` elsewhere) give ``softmax(ẑ)_j = softmax(z)_j`` for every ``j ∈ S`` and the same
total tail mass. The log-sum-exp is computed with the maximum subtracted (``torch.logsumexp``),
so nothing overflows. At a temperature ``T ≠ 1`` the match is approximate: for ``T > 1`` a
uniform tail holds *at least* the true tail mass (power-mean inequality), i.e. slightly softer
targets. Compression is for softmax objectives; multi-label (sigmoid) distillation reads each
logit on its own and needs exact logits (``topk=None``).

Top-k values are stored as **float16** (indices as int16 when ``C < 32768``, else int32; the
fill, one per view, as float32). The soft targets depend only on logit differences, and
float16 rounds a logit ``z`` by at most ``|z|·2⁻¹¹`` (≤ 0.01 for ``|z| ≤ 20``), i.e. each
teacher probability by ≤ 1 % relative and the KL term by a second-order amount, far below
the variation between augmented views; in exchange the dominant storage term is halved
(4 instead of 6 bytes per kept class with its index), as FKD stores its soft labels in half
precision. Exact logits, used when ``k`` is not smaller than ``C``, stay float32: they are the
small-``C`` case, where storage is cheap and some methods read raw logits. Features and
layer outputs are float16 for the same reason as top-k values (activations are O(1), and each
is rounded by at most 2⁻¹¹ relative; a value beyond float16's range is refused, never clipped).
The teacher is frozen and in eval mode, so a layer's output is a pure function of the view, as
the logits are.

**The key.** A cache is valid only for the teacher checkpoint, training data, student
transform, number of views and seed it was built with, and (when it holds layers) for the
teacher layer paths it tapped. :func:`cache_key` condenses them into strings, stored in
``cache.json``; :meth:`TeacherCache.load` with ``expected_key`` compares
them component by component and raises :class:`CacheMismatch` naming every difference.

On disk a cache is a directory: ``teacher_outputs.pt`` (``torch.save`` of a dict of tensors,
loaded with ``weights_only=True`` and memory-mapped) and ``cache.json`` (key, shapes, dtypes,
compression, sizes; human-readable). :meth:`TeacherCache.save` writes it atomically.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from kdlib.data.views import AugmentedViews
from kdlib.losses.registry import TeacherOutput
from kdlib.teacher import OnlineTeacher

TENSORS_FILE = "teacher_outputs.pt"
META_FILE = "cache.json"
FORMAT_VERSION = 1
KEY_COMPONENTS = ("teacher", "data", "transform", "views", "seed")
LAYERS_KEY = "layers"  # a key component only when layers are cached: older caches' keys stay valid
LSH_META_KEYS = ("num_hyperplanes", "sigma", "seed", "bias_mode")
TOPK_VALUE_DTYPE = torch.float16  # see the module docstring for why half precision
FEATURE_DTYPE = torch.float16
LAYER_DTYPE = torch.float16
_FP16_MAX = float(torch.finfo(torch.float16).max)
REBUILD_HINT = "rebuild it (dvc repro teacher_cache)"


class CacheMismatch(ValueError):
    """The cache was built for another teacher, data set, transform, view count, seed or teacher layers."""


# --------------------------------------------------------------------------------------- key

def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB chunks); a missing file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path} for the teacher-cache key: no such file")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the files' bytes in the given order, each prefixed by its length, so that
    moving bytes from one file to the next changes the digest (plain concatenation would not).
    File names are not hashed: the same content at another path is the same data."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot hash {path} for the teacher-cache key: no such file")
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: equal dicts give equal strings (tuples become lists)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(teacher_checkpoint: Path, data_files: Sequence[Path], transform: dict[str, Any],
              num_views: int, seed: int, layers: Sequence[str] = ()) -> dict[str, str]:
    """What a cache is valid for, as strings compared component by component on load.

    * ``teacher``: sha256 of the teacher checkpoint's bytes (weights and metadata);
    * ``data``: sha256 over ``data_files`` (e.g. the prepared ``index.csv`` and
      ``dataset.json``: paths, labels, splits and per-image md5s), see :func:`files_sha256`;
    * ``transform``: canonical JSON of the student's training transform (preset name,
      options, input size, mean/std, ...): what turns a seed into the tensor the teacher saw;
    * ``views``: ``K``; ``seed``: the seed of the view-seed table
      (:func:`kdlib.data.views.make_view_seeds`);
    * ``layers``: the teacher layer paths whose outputs are cached, in order, each once (JSON),
      only when there are some.
    """
    if not data_files:
        raise ValueError("cache_key needs at least one data file (e.g. index.csv and dataset.json)")
    key = {
        "teacher": file_sha256(teacher_checkpoint),
        "data": files_sha256(data_files),
        "transform": canonical_json(transform),
        "views": str(int(num_views)),
        "seed": str(int(seed)),
    }
    if layers:
        key[LAYERS_KEY] = canonical_json(distinct(layers))
    return key


def _short(value: str | None) -> str:
    if value is None:
        return "(none)"
    return value[:12] + "…" if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value


def _transform_difference(built: str, used: str) -> str:
    """The top-level entries two transform JSONs disagree on (both values), or ''."""
    try:
        a, b = json.loads(built), json.loads(used)
    except ValueError:
        return ""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ""
    def shown(d: dict[str, Any], k: str) -> str:
        return json.dumps(d[k]) if k in d else "(absent)"

    diffs = [f"{k}: {shown(a, k)} → {shown(b, k)}" for k in sorted(set(a) | set(b))
             if k not in a or k not in b or a[k] != b[k]]
    return " (" + "; ".join(diffs) + ")" if diffs else ""


def check_key(directory: Path, built: Mapping[str, str], expected: Mapping[str, str]) -> None:
    """Raise :class:`CacheMismatch` naming every component where ``built`` (stored in the cache)
    differs from ``expected`` (what distillation uses), with both values."""
    problems = []
    for name in list(KEY_COMPONENTS) + sorted((set(built) | set(expected)) - set(KEY_COMPONENTS)):
        if name not in built and name not in expected:
            continue
        have, want = built.get(name), expected.get(name)
        if have == want:
            continue
        what = {"teacher": "teacher sha256", "data": "data sha256", "transform": "transform",
                "views": "number of views", "seed": "view seed", LAYERS_KEY: "teacher layers"}.get(name, name)
        line = f"{what} {_short(have)} but distillation uses {_short(want)}"
        if name == LAYERS_KEY:  # DVC reruns teacher_cache for the method's name, not for its (layer) knobs
            line += (" (the method's layer knobs changed, and DVC reruns teacher_cache for them only when forced: "
                     "dvc repro -f -s teacher_cache)")
        if name == "transform" and have is not None and want is not None:
            line += _transform_difference(have, want)
        problems.append(line)
    if problems:
        raise CacheMismatch(f"teacher-output cache {directory} was built for " + "; for ".join(problems)
                            + f"; {REBUILD_HINT}")


# ------------------------------------------------------------------------------------ cache

def _positions_views(positions: Tensor, views: Tensor) -> tuple[Tensor, Tensor]:
    return positions.detach().to("cpu", torch.long), views.detach().to("cpu", torch.long)


def distinct(paths: Sequence[str]) -> list[str]:
    """``paths`` each once, in order of first appearance: a method may pair one teacher layer with
    several student layers, and the cache holds each layer once."""
    return list(dict.fromkeys(paths))


def _layer_name(index: int) -> str:
    return f"layer_{index}"


def layer_table_bytes(shapes: Sequence[Sequence[int]], num_images: int, num_views: int) -> int:
    """Bytes the outputs of layers of per-image ``shapes`` take in a cache of ``num_images`` ×
    ``num_views`` views: ``N × K × Σ numel × 2`` (float16)."""
    values = sum(math.prod(int(d) for d in shape) for shape in shapes)
    return int(num_images) * int(num_views) * values * torch.finfo(LAYER_DTYPE).bits // 8


# ----------------------------------------------------------------------- skipped caches

def save_skipped(directory: Path, reason: str | None, key: Mapping[str, str] | None) -> None:
    """Write, instead of a cache, the marker saying why none was built for the run of ``key``
    (say, its layers would not fit): :func:`skipped_reason` reads it back for that run only.
    Without a reason (the cache disabled) the marker is ``{"enabled": false}``, which no run follows."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    marker: dict[str, Any] = {"enabled": False}
    if reason is not None and key is not None:
        marker.update(reason=reason, key=dict(key))
    (directory / META_FILE).write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def skipped_reason(directory: Path, expected_key: Mapping[str, str] | None = None) -> str | None:
    """The reason in ``directory``'s marker when :func:`save_skipped` wrote one there (for the run
    of ``expected_key``: another run's raises :class:`CacheMismatch`, as its cache would); ``None``
    when the directory holds anything else (a cache, nothing, a marker without a key: loading it
    says what is wrong)."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file() or (Path(directory) / TENSORS_FILE).exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not (isinstance(meta, dict) and meta.get("enabled") is False and isinstance(meta.get("key"), dict)
            and isinstance(meta.get("reason"), str)):
        return None
    if expected_key is not None:
        check_key(Path(directory), meta["key"], expected_key)
    return meta["reason"]


class TeacherCache:
    """The teacher's outputs on ``K`` views of ``N`` images, as CPU tensors.

    Exactly one logits representation is held: ``exact_logits`` ``(N, K, C)`` float32, or
    ``top_values`` ``(N, K, k)`` float16 + ``top_indices`` ``(N, K, k)`` int16/int32 + ``fill``
    ``(N, K)`` float32 (module docstring). ``feature_table`` is ``(N, K, D)`` float16 or ``None``.
    ``layer_tables`` are the outputs of the teacher layers ``layer_paths``, one ``(N, K, *shape)``
    float16 table per path, in order. ``seeds`` ``(N, K)`` int64 rebuild the views
    (:class:`kdlib.data.views.AugmentedViews`).
    """

    def __init__(
        self,
        seeds: Tensor,
        num_classes: int,
        key: Mapping[str, str],
        exact_logits: Tensor | None = None,
        top_values: Tensor | None = None,
        top_indices: Tensor | None = None,
        fill: Tensor | None = None,
        feature_table: Tensor | None = None,
        layer_paths: Sequence[str] = (),
        layer_tables: Sequence[Tensor] = (),
    ) -> None:
        if seeds.ndim != 2 or seeds.dtype != torch.int64:
            raise ValueError(f"view seeds must be an (N, K) int64 tensor, got {tuple(seeds.shape)} {seeds.dtype}")
        n, k = seeds.shape
        compressed = top_values is not None
        if compressed == (exact_logits is not None):
            raise ValueError("a teacher cache holds either exact logits or (top_values, top_indices, fill)")
        if compressed:
            if top_indices is None or fill is None:
                raise ValueError("top-k logits need top_values, top_indices and fill")
            if top_values.ndim != 3 or top_values.shape[:2] != (n, k) or top_indices.shape != top_values.shape \
                    or fill.shape != (n, k):
                raise ValueError(f"top-k shapes {tuple(top_values.shape)}, {tuple(top_indices.shape)}, "
                                 f"{tuple(fill.shape)} do not match view seeds ({n}, {k})")
            if not 0 < top_values.shape[2] < num_classes:
                raise ValueError(f"top-k with k={top_values.shape[2]} needs 0 < k < C={num_classes}")
        else:
            assert exact_logits is not None
            if exact_logits.shape != (n, k, num_classes):
                raise ValueError(f"logits of shape {tuple(exact_logits.shape)}, expected ({n}, {k}, {num_classes})")
        if feature_table is not None and (feature_table.ndim != 3 or feature_table.shape[:2] != (n, k)):
            raise ValueError(f"features of shape {tuple(feature_table.shape)}, expected ({n}, {k}, D)")
        if len(layer_paths) != len(layer_tables) or len(set(layer_paths)) != len(layer_paths):
            raise ValueError(f"{len(layer_tables)} layer tables for the layer paths {list(layer_paths)} (expected one "
                             "table per distinct path)")
        for path, table in zip(layer_paths, layer_tables):
            if table.ndim < 3 or table.shape[:2] != (n, k) or table.dtype != LAYER_DTYPE:
                raise ValueError(f"layer {path}: a table of shape {tuple(table.shape)} {table.dtype}, expected "
                                 f"({n}, {k}, ...) {LAYER_DTYPE}")
        if "views" in key and key["views"] != str(k):
            raise ValueError(f"cache key says {key['views']} views but the seed table has {k}")
        self.seeds = seeds
        self.num_classes = int(num_classes)
        self.key: dict[str, str] = dict(key)
        self.exact_logits = exact_logits
        self.top_values, self.top_indices, self.fill = top_values, top_indices, fill
        self.feature_table = feature_table
        self.layer_paths: tuple[str, ...] = tuple(layer_paths)
        self.layer_tables: tuple[Tensor, ...] = tuple(layer_tables)
        self._lsh_bias: Tensor | None = None
        self._lsh_meta: dict[str, Any] | None = None

    # -- shape and size ----------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.seeds.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.seeds.shape[1])

    @property
    def topk(self) -> int | None:
        """``k`` of the top-k compression, ``None`` for exact logits."""
        return None if self.top_values is None else int(self.top_values.shape[2])

    @property
    def has_features(self) -> bool:
        return self.feature_table is not None

    @property
    def feature_dim(self) -> int | None:
        return None if self.feature_table is None else int(self.feature_table.shape[2])

    @property
    def layer_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The per-image shape of each cached layer, in the order of :attr:`layer_paths`."""
        return tuple(tuple(int(d) for d in t.shape[2:]) for t in self.layer_tables)

    def tensors(self) -> dict[str, Tensor]:
        """Everything stored, by the name it has in ``teacher_outputs.pt`` (layer ``i`` as
        ``layer_<i>``; ``cache.json`` names its path)."""
        named = {"seeds": self.seeds, "logits": self.exact_logits, "top_values": self.top_values,
                 "top_indices": self.top_indices, "fill": self.fill, "features": self.feature_table,
                 "lsh_bias": self._lsh_bias, **{_layer_name(i): t for i, t in enumerate(self.layer_tables)}}
        return {name: t for name, t in named.items() if t is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (the size of ``teacher_outputs.pt`` up to its small header)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- LSH ---------------------------------------------------------------------------
    def set_lsh(self, bias: Tensor, meta: Mapping[str, Any]) -> None:
        """Attach the LSH bias ``(N_h,)``; the hyperplane weights are not stored but rebuilt from
        ``meta`` (``num_hyperplanes``, ``sigma``, ``seed``, ``bias_mode``), which costs nothing
        and cannot disagree with the seed."""
        missing = [k for k in LSH_META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"LSH metadata lacks {', '.join(missing)} (needs {', '.join(LSH_META_KEYS)})")
        if bias.ndim != 1 or bias.shape[0] != int(meta["num_hyperplanes"]):
            raise ValueError(f"LSH bias of shape {tuple(bias.shape)}, expected ({meta['num_hyperplanes']},)")
        self._lsh_bias = bias.detach().to("cpu", torch.float32).contiguous()
        self._lsh_meta = json.loads(json.dumps(dict(meta)))  # plain JSON values, as stored

    @property
    def lsh_bias(self) -> Tensor | None:
        return self._lsh_bias

    @property
    def lsh_meta(self) -> dict[str, Any] | None:
        return None if self._lsh_meta is None else dict(self._lsh_meta)

    # -- reading -----------------------------------------------------------------------
    def logits(self, positions: Tensor, views: Tensor) -> Tensor:
        """``(B, C)`` float32 teacher logits of views ``(positions[b], views[b])``; top-k
        entries are expanded: ``fill`` everywhere, the kept values at their indices."""
        p, v = _positions_views(positions, views)
        if self.exact_logits is not None:
            return self.exact_logits[p, v].float()
        assert self.top_values is not None and self.top_indices is not None and self.fill is not None
        out = self.fill[p, v].float().unsqueeze(1).repeat(1, self.num_classes)
        return out.scatter_(1, self.top_indices[p, v].long(), self.top_values[p, v].float())

    def features(self, positions: Tensor, views: Tensor) -> Tensor:
        """``(B, D)`` float32 pooled teacher features of the given views."""
        if self.feature_table is None:
            raise ValueError("this teacher-output cache holds no features: build it with a teacher "
                             "that has features=True (a feature method needs them)")
        p, v = _positions_views(positions, views)
        return self.feature_table[p, v].float()

    def layers(self, positions: Tensor, views: Tensor) -> tuple[Tensor, ...]:
        """``(B, *shape)`` float32 outputs of each cached teacher layer on the given views."""
        if not self.layer_tables:
            raise ValueError("this teacher-output cache holds no layer outputs: build it for the method that "
                             "reads them (dvc repro teacher_cache)")
        p, v = _positions_views(positions, views)
        return tuple(table[p, v].float() for table in self.layer_tables)

    # -- disk --------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The content of ``cache.json``."""
        tensors = self.tensors()
        return {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "num_images": self.num_images,
            "num_views": self.num_views,
            "num_classes": self.num_classes,
            "compression": ({"kind": "none"} if self.topk is None else
                            {"kind": "topk-marginal-smoothing", "k": self.topk,
                             "fill": "log(sum of non-top-k exp(logits) / (C - k)), exact tail mass at T=1"}),
            "feature_dim": self.feature_dim,
            "layers": [{"path": path, "tensor": _layer_name(i), "shape": list(shape),
                        "dtype": str(LAYER_DTYPE).removeprefix("torch."),
                        "bytes": self.layer_tables[i].numel() * self.layer_tables[i].element_size()}
                       for i, (path, shape) in enumerate(zip(self.layer_paths, self.layer_shapes))],
            "layer_bytes": sum(t.numel() * t.element_size() for t in self.layer_tables),
            "lsh": self._lsh_meta,
            "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                               "bytes": t.numel() * t.element_size()} for name, t in tensors.items()},
            "total_bytes": self.nbytes,
        }

    def save(self, directory: Path) -> None:
        """Write ``teacher_outputs.pt`` and ``cache.json`` into ``directory`` atomically.

        Both files are written (and fsynced) into ``<directory>.partial``, which then replaces
        ``directory`` by a rename; a previous ``directory`` is renamed aside first and removed
        after. A failure removes the partial directory, so ``directory`` is either the old
        complete cache, absent, or the new complete one — never half-written (DVC would cache it).
        """
        directory = Path(directory)
        partial = directory.with_name(directory.name + ".partial")
        old = directory.with_name(directory.name + ".old")
        for stale in (partial, old):
            if stale.exists():
                shutil.rmtree(stale)
        try:
            partial.mkdir(parents=True)
            tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
            torch.save(tensors, partial / TENSORS_FILE)
            (partial / META_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")
            for name in (TENSORS_FILE, META_FILE):
                with open(partial / name, "rb") as handle:
                    os.fsync(handle.fileno())
            if directory.exists():
                os.rename(directory, old)
            os.rename(partial, directory)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if old.exists() and not directory.exists():
                os.rename(old, directory)  # put the previous complete cache back
            raise
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path, expected_key: Mapping[str, str] | None = None, mmap: bool = True
             ) -> "TeacherCache":
        """Read a cache written by :meth:`save`; tensors are memory-mapped when ``mmap`` (pages
        are read on access, so a cache larger than RAM works).

        With ``expected_key`` (:func:`cache_key` of the run about to use it) every component is
        compared first and :class:`CacheMismatch` names each one that differs. Missing,
        truncated or inconsistent files raise naming the file.
        """
        directory = Path(directory)
        meta_path, tensors_path = directory / META_FILE, directory / TENSORS_FILE
        if not directory.is_dir():
            raise FileNotFoundError(f"teacher-output cache {directory} does not exist; build it (dvc repro teacher_cache)")
        for path in (meta_path, tensors_path):
            if not path.is_file():
                raise FileNotFoundError(f"teacher-output cache file {path} is missing; {REBUILD_HINT}")
        try:
            meta = json.loads(meta_path.read_text())
            key, num_classes, declared = meta["key"], int(meta["num_classes"]), meta["tensors"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"teacher-output cache file {meta_path} is corrupt ({err!r}); {REBUILD_HINT}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"teacher-output cache file {meta_path} has format version "
                             f"{meta.get('format_version')}, this code reads {FORMAT_VERSION}; {REBUILD_HINT}")
        if expected_key is not None:
            check_key(directory, key, expected_key)
        try:
            tensors = torch.load(tensors_path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:  # truncated zip, bad pickle...: torch raises several types
            raise ValueError(f"teacher-output cache file {tensors_path} is corrupt or truncated "
                             f"({type(err).__name__}: {err}); {REBUILD_HINT}") from None
        if not isinstance(tensors, dict) or set(tensors) != set(declared):
            found = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
            raise ValueError(f"teacher-output cache file {tensors_path} holds {found}, but {meta_path} "
                             f"lists {sorted(declared)}; {REBUILD_HINT}")
        for name, t in tensors.items():
            want = declared[name]
            if list(t.shape) != want["shape"] or str(t.dtype).removeprefix("torch.") != want["dtype"]:
                raise ValueError(f"teacher-output cache file {tensors_path}: {name} is {tuple(t.shape)} "
                                 f"{t.dtype}, {meta_path} says {want['shape']} {want['dtype']}; {REBUILD_HINT}")
        try:
            layers = meta.get("layers") or []
            cache = cls(tensors["seeds"], num_classes, key, exact_logits=tensors.get("logits"),
                        top_values=tensors.get("top_values"), top_indices=tensors.get("top_indices"),
                        fill=tensors.get("fill"), feature_table=tensors.get("features"),
                        layer_paths=[str(layer["path"]) for layer in layers],
                        layer_tables=[tensors[str(layer["tensor"])] for layer in layers])
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"teacher-output cache {directory} is inconsistent ({err}); {REBUILD_HINT}") from None
        unlisted = sorted(set(n for n in tensors if n.startswith("layer_")) - set(_layer_name(i) for i in
                                                                                 range(len(cache.layer_paths))))
        if unlisted:
            raise ValueError(f"{tensors_path} holds the layer tables {unlisted}, which {meta_path} does not describe; "
                             f"{REBUILD_HINT}")
        if "lsh_bias" in tensors:
            if not meta.get("lsh"):
                raise ValueError(f"{tensors_path} holds an LSH bias but {meta_path} has no LSH metadata; {REBUILD_HINT}")
            cache.set_lsh(tensors["lsh_bias"], meta["lsh"])
        return cache


# ----------------------------------------------------------------------------------- build

class AllViewsSampler(Sampler[tuple[int, int]]):
    """Every ``(image, view)`` pair once, view-major: all images under view 0, then view 1...
    (the order the training epochs visit them). With ``world > 1``, process ``rank`` takes every
    ``world``-th pair of that order: the processes' shards are disjoint and cover every pair."""

    def __init__(self, num_images: int, num_views: int, rank: int = 0, world: int = 1) -> None:
        self.num_images, self.num_views, self.rank, self.world = num_images, num_views, rank, world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for flat in range(self.rank, self.num_images * self.num_views, self.world):
            yield flat % self.num_images, flat // self.num_images

    def __len__(self) -> int:
        total = self.num_images * self.num_views
        return max(0, (total - self.rank + self.world - 1) // self.world)


def compress_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, indices, fill)`` of the top-k compression of ``(B, C)`` logits.

    ``fill = logsumexp(z_j, j ∉ top-k) − log(C − k)``: the non-top-k classes share their
    softmax mass at T=1 uniformly (module docstring); ``torch.logsumexp`` subtracts the maximum,
    so large logits do not overflow. Values are rounded to float16 (raising if one does not fit),
    indices are int16 when ``C < 32768`` else int32, fill is float32.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if not 0 < k < num_classes:
        raise ValueError(f"top-k compression needs 0 < k < C, got k={k}, C={num_classes}")
    values, indices = logits.topk(k, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    fill = torch.logsumexp(rest, dim=1) - math.log(num_classes - k)
    if values.abs().max() > _FP16_MAX:
        raise ValueError(f"teacher logits up to {values.abs().max().item():.3g} do not fit float16")
    index_dtype = torch.int16 if num_classes < 32768 else torch.int32
    return values.to(TOPK_VALUE_DTYPE), indices.to(index_dtype), fill


def expand_topk(values: Tensor, indices: Tensor, fill: Tensor, num_classes: int) -> Tensor:
    """Inverse of :func:`compress_topk` up to the tail: ``(B, C)`` float32 logits."""
    out = fill.float().unsqueeze(1).repeat(1, num_classes)
    return out.scatter_(1, indices.long(), values.float())


@torch.no_grad()
def build_teacher_cache(
    teacher: OnlineTeacher,
    views: AugmentedViews,
    normalizer: nn.Module,
    device: torch.device,
    batch_size: int,
    key: dict[str, str],
    topk: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> TeacherCache:
    """Run ``teacher`` on every view ``(i, k)`` of ``views`` and keep its outputs.

    With ``world`` > 1 processes (torch.distributed initialized), each runs the teacher on its
    shard of the views (:class:`AllViewsSampler`) and the shards are exchanged, so every process
    returns the whole cache (each view's outputs computed once, by one process).

    Each batch goes through exactly what the training loop does to it (module docstring):
    the per-image transform under ``seeds[i, k]`` (in :class:`AugmentedViews`),
    ``views.base.batch_transform`` with the batch's seeds, ``normalizer`` and the teacher
    (which renormalizes and resizes for itself). The teacher is evaluated in float32 and in
    eval mode (it is moved to ``device``; ``normalizer`` is copied there, the caller's stays).
    Outputs do not depend on batch composition (eval mode) beyond floating-point rounding.

    ``topk``: ``None`` or ``≥ C`` stores exact float32 logits, otherwise the top-k compression
    (:func:`compress_topk`). Features (``teacher.features``) are stored as float16, and so are
    the outputs of the layers the teacher taps (:meth:`OnlineTeacher.tap`), under their paths
    and in the key's ``layers`` component (``key`` must name them: it is checked here).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be >= 1 or None, got {topk}")
    tapped = teacher.taps.paths if teacher.taps is not None else ()
    layer_paths = distinct(tapped)
    first = [tapped.index(path) for path in layer_paths]  # where each distinct layer is in the teacher's answer
    if key and key.get(LAYERS_KEY) != (canonical_json(layer_paths) if layer_paths else None):
        raise ValueError(f"the cache key names the teacher layers {key.get(LAYERS_KEY) or '(none)'}, but the teacher "
                         f"taps {list(layer_paths) or '(none)'}: the key must say which layers the cache holds")
    base = views.base
    n, k_views = views.seeds.shape
    device = torch.device(device)
    teacher.model.to(device)
    normalizer = copy.deepcopy(normalizer).to(device)
    batch_transform = getattr(base, "batch_transform", None)
    loader = DataLoader(views, batch_size=batch_size, sampler=AllViewsSampler(n, k_views, rank, world),
                        num_workers=num_workers, pin_memory=device.type == "cuda")

    exact: Tensor | None = None
    top_values: Tensor | None = None
    top_indices: Tensor | None = None
    fill: Tensor | None = None
    feature_table: Tensor | None = None
    layer_tables: list[Tensor] = []
    num_classes: int | None = None
    compressed = False
    filled = torch.zeros(n, k_views, dtype=torch.bool)

    for images, _targets, positions, view_ids in tqdm(loader, desc="teacher cache", leave=False,
                                                      disable=None if progress else True):
        positions, view_ids = positions.long(), view_ids.long()
        images = images.to(device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images, views.batch_seeds(positions, view_ids))
        out = teacher(normalizer(images), positions, view_ids)
        logits = out.logits.float().cpu()
        if num_classes is None:  # allocate on the first batch, once C and D are known
            num_classes = logits.shape[1]
            compressed = topk is not None and topk < num_classes
            if compressed:
                assert topk is not None
                index_dtype = torch.int16 if num_classes < 32768 else torch.int32
                top_values = torch.empty(n, k_views, topk, dtype=TOPK_VALUE_DTYPE)
                top_indices = torch.empty(n, k_views, topk, dtype=index_dtype)
                fill = torch.empty(n, k_views, dtype=torch.float32)
            else:
                exact = torch.empty(n, k_views, num_classes, dtype=torch.float32)
            if teacher.features:
                if out.features is None:
                    raise ValueError("the teacher has features=True but returned no features")
                feature_table = torch.empty(n, k_views, out.features.shape[1], dtype=FEATURE_DTYPE)
            if layer_paths:
                if out.layers is None or len(out.layers) != len(tapped):
                    raise ValueError(f"the teacher taps {list(tapped)} but returned "
                                     f"{0 if out.layers is None else len(out.layers)} layer outputs")
                layer_tables = [torch.empty(n, k_views, *out.layers[i].shape[1:], dtype=LAYER_DTYPE) for i in first]
        if compressed:
            assert top_values is not None and top_indices is not None and fill is not None and topk is not None
            values, indices, tail = compress_topk(logits, topk)
            top_values[positions, view_ids] = values
            top_indices[positions, view_ids] = indices
            fill[positions, view_ids] = tail
        else:
            assert exact is not None
            exact[positions, view_ids] = logits
        if feature_table is not None:
            assert out.features is not None
            feats = out.features.float().cpu()
            if feats.abs().max() > _FP16_MAX:
                raise ValueError(f"teacher features up to {feats.abs().max().item():.3g} do not fit float16")
            feature_table[positions, view_ids] = feats.to(FEATURE_DTYPE)
        for path, table, i in zip(layer_paths, layer_tables, first):
            assert out.layers is not None
            values = out.layers[i].float().cpu()
            if values.abs().max() > _FP16_MAX:
                raise ValueError(f"the teacher's layer {path} outputs values up to {values.abs().max().item():.3g}, "
                                 "which do not fit float16")
            table[positions, view_ids] = values.to(LAYER_DTYPE)
        filled[positions, view_ids] = True

    if world > 1:
        _exchange_shards(filled, [t for t in (exact, top_values, top_indices, fill, feature_table, *layer_tables)
                                  if t is not None])
    if num_classes is None:
        raise ValueError("cannot build a teacher-output cache of an empty training set")
    if not bool(filled.all()):
        raise RuntimeError(f"{int((~filled).sum())} views were never run through the teacher")
    return TeacherCache(views.seeds.clone(), num_classes, key, exact_logits=exact, top_values=top_values,
                        top_indices=top_indices, fill=fill, feature_table=feature_table, layer_paths=layer_paths,
                        layer_tables=layer_tables)


def _exchange_shards(filled: Tensor, tables: list[Tensor]) -> None:
    """Give every process the rows the others computed: ``filled`` marks this process's
    ``(image, view)`` pairs; each table is ``(N, K, ...)`` and filled at those pairs."""
    from kdlib import distributed

    mine = filled.nonzero()
    shards = distributed.all_gather_objects((mine, [t[mine[:, 0], mine[:, 1]] for t in tables]))
    for pairs, rows in shards:
        if len(pairs) and tables and len(rows) != len(tables):
            raise RuntimeError("teacher cache shards disagree on what they hold (a process ran another teacher "
                               "or method)")
        for table, values in zip(tables, rows):
            table[pairs[:, 0], pairs[:, 1]] = values
        filled[pairs[:, 0], pairs[:, 1]] = True


# --------------------------------------------------------------------------- cached teacher

class CachedTeacher:
    """Drop-in for :class:`~kdlib.teacher.OnlineTeacher` in the training loop: called with
    ``(images, positions, views)`` it ignores the images and returns the cached
    :class:`TeacherOutput` of those views, as float32 tensors on ``device``.

    The loop must train on the cache's views (``view_seeds=cache.seeds``); the cache key
    guarantees the same teacher, data and transform built them. ``layers``: the teacher layer
    paths a feature-map method reads (its ``LayerPlan.teacher``), returned as
    ``TeacherOutput.layers`` in that order (a path named twice, twice); a cache that holds other
    layers raises :class:`CacheMismatch`.
    """

    def __init__(self, cache: TeacherCache, device: torch.device, features: bool = False,
                 layers: Sequence[str] | None = None) -> None:
        if features and not cache.has_features:
            raise ValueError("features were asked of a teacher-output cache built without them; "
                             "rebuild it with a feature method (dvc repro teacher_cache)")
        if layers is not None and tuple(distinct(layers)) != cache.layer_paths:
            raise CacheMismatch(f"the teacher-output cache holds the teacher layers "
                                f"{', '.join(cache.layer_paths) or '(none)'} but distillation reads "
                                f"{', '.join(layers) or '(none)'}; {REBUILD_HINT}")
        self.cache = cache
        self.device = torch.device(device)
        self.features = features
        # which cached table answers each layer the method reads
        self.layer_order = None if layers is None else [cache.layer_paths.index(path) for path in layers]

    def __call__(self, images: Tensor | None, positions: Tensor | None = None, views: Tensor | None = None
                 ) -> TeacherOutput:
        if positions is None or views is None:
            raise ValueError("a cached teacher needs the batch's image positions and view indices")
        logits = self.cache.logits(positions, views).to(self.device, non_blocking=True)
        feats = None
        if self.features:
            feats = self.cache.features(positions, views).to(self.device, non_blocking=True)
        layers = None
        if self.layer_order is not None:
            tables = [t.to(self.device, non_blocking=True) for t in self.cache.layers(positions, views)]
            layers = tuple(tables[i] for i in self.layer_order)
        return TeacherOutput(logits, feats, layers)
