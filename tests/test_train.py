"""The shared training loop: schedule, EMA, best checkpoint, resume equals an uninterrupted run, non-finite loss;
units trained at once in processes equal units trained one after another."""
import logging
import math
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.train import TrainingError, lr_factor, resolve_unit_workers, train_unit, train_units
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


def make(name, T=3, budget=20000):
    torch.manual_seed(0)
    return build_prior(name, 12, (4, 4), T=T, budget=budget, cfg={"n_layer": 2, "n_head": 2})


def test_lr_schedule_warmup_then_cosine():
    # Scalar float64 arithmetic (a cosine and a few products): pytest.approx's relative 1e-6 is 1e9 ulps.
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
    assert stopped["steps"] == 5 and stopped["best_step"] == 4  # stopped after step 5; validated at step 4
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


def poison(ckpt):
    """Make a resumable checkpoint's weights NaN: the first resumed step must stop the run."""
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: torch.full_like(v, float("nan")) if v.dtype.is_floating_point else v
                      for k, v in state["model"].items()}
    torch.save(state, ckpt)


def test_non_finite_loss_names_the_step_and_keeps_checkpoint(tmp_path):
    train, val = tokens(64), tokens(16, seed=1)
    prior = make("ar")
    train_unit(prior, "model", train, val, cfg(steps=8), seed=0, work_dir=tmp_path, device=torch.device("cpu"),
               stop_after=4)
    ckpt = tmp_path / "model.ckpt"
    # Resume from a checkpoint whose weights went NaN: the first resumed step (5) must stop the run.
    poison(ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 5 of ar:model"):
        train_unit(make("ar"), "model", train, val, cfg(steps=8), seed=0, work_dir=tmp_path,
                   device=torch.device("cpu"))
    assert ckpt.read_bytes() == before


def run_units(prior, work_dir, workers, threads, steps=12):
    """train_units with what it hands back: {unit: result} and the logger records without the timing ones."""
    got, records = {}, []
    train_units(prior, tokens(64), tokens(16, seed=1), cfg(steps=steps), seed=2, work_dir=work_dir,
                device=torch.device("cpu"), workers=workers, threads=threads,
                log_fn=lambda rec, step: records.append((step, {k: v for k, v in rec.items() if "tokens_per_s" not in k})),
                on_done=lambda unit, r: got.__setitem__(unit, r))
    return got, sorted(records, key=lambda r: (sorted(r[1]), r[0]))


def validation_lines(caplog):
    return sorted(r.getMessage() for r in caplog.records if r.name == "bench.train" and ": val " in r.getMessage())


def test_units_at_once_equal_units_one_after_another(tmp_path, one_thread, caplog):
    # Two processes of one thread each against this process on one thread: every unit's run must be the same,
    # bit for bit (weights, best validation, logged curves), whichever finished first.
    caplog.set_level(logging.INFO)
    alone, alone_records = run_units(make("imagebart", T=4, budget=25000), tmp_path / "alone", workers=1, threads=1)
    alone_lines = validation_lines(caplog)
    caplog.clear()
    at_once, at_once_records = run_units(make("imagebart", T=4, budget=25000), tmp_path / "at_once", workers=2, threads=2)
    # The workers' own log lines reach this process's logging (so Hydra's run.log), the same lines as alone.
    assert validation_lines(caplog) == alone_lines and len(alone_lines) == 3 * 3
    assert set(alone) == set(at_once) == {"scale2", "scale3", "scale4"}
    for unit, r in alone.items():
        assert (r["best_val"], r["best_step"], r["steps"]) == (at_once[unit]["best_val"], at_once[unit]["best_step"],
                                                                at_once[unit]["steps"])
        assert r["state_dict"].keys() == at_once[unit]["state_dict"].keys()
        for k, v in r["state_dict"].items():
            assert torch.equal(v, at_once[unit]["state_dict"][k]), (unit, k)
    assert alone_records == at_once_records and len(alone_records) == 3 * 12
    # Units differ from one another (each its own seed and data): equal results are not a copy of one unit.
    assert alone["scale2"]["best_val"] != alone["scale3"]["best_val"]


def test_a_unit_failing_in_its_process_stops_the_job_with_its_error(tmp_path, one_thread):
    train, val = tokens(64), tokens(16, seed=1)
    prior = make("imagebart", T=3)
    # scale3's checkpoint with NaN weights (as in the test above): its process must fail at its first step.
    train_unit(prior, "scale3", train, val, cfg(steps=8), seed=201, work_dir=tmp_path, device=torch.device("cpu"),
               stop_after=4)
    ckpt = tmp_path / "scale3.ckpt"
    poison(ckpt)
    with pytest.raises(TrainingError, match=r"imagebart:scale3: non-finite loss .* at step 5"):
        train_units(make("imagebart", T=3), train, val, cfg(steps=8), seed=2, work_dir=tmp_path,
                    device=torch.device("cpu"), workers=2, threads=2)
    # A configuration error raised in a process is the job's one-line ConfigError.
    (tmp_path / "other").mkdir()
    torch.save({"arch": {"other": 1}, "unit": "scale2"}, tmp_path / "other" / "scale2.ckpt")
    with pytest.raises(ConfigError, match=r"scale2.ckpt was written by a different prior configuration"):
        train_units(make("imagebart", T=3), train, val, cfg(steps=8), seed=2, work_dir=tmp_path / "other",
                    device=torch.device("cpu"), workers=2, threads=2)


def test_a_unit_process_that_dies_fails_the_job_naming_the_unit(tmp_path, one_thread):
    import multiprocessing
    import signal
    import threading
    import time

    errors = []

    def job():  # in a thread, so this test can watch the processes (signals then keep their handlers)
        try:
            train_units(make("imagebart", T=3), tokens(64), tokens(16, seed=1), cfg(steps=100_000, val_every=10_000,
                        ckpt_every=10_000), seed=2, work_dir=tmp_path, device=torch.device("cpu"), workers=2,
                        threads=2)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=job)
    t.start()
    t0 = time.time()
    while len(multiprocessing.active_children()) < 2 and time.time() - t0 < 60:
        time.sleep(0.1)
    time.sleep(2)
    os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)  # e.g. the out-of-memory killer
    t.join(120)
    assert not t.is_alive()
    [e] = errors
    assert isinstance(e, RuntimeError) and re.fullmatch(
        r"training imagebart:scale[23]: its process exited with code -9 \(RuntimeError\)", str(e)), str(e)
    assert not multiprocessing.active_children()  # the other unit's process was stopped, not left running


def test_unit_workers_option():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_unit_workers("auto", 8, cpu, 2) == 2
    assert resolve_unit_workers("auto", 2, cpu, 16) == 2
    assert resolve_unit_workers("auto", 1, cpu, 2) == 1
    assert resolve_unit_workers("auto", 8, cuda, 16) == 1
    assert resolve_unit_workers(4, 3, cpu, 2) == 3
    assert resolve_unit_workers(1, 8, cuda, 2) == 1
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ConfigError, match=f"unit_workers={bad} must be a positive integer or auto"):
            resolve_unit_workers(bad, 8, cpu, 2)
    with pytest.raises(ConfigError, match="unit_workers=2: units train at once only on CPU"):
        resolve_unit_workers(2, 8, cuda, 2)
