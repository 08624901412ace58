"""Untrusted files and interruptions: no pickle runs, no remote code, no write outside --output,
Ctrl-C saves and stops cleanly, a failed write leaves no half-written file."""

from __future__ import annotations

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mosmos.engine import Engine, TrainConfig
from mosmos.engine.checkpoints import list_checkpoints
from tests.conftest import REPO
from tests.test_engine import ToyTask

PACKAGES = ("mosmos", "pretrain", "finetune", "models", "benchmark", "benchmarks")


def _calls(tree: ast.AST, dotted: str):
    owner, attr = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            value = node.func.value
            if isinstance(value, ast.Name) and value.id == owner:
                yield node


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    """Static guard over the package: torch.load only with weights_only=True; no pickle.load(s)."""
    offenders = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for call in _calls(tree, "torch.load"):
                kw = {k.arg: k.value for k in call.keywords}
                if not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ):
                    offenders.append(f"{path}:{call.lineno} torch.load without weights_only=True")
            for name in ("pickle.load", "pickle.loads"):
                offenders += [f"{path}:{c.lineno} {name}" for c in _calls(tree, name)]
            if "trust_remote_code=True" in path.read_text():
                offenders.append(f"{path}: hard-coded trust_remote_code=True")
    assert not offenders, offenders


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_checkpoint_runs_no_code_and_falls_back(tmp_path, caplog):
    cfg = TrainConfig(epochs=1, max_steps=10, batch_size=8, checkpoint_every=5, keep_checkpoints=3)
    Engine(ToyTask(), cfg, tmp_path, seed=0).fit()
    newest = list_checkpoints(tmp_path)[0]
    marker = tmp_path / "PWNED"
    # a pickle where the optimizer state belongs, and one where accelerate keeps registered objects
    (newest / "optimizer.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (newest / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    # the checkpoint's checksums would reject the new file before it is read; drop them so the test
    # reaches torch.load and shows that weights_only refuses the pickle on its own
    state_file = newest / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["checksums"]
    state_file.write_text(json.dumps(state))
    engine = Engine(ToyTask(), TrainConfig(batch_size=8, resume="latest", max_steps=10), tmp_path, seed=0)
    engine._prepare()
    with caplog.at_level("WARNING", logger="mosmos"):
        assert engine.try_resume()
    assert not marker.exists(), "a pickle from the checkpoint was executed"
    assert engine.global_step == 5  # fell back to the previous checkpoint
    assert any(
        newest.name in r.getMessage() and "could not be loaded" in r.getMessage() for r in caplog.records
    )


class _Loaded(Exception):
    """Raised by the spy once the text encoder is requested: the test needs nothing after that."""


@pytest.mark.parametrize(("override", "trusted"), [([], False), (["model.trust_remote_code=true"], True)])
def test_hugging_face_code_is_trusted_only_when_the_config_says_so(
    override, trusted, tiny_synth, tmp_path, monkeypatch
):
    """``mosmos pretrain`` with a local Hugging Face text encoder: the tokenizer and the model are
    loaded with trust_remote_code exactly as the config says (off unless set)."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from mosmos.cli import main as cli
    from mosmos.pretrain.text import train_wordpiece_tokenizer
    from tests.conftest import tiny_pretrain_overrides

    hf_dir = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(hf_dir)
    train_wordpiece_tokenizer(["the liver is normal"] * 4, 64).save_pretrained(str(hf_dir))
    seen = {}
    for cls in (AutoModel, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            seen[_name] = kwargs.get("trust_remote_code")
            if _name == "AutoModel":
                raise _Loaded
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    overrides = tiny_pretrain_overrides(tiny_synth, tmp_path / "run", **{"model.text_encoder": hf_dir})
    with pytest.raises(_Loaded):
        cli(["pretrain", "--config", "pretrain/demo", *overrides, *override])
    assert seen == {"AutoTokenizer": trusted, "AutoModel": trusted}


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import nibabel as nib

    from mosmos.finetune import inference

    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4)), str(ref))
    target = tmp_path / "out" / "case.nii.gz"
    inference.save_label_map(np.ones((4, 4, 3), np.uint8), ref, target)
    before = target.read_bytes()

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        inference.save_label_map(np.zeros((4, 4, 3), np.uint8), ref, target)
    assert target.read_bytes() == before  # the previous file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["case.nii.gz"]  # no temporary left


SIGINT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from mosmos.engine import Engine, TrainConfig
    from tests.test_engine import ToyTask

    class Slow(ToyTask):
        def step(self, model, batch):
            time.sleep(0.05)
            return super().step(model, batch)

    cfg = TrainConfig(epochs=10, batch_size=8, checkpoint_every=1000, deterministic=True,
                      resume=sys.argv[2] if len(sys.argv) > 2 else None)
    Engine(Slow(), cfg, sys.argv[1], seed=3).fit()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SIGINT_SCRIPT.format(repo=str(REPO)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "logs").exists():
        time.sleep(0.05)
    time.sleep(0.7)  # some steps in
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted: saved" in out
    [ckpt] = list_checkpoints(run)
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 80  # 10 epochs x 8 steps: stopped early, at a step boundary
    assert int(ckpt.name.split("_")[1]) == step
    # the interrupted run resumes where it stopped
    proc = subprocess.run(
        [sys.executable, str(script), str(run), "latest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {ckpt}" in proc.stdout and "done: 80 steps" in proc.stdout


def test_predict_names_broken_inputs_first_and_keeps_the_good_outputs(tiny_synth, tmp_path, capsys):
    """A header that does not read fails before any prediction; voxels that do not read (a truncated
    gzip body) fail that input only, after the others are written."""
    import shutil

    from mosmos.cli import main as cli
    from tests.test_finetune_e2e import tiny_finetune_overrides

    run = tmp_path / "run"
    assert (
        cli(
            [
                "finetune",
                "--config",
                str(REPO / "configs/finetune/demo.yaml"),
                *tiny_finetune_overrides(tiny_synth, run, **{"train.epochs": 1, "eval.hd95": "false"}),
            ]
        )
        == 0
    )
    src = tiny_synth / "nnUNet_raw" / "Dataset099_SynthTest" / "imagesTr"
    inputs = tmp_path / "in"
    shutil.copytree(src, inputs)
    good = sorted(inputs.iterdir())[0]
    shutil.copy(good, inputs / "second.nii.gz")
    (inputs / "junk.nii.gz").write_bytes(b"not a volume")
    capsys.readouterr()
    assert (
        cli(["predict", "--model", str(run), "--input", str(inputs), "--output", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err
    assert "junk.nii.gz: cannot read image" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "labels.json").exists()  # nothing was predicted
    (inputs / "junk.nii.gz").unlink()
    data = (inputs / "second.nii.gz").read_bytes()
    (inputs / "second.nii.gz").write_bytes(data[: len(data) // 2])  # header fine, body cut
    assert (
        cli(["predict", "--model", str(run), "--input", str(inputs), "--output", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err
    assert "1 of 2 input(s) could not be predicted" in err and "second.nii.gz" in err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    # not every input ends in _0000 (second.nii.gz), so every name is kept as it is
    assert written == sorted([good.name, "dataset.json", "labels.json"])


def test_evaluate_names_every_bad_test_case_before_predicting(tiny_synth, tmp_path, capsys):
    import shutil

    from mosmos.cli import main as cli
    from tests.test_finetune_e2e import tiny_finetune_overrides

    run = tmp_path / "run"
    overrides = tiny_finetune_overrides(tiny_synth, run, **{"train.epochs": 1, "eval.hd95": "false"})
    assert cli(["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), *overrides]) == 0
    data = tmp_path / "Dataset099_SynthTest"
    shutil.copytree(tiny_synth / "nnUNet_raw" / "Dataset099_SynthTest", data)
    label = sorted((data / "labelsTr").iterdir())[0]
    label.write_bytes(label.read_bytes()[:100])
    capsys.readouterr()
    assert cli(["evaluate", "--model", str(run), "--data", str(data), "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert f"{label}: cannot read label map" in err and "Traceback" not in err
    assert not (tmp_path / "ev").exists()
