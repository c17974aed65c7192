"""LoRA+ (Hayou et al. 2024): B matrices learn at lr × loraplus_lr_ratio through optimizer parameter groups —
checked against PEFT's create_loraplus_optimizer on the same model and gradients, and through a resumed run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import randomize_lora_B, tiny_llama
from lorakit.errors import LorakitError
from lorakit.train import OptimConfig, TrainConfig, build_optimizer, checkpoints, train
from lorakit.train.checkpoint import trainable_params
from tiny_run import config, lora_model, one_thread, write_data  # noqa: F401 (fixtures)
from tiny_text import tiny_tokenizer


def adapted(**lora):
    """The tiny Llama with LoRA, B made non-zero so A gets gradients too."""
    model = lora_model(dropout=0.0, **lora)
    randomize_lora_B(model)
    return model


def backward(model) -> None:
    """The gradients of one fixed batch."""
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


def lr_of(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_b_matrices_get_lr_times_ratio_in_their_own_groups():
    model = adapted()
    params = trainable_params(model)
    lrs = lr_of(build_optimizer(model, params, OptimConfig(lr=1e-3, loraplus_lr_ratio=16)))
    assert len(lrs) == len(params) == 8
    for name, p in params:
        assert lrs[id(p)] == (1e-3 * 16 if ".lora_B." in name else 1e-3), name
    plain = build_optimizer(model, params, OptimConfig(lr=1e-3))
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(8, 1e-3, 0.01)]


def test_first_step_equals_peft_create_loraplus_optimizer():
    from peft.optimizers import create_loraplus_optimizer

    ours_model = adapted()
    peft_model = copy.deepcopy(ours_model)  # same weights
    backward(ours_model)
    backward(peft_model)  # same gradients
    ours = build_optimizer(ours_model, trainable_params(ours_model),
                           OptimConfig(lr=1e-3, weight_decay=0.01, loraplus_lr_ratio=16))
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                       loraplus_weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    before = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    ours.step()
    theirs.step()
    moved = 0
    for (name, p), (_, q) in zip(ours_model.named_parameters(), peft_model.named_parameters()):
        assert torch.equal(p, q), name
        moved += not torch.equal(p, before[name])
    assert moved == 8


def test_b_moves_ratio_times_as_far_as_without_loraplus_on_the_first_step():
    updates = {}
    for ratio in (None, 4.0):
        model = adapted()
        backward(model)
        params = trainable_params(model)
        before = {n: p.detach().clone() for n, p in params}
        build_optimizer(model, params, OptimConfig(lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=ratio)).step()
        updates[ratio] = {n: p.detach() - before[n] for n, p in params}
    for name, plain in updates[None].items():
        assert plain.abs().max() > 9e-4  # Adam's first step moves each weight by about lr
        if ".lora_B." in name:
            torch.testing.assert_close(updates[4.0][name], 4 * plain, rtol=0, atol=1e-6)
        else:
            assert torch.equal(updates[4.0][name], plain), name


def test_embedding_b_gets_the_ratio_and_its_a_the_lr():
    model = lora_model(dropout=0.0, target_modules=["embed_tokens", "q_proj"])
    lrs = lr_of(build_optimizer(model, trainable_params(model), OptimConfig(lr=1e-3, loraplus_lr_ratio=8)))
    embedding = model.model.embed_tokens
    assert lrs[id(embedding.lora_embedding_B["default"])] == 8e-3
    assert lrs[id(embedding.lora_embedding_A["default"])] == 1e-3


def test_ratio_is_validated_saved_and_refused_without_lora_b():
    cfg = TrainConfig.from_yaml(None, {"optim.loraplus_lr_ratio": "16"})
    assert cfg.optim.loraplus_lr_ratio == 16 and "  loraplus_lr_ratio: 16\n" in cfg.to_yaml()
    assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    for bad in (0, -1, "fast", True, float("inf")):
        with pytest.raises(LorakitError, match=r"optim.loraplus_lr_ratio must be a positive number"):
            TrainConfig.from_dict({"optim": {"loraplus_lr_ratio": bad}})
    bitfit = tiny_llama()
    for name, p in bitfit.named_parameters():
        p.requires_grad_("norm" in name)
    with pytest.raises(LorakitError, match=r"loraplus_lr_ratio=16 .* none of the trainable parameters is one"):
        build_optimizer(bitfit, trainable_params(bitfit), OptimConfig(loraplus_lr_ratio=16))


class Crash(Exception):
    """Stands for the process dying after a checkpoint."""


def test_loraplus_run_resumes_exactly_and_its_checkpoint_keeps_the_group_lrs(tmp_path):
    tok, data = tiny_tokenizer(), write_data(tmp_path / "train.jsonl")

    def cfg(name):
        return config(tmp_path / name, data, eval_every=0, save_every=2, optim__max_steps=6, optim__lr=2e-3,
                      optim__loraplus_lr_ratio=16, data__eval_fraction=0.0)

    def crash_at_5(step, record):
        if step == 5:
            raise Crash

    full = train(cfg("full"), lora_model(), tok)
    with pytest.raises(Crash):
        train(cfg("cut"), lora_model(), tok, on_step=crash_at_5)
    resumed = train(None, lora_model(), tok, resume=tmp_path / "cut")
    A = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    B = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert A.keys() == B.keys() and all(torch.equal(A[k], B[k]) for k in A)
    groups = json.loads((checkpoints(full.run_dir)[-1] / "optimizer.json").read_text())["param_groups"]
    assert [(len(g["params"]), g["initial_lr"]) for g in groups] == [(4, 2e-3), (4, 2e-3 * 16)]
