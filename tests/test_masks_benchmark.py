"""mosmos+masks in the benchmark (issue 20): the masked strategies' stage 1 runs, their controls, the report."""

from __future__ import annotations

import pytest

from mosmos.benchmark.config import BenchmarkConfig
from mosmos.benchmark.plan import make_plan
from mosmos.config import load_config
from mosmos.errors import ConfigError
from tests.conftest import REPO

DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def _bench_overrides(root, *extra: str) -> list[str]:
    """A one-seed benchmark on empty stand-in datasets under ``root`` (enough for planning), plus ``extra``."""
    for name in ("target", "test", "other", "few"):
        (root / name).mkdir(exist_ok=True)
    return [
        f"output_dir={root / 'bench'}",
        f"data.target={root / 'target'}",
        f"data.test={root / 'test'}",
        f"data.pretrain_table={root / 'reports.csv'}",
        "seeds=[0]",
        f"pretrain_config={DEMO}",
        f"finetune_config={REPO / 'configs/finetune/demo.yaml'}",
        *extra,
    ]


def test_benchmark_strategy_sets_the_mask_datasets_of_its_stage1(tmp_path):
    base = _bench_overrides(
        tmp_path,
        f"data.other_datasets=[{tmp_path / 'other'}]",
        "strategies=[random, mosmos, mosmos+masks, shuffled_tags]",
        "fractions=[1.0]",
    )
    variants = make_plan(load_config(BenchmarkConfig, None, base)).variants
    masks, paper = variants["mosmos_masks"].config, variants["mosmos"].config
    assert masks.data.mask_datasets == [str(tmp_path / "other")] and masks.train.variants == []
    assert paper.data.mask_datasets == [] and variants["mosmos_masks"].dir != variants["mosmos"].dir
    own = make_plan(load_config(BenchmarkConfig, None, [*base, f"data.mask_datasets=[{tmp_path / 'few'}]"]))
    assert own.variants["mosmos_masks"].config.data.mask_datasets == [str(tmp_path / "few")]


def test_benchmark_plans_mosmos_variant_masks(tmp_path):
    """mosmos_variant+masks: the mosmos_variant objective (objective_variants) plus the masked scans; a
    config without mask datasets is refused before any work."""
    base = _bench_overrides(
        tmp_path,
        "strategies=[random, mosmos_variant, mosmos_variant+masks, shuffled_variant]",
        "objective_variants=[lit, pooled_tags]",
        "label_cases=[1]",
        "fractions=[]",
    )
    with pytest.raises(ConfigError, match=r"data.mask_datasets .*mosmos_variant\+masks"):
        make_plan(load_config(BenchmarkConfig, None, base))
    variants = make_plan(
        load_config(BenchmarkConfig, None, [*base, f"data.mask_datasets=[{tmp_path / 'few'}]"])
    ).variants
    masks, plain = variants["mosmos_variant_masks"].config, variants["mosmos_variant"].config
    assert masks.train.variants == plain.train.variants == ["lit", "pooled_tags"]
    assert masks.data.mask_datasets == [str(tmp_path / "few")] and plain.data.mask_datasets == []
    assert variants["shuffled_variant"].config.data.mask_datasets == []
    # everything else of the two stage 1 configs is the same (the comparison isolates the masks)
    masks.data.mask_datasets = []
    assert masks.output_dir != plain.output_dir
    masks.output_dir = plain.output_dir
    assert masks == plain


def test_benchmark_plans_the_masked_control_and_the_attention_strategies(tmp_path):
    """shuffled_variant+masks: the mosmos_variant+masks stage 1 with shuffled reports and nothing else
    changed; a ``+attention`` strategy shares its base strategy's encoder and feeds the maps to the
    decoder."""
    cfg = load_config(
        BenchmarkConfig,
        None,
        _bench_overrides(
            tmp_path,
            f"data.mask_datasets=[{tmp_path / 'few'}]",
            "strategies=[random, mosmos_variant+masks, mosmos_variant+masks+attention, "
            "shuffled_variant+masks+attention]",
            "objective_variants=[lit]",
            "label_cases=[1]",
            "fractions=[]",
        ),
    )
    plan = make_plan(cfg)
    assert sorted(plan.variants) == ["mosmos_variant_masks", "shuffled_variant_masks"]
    real, control = (
        plan.variants["mosmos_variant_masks"].config,
        plan.variants["shuffled_variant_masks"].config,
    )
    assert control.data.shuffle_reports and not real.data.shuffle_reports
    assert control.data.mask_datasets == [str(tmp_path / "few")] and control.train.variants == ["lit"]
    control.data.shuffle_reports, control.output_dir = False, real.output_dir
    assert control == real
    cells = {c.strategy: c.config for c in plan.cells}
    assert cells["mosmos_variant+masks+attention"].model.attention_maps
    assert not cells["mosmos_variant+masks"].model.attention_maps
    assert cells["mosmos_variant+masks+attention"].model.init == cells["mosmos_variant+masks"].model.init
    assert cells["shuffled_variant+masks+attention"].model.attention_maps


def test_each_strategy_is_compared_with_the_control_of_its_stage1():
    from mosmos.benchmark.comparisons import control_of

    every = [
        "random",
        "mosmos",
        "mosmos+attention",
        "mosmos_variant",
        "mosmos_variant+masks",
        "mosmos_variant+masks+attention",
        "shuffled_tags",
        "shuffled_variant",
        "shuffled_variant+masks",
        "shuffled_variant+masks+attention",
    ]
    assert control_of("mosmos_variant+masks", every) == "shuffled_variant+masks"
    assert control_of("mosmos_variant+masks+attention", every) == "shuffled_variant+masks+attention"
    assert control_of("mosmos_variant", every) == "shuffled_variant"
    assert control_of("mosmos+attention", every) == "shuffled_tags"
    assert all(control_of(s, every) is None for s in ("random", "shuffled_variant+masks", "shuffled_tags"))
    # without the masked control the variant's own control stands in; without any, no comparison
    assert control_of("mosmos_variant+masks+attention", ["random", "shuffled_variant"]) == "shuffled_variant"
    assert control_of("mosmos_variant", ["random", "shuffled_tags"]) is None


def test_the_report_compares_the_masks_strategies_with_their_control_and_without_masks():
    """mosmos_variant+masks is compared with random, with its shuffled-report control and with
    mosmos_variant (what the masks add); each difference equals an independent mean over the rows."""
    import numpy as np

    from mosmos.benchmark.summary import _init_lines

    rng = np.random.default_rng(0)
    base = {"random": 0.5, "mosmos_variant": 0.52, "mosmos_variant+masks": 0.58, "shuffled_variant": 0.47}
    rows = []
    for strategy, level in base.items():
        for seed in (0, 1):
            for case in range(8):
                for organ in ("kidney_left", "kidney_right"):
                    dice = float(np.clip(level + 0.05 * rng.standard_normal(), 0, 1))
                    rows.append(
                        {
                            "axis": "initialisation",
                            "strategy": strategy,
                            "budget": "n1",
                            "fraction": 1.0,
                            "seed": seed,
                            "dataset": "T",
                            "case": f"c{case}",
                            "organ": organ,
                            "dice": dice,
                        }
                    )
    cfg = BenchmarkConfig(strategies=list(base), label_cases=[1], fractions=[])
    text = "\n".join(_init_lines(cfg, rows))
    assert "## What the masks add (mosmos_variant+masks against mosmos_variant)" in text
    control = text.split("## Against the shuffled-report control of the variant (shuffled_variant)")[1]
    control = control.split("##")[0]
    assert (
        "mosmos_variant vs shuffled_variant" in control
        and "mosmos_variant+masks vs shuffled_variant" in control
    )
    assert "(shuffled_tags, the paper's objective)" not in text  # no paper-objective strategy here

    def mean(strategy):
        return np.mean([r["dice"] for r in rows if r["strategy"] == strategy])

    expected = mean("mosmos_variant+masks") - mean("mosmos_variant")
    line = next(x for x in text.splitlines() if "mosmos_variant+masks vs mosmos_variant:" in x)
    assert float(line.split(": ")[2].split(" ")[0]) == pytest.approx(expected, abs=6e-4)
