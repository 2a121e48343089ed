"""Feature mimicking by L2 + LSH (``lshl2``), LSHFM's default method.

Wang, Ge, Wu, "Distilling Knowledge by Mimicking Features", TPAMI 2021, arXiv:2011.01424.
The L2 term matches the feature's magnitude and direction, the LSH term its direction
(:mod:`kdlib.losses.l2`, :mod:`kdlib.losses.lsh`):

.. math::

    L = \\gamma\\,\\mathcal L_{hard} + \\beta\\,\\big(\\mathcal L_2 + \\mathcal L_{LSH}\\big), \\qquad
    \\mathcal L_2 = \\frac{1}{BD}\\lVert f_s - f_t\\rVert^2, \\quad
    \\mathcal L_{LSH} = \\frac{1}{BN}\\sum_{i,j}\\mathrm{BCEWithLogits}(w_j^\\top f_s + b_j,\\ y_{ij})

:math:`\\mathcal L_{hard}` is CE_ε, or BCE with ``multilabel=True``. LSHFM's multi-label recipe
runs it twice: stage 1 trains only ``feat_fc`` with γ = 0, β = 1; stage 2 trains everything with
γ = 1 and β = 0.5 (VOC) or 3 (COCO). Its single-label CIFAR-100 recipe uses the masked variant
``lshl2_s`` with β = 6.

Knobs and context: as ``lsh`` (``beta`` 1, ``gamma`` 1, ``num_hyperplanes`` None = 32·D,
``sigma`` None = teacher classifier std, ``bias`` "median", ``force_feat_fc`` False;
``label_smoothing``, ``multilabel``, ``lsh``). Terms logged: ``ce``/``bce``, ``l2``, ``lsh``.
"""
from __future__ import annotations

from torch import Tensor

from kdlib.losses._common import require_features
from kdlib.losses.ce import hard_loss
from kdlib.losses.l2 import l2_loss
from kdlib.losses.lsh import LSHHyperplanes, LSHMethodBase, lsh_loss
from kdlib.losses.registry import MULTICLASS, MULTILABEL, LossOutput, StudentOutput, TeacherOutput, register_method


def lshl2_loss(student_features: Tensor, teacher_features: Tensor, hyperplanes: LSHHyperplanes) -> Tensor:
    """``L2(f_s, f_t) + LSH(f_s, f_t)``, both means over the batch (and D, resp. N)."""
    return l2_loss(student_features, teacher_features) + lsh_loss(student_features, teacher_features, hyperplanes)


@register_method("lshl2")
class LSHL2Loss(LSHMethodBase):
    """``γ·hard + β·(L2 + L_LSH)`` (see the module docstring)."""

    needs_teacher = True
    needs_features = True
    uses_distillation_token = False
    tasks = (MULTICLASS, MULTILABEL)
    soft_targets = "mixed"
    uses_progress = False
    uses_positions = False
    uses_layers = False

    def forward(
        self, student: StudentOutput, targets: Tensor, teacher: TeacherOutput | None = None
    ) -> LossOutput:
        f_s, f_t = require_features("lshl2", student, teacher)
        hyperplanes = self.hyperplanes("lshl2")
        name, hard = hard_loss(student.logits, targets, self.label_smoothing, self.multilabel)
        l2 = l2_loss(f_s, f_t)
        lsh = lsh_loss(f_s, f_t, hyperplanes)
        total = self.gamma * hard + self.beta * (l2 + lsh)
        return LossOutput(total, {name: hard.detach(), "l2": l2.detach(), "lsh": lsh.detach()})
