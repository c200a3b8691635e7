"""Bad input, as a demanding user types it: one table of command lines, each run through the real CLI.

Every case must end with exit status 2 and one line `error: ...` on stderr naming the option (the table's
message; `...` stands for text that depends on the machine or the case), print no traceback, and compute
nothing: no stage of the cache is started and no sweep folder is made. The cases run in one process
(tests/cli_batch.py) so that the table costs Hydra's composition per case, not an interpreter and torch each.

docs/errors.md's first table is generated from CASES: `python -m tests.test_bad_input` rewrites it, and
test_errors_doc_is_generated_from_the_table fails when it is stale.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clitools import ROOT, run_cli_many

SMOKE = ["experiment=smoke", "logger=none"]
DOC = ROOT / "docs" / "errors.md"
BEGIN = "<!-- bad-input table: generated from tests/test_bad_input.py (python -m tests.test_bad_input) -->"
END = "<!-- end of the generated table -->"


@dataclass(frozen=True)
class Case:
    what: str  # the row's first column in docs/errors.md
    argv: tuple[str, ...]  # after `experiment=smoke logger=none paths.cache=...`; DIR: a folder without images
    message: str  # the error line after "error: ", from its start; "..." matches anything

    @property
    def example(self) -> str:
        return " ".join(self.argv)

    def pattern(self) -> re.Pattern:
        return re.compile("^error: " + ".*".join(re.escape(part) for part in self.message.split("...")))


def case(what: str, args: str, message: str) -> Case:
    return Case(what, tuple(args.split()), message)


CASES = [
    case("unknown prior", "prior=foo", "prior=foo is not one of: absorbing, ar, imagebart"),
    case("unknown data", "data=nope", "data=nope is not one of: emoji, folder"),
    case("unknown tokenizer", "tokenizer=nope", "tokenizer=nope is not one of: release, taming, vqgan_smoke, vqgan_tiny"),
    case("T < 2 for ImageBART", "prior=imagebart T=1",
         "T=1: imagebart needs an integer chain length T >= 2 (T = 2 is a single AR model)"),
    case("T not an integer", "prior=imagebart T=2.5", "T=2.5 must be an integer"),
    case("schedule of the wrong length", "prior=imagebart T=3 prior.schedule={betas:[1.0]}",
         "prior.schedule.betas has 1 values, T=3 needs T-1=2 ..."),
    case("last beta not 1", "prior=imagebart T=3 prior.schedule={betas:[0.5,0.5]}",
         "prior.schedule.betas=[0.5, 0.5]: the last beta (beta_T) must be 1 ..."),
    case("beta outside (0, 1]", "prior=imagebart T=3 prior.schedule={betas:[1.5,1.0]}",
         "prior.schedule.betas=[1.5, 1.0]: every beta must lie in (0, 1]"),
    case("budget too small for T", "prior=imagebart T=9 budget.params=20000",
         "budget.params=20000 is too small for imagebart T=9: it is split equally over T-1=8 scales ..."),
    case("budget too small", "prior=absorbing budget.params=2000", "budget.params=2000 is too small for ..."),
    case("too few samples", "eval.num_samples=1", "eval.num_samples=1 must be at least 2"),
    case("unknown stage", "stage=everything", "stage=everything is not one of: plan, tokens, train, all"),
    case("unknown precision", "precision=fp16", "precision=fp16 is not one of: auto, fp32, bf16"),
    case("likelihood residual not a boolean", "prior=imagebart T=3 prior.likelihood_residual=maybe",
         "prior.likelihood_residual='maybe': expected true or false"),
    case("missing data folder", "data=folder data.path=/no/such/folder", "data.path=/no/such/folder: no such folder"),
    case("folder without images", "data=folder data.path=DIR",
         "data.path=...: no images (.png/.jpg/.jpeg/.webp) found"),
    case("missing tokenizer checkpoint", "tokenizer=taming tokenizer.ckpt=/no/such.ckpt tokenizer.config=/no/such.yaml",
         "tokenizer.ckpt=/no/such.ckpt: file not found"),
    case("unknown W&B mode", "logger=wandb wandb.mode=sometimes",
         "wandb.mode=sometimes is not one of: offline, online, disabled"),
    case("unknown choice inside Hydra's sweep syntax", "-m prior=choice(ar,nosuch)",
         "prior=nosuch is not one of: absorbing, ar, imagebart"),
    case("a glob that matches nothing", "-m prior=glob(nosuch*)",
         "prior=glob(nosuch*) matches none of: absorbing, ar, imagebart"),
    case("no training steps", "train.steps=0", "train.steps=0 must be at least 1"),
    case("negative training steps", "train.steps=-5", "train.steps=-5 must be at least 1"),
    case("empty batches", "train.batch_size=0", "train.batch_size=0 must be at least 1"),
    case("empty sampling batches", "eval.batch_size=0", "eval.batch_size=0 must be at least 1"),
    case("empty feature batches", "eval.feature_batch_size=0", "eval.feature_batch_size=0 must be at least 1"),
    case("a budget the device cannot train", "budget.params=1000000000000",
         "budget.params=1000000000000: training ... parameters needs at least ... GiB ..."),
    case("activations that cannot fit", "train.batch_size=10000000",
         "train.batch_size=10000000: training needs at least ... GiB (... GiB weights and optimizer state, ... GiB "
         "activations), more than the ... GiB ... memory available"),
    case("PRDC and KID matrices that cannot fit", "eval.num_samples=1000000 eval.prdc_samples=1000000",
         "eval.prdc_samples=1000000: evaluation needs at least ... GiB (feature extractors' activations "
         "(Inception, eval.fd_features) and the PRDC/KID matrices), more than the ... GiB ... memory available"),
    case("a sample count with zeros too many", "eval.num_samples=100000000",
         "eval.num_samples=100000000 exceeds 1000000; raise eval.max_samples if this is intended"),
    case("a completion count with zeros too many", "eval.completion_samples=100000000",
         "eval.completion_samples=100000000 exceeds 1000000; raise eval.max_samples if this is intended"),
    case("unknown sampling path", "eval.compile=maybe", "eval.compile=maybe is not one of: auto, off, on"),
    case("too few bootstrap resamples", "eval.bootstrap=1", "eval.bootstrap=1 must be at least 2"),
    case("bad thread count", "threads=0", "threads=0 must be a positive integer or auto"),
    case("bad count of units trained at once", "unit_workers=0", "unit_workers=0 must be a positive integer or auto"),
    case("mirroring that is not a yes/no", "tokenizer.hflip_train=maybe",
         "tokenizer.hflip_train='maybe': expected true or false"),
    case("a tokenizer name not in the registry", "tokenizer.name=nope",
         "tokenizer.name=nope is not one of: vqgan, taming"),
    case("a tokenizer class that cannot be imported", "+tokenizer.class=pkg.mod:Nope",
         "tokenizer.class=pkg.mod:Nope: cannot import it (..."),
    case("a tokenizer option of the wrong type", "tokenizer.train.steps=many",
         "tokenizer.train.steps='many': expected an integer"),
    case("an unknown tokenizer option", "+tokenizer.model.n_embd=64",
         "tokenizer.model.n_embd is not an option of tokenizer=vqgan (options: ..."),
    case("a tokenizer option out of range", "tokenizer.train.codebook_init=zeros",
         "tokenizer.train: codebook_init='zeros' is not 'random' or 'kmeans'"),
    # Accepted before with exit 0 and wrong numbers.
    case("an EMA decay above 1", "train.ema_decay=2", "train.ema_decay=2.0 must lie in [0, 1)"),
    case("a negative data limit", "data.limit=-5", "data.limit=-5 must be at least 1"),
    case("no samples for KID and PRDC", "eval.prdc_samples=0",
         "eval.prdc_samples=0 must be at least eval.prdc_k + 1 = 6 ..."),
    case("an infinite temperature", "prior.sample.temperature=inf", "prior.sample.temperature=inf must be finite"),
    case("more threads than CPUs", "threads=999", "threads=999 exceeds the ... CPUs this process may use"),
    case("no IS splits", "eval.isc_splits=0", "eval.isc_splits=0 must be at least 1"),
    case("an unknown eval option", "+eval.num_sample=10",
         "eval.num_sample is not an option of eval=default (options: ...); did you mean eval.num_samples?"),
    case("an unknown train option", "+train.stepz=5",
         "train.stepz is not an option of train=default (options: ...); did you mean train.steps?"),
    case("an unknown data option", "+data.resolutoin=64",
         "data.resolutoin is not an option of data=emoji (options: ...); did you mean data.resolution?"),
    case("an unknown top-level option", "+seeds=3", "seeds is not an option (options: ...); did you mean seed?"),
    case("an unknown budget option", "+budget.param=5",
         "budget.param is not an option of budget (options: params); did you mean budget.params?"),
    # Failed before only after work started, with a traceback that did not name the option.
    case("a negative protocol seed", "eval.split_seed=-1", "eval.split_seed=-1 must be at least 0"),
    case("a learning rate that is not a number", "train.lr=abc", "train.lr='abc': expected a number"),
    case("a negative learning rate", "train.lr=-1", "train.lr=-1.0 must lie in (0, inf)"),
    case("an Adam beta above 1", "train.betas=[2,.5]", "train.betas=[2, 0.5]: each beta must lie in [0, 1)"),
    case("a val fraction that is not a number", "data.val_fraction=abc", "data.val_fraction='abc': expected a number"),
    case("a data limit too small to split", "data.limit=2",
         "data.limit=2 leaves 1 train / 1 val images; at least 2 of each are needed"),
    case("a selection fraction outside (0, 1)", "data.selection_fraction=1",
         "data.selection_fraction=1.0 must lie in (0, 1)"),
    case("a selection split that leaves too few train images", "data.limit=20 data.selection_fraction=0.95",
         "data.selection_fraction=0.95 leaves 1 of 18 train images to train the priors on; at least 2 are needed"),
    case("no pixels", "data.resolution=0", "data.resolution=0 must be at least 1"),
    case("a taming project.yaml that is not YAML", "tokenizer=taming tokenizer.ckpt=RANDOM tokenizer.config=BADYAML",
         "tokenizer.config=...: not valid YAML at line ..."),
    case("a tokenizer checkpoint of random bytes", "tokenizer=taming tokenizer.ckpt=RANDOM tokenizer.config=YAML",
         "tokenizer.ckpt=... cannot be loaded safely (weights_only=True): not a PyTorch checkpoint, or a damaged one "
         "(...)"),
    case("a cache that is a file", "paths.cache=FILE", "paths.cache=...: ... is a file, not a folder"),
    # Sweep-level options: checked before the first job of the sweep.
    case("-m after the overrides (as Hydra allows)", "prior=ar,absorbing compare_to=foo -m",
         "compare_to=foo is not one of the priors: absorbing, ar, imagebart"),
    case("a sweep name that is a path", "-m name=a/b",
         "name=a/b must be one folder name (no '/', not '.' or '..'): it names multirun/NAME and reports/NAME"),
    case("a sweep name outside multirun/", "-m name=../../escape", "name=../../escape must be one folder name ..."),
    case("comparing against a prior that does not exist", "-m compare_to=foo",
         "compare_to=foo is not one of the priors: absorbing, ar, imagebart"),
    case("a reports folder that is a file", "-m paths.reports=FILE", "paths.reports=...: ... is a file, not a folder"),
]


# A taming project.yaml of a small VQGAN: a valid config for the cases about its checkpoint.
TAMING_YAML = """model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 4
    n_embed: 16
    ddconfig: {double_z: false, z_channels: 4, resolution: 32, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2],
               num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
"""
FILES = {
    "DIR": ("no_images/readme.txt", "no images"),  # a folder without images
    "FILE": ("a_file", "a file"),  # a plain file where a folder is expected
    "RANDOM": ("random.ckpt", None),  # random bytes
    "YAML": ("project.yaml", TAMING_YAML),
    "BADYAML": ("broken.yaml", "model:\n  params: [1, 2\n"),  # an unclosed list
}


def make_files(root: Path) -> dict[str, str]:
    import numpy as np

    subs = {}
    for name, (rel, text) in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.write_bytes(np.random.default_rng(0).bytes(4096))
        else:
            path.write_text(text)
        subs[name] = str(path.parent if name == "DIR" else path)
    return subs


def substitute(argv: tuple[str, ...], subs: dict[str, str]) -> list[str]:
    return [re.sub(r"\b(" + "|".join(subs) + r")\b", lambda m: subs[m.group(1)], a) for a in argv]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run once, each in its own working folder (cache, outputs, multirun, reports), in one process."""
    root = tmp_path_factory.mktemp("bad_input")
    subs = make_files(root)
    lines = []
    for i, c in enumerate(CASES):
        argv = substitute(c.argv, subs)
        cache = [] if any(a.startswith("paths.cache=") for a in argv) else ["paths.cache=cache"]
        overrides = SMOKE + cache + [a for a in argv if a != "-m"]
        # The sweep flag stays where the case puts it: first, or after the overrides as Hydra allows.
        line = overrides + ["-m"] if argv[-1] == "-m" else ["-m"] + overrides if "-m" in argv else overrides
        cwd = root / f"case{i}"
        cwd.mkdir()
        lines.append((line, cwd))
    return root, dict(zip(CASES, run_cli_many(lines)))


@pytest.mark.parametrize("c", CASES, ids=[c.example for c in CASES])
def test_bad_input_is_one_line_error_before_any_work(outcomes, c):
    root, results = outcomes
    r = results[c]
    assert r["rc"] == 2, (r["rc"], r["stderr"][-2000:])
    err_lines = [ln for ln in r["stderr"].splitlines() if ln.startswith("error: ")]
    assert len(err_lines) == 1, r["stderr"][-2000:]
    assert r["stderr"].strip().splitlines()[-1] == err_lines[0]  # the last thing the user reads
    assert c.pattern().match(err_lines[0]), err_lines[0]
    assert "Traceback" not in r["stderr"] + r["stdout"]
    assert "weights_only=False" not in r["stderr"]  # never the advice to run a checkpoint's pickled code
    # Nothing was computed: no cache stage was started, no sweep folder or report made.
    cwd = root / f"case{CASES.index(c)}"
    assert not (cwd / "cache").exists() or not any((cwd / "cache").iterdir())
    assert not (cwd / "multirun").exists() and not (cwd / "reports").exists()


def render_table() -> str:
    rows = ["| bad input | example | message |", "| --- | --- | --- |"]
    rows += [f"| {c.what} | `{c.example}` | `{c.message}` |" for c in CASES]
    return "\n".join([BEGIN, *rows, END])


def test_errors_doc_is_generated_from_the_table():
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lost its generated table's markers"
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == render_table(), "docs/errors.md is stale: run python -m tests.test_bad_input"


if __name__ == "__main__":
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DOC.write_text(text[:start] + render_table() + text[end:])
    print(f"wrote {DOC}", file=sys.stderr)
