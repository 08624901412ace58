"""``mosmos info``: organs, tasks, preprocessing, objective and scores of a run or an export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mosmos.api_export import _SEGMENTER_JSON, _pretrained_config, _read_json, _scores, run_kind
from mosmos.errors import ConfigError
from mosmos.export import read_encoder_export

__all__ = ["format_info", "run_info"]

#: Stage 1 scores ``mosmos info`` shows first (every scalar of the final evaluation is recorded).
_STAGE1_HEADLINE = (
    "i2t_R@1",
    "t2i_R@1",
    "i2t_R@5",
    "t2i_R@5",
    "tag_mAP",
    "tag_AUROC",
    "tag_abnormal_AUROC",
    "pointing_game",
)


def run_info(path: str | Path) -> dict[str, Any]:
    """What ``mosmos info`` prints, as a dict: kind, organs, tasks, preprocessing, objective, scores."""
    path = Path(path)
    kind = run_kind(path)
    if kind == "export":
        config = _pretrained_config(path)
        kind, record, scores = config["kind"], config[config["kind"]], config.get("scores", {})
        commit = (config.get("source") or {}).get("commit", "")
    else:
        if kind == "encoder":
            record = read_encoder_export(path)[0].to_dict()
        else:
            record = _read_json(path / _SEGMENTER_JSON)
            if not isinstance(record, dict):
                raise ConfigError(f"{path / _SEGMENTER_JSON}: expected a JSON object")
        scores, commit = _scores(path, kind), record.get("commit", "")
    if kind == "encoder":
        objective = record.get("objective") or {}
        tasks: list[dict[str, Any]] = []
        extra = {"architecture": record.get("architecture"), "text": (record.get("text") or {}).get("name")}
    else:
        objective = {"strategy": record.get("strategy"), "init": record.get("init", "random")}
        tasks = list(record.get("tasks") or [])
        extra = {"architecture": f"{record.get('name')} on {record.get('encoder')}"}
    return {
        "path": str(path),
        "kind": kind,
        "organs": list(record.get("organs") or []),
        "tasks": tasks,
        "preprocess": record.get("preprocess") or {},
        "objective": objective,
        "scores": scores,
        "commit": commit,
        **extra,
    }


def format_info(info: dict[str, Any]) -> str:
    """The text ``mosmos info`` prints."""
    stage = "stage 1 encoder" if info["kind"] == "encoder" else "stage 2 segmenter"
    lines = [f"{info['path']}: {stage} ({info.get('architecture')})"]
    if info.get("text"):
        lines.append(f"text tower: {info['text']}")
    lines.append(f"organs ({len(info['organs'])}): {', '.join(info['organs']) or '-'}")
    if info["kind"] == "segmenter":
        lines.append(f"tasks ({len(info['tasks'])}):")
        lines += [f"  {t.get('name')}: {', '.join(t.get('organs', []))}" for t in info["tasks"]]
    pre = info["preprocess"]
    keys = ("spacing", "size", "hu_window", "body_threshold_hu", "resize_mode")
    lines.append("preprocessing: " + ", ".join(f"{k} {pre[k]}" for k in keys if k in pre))
    objective = dict(info["objective"])
    name = objective.pop("name", None)
    lines.append(f"objective: {name}" if name else "objective:")
    lines += [f"  {k}: {v}" for k, v in objective.items()]
    scores = dict(info["scores"])
    if not scores:
        lines.append("scores: none recorded (no metrics.json)")
    else:
        weights = scores.pop("weights", "")
        best_map = scores.pop("best_tag_mAP", None)
        lines.append(f"scores (of the {weights} weights):")
        shown = [k for k in (*_STAGE1_HEADLINE, "mean_dice", "mean_hd95") if k in scores]
        shown += sorted(k for k in scores if k.startswith("dice/"))
        lines += [f"  {k:28s} {scores[k]:.4f}" for k in shown]
        if "epoch" in scores:
            lines.append(f"  {'epoch':28s} {int(scores['epoch'])}")
        if best_map:
            lines.append(f"  best tag_mAP {best_map['value']:.4f} at epoch {best_map['epoch']}")
    if info.get("commit"):
        lines.append(f"commit: {info['commit']}")
    return "\n".join(lines)
