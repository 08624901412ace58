"""The initialisation benchmark: resume, pretraining reuse, a tiny real grid (statistics: test_benchmark_stats)."""

from __future__ import annotations

import csv
import json

import pytest

from mosmos.benchmark import run as benchmark
from mosmos.benchmark.config import BenchmarkConfig
from mosmos.benchmark.plan import make_plan
from mosmos.benchmark.run import run_benchmark
from mosmos.cli import main as cli
from mosmos.config import load_config
from mosmos.errors import ConfigError
from tests.conftest import REPO, tiny_pretrain_overrides

RAW = "nnUNet_raw"
ENCODER_KWARGS = "{channels: [8, 16, 16, 16], strides: [2, 2, 2, 2], num_res_units: 1, norm: batch}"
# a seconds-long stage 2 cell on tiny_synth (the benchmark sets output_dir, datasets, fraction, init)
TINY_FINETUNE = [
    "data.patch_size=[32,32,16]",
    "data.spacing=[10.0,10.0,14.0]",
    "data.val_fraction=0.5",
    "data.samples_per_epoch=4",
    f"model.encoder_kwargs={ENCODER_KWARGS}",
    "train.epochs=1",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.eval_every=1",
    "eval.hd95=false",
]


# ------------------------------------------------------------------------------ the grid, faked runs
@pytest.fixture
def bench_dirs(tmp_path):
    """Empty stand-ins for the datasets: enough for planning (the runners are faked)."""
    for name in ("target", "test", "other"):
        (tmp_path / name).mkdir()
    return tmp_path


def _config(root, **overrides) -> BenchmarkConfig:
    base = {
        "output_dir": str(root / "bench"),
        "data.target": str(root / "target"),
        "data.test": str(root / "test"),
        "data.pretrain_table": str(root / "reports.csv"),
        "data.other_datasets": f"[{root / 'other'}]",
        "strategies": "[random]",
        "fractions": "[0.5, 1.0]",
        "seeds": "[0, 1]",
        "pretrain_config": str(REPO / "configs/pretrain/demo.yaml"),
        "finetune_config": str(REPO / "configs/finetune/demo.yaml"),
        "finetune_overrides": "[train.epochs=2]",
    }
    base.update(overrides)
    return load_config(BenchmarkConfig, None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture
def fake_runners(monkeypatch):
    """Replace training with fakes that write what the real ones write; count the calls."""
    calls = {"cells": [], "variants": []}

    def fake_cell(cell, cfg):
        calls["cells"].append((cell.strategy, cell.fraction, cell.seed))
        rows = ["dataset,case,organ,dice,hd95,gt_voxels,pred_voxels"]
        for case in ("c1", "c2", "c3"):
            for organ in ("kidney_left", "kidney_right"):
                dice = 0.5 + 0.1 * cell.seed + 0.05 * len(case) * cell.fraction
                rows.append(f"Test,{case},{organ},{dice},3.0,10,10")
        (cell.dir / "test").mkdir(parents=True, exist_ok=True)
        (cell.dir / "test" / "cases.csv").write_text("\n".join(rows) + "\n")
        n_train = 1 if cell.budget.startswith("n") else round(4 * cell.fraction)
        return {"train_seconds": 1.5, "steps": 8, "epochs": 2, "best_epoch": 2, "n_train_cases": n_train}

    def fake_variant(variant):
        calls["variants"].append(variant.dir.name)
        variant.dir.mkdir(parents=True, exist_ok=True)
        (variant.dir / "encoder.safetensors").write_bytes(b"fake")
        (variant.dir / "encoder.json").write_text('{"format": "mosmos-encoder-v1"}')

    monkeypatch.setattr(benchmark, "train_and_evaluate", fake_cell)
    monkeypatch.setattr(benchmark, "run_variant", fake_variant)
    return calls


def test_finished_cells_are_skipped_and_unfinished_ones_rerun(bench_dirs, fake_runners):
    cfg = _config(bench_dirs)
    summary = run_benchmark(cfg)
    assert len(fake_runners["cells"]) == 4 and summary.name == "summary.md"
    out = bench_dirs / "bench"
    done = json.loads((out / "runs/random/f0.5_s1/DONE.json").read_text())
    assert done["train_seconds"] == 1.5 and done["seed"] == 1 and done["config_hash"]
    run_benchmark(cfg)
    assert len(fake_runners["cells"]) == 4  # the second call ran nothing
    (out / "runs/random/f1_s0/DONE.json").unlink()  # e.g. killed during its test evaluation
    run_benchmark(cfg)
    assert fake_runners["cells"][4:] == [("random", 1.0, 0)]
    with (out / "results.csv").open() as fh:
        results = list(csv.DictReader(fh))
    assert len(results) == 4 * 2 and set(results[0]) >= {
        "strategy",
        "budget",
        "fraction",
        "seed",
        "organ",
        "dice",
        "hd95",
    }
    with (out / "cases.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4 * 3 * 2
    for name in ("summary.md", "config.yaml", "versions.json", "dice_vs_budget.png", "organ_dice_f0.5.png"):
        assert (out / name).is_file(), name


def test_a_failing_cell_keeps_the_report_of_the_finished_ones(bench_dirs, fake_runners, monkeypatch):
    real = benchmark.train_and_evaluate

    def crash_on_third(cell, cfg):
        if len(fake_runners["cells"]) == 2:
            raise KeyboardInterrupt
        return real(cell, cfg)

    monkeypatch.setattr(benchmark, "train_and_evaluate", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(_config(bench_dirs))
    summary = (bench_dirs / "bench" / "summary.md").read_text()
    assert "2 of 4 cells finished" in summary
    assert not (bench_dirs / "bench" / "runs/random/f1_s0/DONE.json").exists()


def test_a_changed_finetune_config_does_not_mix_with_finished_cells(bench_dirs, fake_runners):
    run_benchmark(_config(bench_dirs, seeds="[0]"))
    with pytest.raises(ConfigError, match="different configuration") as exc:
        run_benchmark(_config(bench_dirs, seeds="[0]", finetune_overrides="[train.epochs=3]"))
    assert "f0.5_s0" in str(exc.value)
    assert len(fake_runners["cells"]) == 2


def test_pretraining_variants_are_keyed_by_their_config_hash(bench_dirs, fake_runners):
    cfg = _config(bench_dirs, strategies="[mosmos, shuffled_tags, mosmos+attention]", seeds="[0]")
    plan = make_plan(cfg)
    assert sorted(plan.variants) == ["mosmos", "shuffled_tags"]  # mosmos+attention reuses mosmos
    mosmos, shuffled = plan.variants["mosmos"], plan.variants["shuffled_tags"]
    assert mosmos.dir.name.startswith("mosmos-") and mosmos.dir.parent == bench_dirs / "bench" / "pretrain"
    assert shuffled.config.data.shuffle_reports and not mosmos.config.data.shuffle_reports
    assert mosmos.config.train.resume == "latest" and mosmos.config.seed == cfg.seed
    assert mosmos.config.data.table == str(bench_dirs / "reports.csv")
    attention = [c for c in plan.cells if c.strategy == "mosmos+attention"]
    assert all(c.config.model.attention_maps and c.config.model.init == str(mosmos.dir) for c in attention)
    assert make_plan(cfg).variants["mosmos"].dir == mosmos.dir  # same config, same folder

    run_benchmark(cfg)
    assert sorted(fake_runners["variants"]) == sorted([mosmos.dir.name, shuffled.dir.name])
    run_benchmark(_config(bench_dirs, strategies="[mosmos]", seeds="[0, 1]"))  # new cells, same variant
    assert len(fake_runners["variants"]) == 2 and len(fake_runners["cells"]) == 6 + 2

    changed = _config(bench_dirs, strategies="[mosmos]", seeds="[0]", pretrain_overrides="[train.epochs=2]")
    new_dir = make_plan(changed).variants["mosmos"].dir
    assert new_dir != mosmos.dir and new_dir.name.startswith("mosmos-")
    # its cells were trained from the old encoder: reusing them would be wrong
    with pytest.raises(ConfigError, match="different configuration"):
        run_benchmark(changed)
    run_benchmark(_config(bench_dirs, output_dir=bench_dirs / "bench2", strategies="[mosmos]", seeds="[0]"))
    assert len(fake_runners["variants"]) == 3  # a new benchmark folder: the variant is trained there


def test_the_summary_quotes_each_stage1_variants_last_held_out_scores(bench_dirs, fake_runners):
    cfg = _config(bench_dirs, strategies="[random, mosmos, shuffled_tags]", seeds="[0]", fractions="[1.0]")
    plan = make_plan(cfg)
    mosmos_dir = plan.variants["mosmos"].dir
    mosmos_dir.mkdir(parents=True)
    history = [  # two evaluations: the summary quotes the last one, not the first
        {"epoch": 1, "step": 30, "tag_present_AUROC": 0.5, "tag_abnormal_AUROC": 0.5, "pointing_game": 0.0},
        {
            "epoch": 2,
            "step": 60,
            "tag_present_AUROC": 0.91234,
            "tag_abnormal_AUROC": 0.7,
            "tag_mAP": 0.75,
            "pointing_game": 0.25,
            "i2t_R@1": 0.125,
        },
    ]
    (mosmos_dir / "metrics.json").write_text(json.dumps({"history": history, "final": history[-1]}))
    summary = run_benchmark(cfg).read_text()
    line = next(x for x in summary.splitlines() if x.startswith("- Pretraining variant mosmos:"))
    assert line.endswith(
        "its held-out scores at step 60: present-tag AUROC 0.912, abnormal-tag AUROC 0.700, "
        "tag mAP 0.750, pointing game 0.250, image-to-report R@1 0.125."
    )
    # the shuffled control's fake run wrote no metrics.json: its line says nothing it does not know
    control = next(x for x in summary.splitlines() if x.startswith("- Pretraining variant shuffled_tags:"))
    assert "held-out" not in control and control.endswith("shared by its cells.")


def test_stage1_ablations_switch_off_their_terms(bench_dirs):
    cfg = _config(bench_dirs, strategies="[contrastive_only, tags_only]", seeds="[0]")
    variants = make_plan(cfg).variants
    c, t = variants["contrastive_only"].config.train, variants["tags_only"].config.train
    assert (c.tag_weight, c.embedding_tag_weight, c.pooled_tag_weight) == (
        0,
        0,
        0,
    ) and c.contrastive_weight > 0
    assert (t.contrastive_weight, t.embedding_tag_weight) == (0, 0) and t.tag_weight > 0


def test_mosmos_is_the_papers_objective_and_the_variant_sits_beside_it(bench_dirs):
    """The demo stage 1 config lists departures; the benchmark's mosmos (and its control) drop them,
    mosmos_variant keeps exactly the named ones."""
    cfg = _config(
        bench_dirs,
        strategies="[mosmos, mosmos_variant, shuffled_tags]",
        seeds="[0]",
        objective_variants="[lit]",
    )
    variants = make_plan(cfg).variants
    paper, lit, control = (variants[n].config.train for n in ("mosmos", "mosmos_variant", "shuffled_tags"))
    assert paper.variants == [] and paper.image_embedding_grad == 1 and paper.pooled_tag_weight == 0
    assert control.variants == [] and variants["shuffled_tags"].config.data.shuffle_reports
    assert lit.variants == ["lit"] and lit.image_embedding_grad == 0 and lit.pooled_tag_weight == 0
    assert not variants["mosmos_variant"].config.model.embedding_from_tags
    cfg.objective_variants = []
    with pytest.raises(ConfigError, match="objective_variants is required"):
        cfg.validate()


def test_label_counts_pretraining_seeds_recipes_and_stage1_spacing_reach_the_cells(bench_dirs):
    cfg = _config(
        bench_dirs,
        strategies="[random, mosmos]",
        fractions="[1.0]",
        label_cases="[2, 1]",
        seeds="[0, 1]",
        pretrain_seeds="[5, 6]",
        **{
            "train.early_stopping_patience": 3,
            "train.pretrained_overrides": "[train.freeze_encoder_steps=7]",
            "train.random_overrides": "[train.lr=0.01]",
        },
    )
    assert cfg.budgets == ["n1", "n2", "f1"]
    plan = make_plan(cfg)
    assert sorted(plan.variants) == ["mosmos@s5", "mosmos@s6"]
    assert [v.config.seed for v in plan.variants.values()] == [5, 6]
    cells = {(c.strategy, c.budget, c.seed): c for c in plan.cells}
    assert len(cells) == 2 * 3 * 2
    n1 = cells[("mosmos", "n1", 1)]
    assert (
        n1.config.data.max_train_cases == 1 and n1.config.data.fraction == 1.0 and n1.variant == "mosmos@s6"
    )
    assert n1.config.model.init == str(plan.variants["mosmos@s6"].dir) and n1.dir.name == "n1_s1"
    assert cells[("mosmos", "f1", 0)].config.data.max_train_cases is None
    assert all(c.config.train.early_stopping_patience == 3 for c in plan.cells)
    rnd, pre = cells[("random", "n2", 0)].config, cells[("mosmos", "n2", 0)].config
    assert (rnd.train.lr, rnd.train.freeze_encoder_steps) == (0.01, 0)
    assert pre.train.freeze_encoder_steps == 7 and pre.train.lr != 0.01
    # the demo fine-tuning config sets its own spacing; with it unset, random cells take stage 1's
    cfg.finetune_overrides = ["train.epochs=2", "data.spacing=null"]
    plan = make_plan(cfg)
    stage1 = plan.variants["mosmos@s5"].config.data
    rnd = next(c for c in plan.cells if c.strategy == "random").config.data
    assert rnd.spacing == list(stage1.spacing) and rnd.hu_window == list(stage1.hu_window)
    assert (
        next(c for c in plan.cells if c.strategy == "mosmos").config.data.spacing is None
    )  # from the export


def test_bad_strategies_and_paths_fail_before_any_work(bench_dirs, fake_runners):
    with pytest.raises(ConfigError, match=r"unknown strategy 'imagenet'.*checkpoint:PATH"):
        _config(bench_dirs, strategies="[random, imagenet]")
    with pytest.raises(ConfigError, match="nope"):
        run_benchmark(_config(bench_dirs, strategies=f"[random, 'checkpoint:{bench_dirs / 'nope'}']"))
    with pytest.raises(ConfigError, match=r"data\.target"):
        run_benchmark(_config(bench_dirs, **{"data.target": bench_dirs / "missing"}))
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        _config(bench_dirs, **{"train.early_stopping_patience": 0})
    with pytest.raises(ConfigError, match="pretrain_seeds"):
        _config(bench_dirs, seeds="[0, 1]", pretrain_seeds="[0]")
    with pytest.raises(ConfigError, match="label budget"):
        _config(bench_dirs, fractions="[]")
    with pytest.raises(ConfigError, match="finetune_overrides"):
        make_plan(_config(bench_dirs, finetune_overrides="[train.epoch=2]"))
    assert fake_runners["cells"] == [] and not (bench_dirs / "bench" / "runs").exists()


# ------------------------------------------------------------------------- a tiny real grid
def test_a_tiny_grid_end_to_end_then_a_second_call_skips_it(tiny_synth, tmp_path, monkeypatch):
    raw = tiny_synth / RAW
    out = tmp_path / "bench"
    pretrain = tiny_pretrain_overrides(
        tiny_synth,
        tmp_path / "unused",
        **{"train.epochs": 1, "train.deterministic": "false", "eval.attention_overlays": 0},
    )
    skip = ("output_dir=", "data.table=", "data.image_root=", "data.ground_truth=", "data.cache_dir=")
    yaml_list = lambda items: json.dumps([i for i in items if not i.startswith(skip)])  # noqa: E731
    config = tmp_path / "bench.yaml"
    config.write_text(
        "\n".join(
            [
                f"output_dir: {out}",
                "seed: 0",
                "data:",
                f"  target: {raw / 'Dataset012_KidneyB'}",
                f"  test: {raw / 'Dataset099_SynthTest'}",
                f"  pretrain_table: {tiny_synth / 'pretrain' / 'reports.csv'}",
                f"  pretrain_image_root: {tiny_synth / 'pretrain' / 'images'}",
                f"  pretrain_ground_truth: {tiny_synth / 'pretrain' / 'ground_truth'}",
                f"  other_datasets: [{raw / 'Dataset011_AbdomenA'}, {raw / 'Dataset013_VesselsC'}]",
                "strategies: [random, mosmos, multidataset]",
                "fractions: [1.0]",
                "seeds: [0]",
                f"pretrain_config: {REPO / 'configs/pretrain/demo.yaml'}",
                f"pretrain_overrides: {yaml_list(pretrain)}",
                f"finetune_config: {REPO / 'configs/finetune/demo.yaml'}",
                f"finetune_overrides: {json.dumps(TINY_FINETUNE)}",
            ]
        )
        + "\n"
    )
    assert cli(["benchmark", "--config", str(config)]) == 0
    for name in (
        "results.csv",
        "cases.csv",
        "curves.csv",
        "summary.md",
        "dice_vs_budget.png",
        "dice_vs_steps.png",
        "organ_dice_f1.png",
    ):
        assert (out / name).is_file(), name
    for strategy in ("random", "mosmos", "multidataset"):
        cell = out / "runs" / strategy / "f1_s0"
        done = json.loads((cell / "DONE.json").read_text())
        assert done["steps"] == 2 and done["train_seconds"] > 0
        assert (cell / "test" / "cases.csv").is_file()
        # the default curve points (1/8, 1/4, 1/2 of a 2-step cap) all land on step 1: one snapshot
        assert done["step_cap"] == 2 and done["curve"] == [{"step": 1, "fraction": 0.125}]
        assert (cell / "snapshots" / "step_1" / "model.safetensors").is_file()
        assert (cell / "test_step_1" / "cases.csv").is_file()
    with (out / "curves.csv").open() as fh:
        curves = list(csv.DictReader(fh))
    points = sorted((r["strategy"], int(r["step"]), r["weights"]) for r in curves)
    assert points == sorted(
        (s, step, w)
        for s in ("random", "mosmos", "multidataset")
        for step, w in ((1, "snapshot"), (2, "best_validation"))
    )
    md = next((out / "pretrain").glob("multidataset-*"))
    export = json.loads((md / "encoder.json").read_text())
    assert export["format"] == "mosmos-encoder-v2" and export["feature_strides"]
    assert export["encoder_kwargs"]["channels"] == [8, 16, 16, 16] and export["tag_attention"] is None
    assert export["objective"]["datasets"] == ["Dataset011_AbdomenA", "Dataset013_VesselsC"]
    assert export["preprocess"]["spacing"] == [10.0, 10.0, 14.0]
    with (out / "results.csv").open() as fh:
        results = list(csv.DictReader(fh))
    target_organs = json.loads((out / "runs/random/f1_s0/model.json").read_text())["organs"]
    organs = {r["organ"] for r in results}
    assert organs <= set(target_organs) and "liver" not in organs  # only what KidneyB labels is scored
    assert len(results) == 3 * len(organs) and all(0 <= float(r["dice"]) <= 1 for r in results)
    summary = (out / "summary.md").read_text()
    assert "no early stopping" in summary and "fraction 1: mosmos vs random" in summary
    assert "Learning curves: each cell's weights after optimizer step 1 (curve_points" in summary
    assert "p n/a" in summary  # one test case and seed: too few pairs for a p-value

    def fail(*args, **kwargs):
        raise AssertionError("a finished benchmark must not train again")

    monkeypatch.setattr(benchmark, "train_and_evaluate", fail)
    monkeypatch.setattr(benchmark, "run_variant", fail)
    (out / "summary.md").unlink()
    assert cli(["benchmark", "--config", str(config)]) == 0
    assert (out / "summary.md").read_text() == summary
