"""Training at scale: sharding, DDP on CPU (gloo, 2 processes) against one process over the
same global batch, gradient accumulation, gradient checkpointing, bf16 and torch.compile."""

import pytest
import torch
import torch.multiprocessing as mp

from scidiff.training import ScIDiffTrainer, read_training_checkpoint
from training_helpers import TRAIN_KW, cell_ids, ddp_worker, state_of, synthetic_cells, tiny_model


def test_in_memory_shards_are_disjoint_cover_the_epoch_and_interleave():
    data = synthetic_cells(64)
    world, bs = 3, 5
    loaders = [data.loader(bs, seed=4, rank=r, world_size=world) for r in range(world)]
    single = [cell_ids(b) for b in data.loader(bs, seed=4)]
    epochs = []
    for _ in range(2):
        shards = [[cell_ids(b) for b in loader] for loader in loaders]
        seen = [c for shard in shards for batch in shard for c in batch]
        assert sorted(seen) == list(range(64))  # disjoint and covering
        assert [len(s) for s in shards] == [len(loader) for loader in loaders] == [5, 4, 4]
        epochs.append(shards)
    # rank r holds the global batches r, r + world, ... of the one-process order
    assert [epochs[0][j % world][j // world] for j in range(len(single))] == single
    assert epochs[1] != epochs[0]  # every epoch draws a new permutation, the same on all ranks
    with pytest.raises(ValueError, match="rank must lie"):
        data.loader(4, rank=2, world_size=2)


def test_loader_state_and_resume_at_reproduce_the_rest_of_an_epoch():
    data = synthetic_cells(64)
    loader = data.loader(6, seed=1)
    next(iter(loader))  # move past epoch 0
    state = loader.state_dict()
    epoch = [cell_ids(b) for b in loader]
    loader.load_state_dict(state)
    loader.resume_at(4)
    assert [cell_ids(b) for b in loader] == epoch[4:]
    assert [cell_ids(b) for b in loader] != epoch  # the next epoch draws a new permutation
    with pytest.raises(ValueError, match="cannot resume at batch 99"):
        loader.resume_at(99)


def _final_state(trainer_kwargs, epochs=2):
    data = synthetic_cells()
    train, val = data.subset(range(48)), data.subset(range(48, 64))
    trainer = ScIDiffTrainer(tiny_model(data), train.loader(8, seed=3), val.loader(8, shuffle=False),
                             **{**TRAIN_KW, **trainer_kwargs})
    trainer.train(epochs)
    return state_of(trainer)


def test_ddp_two_processes_equal_one_process_over_the_same_global_batch(tmp_path):
    """Two gloo processes with batch 8 each (rank r takes global batches r, r + 2, ...) against one
    process taking the same two batches per step by gradient accumulation: same weights. The
    DDP run also resumes exactly from a mid-epoch checkpoint that rank 0 wrote for both ranks."""
    epochs = 2
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), epochs), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp2.pt")
    ref = _final_state({"gradient_accumulation": 2}, epochs)
    assert ddp["step"] == ref["step"] == epochs * 3
    for which in ("live", "ema"):
        for k in ref[which]:
            torch.testing.assert_close(ddp[which][k], ref[which][k], rtol=1e-5, atol=1e-6, msg=f"{which} {k}")
    assert [r["train_loss"] for r in ddp["history"]] == pytest.approx([r["train_loss"] for r in ref["history"]],
                                                                      rel=1e-5)
    # the comparison has power: one process with batch 8 and no accumulation ends elsewhere
    other = _final_state({}, epochs)
    assert max(float((other["live"][k] - ref["live"][k]).abs().max()) for k in ref["live"]) > 1e-3

    # rank 0 wrote the checkpoints, holding both ranks' noise-generator states
    ckpt = read_training_checkpoint(tmp_path / "run" / "checkpoints" / "step-000000002.pt")
    t = ckpt["trainer"]
    assert t["world_size"] == 2 and len(t["ranks"]) == 2 and t["batch_in_epoch"] == 2
    assert not torch.equal(t["ranks"][0]["rng"]["generators"][0], t["ranks"][1]["rng"]["generators"][0])
    resumed = torch.load(tmp_path / "ddp2-resumed.pt")
    for k in ddp["live"]:
        assert torch.equal(resumed["live"][k], ddp["live"][k]), k
        assert torch.equal(resumed["ema"][k], ddp["ema"][k]), k


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_step():
    data = synthetic_cells()
    batch = next(iter(data.loader(16, seed=0)))
    results = []
    for checkpointing in (False, True):
        model = tiny_model(data)
        calls, block = [], model.score.blocks[0]
        block.forward = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(block.forward)
        trainer = ScIDiffTrainer(model, [batch], gradient_checkpointing=checkpointing, **TRAIN_KW)
        for _ in range(3):
            trainer.training_step(batch, 10)
        results.append(({k: v.clone() for k, v in model.state_dict().items()}, len(calls)))
    (plain, n_plain), (ckpt, n_ckpt) = results
    assert n_plain == 3 and n_ckpt == 6  # each block runs again in the backward pass
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="gradient_checkpointing needs"):
        ScIDiffTrainer(torch.nn.Linear(2, 2), [], gradient_checkpointing=True, **TRAIN_KW)


def test_bf16_autocast_on_cpu_trains_close_to_fp32():
    data = synthetic_cells()
    batch = next(iter(data.loader(32, seed=0)))
    out = {}
    for mp_mode in ("no", "bf16"):
        trainer = ScIDiffTrainer(tiny_model(data), [batch], mixed_precision=mp_mode, **TRAIN_KW)
        seen = []
        trainer.model.score.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        losses = [float(trainer.training_step(batch, 10)["loss"]) for _ in range(3)]
        out[mp_mode] = (losses, seen[0], {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert out["no"][1] == torch.float32 and out["bf16"][1] == torch.bfloat16
    assert out["bf16"][0] == pytest.approx(out["no"][0], rel=0.05)
    start = tiny_model(data).state_dict()
    for w in ("score.blocks.0.linear.weight", "score.input.weight"):
        step16, step32 = out["bf16"][2][w] - start[w], out["no"][2][w] - start[w]
        assert not torch.equal(step16, step32)  # bf16 really ran
        assert float((step16 - step32).norm() / step32.norm()) < 0.3  # and took nearly the same steps


def test_compiled_training_step_matches_eager():
    """The model's forward and backward captured by dynamo and AOTAutograd (the ``aot_eager``
    backend: inductor's C++ code generation takes minutes on CPU and is measured in
    bench/bench_training.py instead)."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager, graphs = lookup_backend("aot_eager"), []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    data = synthetic_cells()
    batch = next(iter(data.loader(16, seed=0)))
    out = {}
    for compiled in (False, "aot_eager"):
        trainer = ScIDiffTrainer(tiny_model(data), [batch], compile=compiled and counting_backend, **TRAIN_KW)
        losses = [float(trainer.training_step(batch, 10)["loss"]) for _ in range(2)]
        out[compiled] = (losses, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert graphs  # the model really went through dynamo
    assert out["aot_eager"][0] == pytest.approx(out[False][0], rel=1e-5)
    for k in out[False][1]:
        torch.testing.assert_close(out["aot_eager"][1][k], out[False][1][k], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
