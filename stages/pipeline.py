"""The training half of ``dvc.yaml`` in one process, for tests and benchmarks that call the stage
functions on a scratch :class:`~stages.workspace.Workspace` instead of running ``dvc repro``."""
from __future__ import annotations

from kdlib.train import FitResult
from stages.align import align
from stages.params import ROLES, Run
from stages.prepare import prepare
from stages.teacher_cache import build_cache
from stages.train import train_role
from stages.workspace import Workspace

__all__ = ["prepare", "train_pipeline"]


def train_pipeline(run: Run, ws: Workspace, roles: tuple[str, ...] = ROLES, progress: bool = False
                   ) -> dict[str, tuple[FitResult, int]]:
    """The training stages in ``dvc.yaml``'s order: ``distill`` is preceded by ``teacher_cache``
    and ``align``, as in the pipeline."""
    results = {}
    for role in roles:
        if role == "distill":
            build_cache(run, ws, progress)
            align(run, ws)
        results[role] = train_role(run, role, ws, progress=progress)
    return results
