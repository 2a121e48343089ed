"""Load and validate ``params.yaml`` before any work.

``dvc exp run -S key=value`` does no type checking, so every key is checked here: unknown
keys, wrong types, unknown names and impossible values stop the stage with a message naming
the key, the value and what is allowed.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamError(ValueError):
    pass


# ---- small checkers: each returns None when fine, else what was expected -----------------
Check = Callable[[Any], "str | None"]


def is_int(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"an integer in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        return None
    return check


def is_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        desc = f"a number in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return desc
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return desc
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return desc
        return None
    return check


def is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def is_str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        ok = not isinstance(v, bool) and any(v == c and type(v) is type(c) for c in choices)
        return None if ok else f"one of: {', '.join(map(str, choices))}"
    return check


def is_float_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    return None if ok else "a non-empty list of numbers"


def is_mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else "a mapping"


def is_pretrained(v: Any) -> str | None:
    return None if isinstance(v, (bool, str)) and v != "" else "false, true, or a path to a weights file"


# ---- the schema -----------------------------------------------------------------------------
# key -> (checker, required). Sections are nested dicts; `models` / `datasets` map names to these.
MODEL_PRESET: dict[str, tuple[Check, bool]] = {
    "arch": (is_str, True),
    "pretrained": (is_pretrained, False),
    "input_size": (lambda v: None if v is None else is_int(8)(v), True),  # null: the data set's size
    "kwargs": (is_mapping, False),
    "drop_path": (is_float(0, 1, hi_open=True), False),
    "optimizer": (one_of("sgd", "adamw"), True),
    "lr": (is_float(0, lo_open=True), True),
    "momentum": (is_float(0, 1, hi_open=True), False),
    "nesterov": (is_bool, False),
    "weight_decay": (is_float(0), False),
    "schedule": (one_of("cosine", "step", "constant"), True),
    "warmup_epochs": (is_int(0), False),
    "min_lr": (is_float(0), False),
    "step_epochs": (is_int(1), False),
    "step_gamma": (is_float(0, 1, lo_open=True), False),
    "epochs": (is_int(1), True),
    "batch_size": (is_int(1), True),
    "label_smoothing": (is_float(0, 1, hi_open=True), False),
    "patience": (is_int(0), False),
    "grad_clip": (is_float(0), False),
    "channels_last": (is_bool, False),
    "amp": (one_of("none", "bf16", "fp16"), False),
}
DATASET_PRESET: dict[str, tuple[Check, bool]] = {
    "layout": (is_str, True),
    "root": (is_str, False),  # the data set on disk; or, with `url`, downloaded and extracted
    "url": (is_str, False),
    "sha256": (is_str, False),
    "md5": (is_str, False),
    "download_dir": (is_str, False),
    "archive_subdir": (is_str, False),  # the layout's root inside the extracted archive
    "options": (is_mapping, False),  # keyword arguments of the layout reader (e.g. dogs_root)
    "on_bad_image": (one_of("error", "skip"), False),
    "preload": (is_bool, False),
    "ap_mode": (one_of("voc", "coco"), False),
    "mixup": (is_float(0), False),  # MixUp alpha (0 = off); single-label only
    "cutmix": (is_float(0), False),  # CutMix alpha (0 = off); one of the two per batch when both on  # multi-label AP: all-point interpolated or not  # decode every image once into memory: only for small data sets
    "eval_crop_pct": (is_float(0, 1, lo_open=True), False),  # eval: resize to size/crop_pct, center crop
    "image_size": (is_int(8), True),
    "channels": (one_of(1, 3), True),  # type: ignore[arg-type]
    "mean": (is_float_list, True),
    "std": (is_float_list, True),
    "augment": (is_str, True),
    "augment_options": (is_mapping, False),
    "val_fraction": (is_float(0, 1, lo_open=True, hi_open=True), False),
    "test_fraction": (is_float(0, 1, lo_open=True, hi_open=True), False),
}
SCHEMA: dict[str, Any] = {
    "seed": (is_int(0), True),
    "dataset": (is_str, True),
    "teacher": (is_str, True),
    "student": (is_str, True),
    "data": {
        "split_seed": (is_int(0), True),
        "train_per_class": (is_int(1), True),
        "val_per_class": (is_int(1), True),
        "test_per_class": (lambda v: None if v is None else is_int(1)(v), True),
        "num_workers": (is_int(0), True),
    },
    "teacher_ls": (lambda v: None if v is None else is_float(0, 1, hi_open=True)(v), True),
    "distill": ("methods", None),  # `method` + one knob section per method; checked in validate()
    "align": {
        "epochs": (is_int(0), True),
        "optimizer": (one_of("sgd", "adamw"), True),
        "lr": (is_float(0, lo_open=True), True),
        "momentum": (is_float(0, 1, hi_open=True), False),
        "weight_decay": (is_float(0), False),
        "beta": (is_float(0, lo_open=True), True),
    },
    "teacher_cache": {
        "enabled": (is_bool, True),
        "views": (lambda v: None if v is None else is_int(1)(v), True),
        "topk": (lambda v: None if v is None else is_int(1)(v), True),
        "batch_size": (is_int(1), True),
    },
    "eval": {
        "batch_size": (is_int(1), True),
        # quantize stage; names are checked against kdlib.quantize.PRECISIONS in validate()
        "precisions": (lambda v: None if isinstance(v, list) and v and all(isinstance(x, str) for x in v)
                       and len(set(v)) == len(v) else "a non-empty list of distinct precision names", True),
        "roles": (lambda v: None if isinstance(v, list) and v and len(set(v)) == len(v)
                  and set(v) <= {"teacher", "baseline", "distill"} else
                  "a non-empty list of distinct roles among teacher, baseline, distill", True),
        "threads": (is_int(1), True),
        "warmup_runs": (is_int(0), True),
        "timed_runs": (is_int(1), True),
        "throughput_batch": (is_int(2), True),
        "throughput_runs": (is_int(1), True),
        "calibration_images": (is_int(1), True),
    },
    "datasets": ("presets", DATASET_PRESET),
    "models": ("presets", MODEL_PRESET),
}


def _check_section(values: Any, schema: dict[str, Any], where: str, errors: list[str]) -> None:
    if not isinstance(values, dict):
        errors.append(f"{where or 'params'}: expected a mapping, got {values!r}")
        return
    for key in values:
        if key not in schema:
            errors.append(f"{where}{key}: unknown key; allowed here: {', '.join(schema)}")
    for key, spec in schema.items():
        path = f"{where}{key}"
        if isinstance(spec, dict):
            if key not in values:
                errors.append(f"{path}: missing section")
            else:
                _check_section(values[key], spec, path + ".", errors)
        elif spec[0] == "methods":
            if key not in values:
                errors.append(f"{path}: missing section")
            else:
                _check_methods(values[key], path, errors)
        elif spec[0] == "presets":
            presets = values.get(key)
            if not isinstance(presets, dict) or not presets:
                errors.append(f"{path}: expected a mapping of named presets")
                continue
            for name, preset in presets.items():
                _check_section(preset, spec[1], f"{path}.{name}.", errors)
        else:
            check, required = spec
            if key not in values:
                if required:
                    errors.append(f"{path}: missing")
                continue
            expected = check(values[key])
            if expected:
                errors.append(f"{path} = {values[key]!r}: expected {expected}")


def _check_methods(section: Any, where: str, errors: list[str]) -> None:
    """``distill``: ``method`` names a registered method that uses a teacher; every other key is
    a method's knob section, checked by building the method with it (its constructor validates
    each knob), so a new method file needs no schema edit here."""
    from kdlib.losses import CONTEXT_ARGS, METHODS, method_knobs

    if not isinstance(section, dict):
        errors.append(f"{where}: expected a mapping")
        return
    teacher_methods = [m for m in METHODS.names() if getattr(METHODS.get(m), "needs_teacher", False)]
    method = section.get("method")
    if method not in teacher_methods:
        errors.append(f"{where}.method = {method!r}: expected one of: {', '.join(teacher_methods)}")
    elif method not in section:
        errors.append(f"{where}.{method}: missing (the knobs of the chosen method; may be {{}})")
    for name, knobs in section.items():
        if name == "method":
            continue
        if name not in teacher_methods:
            errors.append(f"{where}.{name}: unknown key; expected `method` or a method name: "
                          f"{', '.join(teacher_methods)}")
        elif not isinstance(knobs, dict):
            errors.append(f"{where}.{name} = {knobs!r}: expected a mapping of the method's knobs")
        else:
            allowed = [k for k in method_knobs(name) if k not in CONTEXT_ARGS]
            unknown = [k for k in knobs if k not in allowed]
            for knob in unknown:
                errors.append(f"{where}.{name}.{knob}: unknown knob; {name} takes: {', '.join(allowed)}")
            if not unknown:
                try:  # the method's constructor checks every value and names the bad one
                    METHODS.get(name)(**knobs)
                except (TypeError, ValueError) as err:
                    errors.append(f"{where}.{name}: {err}")


def validate(params: dict[str, Any]) -> None:
    """Raise :class:`ParamError` listing every problem in ``params``."""
    from kdlib.data.layouts import LAYOUTS
    from kdlib.data.transforms import TRAIN_PRESETS
    from kdlib.models import known_architectures

    errors: list[str] = []
    _check_section(params, SCHEMA, "", errors)
    if not errors:
        for role in ("teacher", "student"):
            if params[role] not in params["models"]:
                errors.append(f"{role} = {params[role]!r}: expected one of the models presets: "
                              f"{', '.join(params['models'])}")
        if params["dataset"] not in params["datasets"]:
            errors.append(f"dataset = {params['dataset']!r}: expected one of: {', '.join(params['datasets'])}")
        from kdlib.quantize import PRECISIONS

        for name in params["eval"]["precisions"]:
            if name not in PRECISIONS:
                errors.append(f"eval.precisions: {name!r} is not a known precision; expected some of: "
                              f"{', '.join(PRECISIONS.names())}")
        archs = known_architectures()
        for name, preset in params["models"].items():
            if preset["arch"] not in archs:
                errors.append(f"models.{name}.arch = {preset['arch']!r}: not a timm architecture "
                              "(see timm.list_models())")
        for name, preset in params["datasets"].items():
            layouts = ["mnist", *LAYOUTS.names()]
            if preset["layout"] not in layouts:
                errors.append(f"datasets.{name}.layout = {preset['layout']!r}: expected one of: {', '.join(layouts)}")
            if preset["augment"] not in TRAIN_PRESETS:
                errors.append(f"datasets.{name}.augment = {preset['augment']!r}: expected one of: "
                              f"{', '.join(TRAIN_PRESETS.names())}")
            if not preset.get("root") and not preset.get("url"):
                errors.append(f"datasets.{name}: give `root` (a path) or `url` with `sha256` or `md5`")
            if preset.get("url") and not (preset.get("sha256") or preset.get("md5")):
                errors.append(f"datasets.{name}.url: a download needs `sha256` or `md5` to verify it")
            if (preset.get("mixup") or preset.get("cutmix")) and preset["layout"] in ("voc2007", "coco2014"):
                errors.append(f"datasets.{name}: mixup/cutmix are for single-label data sets")
            if len(preset["mean"]) != preset["channels"] or len(preset["std"]) != preset["channels"]:
                errors.append(f"datasets.{name}: mean and std need {preset['channels']} values (channels)")
            if any(s <= 0 for s in preset["std"]):
                errors.append(f"datasets.{name}.std = {preset['std']}: expected positive numbers")
    if errors:
        raise ParamError("invalid parameters in params.yaml:\n  " + "\n  ".join(errors))


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read and validate ``params.yaml``; on error print the problems and exit with status 2."""
    try:
        params = yaml.safe_load(Path(path).read_text())
        validate(params)
    except (ParamError, yaml.YAMLError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return params


@dataclass(frozen=True)
class ModelSpec:
    """What build_model and the checkpoint need, resolved from a models preset."""

    name: str
    arch: str
    pretrained: bool | str
    input_size: int | None
    kwargs: dict[str, Any]


def model_spec(params: dict[str, Any], preset_name: str) -> ModelSpec:
    preset = params["models"][preset_name]
    kwargs = dict(preset.get("kwargs") or {})
    if preset.get("drop_path"):
        kwargs["drop_path_rate"] = preset["drop_path"]
    return ModelSpec(preset_name, preset["arch"], preset.get("pretrained", False),
                     preset.get("input_size"), kwargs)
