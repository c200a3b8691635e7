"""The cost plan (bench/cost.py) against torch's own FLOP counter and its arithmetic."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from bench import cost as C
from priors import build_prior
from priors.flops import causal_pairs
from priors.transformer import Transformer

V, GRID = 16, (4, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


def attention_flops(prior) -> int:
    """The attention part of one forward of every transformer (pairs read, priors/flops.py's convention)."""
    total = 0
    for m in prior.modules():
        if isinstance(m, Transformer):
            c = m.cfg
            pairs = causal_pairs(0, c.seq_len) if c.causal else c.seq_len ** 2
            total += 4 * c.d_model * c.n_layer * (pairs + (c.seq_len ** 2 if c.cross_attn else 0))
    return total


@pytest.mark.parametrize("name,T", [("ar", 2), ("imagebart", 2), ("imagebart", 4), ("absorbing", 5)])
def test_training_flops_equal_torchs_flop_counter(name, T):
    """One training step of every unit under FlopCounterMode (forward and backward) gives exactly the plan's
    matmul FLOPs; the counter does not see the CPU attention kernel, whose FLOPs the plan adds on top."""
    torch.manual_seed(0)
    prior = build_prior(name, V, GRID, T=T, budget=60000, cfg={"n_layer": 2, "n_head": 2})
    batch = 8
    x = torch.randint(0, V, (batch, GRID[0] * GRID[1]), generator=torch.Generator().manual_seed(1))
    counted = 0
    for unit in prior.units():
        with FlopCounterMode(display=False) as counter:
            loss, _ = prior.unit_loss(unit, x, torch.Generator().manual_seed(0))
            loss.backward()
        counted += counter.get_total_flops()
    planned = C.training_flops(prior, batch, steps=1, val_every=10 ** 9, val_batches=0)
    assert planned - 3 * batch * attention_flops(prior) == counted
    # Validation forwards: val_batches x batch forwards every val_every steps and once at the end.
    with_val = C.training_flops(prior, batch, steps=10, val_every=5, val_batches=2)
    per_seq = sum(C.unit_forward_flops(prior).values())
    assert with_val == per_seq * batch * (3 * 10 + 2 * 3)


def test_inception_flops_are_the_published_size():
    """About 5.7 billion multiply-adds per 299 x 299 image (Szegedy et al. 2016 report about 5 billion for the
    network without its auxiliary head): 2 FLOPs each."""
    from bench.features import load_feature_extractor
    flops = C.inception_flops_per_image(load_feature_extractor())
    assert 2 * 5.0e9 <= flops <= 2 * 6.0e9


def test_estimate_adds_phases_at_their_utilisation():
    torch.manual_seed(0)
    prior = build_prior("ar", V, GRID, T=2, budget=60000, cfg={"n_layer": 2, "n_head": 2})
    cfg = OmegaConf.create({"train": {"batch_size": 8, "steps": 100, "val_every": 50, "val_batches": 2},
                            "eval": {"num_samples": 40}})
    counts = {"n_train": 300, "n_val": 30, "n_reference": 100, "n_completions": 10}
    cost = C.estimate(prior, prior.num_params(), cfg, counts, resolution=32, inception_per_image=1e10,
                      own_peak=("this CPU", 1e11))
    assert cost.train_flops == C.training_flops(prior, 8, 100, 50, 2)
    assert cost.sample_flops == prior.sample_flops() * 50
    assert cost.inception_images == 100 + 40 + 10 + 2 * 30
    want = (cost.train_flops / 0.4 + cost.sample_flops / 0.1 + cost.inception_flops / 0.3) / 1e11 / 3600
    assert cost.hours["this CPU"] == pytest.approx(want, rel=1e-12)  # the same three divisions
    assert cost.hours["H100 SXM"] < cost.hours["A100"] < cost.hours["this CPU"]
    released = C.estimate(prior, prior.num_params(), cfg, counts, 32, 1e10, None, train=False)
    assert released.train_flops == 0 and "this CPU" not in released.hours
    both = C.total([cost, cost])
    assert both.train_flops == 2 * cost.train_flops and both.hours["A100"] == pytest.approx(2 * cost.hours["A100"])
    # Two points that share their tokens and their training (AR at two T) count them once, evaluation twice.
    shared = C.total([cost, cost], [{"tokens": "t", "train": "a", "eval": "e1"}, {"tokens": "t", "train": "a",
                                                                              "eval": "e2"}])
    assert shared.train_flops == cost.train_flops and shared.tokenizer_flops == cost.tokenizer_flops
    assert shared.sample_flops == 2 * cost.sample_flops and shared.inception_images == 2 * cost.inception_images
    assert any("FLOPs" in line for line in cost.lines()) and "A100" in cost.lines()[1]


def test_stage_plan_sweep_prints_every_job_and_the_total_and_runs_nothing(tmp_path):
    from tests.clitools import job_results, run_cli

    p = run_cli(["-m", "experiment=smoke", "logger=none", "stage=plan", "prior=ar,imagebart", "T=3",
                 f"paths.cache={tmp_path / 'cache'}", "name=plan"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "sweep plan: prior=ar T=3 seed=0" in log and "sweep plan: prior=imagebart T=3 seed=0" in log
    assert "sweep plan: total over 2 job(s)" in log and "H100 SXM" in log and "this CPU" in log
    # Before the first job: the total comes before Hydra launches anything.
    assert log.index("sweep plan: total") < log.index("stage=plan: stopping before any stage")
    assert not (tmp_path / "cache").exists()  # nothing computed, nothing cached
    jobs = job_results(tmp_path / "multirun" / "plan")
    assert len(jobs) == 2 and all(j["status"] == "ok" for j in jobs)
    for j in jobs:
        assert j["plan_train_flops"] > 0 and j["plan_sample_flops"] > 0 and j["plan_inception_images"] == 64 + 16 + 8 + 2 * 16
        assert set(j["plan_hours"]) == {"A100", "H100 SXM", "this CPU"} and j["fid"] is None
    report = (tmp_path / "reports" / "plan" / "report.md").read_text()
    assert "## Cost: planned and measured" in report and "planned min, this CPU" in report
