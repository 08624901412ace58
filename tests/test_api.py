"""``mosmos export``, ``mosmos.from_pretrained`` and ``mosmos info`` on tiny real runs."""

from __future__ import annotations

import json

import pytest
import torch

import mosmos
from mosmos.cli import main as cli
from tests.conftest import REPO, tiny_pretrain_overrides

#: Scores of the run's own evaluation that the export must reproduce.
RETRIEVAL = ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "i2t_R@10", "t2i_R@10", "i2t_MedR", "t2i_MedR")
TAGS = ("tag_AUROC", "tag_mAP", "tag_abnormal_AUROC")


@pytest.fixture(scope="module")
def stage1_run(tiny_synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "pre"
    overrides = tiny_pretrain_overrides(tiny_synth, run, **{"train.epochs": 1, "eval.attention_overlays": 0})
    assert cli(["pretrain", "--config", str(REPO / "configs/pretrain/demo.yaml"), *overrides]) == 0
    return run


def test_an_exported_stage1_run_gives_the_runs_own_retrieval_scores(stage1_run, tiny_synth, tmp_path):
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.pretrain.data import build_datasets
    from mosmos.pretrain.evaluate import collect_outputs, compute_metrics
    from mosmos.vocabulary import load_vocabulary

    out = tmp_path / "export"
    assert cli(["export", str(stage1_run), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "text"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mosmos" and config["kind"] == "encoder"
    assert config["encoder"]["objective"]["name"].startswith("mosmos")
    assert config["encoder"]["temperature"] > 0 and set(config["encoder"]["projections"]) == {"image", "text"}

    # the run's validation set, read as the run read it, through the export alone
    model = mosmos.from_pretrained(out)
    cfg = load_config(PretrainConfig, str(stage1_run / "config.yaml"))
    data = build_datasets(cfg, load_vocabulary(cfg.data.vocabulary, cfg.data.organs))
    loader = torch.utils.data.DataLoader(
        data.val,
        batch_size=cfg.train.batch_size,
        collate_fn=data.make_collator(model.tokenizer, cfg.data.max_length),
    )
    outputs = collect_outputs(model.model, loader, torch.device("cpu"), cfg.eval.max_cases)
    got = compute_metrics(outputs, model.organs, data.organ_label_ids, spacing=list(cfg.data.spacing))
    want = json.loads((stage1_run / "metrics.json").read_text())["final"]
    for key in (*RETRIEVAL, *TAGS, "pointing_game"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # the embeddings are not constant: the scores above could differ
    assert outputs["image_emb"].std(0).max() > 1e-4 and outputs["text_emb"].std(0).max() > 1e-4

    # the three-line use: a volume and two reports
    image, mask = model.load_image(sorted((tiny_synth / "pretrain" / "images").rglob("*.nii.gz"))[0])
    similarity = model.encode_image(image, mask) @ model.encode_text(["The liver is normal.", "No spleen."]).T
    assert similarity.shape == (1, 2) and type(similarity) is torch.Tensor


def test_the_export_is_also_an_encoder_for_stage2(stage1_run, tmp_path):
    out = tmp_path / "export"
    assert cli(["export", str(stage1_run), "-o", str(out)]) == 0
    a, b = mosmos.load_encoder(out), mosmos.load_encoder(stage1_run)
    for (key, x), (_, y) in zip(a.encoder.state_dict().items(), b.encoder.state_dict().items(), strict=True):
        assert torch.equal(x, y), key
    assert a.export.organs == b.export.organs


def test_export_refuses_what_it_cannot_write_and_leaves_nothing(stage1_run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert cli(["export", str(stage1_run), "-o", str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "e")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli(["export", str(busy), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "neither a stage 1 run" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no half-made export


def test_info_prints_organs_preprocessing_objective_and_scores(stage1_run, capsys):
    assert cli(["info", str(stage1_run)]) == 0
    text = capsys.readouterr().out
    objective = json.loads((stage1_run / "encoder.json").read_text())["objective"]["name"]
    assert "stage 1 encoder" in text and "liver" in text and "spacing [10.0, 10.0, 14.0]" in text
    assert f"objective: {objective}" in text and "i2t_R@1" in text
    assert cli(["info", "--json", str(stage1_run)]) == 0
    info = json.loads(capsys.readouterr().out)
    want = json.loads((stage1_run / "metrics.json").read_text())["final"]["i2t_R@1"]
    assert info["scores"]["i2t_R@1"] == want and info["kind"] == "encoder"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mosmos {mosmos.__version__}"


def test_the_readme_python_example_runs(stage1_run, tiny_synth, tmp_path, monkeypatch):
    """The README's Python block, as written, against a real stage 1 run at ``runs/pretrain``."""
    import re
    import shutil

    [code] = re.findall(
        r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.S | re.M
    )
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "pretrain").symlink_to(stage1_run, target_is_directory=True)
    scan = next((tiny_synth / "pretrain" / "images").glob("*.nii.gz"))
    shutil.copy(scan, tmp_path / "ct.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["similarity"].shape) == (1, 1)
