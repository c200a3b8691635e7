"""The one table of result keys: every key a job writes into results.json, and nowhere else spelled out.

Each key is a `Key`: the string results.json uses (a `str`, so `results[K.FID]` and `results["fid"]` are the
same entry) carrying its title, unit, digits, direction and where it comes from. Code names a key by its
constant (`K.FID`); tests/test_keys.py checks that no module under bench/ spells a key of this table as a
string literal of its own.

    SCHEMA          the scalar keys of every results.json (None until a stage fills them)
    RECORDS         the maps and bookkeeping a job writes besides (unavailable reasons, stage times, ...)
    bound_key(n)    the key of a prior's declared extra bound `n` (priors.base.Prior.extra_bounds)

Torch-free: the report and notebooks import it without torch.
"""
from __future__ import annotations

from typing import Any


class Key(str):
    """A result key: the string itself, plus how reports show it."""

    title: str  # column title
    unit: str
    digits: int  # decimals shown; 0: an integer (large ones in millions)
    lower_is_better: bool | None  # None: not a quality measure
    source: str  # job | tokenizer | train | eval | speed | plan | env: the stage that writes it
    interval: bool  # results.json also carries `<name>_ci` = [lo, hi] (95%) and `<name>_se`
    column: bool  # a column of the report's main table
    doc: str
    in_schema: bool  # one of SCHEMA's scalars (False: a RECORDS entry)

    def __new__(cls, name: str, title: str = "", unit: str = "", digits: int = 3, lower_is_better: bool | None = None,
                source: str = "eval", interval: bool = False, column: bool = False, doc: str = "",
                in_schema: bool = True) -> "Key":
        key = super().__new__(cls, name)
        key.title, key.unit, key.digits, key.lower_is_better = title or name, unit, digits, lower_is_better
        key.source, key.interval, key.column, key.doc, key.in_schema = source, interval, column, doc, in_schema
        return key

    @property
    def name(self) -> str:
        return str(self)

    @property
    def ci(self) -> str:
        """The key of its 95% interval [lo, hi] (interval keys)."""
        return f"{self}{CI_SUFFIX}"

    @property
    def se(self) -> str:
        """The key of its standard error (interval keys)."""
        return f"{self}{SE_SUFFIX}"

    def __reduce__(self) -> tuple[Any, ...]:
        return str, (str(self),)  # pickled (torch.save, worker pipes) as the plain string


CI_SUFFIX, SE_SUFFIX = "_ci", "_se"
BITS_SUFFIX = "_bits_per_token"  # the per-token likelihood keys: nll_bits_per_token and each declared extra bound


def bound_key(name: str) -> str:
    """results.json's key of a prior's declared extra bound `name` (Prior.extra_bounds), in bits per token."""
    return f"{name}{BITS_SUFFIX}"

# identity and status
PRIOR = Key("prior", "Prior", source="job", doc="prior name (conf/prior/)")
T = Key("T", "T", source="job", digits=0, doc="chain length or sampling steps; how it applies: T_applies")
PRIOR_LABEL = Key("prior_label", "Prior", source="job", doc="the prior's name in reports (declared by the prior)")
T_APPLIES = Key("T_applies", "T applies to", source="job", doc="how T applies to the prior: none | training | sampling")
SEED = Key("seed", "seed", source="job", digits=0)
STATUS = Key("status", "status", source="job", doc="ok | failed")
ERROR = Key("error", "error", source="job", doc="null or one line")
SWEEP_ID = Key("sweep_id", "sweep id", source="job", doc="id of the sweep launch that wrote this job")
THREADS = Key("threads", "threads", source="job", digits=0, doc="intra-op CPU threads the job computed with")
UNIT_WORKERS = Key("unit_workers", "unit workers", source="job", digits=0,
    doc="units of the prior trained at once, each with threads // unit_workers threads")

# training
PARAMS = Key("params", "Params", source="train", digits=0, column=True, doc="trainable transformer parameters")
TRAIN_STEPS = Key("train_steps", "train steps", source="train", digits=0)
N_TRAIN_SEQUENCES = Key("n_train_sequences", "N train sequences", source="train", digits=0,
    doc="token sequences the prior trains on: the train split less the selection split (mirrors included)")
N_SELECTION = Key("n_selection", "N selection", source="train", digits=0,
    doc="train images held out to pick the best checkpoint (data.selection_fraction; never in reported numbers)")
SELECTION_FRACTION = Key("selection_fraction", "selection fraction", source="train", doc="data.selection_fraction")
SELECTION_SEED = Key("selection_seed", "selection seed", source="train", digits=0, doc="data.selection_seed")
TRAIN_SECONDS = Key("train_seconds", "train s", "s", 1, source="train", doc="training time summed over the prior's units")
TRAIN_WALL_SECONDS = Key("train_wall_seconds", "train wall s", "s", 1, source="train",
    doc="wall time of the training stage (units trained at once overlap: see unit_workers)")

# likelihood
NLL_BITS_PER_TOKEN = Key("nll_bits_per_token", "NLL at temp. 1", "bits/token", 3, True, interval=True, column=True,
    doc="exact, ELBO or sampler bound (nll_kind) of the model at temperature 1 without top-k/top-p, whatever "
        "the sampling settings; interval and stderr over validation sequences")
NLL_STDERR = Key("nll_stderr", "NLL stderr", "bits/token", 4, doc="standard error over validation sequences (incl. Monte Carlo)")
NLL_KIND = Key("nll_kind", "NLL kind", doc="exact | elbo | order_bound")
NLL_SEQUENCES = Key("nll_sequences", "NLL sequences", digits=0, doc="validation sequences the NLL averages")

# sample metrics
FID = Key("fid", "FID", "", 2, True, interval=True, column=True)
KID_MEAN = Key("kid_mean", "KID", "", 4, True, interval=True, column=True,
    doc="unbiased MMD^2 of all samples against all reference rows (the limit of torch-fidelity's subset mean)")
IS_MEAN = Key("is_mean", "IS", "", 2, False, interval=True, column=True)
IS_STD = Key("is_std", "IS std", "", 2)
PRDC_PRECISION = Key("prdc_precision", "Prec.", "", 3, False, interval=True, column=True)
RECALL = Key("recall", "Rec.", "", 3, False, interval=True, column=True)
DENSITY = Key("density", "Dens.", "", 3, False, interval=True, column=True)
COVERAGE = Key("coverage", "Cov.", "", 3, False, interval=True, column=True)
COMPLETION_FID = Key("completion_fid", "Compl. FID", "", 2, True, interval=True, column=True,
    doc="upper-half completion FID: the lower half of the token grid kept, the upper half generated")
TRAIN_MATCH = Key("train_match", "Train match", "", 3, None, interval=True, column=True,
    doc="mean over samples of the largest share of token positions shared with one training grid (1: a copy); "
        "the real val row gives the level of unseen images")
TRAIN_COPIES = Key("train_copies", "train copies", "", 3, None, interval=True,
    doc="share of samples whose token grid is exactly a training grid")
N_MATCH_SAMPLES = Key("n_match_samples", "N match samples", digits=0, doc="samples searched against the training grids")
N_SAMPLES = Key("n_samples", "N samples", digits=0, doc="generated samples per metric")
N_COMPLETIONS = Key("n_completions", "N completions", digits=0)
N_REFERENCE = Key("n_reference", "N reference", digits=0, doc="reference images for FID/KID (PRDC: n_samples of them)")
N_BOOTSTRAP = Key("n_bootstrap", "bootstrap resamples", digits=0)
FEATURE_EXTRACTOR = Key("feature_extractor", "features")

# speed and memory
SAMPLE_SECONDS_PER_IMAGE = Key("sample_seconds_per_image", "s/img", "s", 4, True, source="speed", column=True,
    doc="token generation at batch_size, warm-up excluded")
SAMPLES_PER_SECOND = Key("samples_per_second", "img/s", "1/s", 2, False, source="speed")
DECODE_SECONDS_PER_IMAGE = Key("decode_seconds_per_image", "decode s/img", "s", 5, True, source="speed")
DECODE_IMAGES_PER_SECOND = Key("decode_images_per_second", "decode img/s", "1/s", 1, False, source="speed")
NFE = Key("nfe", "NFE", digits=0, source="speed", column=True, doc="network evaluations per sample() call")
SAMPLE_FLOPS_PER_IMAGE = Key("sample_flops_per_image", "GFLOP/img", "FLOP", 0, source="speed",
    doc="model FLOPs of sample() per image, counted from the architecture, NFE and context lengths")
ACHIEVED_FLOPS = Key("achieved_flops", "FLOP/s", "FLOP/s", 0, False, source="speed")
PEAK_FLOPS = Key("peak_flops", "peak FLOP/s", "FLOP/s", 0, source="speed", doc="the device's measured matmul peak")
SAMPLER_PEAK_PERCENT = Key("sampler_peak_percent", "% limit", "%", 1, False, source="speed", column=True,
    doc="sampling's roofline time, max(model FLOPs / matmul peak, bytes read / read bandwidth), as a "
        "percentage of its measured time")
COMPILE = Key("compile", "compile", source="speed", doc="eval.compile as resolved: on | off")
COMPILE_SECONDS = Key("compile_seconds", "compile s", "s", 1, source="speed", doc="compiling, in the warm-up batch; never in s/img")
COMPLETION_NFE = Key("completion_nfe", "completion NFE", digits=0, source="speed")
BATCH_SIZE = Key("batch_size", "batch", digits=0, source="speed")
PEAK_MEMORY_MB = Key("peak_memory_mb", "peak MB", "MiB", 0, source="speed",
    doc="CUDA: peak allocated during sampling; CPU: peak RSS of the job's sampling (reset before)")

# the cost plan (bench/cost.py), estimated before any work
PLAN_TRAIN_FLOPS = Key("plan_train_flops", "planned train FLOP", "FLOP", 0, source="plan",
    doc="model FLOPs of training every unit (3 x forward x batch x steps) and its validation forwards")
PLAN_SAMPLE_FLOPS = Key("plan_sample_flops", "planned sample FLOP", "FLOP", 0, source="plan",
    doc="model FLOPs of the evaluation's samples and completions (the prior's sample_flops per image)")
PLAN_INCEPTION_IMAGES = Key("plan_inception_images", "planned Inception images", digits=0, source="plan",
    doc="Inception forwards: reference, samples, completions and the two baseline rows")
PLAN_INCEPTION_FLOPS = Key("plan_inception_flops", "planned Inception FLOP", "FLOP", 0, source="plan")
PLAN_TOKENIZER_FLOPS = Key("plan_tokenizer_flops", "planned tokenizer FLOP", "FLOP", 0, source="plan",
    doc="training the VQGAN here (0 for a released one) and encoding the images")
PLAN_DECODE_FLOPS = Key("plan_decode_flops", "planned decode FLOP", "FLOP", 0, source="plan",
    doc="decoding the val reconstructions, samples and completions")
PLAN_DISK_BYTES = Key("plan_disk_bytes", "planned cache disk", "B", 0, source="plan",
    doc="token cache, reference features, checkpoints and samples this job's stages write")
PLAN_MEMORY_BYTES = Key("plan_memory_bytes", "planned peak memory", "B", 0, source="plan",
    doc="the least memory of the job's largest phase (bench/memory.py: weights and optimizer state with "
        "training activations, sampling's KV cache, evaluation's feature batches and matrices)")
PLAN_HOURS = Key("plan_hours", "planned hours", "h", 2, source="plan",
    doc="estimated hours per device (A100, H100 SXM at bf16 peak, the job's own device at its measured peak), "
        "at bench.cost.UTILISATION")
PLAN_FD = Key("plan_fd", "planned FD extractors", source="plan", in_schema=False,
    doc="per extractor of eval.fd_features: images, flops_per_image, flops, disk_bytes (its reference features) "
        "and unavailable (why it will be n/a and cost nothing, else null); written only where some is selected")
COMPUTE_PRECISION = Key("compute_precision", "precision", source="env", doc="fp32 | bf16 (compute dtype of sampling/training)")
DEVICE = Key("device", "device", source="env")
TOKENS_KEY = Key("tokens_key", "tokens key", source="job")
TRAIN_KEY = Key("train_key", "train key", source="job")

# ---- maps and bookkeeping besides the scalars ------------------------------
UNAVAILABLE = Key("unavailable", source="job", in_schema=False, doc="{key: one-line reason} of each key left None")
STAGE_SECONDS = Key("stage_seconds", source="job", in_schema=False, doc="{stage: wall seconds} of this job")
JOB_SECONDS = Key("job_seconds", source="job", in_schema=False, doc="wall seconds of the whole job")
ERROR_KIND = Key("error_kind", source="job", in_schema=False, doc="config | runtime (failed jobs)")
TRACEBACK = Key("traceback", source="job", in_schema=False, doc="the traceback of a runtime failure")
TOKENIZER = Key("tokenizer", source="tokenizer", in_schema=False,
    doc="the token cache's figures (codebook, grid, PSNR) and recon_fid / recon_fid_n")
RECON_FID = Key("recon_fid", "rFID", source="tokenizer", in_schema=False,
    doc="in `tokenizer`: FID of the reconstructions baseline row")
RECON_FID_N = Key("recon_fid_n", "rFID N", source="tokenizer", in_schema=False, doc="in `tokenizer`: its N")
BASELINES = Key("baselines", source="eval", in_schema=False,
    doc="the baseline rows (BASELINE_ROWS) with their sample metrics, and their N")
N_VAL = Key("n_val", "N val", digits=0, in_schema=False, doc="in `baselines`: val images")
TRAIN_UNITS = Key("train_units", source="train", in_schema=False,
                  doc="{unit: best_val, best_step, seconds, steps} of each trained model")
RELEASE = Key("release", source="train", in_schema=False,
               doc="a released prior's row: {family, files: [[name, sha256]], paper_sampling, sampling, differs, "
                   "notes}: its weights files, the sampling settings its paper used, this job's, and which differ")
VALIDATION_NOTE = Key("validation_note", source="job", in_schema=False,
                      doc="what the prior's validation value is (Prior.validation_note)")
EXTRA_BOUNDS = Key("extra_bounds", source="eval", in_schema=False,
                   doc="{bound_key(name): label} of the prior's declared extra bounds (Prior.extra_bounds)")
EVAL_DIR = Key("eval_dir", source="eval", in_schema=False, doc="the evaluation's cache folder")
TIMED_BATCHES = Key("timed_batches", source="speed", in_schema=False, doc="sampling batches timed (warm-up excluded)")
WARMUP_SECONDS = Key("warmup_seconds", source="speed", in_schema=False, doc="the warm-up sampling batch")
TORCH = Key("torch", source="env", in_schema=False)
CUDA = Key("cuda", source="env", in_schema=False)
PYTHON = Key("python", source="env", in_schema=False)
COMMIT = Key("commit", source="env", in_schema=False)

# Frechet distances on other feature extractors (eval.fd_features): one key per torch-fidelity 0.4 extractor, written
# only by jobs that select it (so not in SCHEMA: the default results carry none of them).
_FD_DOC = ("Frechet distance (FID's arithmetic) between the samples' and the reference images' {} features; "
           "eval.fd_features selects it (docs/protocol.md)")


def _fd(extractor: str, title: str) -> Key:
    return Key("fd_" + extractor.replace("-", "_"), f"FD {title}", "", 2, True, interval=True, column=True,
               in_schema=False, doc=_FD_DOC.format(title))


FD_DINOV2_VIT_S_14 = _fd("dinov2-vit-s-14", "DINOv2 ViT-S/14")
FD_DINOV2_VIT_B_14 = _fd("dinov2-vit-b-14", "DINOv2 ViT-B/14")
FD_DINOV2_VIT_L_14 = _fd("dinov2-vit-l-14", "DINOv2 ViT-L/14")
FD_DINOV2_VIT_G_14 = _fd("dinov2-vit-g-14", "DINOv2 ViT-g/14")
FD_CLIP_RN50 = _fd("clip-rn50", "CLIP RN50")
FD_CLIP_RN101 = _fd("clip-rn101", "CLIP RN101")
FD_CLIP_RN50X4 = _fd("clip-rn50x4", "CLIP RN50x4")
FD_CLIP_RN50X16 = _fd("clip-rn50x16", "CLIP RN50x16")
FD_CLIP_RN50X64 = _fd("clip-rn50x64", "CLIP RN50x64")
FD_CLIP_VIT_B_32 = _fd("clip-vit-b-32", "CLIP ViT-B/32")
FD_CLIP_VIT_B_16 = _fd("clip-vit-b-16", "CLIP ViT-B/16")
FD_CLIP_VIT_L_14 = _fd("clip-vit-l-14", "CLIP ViT-L/14")
FD_CLIP_VIT_L_14_336PX = _fd("clip-vit-l-14-336px", "CLIP ViT-L/14@336px")

# The baseline rows of `baselines`: real val images and the tokenizer's reconstructions of them.
REAL_VAL = Key("real_val", "real val images", source="eval", in_schema=False)
RECONSTRUCTION = Key("reconstruction", "tokenizer reconstructions", source="eval", in_schema=False)
BASELINE_ROWS = (REAL_VAL, RECONSTRUCTION)

TABLE: tuple[Key, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, Key))  # definition order
SCHEMA: tuple[Key, ...] = tuple(k for k in TABLE if k.in_schema)
RECORDS: tuple[Key, ...] = tuple(k for k in TABLE if not k.in_schema)
KEYS: dict[str, Key] = {k.name: k for k in TABLE}
INTERVAL_KEYS = tuple(k for k in SCHEMA if k.interval)
COLUMN_KEYS = tuple(k for k in SCHEMA if k.column)
# Sample metrics of `fake` features (bench.metrics.compute_metrics), each None where it cannot be computed.
METRIC_KEYS = (FID, KID_MEAN, IS_MEAN, IS_STD, PRDC_PRECISION, RECALL, DENSITY, COVERAGE)
PRDC_KEYS = (PRDC_PRECISION, RECALL, DENSITY, COVERAGE)
# Sample metrics whose baseline rows (real val images, tokenizer reconstructions) exist at the column's N.
BASELINE_KEYS = (FID, KID_MEAN, IS_MEAN, PRDC_PRECISION, RECALL, DENSITY, COVERAGE, COMPLETION_FID, TRAIN_MATCH,
                 TRAIN_COPIES)
# eval.fd_features' choices (torch-fidelity 0.4's DINOv2 and CLIP extractors) -> the key of their Frechet distance.
FD_KEYS: dict[str, Key] = {k.name[len("fd_"):].replace("_", "-"): k for k in TABLE if k.name.startswith("fd_")}
