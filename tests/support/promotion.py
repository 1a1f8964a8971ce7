"""metrics/promote.json as the promote stage writes it: a challenger kept out, and one
promoted (for the report's banner and the Prefect summary)."""

from __future__ import annotations

KEPT = {
    "decision": "kept", "version": 3, "production_version": 2, "champion_version": 2,
    "reason": "the challenger is worse: top-1 0.4000 vs 0.9000 <b>(p = 1.2e-05)</b>",
    "p_value": 1.2e-05, "images": 1234, "left_out": 17,
    "challenger": {"top1": 0.4, "mean_class_accuracy": 0.38},
    "champion": {"top1": 0.9, "mean_class_accuracy": 0.88},
    "challenger_only_right": 5, "champion_only_right": 622,
    "classes": {"compared": 12, "added": 0, "removed": 0},
}  # fmt: skip
PROMOTED = {
    **KEPT, "decision": "promoted", "version": 2, "production_version": 2, "champion_version": 1,
    "reason": "not worse than the champion (p = 0.84 for a drop)", "p_value": 0.84,
    "challenger": {"top1": 0.93, "mean_class_accuracy": 0.91},
    "champion": {"top1": 0.9, "mean_class_accuracy": 0.88},
}  # fmt: skip
