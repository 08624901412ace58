"""The benchmark's partial-label axis: its plan, its report's statistics, a tiny real run of two strategies."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.stats

from mosmos.benchmark import run as benchmark
from mosmos.benchmark.comparisons import comparison_family
from mosmos.benchmark.config import PARTIAL_STRATEGIES, BenchmarkConfig
from mosmos.benchmark.hashing import config_hash
from mosmos.benchmark.plan import make_plan
from mosmos.benchmark.run import run_benchmark
from mosmos.cli import main as cli
from mosmos.config import load_config
from mosmos.errors import ConfigError
from tests.conftest import REPO
from tests.test_benchmark import RAW, TINY_FINETUNE

ALL = list(PARTIAL_STRATEGIES)


@pytest.fixture
def dirs(tmp_path):
    """Empty stand-ins for the datasets: enough for planning (training is faked or not run)."""
    for name in ("target", "test", "other_a", "other_b"):
        (tmp_path / name).mkdir()
    return tmp_path


def _config(root, **overrides) -> BenchmarkConfig:
    base = {
        "output_dir": str(root / "bench"),
        "data.target": str(root / "target"),
        "data.test": str(root / "test"),
        "data.other_datasets": f"[{root / 'other_a'}, {root / 'other_b'}]",
        "strategies": "[random]",
        "partial_strategies": f"[{', '.join(ALL)}]",
        "fractions": "[1.0]",
        "label_cases": "[2]",
        "seeds": "[0, 1]",
        "pretrain_config": str(REPO / "configs/pretrain/demo.yaml"),
        "finetune_config": str(REPO / "configs/finetune/demo.yaml"),
        "finetune_overrides": "[train.epochs=2]",
    }
    base.update(overrides)
    return load_config(BenchmarkConfig, None, [f"{k}={v}" for k, v in base.items()])


# ------------------------------------------------------------------------------------------ plan
def test_partial_cells_train_on_every_dataset_with_each_strategys_overrides(dirs):
    cfg = _config(dirs, partial_overrides="{mutual: [train.mutual.final=ensemble]}")
    plan = make_plan(cfg)
    target, others = str(dirs / "target"), [str(dirs / "other_a"), str(dirs / "other_b")]
    cells = {(c.strategy, c.budget, c.seed): c for c in plan.cells}
    assert len(plan.cells) == (1 + len(ALL)) * 2 * 2 and plan.variants == {}
    for name in ALL:
        for budget in ("n2", "f1"):
            for seed in (0, 1):
                cell = cells[(f"partial:{name}", budget, seed)]
                ft, alone = cell.config, cells[("random", budget, seed)].config
                assert cell.axis == "partial_label" and cell.variant is None
                assert cell.dir == dirs / "bench" / "runs" / f"partial-{name}" / f"{budget}_s{seed}"
                # the target first (its task is the one tested), the others whole: the budget subsets the target
                assert ft.data.datasets == [target, *others] and ft.data.subset_datasets == [target]
                assert (ft.data.fraction, ft.data.max_train_cases) == (
                    alone.data.fraction,
                    alone.data.max_train_cases,
                )
                assert ft.seed == seed and ft.model.init == "random" and ft.train.epochs == 2
    strategy = {n: cells[(f"partial:{n}", "n2", 0)].config for n in ALL}
    assert {n: c.train.strategy for n, c in strategy.items()} == {
        "masked": "masked",
        "multitalent": "multitalent",
        "marginal": "marginal",
        "task_tokens": "masked",
        "mutual": "mutual",
    }
    # task tokens swap in MO-CTranS; every other strategy keeps the fine-tuning config's network
    assert strategy["task_tokens"].model.name == "mo_ctrans"
    assert {c.model.name for n, c in strategy.items() if n != "task_tokens"} == {"unet"}
    assert strategy["mutual"].train.mutual.final == "ensemble"
    assert strategy["masked"].train.mutual.final == "best"  # partial_overrides reach their strategy only
    hashes = [c.config_hash for c in plan.cells]
    assert len(set(hashes)) == len(hashes)
    # the initialisation cells are planned as without the partial-label axis (same folders, same hashes)
    alone = make_plan(_config(dirs, partial_strategies="[]", **{"data.other_datasets": "[]"}))
    assert [(c.dir, c.config_hash) for c in alone.cells] == [
        (c.dir, c.config_hash) for c in plan.cells if c.axis == "initialisation"
    ]
    assert alone.cells[0].config.data.subset_datasets is None
    # the hash sees the budget's restriction to the target
    ft = cells[("partial:masked", "n2", 0)].config
    before = config_hash(ft)
    ft.data.subset_datasets = None
    assert config_hash(ft) != before


def test_partial_init_reuses_the_initialisation_axis_pretraining(dirs):
    cfg = _config(dirs, partial_strategies="[masked, multitalent]", partial_init="mosmos", seeds="[0]")
    plan = make_plan(cfg)
    assert sorted(plan.variants) == ["mosmos"]  # trained for the partial axis though strategies=[random]
    partial = [c for c in plan.cells if c.axis == "partial_label"]
    assert len(partial) == 2 * 2
    assert all(
        c.variant == "mosmos" and c.config.model.init == str(plan.variants["mosmos"].dir) for c in partial
    )
    random_init = make_plan(_config(dirs, partial_strategies="[masked]", seeds="[0]"))
    masked = {c.budget: c.config_hash for c in partial if c.strategy == "partial:masked"}
    assert all(masked[c.budget] != c.config_hash for c in random_init.cells if c.axis == "partial_label")
    # only the partial-label axis, and an encoder the user brings, which must exist
    with pytest.raises(ConfigError, match="nope"):
        make_plan(_config(dirs, strategies="[]", partial_init=f"'checkpoint:{dirs / 'nope'}'"))


def test_bad_partial_label_settings_fail_before_any_work(dirs):
    with pytest.raises(ConfigError, match=r"unknown partial-label strategy 'dodnet'.*'masked'.*'mutual'"):
        _config(dirs, partial_strategies="[masked, dodnet]")
    with pytest.raises(ConfigError, match=r"data\.other_datasets is required by partial_strategies"):
        _config(dirs, **{"data.other_datasets": "[]"})
    with pytest.raises(ConfigError, match=r"partial_overrides: \['mutual'\] are not in partial_strategies"):
        _config(dirs, partial_strategies="[masked]", partial_overrides="{mutual: [train.mutual.final=best]}")
    with pytest.raises(ConfigError, match="partial_init: unknown strategy 'imagenet'"):
        _config(dirs, partial_init="imagenet")
    with pytest.raises(ConfigError, match="lists a value twice"):
        _config(dirs, partial_strategies="[masked, masked]")
    with pytest.raises(ConfigError, match="pretrain_config is required"):
        _config(dirs, partial_init="mosmos", pretrain_config="null")
    with pytest.raises(ConfigError, match="both empty"):
        _config(dirs, strategies="[]", partial_strategies="[]")
    with pytest.raises(ConfigError, match=r"partial_overrides.*train\.mutual\.finall"):
        make_plan(_config(dirs, partial_overrides="{mutual: [train.mutual.finall=best]}"))
    # on a MO-CTranS fine-tuning config, masked is task_tokens: two names for one experiment
    with pytest.raises(ConfigError, match="partial:masked and partial:task_tokens resolve to the same"):
        make_plan(_config(dirs, finetune_overrides="[train.epochs=2, model.name=mo_ctrans]"))
    with pytest.raises(ConfigError, match=r"data\.other_datasets\[1\]"):
        make_plan(_config(dirs, **{"data.other_datasets": f"[{dirs / 'other_a'}, {dirs / 'missing'}]"}))
    assert not (dirs / "bench").exists()


def test_the_label_budget_subsets_the_target_and_leaves_the_other_datasets_whole(tmp_path):
    """Stage 2's data.subset_datasets (what a partial-label cell sets): the budget applies to the
    target only, and the target's training and validation cases are those it has alone."""
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.finetune.data import build_seg_data
    from mosmos.synth import synthesize
    from mosmos.vocabulary import load_vocabulary

    synthesize(
        tmp_path, seed=0, pretrain_cases=1, seg_cases=5, test_cases=1, shape=(32, 32, 24), progress=False
    )
    target, other = tmp_path / RAW / "Dataset012_KidneyB", tmp_path / RAW / "Dataset011_AbdomenA"

    def split(datasets, *extra):
        cfg = load_config(
            FinetuneConfig,
            REPO / "configs/finetune/demo.yaml",
            [
                f"output_dir={tmp_path / 'run'}",
                f"data.datasets={json.dumps([str(d) for d in datasets])}",
                "data.val_fraction=0.2",  # of 5 cases: 1 validates, 4 train
                "data.check=header",
                *extra,
            ],
        )
        data = build_seg_data(cfg, load_vocabulary(None))
        names = [t.name for t in data.tasks]
        return {part: {(names[t], c.case_id) for c, t in getattr(data, part)} for part in ("train", "val")}

    alone = split([target], "data.max_train_cases=2")
    joint = split([target, other], "data.max_train_cases=2", f"data.subset_datasets=[{target}]")
    by_name = split([target, other], "data.max_train_cases=2", "data.subset_datasets=[Dataset012_KidneyB]")
    everywhere = split([target, other], "data.max_train_cases=2")
    target_only = lambda cases: {c for c in cases if c[0] == "Dataset012_KidneyB"}  # noqa: E731
    assert len(alone["train"]) == 2 and target_only(joint["train"]) == alone["train"]
    assert target_only(joint["val"]) == alone["val"] and len(alone["val"]) == 1
    assert len(joint["train"] - alone["train"]) == 4  # AbdomenA whole: its 4 training cases
    assert by_name == joint
    assert len(everywhere["train"]) == 2 + 2  # without it, the budget caps every dataset
    with pytest.raises(ConfigError, match=r"data\.subset_datasets names \['Dataset099_X'\]"):
        split([target, other], "data.subset_datasets=[Dataset099_X]")


# ---------------------------------------------------------------------------------------- report
N_CASES = 8
TARGET_ORGANS = ["kidney_left", "kidney_right"]


def _case_dice(strategy: str, seed: int, case: int) -> float:
    """The fabricated test Dice of kidney_left (kidney_right is 0.1 lower)."""
    base = 0.5 + 0.02 * case + 0.01 * seed
    shift = {
        "random": 0.0,
        "multidataset": 0.02 + 0.001 * case,
        "partial:masked": 0.05,
        "partial:multitalent": 0.08 + 0.004 * case,  # better on every case
        "partial:marginal": 0.05 + 0.003 * ((5 * case + seed) % N_CASES - 3.5),  # mixed signs
    }[strategy]
    return base + shift


@pytest.fixture
def fake_cells(monkeypatch):
    """Training replaced by a fake that writes what a scored cell writes, the non-target organ
    (liver) included, as a partial-label model's test scores are."""

    def fake_cell(cell, cfg):
        rows = ["dataset,case,organ,dice,hd95,gt_voxels,pred_voxels"]
        for case in range(N_CASES):
            left = _case_dice(cell.strategy, cell.seed, case)
            rows += [
                f"Test,c{case},kidney_left,{left},3.0,10,10",
                f"Test,c{case},kidney_right,{left - 0.1},3.0,10,10",
                f"Test,c{case},liver,0.01,3.0,10,10",
            ]
        (cell.dir / "test").mkdir(parents=True, exist_ok=True)
        (cell.dir / "test" / "cases.csv").write_text("\n".join(rows) + "\n")
        record = {"train_seconds": 1.0, "steps": 8, "best_epoch": 2, "n_train_cases": 4}
        return {**record, "target_organs": TARGET_ORGANS}

    def fake_variant(variant):
        variant.dir.mkdir(parents=True, exist_ok=True)
        (variant.dir / "encoder.safetensors").write_bytes(b"fake")
        (variant.dir / "encoder.json").write_text('{"format": "mosmos-encoder-v1"}')

    monkeypatch.setattr(benchmark, "train_and_evaluate", fake_cell)
    monkeypatch.setattr(benchmark, "run_variant", fake_variant)


def _holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment, written out for a family of any size."""
    order = np.argsort(pvalues)
    m, adjusted, running = len(pvalues), [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def test_the_partial_label_report_matches_an_independent_computation(dirs, fake_cells):
    cfg = _config(
        dirs,
        strategies="[random, multidataset]",
        partial_strategies="[masked, multitalent, marginal]",
        fractions="[1.0]",
        label_cases="[]",
        seeds="[0, 1, 2]",
    )
    summary = run_benchmark(cfg).read_text()
    out = dirs / "bench"
    with (out / "cases.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    partial = [r for r in rows if r["axis"] == "partial_label"]
    assert {r["strategy"] for r in partial} == {"partial:masked", "partial:multitalent", "partial:marginal"}
    assert {r["axis"] for r in rows if not r["strategy"].startswith("partial:")} == {"initialisation"}
    assert {r["organ"] for r in rows} == set(TARGET_ORGANS)  # the liver rows are not the target's: dropped
    assert len(rows) == 5 * 3 * N_CASES * 2
    with (out / "results.csv").open() as fh:
        results = list(csv.DictReader(fh))
    assert {(r["axis"], r["strategy"]) for r in results} >= {("partial_label", "partial:marginal")}

    # independently: case means (mean of the two kidneys), differences per seed, averaged over seeds
    def case_mean(strategy, seed, case):
        left = _case_dice(strategy, seed, case)
        return (left + left - 0.1) / 2

    seeds = (0, 1, 2)
    p_values, diffs = {}, {}
    for name in ("partial:multitalent", "partial:marginal"):
        d = np.array(
            [
                [case_mean(name, s, c) - case_mean("partial:masked", s, c) for c in range(N_CASES)]
                for s in seeds
            ]
        )
        diffs[name] = d.mean()
        p_values[name] = scipy.stats.wilcoxon(d.mean(axis=0)).pvalue
    adjusted = dict(zip(p_values, _holm(list(p_values.values())), strict=True))
    # the partial-label family is its own: the initialisation comparison is not in its correction
    init_d = np.array(
        [[case_mean("multidataset", s, c) - case_mean("random", s, c) for c in range(N_CASES)] for s in seeds]
    )
    init_p = scipy.stats.wilcoxon(init_d.mean(axis=0)).pvalue
    assert _holm([init_p, *p_values.values()])[1:] != pytest.approx(list(adjusted.values()), rel=1e-3)

    planned = comparison_family(
        rows, ["f1"], [("partial:masked", "t", ["partial:multitalent", "partial:marginal"])]
    )
    for c in planned[0][1]:
        assert c.diff.estimate == pytest.approx(diffs[c.strategy], rel=1e-9)
        assert c.test.n == N_CASES and c.test.p == pytest.approx(p_values[c.strategy], rel=1e-9)
        assert c.p_adjusted == pytest.approx(adjusted[c.strategy], rel=1e-9)
        assert c.diff.low <= c.diff.estimate <= c.diff.high
    section = summary.split("## Partial-label strategies (initialisation: random)")[1]
    init_section = summary.split("## Partial-label strategies")[0]
    for name in p_values:
        line = next(x for x in section.splitlines() if f"fraction 1: {name} vs partial:masked" in x)
        assert f"{diffs[name]:+.3f} [" in line and "3 seeds x 8 test cases" in line
        assert f"p={p_values[name]:.3g}, Holm-adjusted p={adjusted[name]:.3g}" in line
    assert f"Holm-adjusted p={init_p:.3g}" in init_section  # a family of one: p unchanged
    # the table: mean over seeds and cases of each partial strategy
    masked_mean = np.mean([case_mean("partial:masked", s, c) for s in seeds for c in range(N_CASES)])
    assert f"| partial:masked | {masked_mean:.3f} [" in section
    assert (
        "Organs scored (both the target and the test set label them): kidney_left, kidney_right;" in section
    )
    assert f"every training case of `{dirs / 'other_a'}`, `{dirs / 'other_b'}`" in section
    assert "The 2 p-values of the partial-label comparisons" in section
    for name in ("partial_dice_vs_budget.png", "partial_organ_dice_f1.png", "dice_vs_budget.png"):
        assert (out / name).is_file(), name


# ------------------------------------------------------------------------------ a tiny real run
def test_two_partial_label_strategies_end_to_end(tiny_synth, tmp_path):
    raw = tiny_synth / RAW
    out = tmp_path / "bench"
    config = tmp_path / "bench.yaml"
    config.write_text(
        "\n".join(
            [
                f"output_dir: {out}",
                "data:",
                f"  target: {raw / 'Dataset012_KidneyB'}",
                f"  test: {raw / 'Dataset099_SynthTest'}",
                f"  other_datasets: [{raw / 'Dataset011_AbdomenA'}, {raw / 'Dataset013_VesselsC'}]",
                f"  cache_dir: {tmp_path / 'cache'}",
                "strategies: []",
                "partial_strategies: [masked, multitalent]",
                "fractions: [1.0]",
                "seeds: [0]",
                f"finetune_config: {REPO / 'configs/finetune/demo.yaml'}",
                f"finetune_overrides: {json.dumps([*TINY_FINETUNE, 'train.num_workers=0'])}",
            ]
        )
        + "\n"
    )
    assert cli(["benchmark", "--config", str(config)]) == 0
    for name in ("masked", "multitalent"):
        cell = out / "runs" / f"partial-{name}" / "f1_s0"
        done = json.loads((cell / "DONE.json").read_text())
        assert done["axis"] == "partial_label" and done["strategy"] == f"partial:{name}"
        assert done["steps"] == 2 and done["n_train_cases"] == 1
        split = json.loads((cell / "split.json").read_text())
        assert sorted({c["dataset"] for c in split["train"]}) == [
            "Dataset011_AbdomenA",
            "Dataset012_KidneyB",
            "Dataset013_VesselsC",
        ]
        spec = json.loads((cell / "model.json").read_text())
        assert spec["strategy"] == name and "liver" in spec["organs"]  # it segments the others' organs
        assert done["target_organs"] == spec["tasks"][0]["organs"] and "liver" not in done["target_organs"]
        with (cell / "test" / "cases.csv").open() as fh:
            assert "liver" in {r["organ"] for r in csv.DictReader(fh)}  # scored by evaluate, not reported
    with (out / "cases.csv").open() as fh:
        cases = list(csv.DictReader(fh))
    organs = {r["organ"] for r in cases}
    assert organs and organs <= set(done["target_organs"])
    assert {r["strategy"] for r in cases} == {"partial:masked", "partial:multitalent"}
    assert all(0 <= float(r["dice"]) <= 1 for r in cases)
    summary = (out / "summary.md").read_text()
    assert "# Partial-label benchmark" in summary and "## Mean test Dice" not in summary
    assert "fraction 1: partial:multitalent vs partial:masked" in summary and "p n/a" in summary
    for name in ("results.csv", "partial_dice_vs_budget.png", "partial_organ_dice_f1.png"):
        assert (out / name).is_file(), name
