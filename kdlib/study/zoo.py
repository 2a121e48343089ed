"""The same- vs cross-architecture teacher study's three claims, answered from a study's rows.

1. Does distillation help? The paired difference distilled − baseline over every (teacher,
   student, seed) of the study (paired t-test).
2. Does a better teacher give a better student? The repeated-measures correlation between the
   teacher's test score and the distilled student's over cells, grouped by student (each centred
   on its student's means, so that the students' own levels do not make the correlation; N − k − 1
   degrees of freedom for N cells of k students).
3. Does a same-family teacher help more? Welch's t-test of the per-seed gains of same-family
   cells against cross-family cells.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence


from kdlib.study.stats import group_difference, paired_difference, within_correlation


def family_of(families: Mapping[str, str], preset: str | None, where: str) -> str:
    if preset not in families:
        raise KeyError(f"{where}: families has no entry for the preset {preset!r}; add `{preset}: <family>`")
    return families[preset]


def claims(rows: Sequence[Mapping[str, Any]], families: Mapping[str, str], where: str) -> list[dict[str, Any]]:
    """Each claim: ``question``, ``answer`` (a sentence with the figures), the statistic's fields."""
    pairs_d, pairs_b = [], []
    same, cross = [], []
    by_student: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        for s in r["per_seed"]:
            if s["distill_best"] is not None and s["baseline_best"] is not None:
                pairs_d.append(s["distill_best"])
                pairs_b.append(s["baseline_best"])
                teacher, student = (family_of(families, r[f"{role}_preset"], where) for role in ("teacher", "distill"))
                (same if teacher == student else cross).append(s["distill_best"] - s["baseline_best"])
        by_student[r["distill_preset"]].append((r["teacher_best"]["mean"], r["distill_best"]["mean"]))
    helps = paired_difference(pairs_d, pairs_b)
    better = within_correlation(list(by_student.values()))
    family = group_difference(same, cross)

    def verdict(p: float, positive: bool) -> str:
        if p != p:  # NaN
            return "Not testable with these cells"
        if p < 0.05:
            return "Yes" if positive else "No, the opposite"
        return "Not shown (p ≥ 0.05)"
    return [
        {"question": "Does distillation help?", **helps.as_dict(),
         "answer": f"{verdict(helps.p_t, helps.mean > 0)}: mean paired gain {helps.mean:+.2f} pt over {helps.n} "
                   f"(teacher, student, seed) pairs, 95% CI [{helps.ci95_low:+.2f}, {helps.ci95_high:+.2f}], "
                   f"paired t-test p = {helps.p_t:.3g}"},
        {"question": "Does a better teacher give a better student?", **better.as_dict(),
         "answer": f"{verdict(better.p, better.r > 0)}: repeated-measures r = {better.r:.2f} between teacher and "
                   f"distilled student score over {better.n} cells of students with two teachers or more "
                   f"(centred per student), p = {better.p:.3g}"},
        {"question": "Does a same-family teacher help more?", **family.as_dict(),
         "answer": f"{verdict(family.p_welch, family.difference > 0)}: same-family gain minus cross-family gain "
                   f"{family.difference:+.2f} pt ({family.n_a} vs {family.n_b} runs), Welch t-test "
                   f"p = {family.p_welch:.3g}"},
    ]
