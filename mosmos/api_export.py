"""``mosmos export``: what a run or export folder is, and a finished run written as an export.

``mosmos export RUN --output DIR`` writes a self-contained folder in Hugging Face's layout:

- ``config.json``: what the model is (``model_type: mosmos``, :data:`FORMAT`, ``kind``: ``encoder``
  for a stage 1 run, ``segmenter`` for a stage 2 one), its record (``encoder``: what the run's
  ``encoder.json`` holds; ``segmenter``: its ``model.json``), the run's scores, resolved config,
  library versions and commit;
- ``model.safetensors``: the weights (a stage 1 export's are named as in ``encoder.safetensors``:
  encoder, tag head, image and text projections);
- ``text/``: stage 1's text tower and tokenizer (a Hugging Face model folder), so image-report
  retrieval works from the export;
- ``model.json`` (stage 2 only): the network spec again, so ``mosmos predict -m DIR`` and
  ``mosmos evaluate --model DIR`` take the export as they take the run.

:func:`run_kind` tells a stage 1 run, a stage 2 run and an export apart; :func:`export_run` writes
the folder that :func:`mosmos.from_pretrained` loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mosmos.errors import ConfigError
from mosmos.export import read_encoder_export
from mosmos.export_format import ENCODER_JSON, ENCODER_WEIGHTS, PRETRAINED_CONFIG, PRETRAINED_WEIGHTS
from mosmos.io import write_json

__all__ = ["FORMAT", "export_run", "run_kind"]

FORMAT = "mosmos-pretrained-v1"
_SEGMENTER_JSON, _SEGMENTER_WEIGHTS = "model.json", "model.safetensors"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def _pretrained_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` of a ``mosmos export`` folder, None for any other folder."""
    cfg_path = path / PRETRAINED_CONFIG
    if not cfg_path.is_file():
        return None
    data = _read_json(cfg_path)
    if not isinstance(data, dict) or data.get("model_type") != "mosmos":
        return None
    if data.get("format") != FORMAT or data.get("kind") not in ("encoder", "segmenter"):
        raise ConfigError(
            f"{cfg_path}: format {data.get('format')!r}, kind {data.get('kind')!r}; expected {FORMAT!r} "
            "of kind 'encoder' or 'segmenter' (export it again with this version of mosmos)"
        )
    return data


def run_kind(path: str | Path) -> str:
    """``"encoder"`` (stage 1 run), ``"segmenter"`` (stage 2 run) or ``"export"`` (``mosmos export``)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder (expected a stage 1 or stage 2 run, or an export)")
    if _pretrained_config(path) is not None:
        return "export"
    if (path / ENCODER_JSON).is_file():
        return "encoder"
    if (path / _SEGMENTER_JSON).is_file():
        return "segmenter"
    raise ConfigError(
        f"{path}: neither a stage 1 run ({ENCODER_JSON}), a stage 2 run ({_SEGMENTER_JSON}) nor a "
        f"mosmos export ({PRETRAINED_CONFIG}); a run writes them when it finishes"
    )


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("train/")
    }


def _scores(run: Path, kind: str) -> dict[str, Any]:
    """What the run's ``metrics.json`` says of the weights it exported.

    Stage 2 keeps its best weights by mean validation Dice (``best``); stage 1 exports its last
    ones (``final``), and the epoch that scored the best tag mAP is noted beside them."""
    path = run / "metrics.json"
    if not path.is_file():
        return {}
    metrics = _read_json(path)
    if not isinstance(metrics, dict):
        return {}
    if kind == "segmenter":
        best = metrics.get("best") or metrics.get("final") or {}
        return {"weights": "best mean_dice", **_scalars(best)}
    history = [h for h in metrics.get("history", []) if isinstance(h, dict)]
    scores: dict[str, Any] = {"weights": "final", **_scalars(metrics.get("final") or {})}
    ranked = [h for h in history if isinstance(h.get("tag_mAP"), (int, float))]
    if ranked:
        best = max(ranked, key=lambda h: h["tag_mAP"])
        scores["best_tag_mAP"] = {"value": float(best["tag_mAP"]), "epoch": best.get("epoch")}
    return scores


def _run_config(run: Path) -> dict[str, Any] | None:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def _config_record(run: Path, kind: str) -> dict[str, Any]:
    """``config.json`` of an export of ``run`` (checked: the run's weights load)."""
    from mosmos import __version__

    if kind == "encoder":
        meta, _ = read_encoder_export(run)  # every file and key checked
        record, commit = meta.to_dict(), meta.commit
    else:
        from mosmos.finetune.inference import load_model

        _, spec = load_model(run)  # the spec parses and the weights fit it
        record, commit = spec.to_dict(), spec.extra.get("commit", "")
    versions = run / "versions.json"
    return {
        "model_type": "mosmos",
        "format": FORMAT,
        "kind": kind,
        "mosmos_version": __version__,
        "source": {"run": str(run.resolve()), "commit": commit},
        "scores": _scores(run, kind),
        "run_config": _run_config(run),
        "versions": _read_json(versions) if versions.is_file() else None,
        kind: record,
    }


def export_run(run: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write ``run`` (a finished stage 1 or stage 2 run) as a self-contained folder ``output``.

    The folder is built beside ``output`` and renamed into place, so a failed export leaves nothing.

    Raises:
        ConfigError: ``run`` is no finished run (or is already an export), its files do not load,
            or ``output`` exists and is not empty (without ``overwrite``).
    """
    run, output = Path(run), Path(output)
    kind = run_kind(run)
    if kind == "export":
        raise ConfigError(f"{run} is already a mosmos export; copy the folder instead")
    if output.resolve() == run.resolve() or run.resolve() in output.resolve().parents:
        raise ConfigError(f"--output {output} is inside the run {run}; choose a folder outside it")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConfigError(
            f"--output {output} exists and is not empty; choose another folder or pass --overwrite"
        )
    config = _config_record(run, kind)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if kind == "encoder":
            shutil.copyfile(run / ENCODER_WEIGHTS, tmp / PRETRAINED_WEIGHTS)
            text = config["encoder"].get("text")
            if text is not None:
                src = run / text.get("dir", "text")
                if not (src / "config.json").is_file():
                    raise ConfigError(f"{src}: the run's text tower is missing (no config.json)")
                shutil.copytree(src, tmp / text.get("dir", "text"))
        else:
            shutil.copyfile(run / _SEGMENTER_WEIGHTS, tmp / PRETRAINED_WEIGHTS)
            write_json(tmp / _SEGMENTER_JSON, config["segmenter"])
        write_json(tmp / PRETRAINED_CONFIG, config)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
