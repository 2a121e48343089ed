"""The layering the project promises: thin stage scripts, a library that never reads params.yaml
or imports DVC, declared capabilities instead of probing, and every stage's script a DVC dependency."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = ("check", "prepare", "train", "teacher_cache", "align", "evaluate", "quantize", "export", "report")
# besides the scripts: parameter loading, paths, the run discipline (staged outputs, signals, parameter
# checks), the training stages in one process (tests, benchmarks), starting torchrun, and the
# resume state's place and key, the study driver (queues experiments, reads them back through dvc.api)
# and what it reads of DVC's queue (experiment states with a time limit, orphaned runs, live workers)
STAGE_SUPPORT = ("__init__", "params", "workspace", "guard", "pipeline", "launch", "resume", "study", "exp_queue")


def test_stages_holds_only_stage_scripts_parameters_and_paths() -> None:
    present = {p.stem for p in (REPO / "stages").glob("*.py")}
    assert present == set(STAGE_SCRIPTS) | set(STAGE_SUPPORT), present


def test_every_stage_script_fits_on_a_screen() -> None:
    for name in STAGE_SCRIPTS:
        lines = (REPO / "stages" / f"{name}.py").read_text().count("\n")
        assert lines <= 90, f"stages/{name}.py has {lines} lines"


def _python_files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_kdlib_never_imports_dvc_nor_reads_params_yaml() -> None:
    for path in _python_files("kdlib"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("dvc", "dvclive", "stages") for n in names), (path, names)
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert "params.yaml\")" not in code and "'params.yaml'" not in code, path


def test_nothing_probes_method_capabilities_with_getattr() -> None:
    probe = re.compile(r"getattr\([^)]*[\"'](needs_|uses_distillation_token|tasks)")
    for folder in ("kdlib", "stages"):
        for path in _python_files(folder):
            assert not probe.search(path.read_text()), path


def test_every_stage_depends_on_its_script_and_the_parameter_loading() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = body["cmd"].split()[2].replace(".", "/") + ".py"  # python -m stages.X ...
        for dep in (script, "stages/params.py", "stages/workspace.py", "stages/guard.py", "kdlib"):
            assert dep in body["deps"], (name, dep)


def test_every_stage_script_writes_through_staged_outputs() -> None:
    """A stage that wrote at its final paths could leave half an output for DVC to cache."""
    for name in STAGE_SCRIPTS:
        tree = ast.parse((REPO / "stages" / f"{name}.py").read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        calls = {n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        # stage_main (stages/launch.py) is the training stages' stage_outputs, with torchrun workers
        assert calls & {"stage_outputs", "stage_main"}, f"stages/{name}.py: main() does not use stage_outputs"
    launch = ast.parse((REPO / "stages" / "launch.py").read_text())
    stage_main = next(n for n in launch.body if isinstance(n, ast.FunctionDef) and n.name == "stage_main")
    assert "stage_outputs" in {n.func.id for n in ast.walk(stage_main) if isinstance(n, ast.Call)
                               and isinstance(n.func, ast.Name)}
