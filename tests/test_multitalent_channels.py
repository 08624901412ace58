"""MultiTalent, faithfully: one channel per (dataset, organ), merged into organs at evaluation and
prediction; the whole-network transfer with a head warm-up; the benchmark's multidataset cells."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mosmos.cli import main as cli
from mosmos.config import load_config
from mosmos.engine.schedule import cosine_with_warmup, make_optimizer
from mosmos.errors import ConfigError
from mosmos.finetune.channels import channel_lut, dataset_class_channels, merge_channels, valid_channels
from mosmos.finetune.config import FinetuneConfig
from mosmos.finetune.inference import ModelSpec, load_model, save_model
from mosmos.finetune.pretrained import build_segmenter
from mosmos.finetune.train import freeze_schedule
from mosmos.models.seg_losses import MultiTalentLoss
from tests.conftest import REPO
from tests.test_finetune_e2e import DATASETS, tiny_finetune_overrides

ORGANS = ["liver", "kidney_right", "kidney_left", "aorta"]
TASKS = [["liver", "kidney_right", "kidney_left"], ["kidney_left", "kidney_right"], ["aorta", "liver"]]
ENCODER = {"channels": [8, 16, 16, 16], "strides": [2, 2, 2, 2], "num_res_units": 1}


# ----------------------------------------------------------------------------- layout and merge
def test_two_datasets_labelling_the_kidneys_get_two_kidney_channels_each():
    channels = dataset_class_channels(TASKS, ORGANS)
    # by dataset, then in vocabulary order (not the dataset's own order)
    assert channels == [
        (0, "liver"),
        (0, "kidney_right"),
        (0, "kidney_left"),
        (1, "kidney_right"),
        (1, "kidney_left"),
        (2, "liver"),
        (2, "aorta"),
    ]
    assert [o for _, o in channels].count("kidney_left") == 2
    with pytest.raises(ValueError, match="spleen"):
        dataset_class_channels([["spleen"]], ORGANS)


def test_a_case_has_targets_on_its_own_datasets_channels_only():
    channels = dataset_class_channels(TASKS, ORGANS)
    assert valid_channels(1, channels) == [False, False, False, True, True, False, False]
    # dataset 1's own ids: 1 = kidney_left, 2 = kidney_right (organ lut: id -> 1 + organ index)
    organ_lut = np.array([0, 1 + ORGANS.index("kidney_left"), 1 + ORGANS.index("kidney_right")])
    lut = channel_lut(organ_lut, 1, channels, ORGANS)
    assert lut.tolist() == [
        0,
        1 + channels.index((1, "kidney_left")),
        1 + channels.index((1, "kidney_right")),
    ]
    with pytest.raises(ValueError, match="aorta"):  # dataset 1 has no aorta channel
        channel_lut(np.array([0, 1 + ORGANS.index("aorta")]), 1, channels, ORGANS)


def test_the_merge_takes_the_tasks_own_channel_else_the_mean_of_every_channel():
    channels = dataset_class_channels(TASKS, ORGANS)
    values = torch.tensor([0.9, 0.2, 0.3, 0.6, 0.7, 0.5, 0.4])  # one probability per channel
    probs = values.view(-1, 1, 1, 1).expand(-1, 2, 2, 2)
    merged = merge_channels(probs, channels, ORGANS)
    # liver: (0.9 + 0.5) / 2; kidney_right: (0.2 + 0.6) / 2; kidney_left: (0.3 + 0.7) / 2; aorta: 0.4
    expected = torch.tensor([0.7, 0.4, 0.5, 0.4])
    assert merged.shape == (4, 2, 2, 2)
    torch.testing.assert_close(merged[:, 0, 0, 0], expected, rtol=1e-6, atol=1e-7)
    # task 1 labels the kidneys: its channels; liver and aorta, which it does not label, stay the mean
    own = merge_channels(probs, channels, ORGANS, task=1)
    torch.testing.assert_close(own[:, 1, 1, 1], torch.tensor([0.7, 0.6, 0.7, 0.4]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="7"):
        merge_channels(probs[:5], channels, ORGANS)


class _TaskLogits(torch.nn.Module):
    """A task-conditioned stand-in network: every channel's probability is 0.1 x (task + 1)."""

    task_conditioned = True

    def forward(self, x, task=None, mask=None):
        p = 0.1 * (task.float() + 1).view(-1, 1, 1, 1, 1)
        return torch.logit(p).expand(x.shape[0], 7, *x.shape[2:]).clone()


def test_the_predictor_runs_each_datasets_channels_under_its_own_task():
    from mosmos.finetune.inference import Predictor
    from mosmos.transforms import PreprocessConfig

    pairs = dataset_class_channels(TASKS, ORGANS)
    pre = PreprocessConfig(spacing=(1.0, 1.0, 1.0), size=(8, 8, 8), hu_window=(-200.0, 300.0))
    spec = _spec(
        output_channels="dataset_class",
        channels=[{"task": f"D{t}", "organ": o} for t, o in pairs],
        preprocess=pre.to_dict(),
    )
    predictor = Predictor(_TaskLogits(), spec, sw_batch_size=1)
    x = torch.zeros(1, 2, 8, 8, 8)
    merged = predictor.window_probabilities(x)[:, 0, 0, 0]
    # liver: tasks 0 and 2 (0.1, 0.3); kidneys: tasks 0 and 1 (0.1, 0.2); aorta: task 2 (0.3)
    torch.testing.assert_close(merged, torch.tensor([0.2, 0.15, 0.15, 0.3]), rtol=1e-5, atol=1e-6)
    # one pass under task 1: its kidneys from its own channels, the rest the mean, all at 0.2
    torch.testing.assert_close(predictor.window_probabilities(x, task=1)[:, 0, 0, 0], torch.full((4,), 0.2))


# ----------------------------------------------------------------------------- model.json
def _spec(**kwargs) -> ModelSpec:
    base = dict(
        name="unet",
        encoder="rescnn3d",
        encoder_kwargs=dict(ENCODER),
        decoder={},
        attention_head=None,
        organs=ORGANS,
        tasks=[{"name": f"D{i}", "organs": t} for i, t in enumerate(TASKS)],
        organ_task=dict.fromkeys(ORGANS, 0),
        strategy="multitalent",
        preprocess={},
        extra={"init": "random"},
    )
    return ModelSpec(**{**base, **kwargs})


def test_model_json_records_the_layout_and_old_files_read_as_organ():
    pairs = dataset_class_channels(TASKS, ORGANS)
    channels = [{"task": f"D{t}", "organ": o} for t, o in pairs]
    spec = _spec(output_channels="dataset_class", channels=channels)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["output_channels"] == "dataset_class" and d["channels"][3] == {
        "task": "D1",
        "organ": "kidney_right",
    }
    back = ModelSpec.from_dict(d)
    assert back.channel_pairs == pairs and back.num_outputs == 7 and back.extra == {"init": "random"}
    old = _spec().to_dict()
    del old["output_channels"]  # a model.json from before the option
    spec_old = ModelSpec.from_dict(old)
    assert (
        spec_old.output_channels == "organ" and spec_old.channel_pairs is None and spec_old.num_outputs == 4
    )
    with pytest.raises(ConfigError, match="channels"):
        ModelSpec.from_dict({**d, "channels": [{"task": "D9", "organ": "liver"}]})
    with pytest.raises(ConfigError, match="channels"):
        ModelSpec.from_dict({**old, "output_channels": "dataset_class"})


def test_dataset_class_needs_the_multitalent_loss_and_mutual_keeps_its_own_transfer():
    base = ["data.datasets=[a]"]
    with pytest.raises(ConfigError, match=r"model.output_channels=dataset_class.*train.strategy=multitalent"):
        load_config(FinetuneConfig, None, [*base, "model.output_channels=dataset_class"])
    load_config(
        FinetuneConfig, None, [*base, "model.output_channels=dataset_class", "train.strategy=multitalent"]
    )
    with pytest.raises(ConfigError, match=r"model\.transfer=encoder_decoder needs"):
        load_config(FinetuneConfig, None, [*base, "model.transfer=encoder_decoder"])
    with pytest.raises(ConfigError, match="mutual"):
        load_config(FinetuneConfig, None, [*base, "train.strategy=mutual", "train.head_warmup_steps=3"])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def dc_run(tiny_synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("dc") / "run"
    extra = {"model.output_channels": "dataset_class", "train.strategy": "multitalent", "train.epochs": 1}
    rc = cli(
        [
            "finetune",
            "--config",
            str(REPO / "configs/finetune/demo.yaml"),
            *tiny_finetune_overrides(tiny_synth, run, **extra),
        ]
    )
    assert rc == 0
    return run


def test_a_dataset_class_run_trains_evaluates_and_predicts_per_organ(dc_run, tiny_synth, tmp_path):
    spec = json.loads((dc_run / "model.json").read_text())
    assert spec["output_channels"] == "dataset_class"
    n_channels = sum(len(t["organs"]) for t in spec["tasks"])
    assert len(spec["channels"]) == n_channels > len(spec["organs"])  # AbdomenA and KidneyB share organs
    assert spec["channels"][0]["task"] == DATASETS[0]
    model, loaded = load_model(dc_run)
    assert model.out.conv.conv.out_channels == n_channels and loaded.num_outputs == n_channels
    # validation scored each dataset's organs (per organ, from its own channels)
    _, *rows = (dc_run / "val_cases.csv").read_text().splitlines()
    assert {r.split(",")[2] for r in rows} <= set(spec["organs"])
    test_set = tiny_synth / "nnUNet_raw/Dataset099_SynthTest"
    out = tmp_path / "eval"
    assert cli(["evaluate", "--model", str(dc_run), "--data", str(test_set), "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["organs"]) == set(spec["organs"])  # vocabulary organs, not channels
    pred = tmp_path / "pred"
    for task, folder in ((None, pred / "all"), (DATASETS[1], pred / "kidney")):
        args = ["predict", "-m", str(dc_run), "-i", str(test_set / "imagesTr"), "-o", str(folder)]
        assert cli([*args, "--probabilities", *(["--task", task] if task else [])]) == 0
        labels = json.loads((folder / "labels.json").read_text())
        assert list(labels.values())[1:] == spec["organs"]
        with np.load(next(folder.glob("*.npz"))) as saved:
            assert saved["probabilities"].shape[0] == len(spec["organs"])
            assert float(saved["probabilities"].min()) >= 0 and float(saved["probabilities"].max()) <= 1


# ----------------------------------------------------------------------------- transfer and warm-up
def _source_run(tmp_path, name: str, num_tasks: int, **decoder) -> tuple:
    """A saved stage 2 run directory of a tiny random network (what a multidataset variant leaves)."""
    torch.manual_seed(0)
    model, _ = build_segmenter(
        name,
        num_classes=5,
        num_tasks=num_tasks,
        encoder="rescnn3d",
        encoder_kwargs=ENCODER,
        decoder_kwargs=decoder,
    )
    spec = ModelSpec(
        name=name,
        encoder="rescnn3d",
        encoder_kwargs=model.encoder.encoder_config(),
        decoder=model.decoder_config(),
        attention_head=None,
        organs=[f"o{i}" for i in range(5)],
        tasks=[{"name": f"D{i}", "organs": [f"o{i}"]} for i in range(num_tasks)],
        organ_task={f"o{i}": 0 for i in range(5)},
        strategy="multitalent",
        preprocess={"spacing": [2.0, 2.0, 3.0], "size": [32, 32, 16], "hu_window": [-200.0, 300.0]},
        extra={},
    )
    run = tmp_path / f"src_{name}"
    save_model(run, model, spec)
    return run, model.state_dict()


@pytest.mark.parametrize("name", ["unet", "mo_ctrans"])
def test_the_whole_network_transfers_but_the_head_and_task_tokens(tmp_path, name):
    run, source = _source_run(tmp_path, name, num_tasks=3)
    torch.manual_seed(1)
    # the same channel count as the source, so that a head left equal would show
    model, report = build_segmenter(name, num_classes=5, num_tasks=3, init=run, transfer="encoder_decoder")
    state = model.state_dict()
    fresh = [k for k in state if model.is_task_specific(k)]
    assert any(k.startswith("out.") for k in fresh)
    assert (name == "mo_ctrans") == any("task_token" in k for k in fresh)
    decoder = [k for k in state if not k.startswith("encoder.") and k not in fresh]
    assert decoder and set(report.filled) == set(state) - set(fresh)
    for key in state:
        if key in fresh:
            assert not torch.equal(state[key], source[key]), key
        else:
            assert torch.equal(state[key], source[key]), key
    # the target's own channels and tasks: a different head and task-token shape is no obstacle
    build_segmenter(name, num_classes=2, num_tasks=1, init=run, transfer="encoder_decoder")


def test_the_decoder_transfers_only_between_the_same_networks(tmp_path):
    run, _ = _source_run(tmp_path, "unet", num_tasks=2)
    with pytest.raises(ConfigError, match="'unet' network"):
        build_segmenter("mo_ctrans", num_classes=2, init=run, transfer="encoder_decoder")
    with pytest.raises(ConfigError, match="not this one's architecture"):
        build_segmenter(
            "unet",
            num_classes=2,
            init=run,
            encoder_kwargs={**ENCODER, "channels": [8, 16, 16, 32]},
            transfer="encoder_decoder",
        )
    with pytest.raises(ConfigError, match="stage 2 run directory"):
        build_segmenter("unet", num_classes=2, init=tmp_path, transfer="encoder_decoder")


def test_during_the_head_warm_up_only_the_new_parameters_change(tmp_path):
    run, _ = _source_run(tmp_path, "unet", num_tasks=2, deep_supervision=True)
    torch.manual_seed(2)
    model, report = build_segmenter(
        "unet",
        num_classes=3,
        num_tasks=1,
        init=run,
        transfer="encoder_decoder",
        decoder_kwargs={"deep_supervision": True},
    )
    warmup = 3
    schedule = freeze_schedule(model, 0, warmup, report.filled)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=1e-2, freeze_steps=schedule)
    scheduler = cosine_with_warmup(optimizer, warmup=1, total=20)
    loss_fn = MultiTalentLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, 16, generator=gen)
    target = torch.randint(0, 4, (2, 1, 32, 32, 16), generator=gen)
    labelled = torch.ones(2, 3, dtype=torch.bool)

    def steps(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad()
            outputs = model(x, intermediates=True)
            sum(
                loss_fn(o, torch.nn.functional.interpolate(target.float(), o.shape[2:]).long(), labelled)
                for o in outputs
            ).backward()
            optimizer.step()
            scheduler.step()

    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    model.train()
    steps(warmup)
    heads = {k for k in before if model.is_task_specific(k)}
    assert heads and {k.split(".")[0] for k in heads} == {"out", "ds_heads"}
    for k, p in model.named_parameters():
        change = (p.detach() - before[k]).abs().max() / before[k].abs().max().clamp_min(1e-12)
        if k in heads:
            assert change > 1e-4, k  # the head trains
        else:
            assert change == 0, k  # everything transferred is held: learning rate 0, no decay
    steps(2)  # after the warm-up the whole network trains
    moved = [k for k, p in model.named_parameters() if k not in heads and not torch.equal(p, before[k])]
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("stages.") for k in moved)


def test_the_warm_up_freezes_nothing_after_a_random_initialisation():
    model, _ = build_segmenter("unet", num_classes=2, encoder_kwargs=ENCODER)
    assert freeze_schedule(model, 4, 10, None) == {"encoder.": 4, "attention_head.": 4}
    schedule = freeze_schedule(
        model, 4, 10, [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    )
    assert all(v == 10 for k, v in schedule.items() if k.startswith("encoder.") and k != "encoder.")


# ----------------------------------------------------------------------------- the benchmark
def test_multidataset_cells_transfer_the_whole_network_and_older_hashes_still_match(tmp_path):
    from mosmos.benchmark.hashing import config_hash
    from mosmos.benchmark.plan import make_plan
    from mosmos.config import to_dict
    from tests.test_benchmark_partial import _config

    for name in ("target", "test", "other_a", "other_b"):
        (tmp_path / name).mkdir()
    plan = make_plan(_config(tmp_path, strategies="[random, mosmos, multidataset]", partial_strategies="[]"))
    cells = {c.strategy: c for c in plan.cells if c.seed == 0 and c.budget == "f1"}
    md = cells["multidataset"].config
    assert md.model.transfer == "encoder_decoder" and md.train.head_warmup_steps == md.train.warmup_steps > 0
    assert md.train.rewarm_steps == md.train.warmup_steps
    assert md.model.init == str(plan.variants["multidataset"].dir)
    for strategy in ("random", "mosmos"):
        ft = cells[strategy].config
        assert (ft.model.transfer, ft.train.head_warmup_steps, ft.model.output_channels) == (
            "encoder",
            0,
            "organ",
        )
        # a config written before these keys existed hashes the same
        tree = to_dict(ft)
        for section, key in (
            ("model", "transfer"),
            ("model", "output_channels"),
            ("train", "head_warmup_steps"),
            ("train", "rewarm_steps"),
        ):
            del tree[section][key]
        assert config_hash(tree) == config_hash(ft)
    # the encoder-only transfer stays one override away, and is a different experiment
    encoder_only = make_plan(
        _config(
            tmp_path,
            strategies="[random, mosmos, multidataset]",
            partial_strategies="[]",
            **{"train.pretrained_overrides": "[model.transfer=encoder, train.head_warmup_steps=0]"},
        )
    )
    again = {c.strategy: c for c in encoder_only.cells if c.seed == 0 and c.budget == "f1"}
    assert again["multidataset"].config.model.transfer == "encoder"
    assert again["multidataset"].config_hash != cells["multidataset"].config_hash
    assert again["random"].config_hash == cells["random"].config_hash
