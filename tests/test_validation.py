"""Validation during training (eclip_app.training.validation): when it runs, what it logs, that
it leaves training untouched, and that a bad setting stops the run before it starts."""

import json
import os
import random
import socket
import sys
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from eclip.data import CatalogError
from eclip.io import load_model
from eclip.model import ECLIP
from eclip_app.cli import main
from eclip_app.distributed import shutdown_distributed
from eclip_app.train import make_train_config, train
from eclip_app.training import validation as validation_module
from eclip_app.training.config import SettingError
from eclip_app.training.validation import Validation

from .conftest import micro_config

HEADLINE = ("val/classification_top1", "val/text_to_product_r10", "val/same_product_map_r", "val/grounding_acc50")
# the clean catalog has one photo per product and no boxes: no same-product retrieval, no grounding
CLEAN_KEYS = ("val/classification_top1", "val/text_to_product_r10", "val/text_to_product_map10")
SCENE_KEYS = ("val/scene_to_catalog_map10", "val/scene_grounding_acc50")


def _config(catalog, out, steps, **fields):
    config = make_train_config("tiny", "eclip", catalog=str(catalog), out_dir=str(out), steps=steps, warmup_steps=2,
                               products_per_batch=6, images_per_product=2, checkpoint_every=3, log_every=1, **fields)
    config.model = micro_config()
    return config


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(synth_catalog, clean_catalog, scenes, tmp_path_factory):
    """Six steps without validation, and the same six steps validated every 4 steps (so at 4
    and after the last, 6) on a clean catalog and its composed scenes."""
    root = tmp_path_factory.mktemp("validation")
    plain = train(_config(synth_catalog["train"], root / "plain", 6, tensorboard=False), progress=False)
    validated = train(_config(synth_catalog["train"], root / "validated", 6, val_catalog=str(clean_catalog),
                              val_scene_catalog=str(scenes), val_every=4), progress=False)
    return plain, validated


def test_validation_runs_at_its_steps_and_logs_every_metric(runs):
    _, validated = runs
    assert [r["step"] for r in validated.validation] == [4, 6]
    for record in validated.validation:
        for key in (*CLEAN_KEYS, *SCENE_KEYS, "val/num_products", "val/num_scenes", "val/seconds"):
            assert key in record, key
        assert record["val/num_products"] == 6 and record["val/num_scenes"] == 18  # 3 scenes of each product
        assert 0.0 <= record["val/classification_top1"] <= 1.0
    # metrics.jsonl: every training record, and each validation record after its step's
    lines = _lines(validated.out_dir)
    assert [(r["step"], "val/seconds" in r) for r in lines] == [
        (1, False), (2, False), (3, False), (4, False), (4, True), (5, False), (6, False), (6, True)]
    assert [r for r in lines if "val/seconds" in r] == validated.validation
    assert all("loss_total" in r for r in validated.history)  # the training history holds training records only
    events = next((validated.out_dir / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
    assert b"val/classification_top1" in events and b"val/scene_to_catalog_map10" in events


def test_validation_leaves_training_bit_identical(runs):
    plain, validated = runs
    assert [r["loss_total"] for r in validated.history] == [r["loss_total"] for r in plain.history]
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(validated.model.state_dict()[name], tensor), name


def test_validation_resumes_at_the_right_steps(runs, synth_catalog, clean_catalog, scenes, tmp_path):
    """Stopped after step 5 (after the step-4 validation) and resumed: the step-4 record is kept,
    the step-6 one made once, and both equal the uninterrupted run's."""
    _, straight = runs
    config = _config(synth_catalog["train"], tmp_path / "run", 6, val_catalog=str(clean_catalog),
                     val_scene_catalog=str(scenes), val_every=4, tensorboard=False)
    first = train(config, progress=False, stop_at=5)
    assert [r["step"] for r in first.validation] == [4]
    resumed = train(config, resume=True, progress=False)
    assert [r["step"] for r in resumed.validation] == [4, 6]
    assert [r["step"] for r in _lines(tmp_path / "run") if "val/seconds" in r] == [4, 6]
    for got, expected in zip(resumed.validation, straight.validation):
        for key in (*CLEAN_KEYS, *SCENE_KEYS):
            assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_run_evaluates_in_eval_and_inference_mode_and_restores_mode_and_rngs(clean_catalog, monkeypatch):
    """Whatever the evaluation draws from the global generators, the training's draws after it
    are the ones they would have been; the model is back in train mode."""
    config = make_train_config("tiny", "eclip", val_catalog=str(clean_catalog))
    validation = Validation(config)
    model = ECLIP(micro_config())
    model.train()
    seen = {}
    real_evaluate = validation_module.evaluate

    def drawing_evaluate(model, *args, **kwargs):
        seen.update(training=model.training, inference=torch.is_inference_mode_enabled())
        torch.rand(3), np.random.rand(3), random.random()  # what a sampling evaluation would do
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(validation_module, "evaluate", drawing_evaluate)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    metrics = validation.run(model)
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]
    assert seen == {"training": False, "inference": True}
    assert model.training and all(m.training for m in model.modules())
    assert metrics["val/num_products"] == 6 and all(p.grad is None for p in model.parameters())


def test_metrics_improve_over_a_short_training(synth_catalog, tmp_path):
    """50 steps on the ShopSynth training split: the held-out split's metrics after the last
    step beat those of the model the run started from (the seed's initial weights)."""
    config = make_train_config("tiny", "eclip", catalog=str(synth_catalog["train"]), out_dir=str(tmp_path / "run"),
                               steps=50, warmup_steps=5, products_per_batch=12, images_per_product=2, checkpoint_every=1000,
                               log_every=10, tensorboard=False, val_catalog=str(synth_catalog["heldout"]))
    config.model = micro_config()
    torch.manual_seed(config.seed)  # the run's initial weights
    before = Validation(config).run(ECLIP(config.model))
    result = train(config, progress=False)
    assert [r["step"] for r in result.validation] == [50]  # val_every=0: after the last step only
    after = result.validation[0]
    score = lambda m: m["val/text_to_product_map10"] + m["val/same_product_map_r"] + m["val/classification_top1"]  # noqa: E731
    assert score(after) > score(before) + 0.15, {k: (round(before[k], 3), round(after[k], 3)) for k in HEADLINE}


def test_a_bad_val_catalog_fails_before_training_naming_the_file(synth_catalog, clean_catalog, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CatalogError, match=f"val_catalog: catalog {missing} does not exist"):
        train(_config(synth_catalog["train"], tmp_path / "a", 3, val_catalog=str(missing)), progress=False)
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "a" / "checkpoints").exists()

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n{\"title\": \"no id\"}\n")
    with pytest.raises(CatalogError, match=f"val_catalog: catalog {garbage}.*no usable product left"):
        train(_config(synth_catalog["train"], tmp_path / "b", 3, val_catalog=str(garbage)), progress=False)
    # scenes of products that are not in the val catalog
    with pytest.raises(CatalogError, match=f"val_scene_catalog {clean_catalog}: no scene shows a product of val_catalog"):
        train(_config(synth_catalog["train"], tmp_path / "c", 3, val_catalog=str(synth_catalog["heldout"]),
                      val_scene_catalog=str(clean_catalog)), progress=False)
    with pytest.raises(SettingError, match="need val_catalog"):
        train(_config(synth_catalog["train"], tmp_path / "d", 3, val_every=2), progress=False)
    assert not (tmp_path / "b" / "metrics.jsonl").exists() and not (tmp_path / "c" / "metrics.jsonl").exists()

    # the command line: one line on stderr, exit status 2
    assert main(["-q", "train", "--catalog", str(synth_catalog["train"]), "--out", str(tmp_path / "e"), "--no-progress",
                 "--val-catalog", str(missing), "--val-every", "2"]) == 2
    assert f"eclip train: val_catalog: catalog {missing} does not exist" in capsys.readouterr().err


class FakeWandb(types.ModuleType):
    """A stand-in for the wandb module: records what the trainer sends."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished += 1


def test_report_to_wandb_gets_every_record_and_a_resume_continues_its_run(synth_catalog, clean_catalog, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = _config(synth_catalog["train"], tmp_path / "run", 4, val_catalog=str(clean_catalog), val_every=2,
                     report_to=["wandb"], tensorboard=False)
    train(config, progress=False, stop_at=2)
    train(config, resume=True, progress=False)
    assert fake.finished == 2 and fake.inits[0]["id"] == fake.inits[1]["id"] and fake.inits[0]["resume"] == "allow"
    assert fake.inits[0]["config"]["val_every"] == 2
    assert [(step, "val/seconds" in values) for step, values in fake.logged] == [
        (1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    assert fake.logged[2][1]["val/num_products"] == 6 and "step" not in fake.logged[2][1]


def test_report_to_fails_before_training_when_wandb_is_missing_or_the_name_unknown(synth_catalog, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of wandb fails, as when it is not installed
    with pytest.raises(SettingError, match="pip install wandb"):
        train(_config(synth_catalog["train"], tmp_path / "a", 2, report_to=["wandb"]), progress=False)
    with pytest.raises(SettingError, match="unknown \\['mlflow'\\]"):
        train(_config(synth_catalog["train"], tmp_path / "b", 2, report_to=["mlflow"]), progress=False)
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def _validating_worker(rank: int, world: int, port: int, catalog: str, val_catalog: str, out: str, fsdp: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(_config(catalog, out, 2, fsdp=fsdp, tensorboard=False, val_catalog=val_catalog), progress=False)
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_under_two_processes_rank_0_validates_the_trained_weights(synth_catalog, clean_catalog, tmp_path, fsdp):
    """DDP or FSDP2 on 2 processes: one validation record, written by rank 0 after the last
    step, with the metrics of the saved final model (under FSDP, of the gathered shards)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist"
    mp.spawn(_validating_worker, args=(2, port, str(synth_catalog["train"]), str(clean_catalog), str(out), fsdp), nprocs=2, join=True)
    records = [r for r in _lines(out) if "val/seconds" in r]
    assert [r["step"] for r in records] == [2]
    config = make_train_config("tiny", "eclip", val_catalog=str(clean_catalog))
    expected = Validation(config).run(load_model(out / "model"))
    for key in CLEAN_KEYS:
        assert records[0][key] == pytest.approx(expected[key], abs=1e-6), key


def test_samples_per_second_leave_the_validation_time_out(monkeypatch):
    from eclip_app.training.logs import ThroughputWindow

    clock = iter([100.0, 104.0, 104.0])  # opens at 100; read (and reset) at 104, 3 s of it spent validating
    monkeypatch.setattr("eclip_app.training.logs.time.perf_counter", lambda: next(clock))
    window = ThroughputWindow()
    window.add(20, data_time=0.5)
    window.exclude(3.0)
    assert window.read(world_size=1) == {"samples_per_s": 20.0, "samples_per_s_per_device": 20.0, "data_wait_fraction": 0.5}
