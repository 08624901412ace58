"""`mosmos demo` end to end at a seconds-long budget: every stage's one-line result, the summary and its pictures."""

from __future__ import annotations

import re
import shutil

from mosmos.cli.demo import QUICK, run_demo


def _tiny_budget() -> dict[str, list[str]]:
    # the quick budget's keys (mask supervision included), shrunk to a few steps on 32^3 phantoms
    pretrain = [o for o in QUICK["pretrain"] if o.startswith("data.mask_datasets")] + [
        "data.mask_max_cases=1",
        "data.mask_ratio=0.25",
        "data.size=[32,32,16]",
        "data.spacing=[10.0,10.0,14.0]",
        "data.val_fraction=0.25",
        "model.encoder_kwargs={channels: [8, 16, 16, 16], strides: [2, 2, 2, 2], num_res_units: 1, norm: batch}",
        "model.text_kwargs={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
        "model.tokenizer_vocab_size=200",
        "model.embed_dim=16",
        "model.tag_head.dim=16",
        "train.epochs=2",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.channels_last=false",
        "train.num_workers=0",
    ]
    small = "model.encoder_kwargs={channels: [8, 16, 16, 16], strides: [2, 2, 2, 2], num_res_units: 1, norm: batch}"
    finetune = [
        "data.spacing=[10.0,10.0,14.0]",
        "data.patch_size=[32,32,16]",
        "data.samples_per_epoch=4",
        small,
        "train.epochs=1",
        "train.warmup_steps=1",
        "train.eval_every=1",
        "train.channels_last=false",
        "train.num_workers=0",
    ]
    benchmark = ["label_cases=[1]", "fractions=[]", "seeds=[0]", "curve_points=[]"]
    cells = [*finetune[:3], small, "data.samples_per_epoch=2", "train.epochs=1", *finetune[6:]]
    return {"pretrain": pretrain, "finetune": finetune, "benchmark": benchmark, "benchmark_cells": cells}


def test_demo_runs_every_stage_and_writes_the_summary(tiny_synth, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(tiny_synth, out / "data")  # synth.json present: the demo reuses the data
    assert run_demo(out, budget=_tiny_budget()) == 0
    printed = capsys.readouterr().out
    # six stages, each with its one-line result, and the summary's path
    for i, stage in enumerate(("synth", "pretrain", "finetune", "evaluate", "predict", "benchmark"), start=1):
        assert f"[{i}/6] {stage}" in printed
    assert printed.count("      -> ") == 6
    assert re.search(r"-> \d+ steps in \d+ s: held-out tag AUROC present \d\.\d\d", printed)
    assert re.search(r"-> mean Dice \d\.\d{3} over 1 test cases", printed)
    # one test case: no paired test can run, so the demo must not claim a difference
    assert "this budget cannot separate the strategies" in printed and "p n/a" in printed
    summary = out / "summary.md"
    assert f"The summary: {summary}" in printed
    text = summary.read_text(encoding="utf-8")
    # the Dice table lists the organs the evaluation scored, with the evaluation's own numbers
    import json

    scored = json.loads((out / "quick" / "finetune" / "eval_test" / "metrics.json").read_text())["summary"]
    for key, value in scored.items():
        if key.startswith("dice/") and key.count("/") == 2:
            assert f"| {key.rsplit('/', 1)[1]} | {value:.3f} |" in text
    # every picture the summary links exists and is a PNG (attention montage, prediction, benchmark plot)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert any("montage_" in link for link in links)
    assert "summary_files/prediction.png" in links
    assert any("dice_vs_budget" in link for link in links)
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the quick budget's overrides are printed for rerunning by hand
    assert "## Reproduce by hand" in text and "train.epochs=2" in text
