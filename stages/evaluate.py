"""evaluate: test-set top-1/top-5 of the best and last checkpoint of every trained model.

The test split is read here and nowhere earlier, so it never picks a checkpoint.
Writes ``reports/evaluate/metrics.json`` and, per model, ``confusion/<role>.json`` pairs for
DVC's confusion template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlib.checkpoint import model_from_checkpoint
from kdlib.data import BatchNormalizer
from kdlib.data.index import DatasetIndex
from kdlib.metrics import EvalResult, confusion_matrix, evaluate
from kdlib.models import count_parameters
from kdlib.runtime import Runtime, make_loader, seed_everything
from stages.common import MODELS_DIR, REPORTS_DIR, ROLES, load_split, prepared_index, write_json
from stages.params import load_params


def evaluate_checkpoint(params: dict[str, Any], index: DatasetIndex, path: Path) -> tuple[EvalResult, dict, int]:
    """Test-split result, checkpoint metadata and parameter count of one checkpoint."""
    model, meta = model_from_checkpoint(path)
    dataset_preset = params["datasets"][params["dataset"]]
    test_set = load_split(index, "test", dataset_preset, meta["input_size"], False)
    runtime = Runtime.from_env("auto")
    loader = make_loader(test_set, params["eval"]["batch_size"], False, 0, runtime)
    normalizer = BatchNormalizer(meta["mean"], meta["std"]).to(runtime.device)
    result = evaluate(model.to(runtime.device), loader, normalizer, runtime.device, None, test_set.ignore,
                      dataset_preset.get("ap_mode", "voc"))
    return result, meta, count_parameters(model)


def main() -> None:
    params = load_params()
    seed_everything(params["seed"])
    index = prepared_index()
    out_dir = REPORTS_DIR / "evaluate"
    metrics: dict[str, Any] = {}
    confusions: dict[str, Any] = {"classes": index.meta.classes}
    multilabel = index.meta.task == "multilabel"
    score = "mAP" if multilabel else "top1"
    for role in ROLES:
        row: dict[str, Any] = {}
        for which in ("best", "last"):
            path = MODELS_DIR / role / f"{which}.pt"
            result, meta, n_params = evaluate_checkpoint(params, index, path)
            row[which] = {**{k: round(v, 4) for k, v in result.metrics.items()},
                          "loss": round(result.loss, 6), "epoch": meta["epoch"]}
            if which == "best":
                row.update(params=n_params, checkpoint_bytes=path.stat().st_size)
                names, pairs = meta["classes"], []
                if not multilabel:  # a confusion matrix needs one label per image
                    pairs = [{"actual": names[a], "predicted": names[p]}
                             for a, p in zip(result.targets.tolist(), result.predictions.tolist())]
                    confusions[role] = confusion_matrix(result.targets, result.predictions, len(names)).tolist()
                write_json(out_dir / "confusion" / f"{role}.json", pairs)
        metrics[role] = row
        print(f"{role:9s} best {score} {row['best'][score]:.2f}  last {score} {row['last'][score]:.2f}")
    metrics[f"kd_gain_{score}"] = round(metrics["distill"]["best"][score] - metrics["baseline"]["best"][score], 4)
    write_json(out_dir / "confusion_matrices.json", confusions)
    write_json(out_dir / "metrics.json", metrics)


if __name__ == "__main__":
    main()
