"""The shared training loop: schedule, EMA, best checkpoint, resume equals an uninterrupted run, non-finite loss."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from bench.train import TrainingError, lr_factor, train_unit
from priors import build_prior


def cfg(**kw):
    base = dict(steps=12, batch_size=8, lr=3e-3, weight_decay=0.01, betas=[0.9, 0.95], warmup_steps=3,
                min_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.9, val_every=4, val_batches=2, ckpt_every=4)
    base.update(kw)
    return OmegaConf.create(base)


def tokens(n, V=12, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Structured data (a repeated ramp with noise) so training has something to learn.
    base = (torch.arange(L) % V).repeat(n, 1)
    noise = torch.randint(0, V, (n, L), generator=g)
    keep = torch.rand(n, L, generator=g) < 0.8
    return torch.where(keep, base, noise)


def make(name, T=3):
    torch.manual_seed(0)
    return build_prior(name, 12, (4, 4), T=T, budget=20000, cfg={"n_layer": 2, "n_head": 2})


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["ar", "imagebart", "absorbing"])
def test_resume_equals_uninterrupted(tmp_path, name):
    train, val = tokens(64), tokens(16, seed=1)
    full = make(name)
    unit = list(full.units())[0]
    r_full = train_unit(full, unit, train, val, cfg(), seed=3, work_dir=tmp_path / "a", device=torch.device("cpu"))

    part = make(name)
    stopped = train_unit(part, unit, train, val, cfg(), seed=3, work_dir=tmp_path / "b", device=torch.device("cpu"),
                         stop_after=5)
    assert stopped == {"stopped_at": 5}
    resumed = make(name)  # a fresh process would rebuild the prior from scratch
    r_res = train_unit(resumed, unit, train, val, cfg(), seed=3, work_dir=tmp_path / "b", device=torch.device("cpu"))
    assert r_res["best_val"] == r_full["best_val"] and r_res["best_step"] == r_full["best_step"]
    for k in r_full["state_dict"]:
        assert torch.equal(r_full["state_dict"][k], r_res["state_dict"][k]), k
    for (k, a), b in zip(full.units()[unit].state_dict().items(), resumed.units()[unit].state_dict().values()):
        assert torch.equal(a, b), k


def test_training_lowers_validation_nll_and_keeps_best(tmp_path):
    train, val = tokens(256), tokens(32, seed=1)
    prior = make("ar")
    first = train_unit(prior, "model", train, val, cfg(steps=1, val_every=1), seed=0, work_dir=tmp_path / "a",
                       device=torch.device("cpu"))
    prior = make("ar")
    r = train_unit(prior, "model", train, val, cfg(steps=40, val_every=10, ckpt_every=10), seed=0,
                   work_dir=tmp_path / "b", device=torch.device("cpu"))
    assert r["best_val"] < first["best_val"] - 0.3
    assert r["best_val"] < math.log2(12)
    assert r["best_step"] in (10, 20, 30, 40)


def test_non_finite_loss_names_the_step_and_keeps_checkpoint(tmp_path):
    train, val = tokens(64), tokens(16, seed=1)
    prior = make("ar")
    train_unit(prior, "model", train, val, cfg(steps=8), seed=0, work_dir=tmp_path, device=torch.device("cpu"),
               stop_after=4)
    ckpt = tmp_path / "model.ckpt"
    # Resume from a checkpoint whose weights went NaN: the first resumed step (5) must stop the run.
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: torch.full_like(v, float("nan")) if v.dtype.is_floating_point else v
                      for k, v in state["model"].items()}
    torch.save(state, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 5 of ar:model"):
        train_unit(make("ar"), "model", train, val, cfg(steps=8), seed=0, work_dir=tmp_path,
                   device=torch.device("cpu"))
    assert ckpt.read_bytes() == before
