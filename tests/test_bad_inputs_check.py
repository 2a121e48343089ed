"""What the check stage refuses before any work, each with status 2 and a message naming the key: YAML
that is read differently than DVC reads it (floats like 1e-05), duplicate keys, alias bombs, more
processes than this machine has cores or GPUs, an input size a model refuses, an alignment with
nothing to align; and a data set with one class, refused by prepare."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlib import yamlfile
from kdlib.data.index import DatasetIndex, DatasetMeta, Record, validate_index
from stages.launch import usable_cpus
from stages.params import read_params, resolve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    params = read_params(REPO / "params.yaml")
    for preset in params["models"].values():  # weights files this machine may lack are not the point here
        if isinstance(preset.get("pretrained"), str):
            preset["pretrained"] = False
    return params


def run_check(folder: Path, params_text: str, timeout: float = 120) -> subprocess.CompletedProcess:
    (folder / "params.yaml").write_text(params_text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.check"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- YAML as DVC reads it
def test_yaml_1_2_floats_are_numbers_as_dvc_writes_them() -> None:
    """PyYAML (YAML 1.1) read DVC's `1e-05` as a string; DVC (ruamel, YAML 1.2) reads a float."""
    assert yaml.safe_load("lr: 1e-05")["lr"] == "1e-05"  # the old reader, for the record
    values = yamlfile.loads("a: 1e-05\nb: 5e-05\nc: 0.00001\nd: 1.0e-5\ne: 1e5\nf: on\ng: 017\n")
    assert values == {"a": 1e-5, "b": 5e-5, "c": 1e-5, "d": 1e-5, "e": 1e5, "f": "on", "g": 17}
    assert all(isinstance(values[k], float) for k in "abcde")
    assert yamlfile.scalar("1e-5") == 1e-5 and yamlfile.scalar("'1e-5'") == "1e-5"


def test_dvc_set_param_floats_resolve_as_numbers(tmp_path: Path) -> None:
    """What `dvc exp run -S` does to params.yaml (DVC's own apply_overrides), then the stages' reader."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(path, ["models.cnn_small.lr=1e-5", "models.resnet18.lr=5e-05", "align.weight_decay=0.00001"])
    run = resolve(yamlfile.load(path))
    assert (run.params.models["cnn_small"][1].lr, run.params.models["resnet18"][1].lr,
            run.params.align.weight_decay) == (1e-5, 5e-5, 1e-5)


def test_duplicate_keys_name_the_key_and_lines(tmp_path: Path) -> None:
    text = "a: 1\nmodels:\n  x:\n    lr: 0.1\n    lr: 0.2\n"
    with pytest.raises(yamlfile.YamlError, match=r"study.yaml: line 5: duplicate key 'lr' in the mapping that "
                                                 r"starts at line 4"):
        yamlfile.loads(text, "study.yaml")


def bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(levels):
        name, prev = chr(98 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_is_built() -> None:
    start = time.perf_counter()
    with pytest.raises(yamlfile.YamlError, match=r"params.yaml: line \d+: YAML aliases expand the document to more "
                                                 r"than 1,000,000 nodes"):
        yamlfile.loads(bomb(), "params.yaml")
    assert time.perf_counter() - start < 10
    # an anchor reused a few times (dvc.yaml's deps lists) is fine
    assert yamlfile.loads("x: &d [1, 2]\ny: *d\nz: *d\n") == {"x": [1, 2], "y": [1, 2], "z": [1, 2]}
    assert yamlfile.load(REPO / "dvc.yaml")["stages"]["baseline"]["deps"] == \
        yamlfile.load(REPO / "dvc.yaml")["stages"]["teacher"]["deps"]


def test_check_refuses_a_bomb_and_a_duplicate_key_with_status_2(tmp_path: Path) -> None:
    """The issue: a bomb in params.yaml grew past 3 GB (hashed before validation); a duplicate key kept the
    last value silently."""
    text = (REPO / "params.yaml").read_text()
    start = time.perf_counter()
    proc = run_check(tmp_path, text + "\n" + bomb())
    assert proc.returncode == 2, proc.stderr
    assert "YAML aliases expand the document" in proc.stderr and "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "reports" / "check.json").exists()
    assert text.startswith("# ") and "\nseed: 0 " in text
    proc = run_check(tmp_path, text.replace("\nseed: 0 ", "\nseed: 1\nseed: 0 ", 1))
    assert proc.returncode == 2, proc.stderr
    assert "duplicate key 'seed'" in proc.stderr and "Traceback" not in proc.stderr


def test_check_refuses_too_many_processes_and_a_refused_input_size(tmp_path: Path, base) -> None:
    """`runtime.nproc_per_node=4` on 2 cores failed only when training started (exit 1), and a DeiT-B-384
    student at 64 px failed in timm after the teacher had trained; both are check's now (exit 2)."""
    params = copy.deepcopy(base)
    params["runtime"]["nproc_per_node"] = usable_cpus() + 1
    params["runtime"]["device"] = "cpu"
    params["student"] = "deit_b384_fgvc"
    params["models"]["deit_b384_fgvc"]["input_size"] = 64
    proc = run_check(tmp_path, yaml.safe_dump(params, sort_keys=False))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"runtime.nproc_per_node = {usable_cpus() + 1}: expected at most {usable_cpus()}, the CPU cores"
            in proc.stderr)
    assert ("models.deit_b384_fgvc.input_size = 64 (the student preset 'deit_b384_fgvc'): "
            "deit_base_distilled_patch16_384 refuses 64×64 inputs" in proc.stderr)
    assert "Input height (64) doesn't match model (384)" in proc.stderr
    assert not (tmp_path / "reports" / "check.json").exists()


def test_the_data_set_image_size_is_named_when_the_preset_has_none(base) -> None:
    params = copy.deepcopy(base)
    params["student"] = "deit"
    params["models"]["deit"]["input_size"] = None
    params["datasets"]["mnist"]["image_size"] = 32  # the tiny DeiT is built for 28 px
    problems = resolve(params).model_problems()
    assert len(problems) == 1 and problems[0].startswith("datasets.mnist.image_size = 32 (the student preset 'deit')")


def test_lshfm_alignment_with_equal_widths_needs_a_forced_feat_fc(base) -> None:
    """The README's LSHFM recipe skipped LSHFM's stage 1: ResNet-34 and ResNet-18 both give 512 features,
    and LSHFM's scripts set force_2FC to train feat_fc regardless."""
    params = copy.deepcopy(base)
    params.update(dataset="voc2007", teacher="resnet34_lshfm", student="resnet18_lshfm")
    params["distill"]["method"] = "lshl2"
    params["align"]["epochs"] = 60
    problems = resolve(params).model_problems()
    assert problems == [
        "align.epochs = 60: the 'resnet18_lshfm' student's pooled features are as wide as the 'resnet34_lshfm' "
        "teacher's (512) and distill.lshl2.force_feat_fc is false, so the student has no feat_fc and the align stage "
        "(LSHFM's stage 1) would have nothing to train; expected -S distill.lshl2.force_feat_fc=true (LSHFM's VOC and "
        "COCO scripts set force_2FC) or -S align.epochs=0"]
    params["distill"]["lshl2"]["force_feat_fc"] = True
    assert resolve(params).model_problems() == []
    params["distill"]["lshl2"]["force_feat_fc"], params["align"]["epochs"] = False, 0
    assert resolve(params).model_problems() == []


def test_the_default_run_has_no_model_problems(base) -> None:
    assert resolve(base).model_problems() == []


# ---------------------------------------------------------------- data
def test_a_single_class_data_set_is_refused() -> None:
    """One class trained to "100 %" without a word: a softmax over one class is always right."""
    meta = DatasetMeta("birds", "/data/birds", ["sparrow"], 3, 32, [0.5] * 3, [0.25] * 3)
    records = [Record(f"{s}/{i}.png", 0, s, md5=f"{s}{i}") for s in ("train", "val", "test") for i in range(2)]
    with pytest.raises(ValueError, match=r"data set 'birds' \(/data/birds\): 1 class\(es\) \(sparrow\); expected at "
                                         r"least two classes"):
        validate_index(DatasetIndex(meta, records))


def test_a_dangling_resume_link_stops_a_training_stage_before_work(tmp_path: Path) -> None:
    """A `.kdlib-resume` symlink to nothing gave a bare FileExistsError; now one line naming it, status 2."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / ".kdlib-resume").symlink_to(tmp_path / "gone")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KDLIB_RESUME_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "stages.train", "teacher"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {tmp_path / '.kdlib-resume'} is a dangling symbolic link" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "models").exists()
