"""Training at scale, checked on the CPU at a tiny size: DDP across processes equals one
process on the global batch, accumulation equals one big batch, and the efficiency and
robustness options do what they say."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from eclip.config import LossConfig
from eclip.data import Batch
from eclip.losses import ECLIPLoss
from eclip.model import ECLIP
from eclip_app.distributed import init_distributed, shutdown_distributed
from eclip_app.step import TrainStep, micro_batches
from eclip_app.train import list_checkpoints, make_train_config, train

from .conftest import micro_config

P, K = 4, 2


def _global_batch() -> Batch:
    g = torch.Generator().manual_seed(7)
    images = torch.randn(P * K, 3, 32, 32, generator=g)
    pids = torch.arange(P).repeat_interleave(K) + 100
    titles = [f"red {c} shirt brand{c}" for c in "abcd"]
    return Batch(images=images, image_pids=pids, titles=titles, text_pids=torch.arange(P) + 100)


def _slice(batch: Batch, rank: int, world: int) -> Batch:
    share = P // world
    t = slice(rank * share, (rank + 1) * share)
    i = slice(rank * share * K, (rank + 1) * share * K)
    return Batch(batch.images[i], batch.image_pids[i], batch.titles[t], batch.text_pids[t])


def _model() -> ECLIP:
    torch.manual_seed(0)
    return ECLIP(micro_config())


def _grads(model: ECLIP) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _single(accum: int = 1, precision: str = "fp32", checkpointing: bool = False, compile_backend: str | None = None, hooks=None):
    model = _model()
    model.set_grad_checkpointing(checkpointing)
    for register in hooks or []:
        register(model)
    forward = model
    if compile_backend:
        forward = torch.compile(forward, backend=compile_backend)
    out = TrainStep(model, ECLIPLoss(LossConfig()), forward, torch.device("cpu"), accum, precision)(_global_batch())
    return out, _grads(model)


def _worker(rank: int, world: int, port: int, accum: int, result_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    forward = DistributedDataParallel(model)
    out = TrainStep(model, ECLIPLoss(LossConfig()), forward, env.device, accum)(_slice(_global_batch(), rank, world))
    if rank == 0:
        torch.save({"losses": out.losses, "grads": _grads(model)}, result_path)
    shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_equal_one_on_the_global_batch(tmp_path, accum):
    """Gathered negatives and same-product masks across ranks: loss and every gradient of a
    2-process DDP step (gloo) equal those of one process on the same global batch."""
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), accum, path), nprocs=2, join=True)
    got = torch.load(path, weights_only=True)
    expected, grads = _single()
    assert got["losses"] == pytest.approx(expected.losses, rel=1e-5, abs=1e-6)
    assert set(got["grads"]) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_equals_one_big_batch():
    """GradCache-style accumulation: the losses see the whole batch, so the gradients match."""
    one, g1 = _single(accum=1)
    four, g4 = _single(accum=4)
    assert four.losses == pytest.approx(one.losses, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_keep_products_whole():
    image_pids = torch.tensor([5, 5, 9, 9, 2, 2])
    text_pids = torch.tensor([5, 9, 2])
    chunks = micro_batches(image_pids, text_pids, 2)
    assert [(i.tolist(), t.tolist()) for i, t in chunks] == [([0, 1, 2, 3], [0, 1]), ([4, 5], [2])]
    with pytest.raises(ValueError, match="exceeds"):
        micro_batches(image_pids, text_pids, 4)


def _count_tower_blocks(calls: list[str]):
    """A hook registrar: every forward of a tower block appends the block's name (a pre-hook: a
    recomputation stops once it has what backward needs, before a block's forward returns)."""

    def register(model: ECLIP) -> None:
        for tower in ("vision", "text"):
            for name, module in getattr(model, tower).named_modules():
                if isinstance(module, torch.nn.ModuleList):
                    for i, block in enumerate(module):
                        block.register_forward_pre_hook(lambda *_, n=f"{tower}.{name}.{i}": calls.append(n))

    return register


def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients():
    """Checkpointed blocks run forward twice a step (the second time in backward, to recompute
    the activations they did not keep); the gradients are those of the plain step."""
    plain_calls, ckpt_calls = [], []
    plain, g1 = _single(hooks=[_count_tower_blocks(plain_calls)])
    ckpt, g2 = _single(checkpointing=True, hooks=[_count_tower_blocks(ckpt_calls)])
    assert plain_calls and sorted(ckpt_calls) == sorted(plain_calls * 2)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)


def _linear_dtypes(dtypes: set):
    def register(model: ECLIP) -> None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda _m, _i, output: dtypes.add(output.dtype))

    return register


def test_bf16_autocast_runs_the_layers_in_bf16_and_is_close_to_fp32():
    fp32_dtypes, bf16_dtypes = set(), set()
    plain, _ = _single(hooks=[_linear_dtypes(fp32_dtypes)])
    bf16, grads = _single(precision="bf16", hooks=[_linear_dtypes(bf16_dtypes)])
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}  # every linear layer, both towers and the decoder
    assert bf16.finite
    assert bf16.losses["total"] == pytest.approx(plain.losses["total"], rel=0.05)
    assert bf16.losses != plain.losses  # rounding shows: the step did not run in fp32
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())  # fp32 master weights


def test_compiled_forward_gives_the_same_loss():
    plain, g1 = _single()
    compiled, g2 = _single(compile_backend="aot_eager")  # inductor works too; slower to build
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- the loop


def _config(catalog, out, steps, **fields):
    fields = {"checkpoint_every": 100, "log_every": 1, **fields}
    config = make_train_config("tiny", "eclip", catalog=str(catalog), out_dir=str(out), steps=steps, warmup_steps=2,
                               products_per_batch=6, images_per_product=2, **fields)
    config.model = micro_config()
    return config


def test_non_finite_loss_skips_the_step_then_stops_the_run(synth_catalog, tmp_path, monkeypatch):
    from eclip_app import train as train_module

    calls = {"n": 0}
    original = train_module.TrainStep.__call__

    def flaky(self, batch, tokens=None):
        out = original(self, batch, tokens)
        calls["n"] += 1
        if calls["n"] == 2:  # one bad step: skipped, counted, the run goes on
            self.model.zero_grad()
            out.finite = False
        return out

    monkeypatch.setattr(train_module.TrainStep, "__call__", flaky)
    result = train(_config(synth_catalog["train"], tmp_path / "a", 4), progress=False)
    assert result.skipped_steps == 1
    assert [r["skipped_steps"] for r in result.history] == [0, 1, 1, 1]

    def always_bad(self, batch, tokens=None):
        out = original(self, batch, tokens)
        out.finite = False
        return out

    monkeypatch.setattr(train_module.TrainStep, "__call__", always_bad)
    with pytest.raises(train_module.NonFiniteLossError, match="3 steps in a row"):
        train(_config(synth_catalog["train"], tmp_path / "b", 10, max_bad_steps=3), progress=False)


def test_tensorboard_and_observability_fields(synth_catalog, tmp_path):
    result = train(_config(synth_catalog["train"], tmp_path / "run", 3, accum_steps=2), progress=False)
    record = result.history[-1]
    for key in ("samples_per_s", "samples_per_s_per_device", "data_wait_fraction", "lr_group0", "loss_inter", "loss_intra"):
        assert key in record
    assert 0.0 <= record["data_wait_fraction"] <= 1.0
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_train_with_compile_matches_eager(synth_catalog, tmp_path, monkeypatch):
    """train(compile=True) goes through torch.compile (counted) and takes the eager run's steps."""
    import torch._dynamo

    compiled_calls = []
    original = torch.compile

    def counting(model, **kwargs):
        compiled_calls.append(kwargs.get("backend"))
        return original(model, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    eager = train(_config(synth_catalog["train"], tmp_path / "eager", 2, tensorboard=False), progress=False)
    assert compiled_calls == []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = _config(synth_catalog["train"], tmp_path / "compiled", 2, tensorboard=False, compile=True, compile_backend="aot_eager")
    compiled = train(config, progress=False)
    assert compiled_calls == ["aot_eager"] and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo captured graphs
    assert [r["loss_total"] for r in compiled.history] == pytest.approx([r["loss_total"] for r in eager.history], rel=1e-4)
    for name, tensor in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


SIGTERM_SCRIPT = """
import sys, json
from eclip_app.train import make_train_config, train
from tests.conftest import micro_config
config = make_train_config("tiny", "eclip", catalog=sys.argv[1], out_dir=sys.argv[2], steps=100000, warmup_steps=2,
                           products_per_batch=6, images_per_product=2, checkpoint_every=100000, log_every=1)
config.model = micro_config()
result = train(config, progress=False)
print(json.dumps({"signal": result.stopped_by_signal, "steps": result.history[-1]["step"]}))
"""


def test_sigterm_writes_a_checkpoint_and_resume_continues(synth_catalog, tmp_path):
    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(synth_catalog["train"]), str(out)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["signal"] is True
    checkpoints = list_checkpoints(out)
    assert checkpoints and int(checkpoints[-1].name.split("_")[1]) == summary["steps"]
    # the schedule is 100000 steps long; resume for a few more with stop_at
    config = _config(synth_catalog["train"], out, 100000)
    resumed = train(config, resume=True, progress=False, stop_at=summary["steps"] + 2)
    assert resumed.history[-1]["step"] == summary["steps"] + 2


# ----------------------------------------------------------------------------- the loop on 2 processes


def _loop_worker(rank: int, world: int, port: int, catalog: str, out: str, fsdp: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(_config(catalog, out, 3, fsdp=fsdp, tensorboard=False), progress=False, stop_at=2)
    finally:
        shutdown_distributed()


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_training_equals_one_and_its_checkpoint_resumes_anywhere(synth_catalog, tmp_path, fsdp):
    """The whole loop under DDP or FSDP2 on 2 processes (each its half of every batch): the
    checkpoint after 2 steps holds the weights one process reaches on the same global batches,
    and one process resumes it to the same step 3 as an uninterrupted run."""
    catalog = str(synth_catalog["train"])
    single = train(_config(catalog, tmp_path / "single", 3, tensorboard=False), progress=False, stop_at=2)
    mp.spawn(_loop_worker, args=(2, _free_port(), catalog, str(tmp_path / "dist"), fsdp), nprocs=2, join=True)

    expected, got = _weights(list_checkpoints(tmp_path / "single")[-1]), _weights(list_checkpoints(tmp_path / "dist")[-1])
    assert list_checkpoints(tmp_path / "dist")[-1].name == "step_00000002"
    assert set(got) == set(expected)
    assert any(not torch.equal(t, _weights_at_init(single.model)[n]) for n, t in expected.items())  # it trained
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=2e-5, msg=name)

    # a distributed checkpoint resumes on one process; so does the single run: both reach step 3
    a = train(_config(catalog, tmp_path / "single", 3, tensorboard=False), resume=True, progress=False)
    b = train(_config(catalog, tmp_path / "dist", 3, tensorboard=False), resume=True, progress=False)
    assert a.history[-1]["step"] == b.history[-1]["step"] == 3
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], tensor, rtol=1e-4, atol=5e-5, msg=name)


def _weights_at_init(model: ECLIP) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # _config's seed: the loop's initial weights
    return ECLIP(model.config).state_dict()


def test_training_streams_shards_and_resumes_from_the_stream_position(synth_catalog, tmp_path):
    from eclip.data.shards import write_shards

    write_shards(synth_catalog["train"], tmp_path / "shards", max_count=10, progress=False)
    config = _config("", tmp_path / "run", 40, shards=str(tmp_path / "shards"), log_every=5, checkpoint_every=10)
    config.loss.instance_warmup_steps = 0  # full weights throughout: total losses compare across steps
    first = train(config, progress=False, stop_at=20)
    assert first.history[-1]["step"] == 20 and first.history[-1]["skipped_samples"] == 0
    state = torch.load(list_checkpoints(tmp_path / "run")[-1] / "train_state.pt", weights_only=True)
    assert state["sampler"]["step"] == 20  # the stream's position, restored by the resume

    resumed = train(config, resume=True, progress=False)
    losses = [r["loss_total"] for r in resumed.history]
    assert [r["step"] for r in resumed.history] == list(range(5, 41, 5))
    assert losses[-1] < losses[0] - 0.2, losses  # it learns from the stream
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_a_resumed_run_does_not_load_pretrained_weights(synth_catalog, tmp_path, monkeypatch):
    """The checkpoint holds every weight: a resume builds the towers without their pretrained
    weights (nothing to fetch, no time spent filling weights that are overwritten)."""
    from eclip.model.towers import factory

    config = _config(synth_catalog["train"], tmp_path / "run", 3, tensorboard=False)
    seen = []
    for registry, kind in ((factory.VISION_TOWERS, config.model.vision.kind), (factory.TEXT_TOWERS, config.model.text.kind)):
        build = registry[kind]
        monkeypatch.setitem(registry, kind, lambda cfg, pretrained, build=build: seen.append(pretrained) or build(cfg, pretrained))
    train(config, progress=False, stop_at=1)
    train(config, resume=True, progress=False)
    assert seen == [True, True, False, False]  # vision and text: fresh, then resumed


def test_fused_adamw_is_used_where_available_and_steps_like_the_plain_one():
    from eclip_app.train import build_optimizer

    results = {}
    for fused in (None, False):  # None: auto (fused on CPU and CUDA)
        model = _model()
        TrainStep(model, ECLIPLoss(LossConfig()), model, torch.device("cpu"))(_global_batch())
        config = make_train_config("tiny", "eclip", fused_adamw=fused)
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        assert bool(optimizer.defaults.get("fused")) is (fused is None)
        optimizer.step()
        results[fused] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in results[False].items():
        torch.testing.assert_close(results[None][name], value, rtol=1e-5, atol=1e-6, msg=name)
