"""The one table of result keys (bench/keys.py): every key spelled there and nowhere else under bench/."""
from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from bench import keys as K
from bench.results import empty_results

BENCH = Path(__file__).resolve().parent.parent / "bench"

# String literals under bench/ that equal a result key but name something else: (module, literal) -> what.
# A new entry needs a reason; a result key written or read by its string instead of its constant fails below.
OTHER_MEANINGS = {
    ("callbacks.py", "prior"): "the `prior` config group of a sweep override",
    ("pipeline.py", "release"): "the config's top-level `release:` block",
    ("cost.py", "params"): "a field of the plan's Cost record",
    ("cost.py", "tokenizer"): "a field of the plan's Cost record",
    ("data.py", "n_val"): "a field of the data cache's manifest",
    ("device.py", "cuda"): "torch's device type",
    ("evaluate.py", "baselines"): "the cached stage's folder",
    ("evaluate.py", "cuda"): "torch's device type",
    ("logger.py", "prior"): "a W&B run tag's name",
    ("logger.py", "T"): "a W&B run tag's name",
    ("logger.py", "seed"): "a W&B run tag's name",
    ("metrics.py", "recall"): "prdc.compute_prdc's output name",
    ("metrics.py", "density"): "prdc.compute_prdc's output name",
    ("metrics.py", "coverage"): "prdc.compute_prdc's output name",
    ("options.py", "prior"): "a config group",
    ("options.py", "tokenizer"): "a config group",
    ("options.py", "batch_size"): "a train option",
    ("pipeline.py", "T"): "the T option in its check",
    ("pipeline.py", "seed"): "the seed option in its check",
    ("pipeline.py", "prior"): "the prior config group, and a checkpoint's field",
    ("pipeline.py", "baselines"): "the stage and its cache folder",
    ("pipeline.py", "tokenizer"): "the tokenizer's cache folder",
    ("pipeline.py", "cuda"): "torch's device type",
    ("report.py", "T"): "a column title",
    ("run.py", "prior"): "a config group",
    ("run.py", "tokenizer"): "a config group",
    ("stats.py", "fid"): "the range table of bounded estimates, keyed like the results",
    ("stats.py", "completion_fid"): "the range table of bounded estimates",
    ("stats.py", "prdc_precision"): "the range table of bounded estimates and the PRDC estimate names",
    ("stats.py", "recall"): "the range table of bounded estimates and the PRDC estimate names",
    ("stats.py", "density"): "the range table of bounded estimates and the PRDC estimate names",
    ("stats.py", "coverage"): "the range table of bounded estimates and the PRDC estimate names",
    ("stats.py", "is_mean"): "the range table of bounded estimates",
    ("stats.py", "train_match"): "the range table of bounded estimates",
    ("stats.py", "train_copies"): "the range table of bounded estimates",
    ("tokens.py", "tokenizer"): "the tokenizer's cache folder and config group",
    ("tokens.py", "n_val"): "a field of the token cache's manifest",
    ("train.py", "params"): "AdamW's parameter-group field",
    ("train.py", "prior"): "who a resumable checkpoint belongs to (Steps.owner), for messages",
    ("train.py", "error"): "the message tag of a training worker's pipe",
}


def key_literals(root: Path = BENCH) -> list[tuple[str, int, str]]:
    """(module, line, literal) of every string constant under root (outside the table) equal to a result key."""
    names = {str(k) for k in K.TABLE}
    hits = []
    for path in sorted(root.glob("*.py")):
        if path.name == "keys.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                hits.append((path.name, node.lineno, node.value))
    return hits


def test_no_result_key_is_spelled_outside_the_table():
    stray = [f"bench/{m}:{line} {lit!r}" for m, line, lit in key_literals() if (m, lit) not in OTHER_MEANINGS]
    assert not stray, "result keys spelled as literals (use bench.keys' constants): " + ", ".join(stray)


def test_every_allowed_literal_still_occurs():
    """An allowance whose literal is gone is removed, so the list never hides a new use."""
    found = {(m, lit) for m, _, lit in key_literals()}
    assert not set(OTHER_MEANINGS) - found, sorted(set(OTHER_MEANINGS) - found)


def test_the_scan_finds_a_key_written_by_its_string(tmp_path):
    """The check above can fail: a module that writes r["fid"] is found; K.FID and a docstring naming it are not."""
    (tmp_path / "stray.py").write_text('"""The fid of r."""\nfrom bench import keys as K\nr = {K.FID: 0}\nr["fid"] = 1.0\n')
    assert key_literals(tmp_path) == [("stray.py", 4, "fid")]


def test_keys_are_unique_strings_that_serialise_as_themselves():
    names = [str(k) for k in K.TABLE]
    assert len(names) == len(set(names))
    assert json.loads(json.dumps({K.FID: 1.0})) == {"fid": 1.0}
    assert type(pickle.loads(pickle.dumps(K.FID))) is str and {K.FID: 1}["fid"] == 1
    assert K.FID.ci == "fid_ci" and K.FID.se == "fid_se" and K.KEYS["fid"].title == "FID"
    assert K.bound_key("elbo_eq6") == "elbo_eq6_bits_per_token"


def test_empty_results_hold_every_schema_key_and_interval():
    r = empty_results()
    assert set(K.SCHEMA) <= set(r)
    assert all(k.ci in r and k.se in r for k in K.INTERVAL_KEYS)
    assert not set(K.RECORDS) & {k for k in r if r[k] is None}  # maps and bookkeeping are filled, not None


@pytest.mark.parametrize("key", K.TABLE, ids=str)
def test_each_key_has_a_source_and_a_title(key):
    assert key.source in ("job", "tokenizer", "train", "eval", "speed", "plan", "env") and key.title


def test_an_evaluation_part_written_with_key_constants_resumes_without_recomputing(tmp_path):
    """Parts are torch files loaded with weights_only=True, which refuses any class but the builtins: the Key
    constants in a part must be written as plain strings."""
    import torch

    from bench.evaluate import part, resumable_part

    calls = []

    def compute():
        calls.append(1)
        return part({K.FID: 1.5}, {K.IS_MEAN: "no logits"}, per_sequence=torch.arange(3.0))

    first, again = resumable_part(tmp_path, "nll", compute), resumable_part(tmp_path, "nll", compute)
    assert len(calls) == 1
    assert again["results"] == {"fid": 1.5} and again[K.UNAVAILABLE] == {"is_mean": "no logits"}
    assert torch.equal(again["per_sequence"], first["per_sequence"])


def test_tables_handed_to_other_libraries_have_plain_str_names():
    """W&B's Table accepts exactly str column names: results and report summaries carry no Key objects."""
    assert all(type(k) is str for k in empty_results())
