"""The fused CPU code: a `Transformer`'s cached step, its prefill and its cache-less pass, each in one call of C.

The ATen step (`Transformer.decode`) runs about sixty small kernels per token, each with its dispatch, its
allocation and, with several threads, its own fork and join; at the default shapes (batch 50, d_model 88) each
kernel's work is the size of that overhead, and the step ran at 10-14% of its roofline. The fused code
(`csrc/decode_step.c`) runs embedding, blocks, final LayerNorm and head for all rows in one call: the rows are split
over the threads once per call (they are independent until the logits), matmuls use a register-blocked kernel on
weights packed once per model, and attention reads only the written prefix from the fused code's own transposed
copy of the cache. Calls:
- a step (`FusedStep`, from `Transformer.decode` at an int position): one token per row;
- a prefill (`prefill`, from `Transformer.forward` on an empty cache): the first positions, and the memory's keys
  and values of a cross-attending decoder, written into both caches;
- a pass without a cache (`fused_pass`, from `Transformer.forward(..., fused=True)`: the samplers' `full_logits`,
  ImageBART's encoder and absorbing's network).
Each new key and value also goes into the ATen cache, so both paths keep one cache and may be mixed.

Tokens: the fused logits differ from ATen's by float rounding only (other summation orders; GELU's erf and
softmax's exp are ATen's own vector polynomials), as the ATen eager step's already differ from the uncached pass;
tests check the samplers' tokens against the uncached path and the logits against a bound derived from the
arithmetic. The logits are the same bit for bit whatever the batch size or the thread count.

Build: the C file is compiled on first use with the machine's C compiler (`$CC`, else `cc`; about half a second)
for the vector instruction set ATen runs with (AVX-512, AVX2 or the baseline: `ATEN_CPU_CAPABILITY` applies to
both), and the library is kept under `$PRIORBENCH_KERNEL_CACHE` (default `~/.cache/priorbench/kernels`) keyed by
source, flags and compiler. Without a compiler, or where it fails, sampling takes ATen's path and says so once.

`FUSED_DECODE`: "auto" (the default) uses the fused code where it applies and builds; False never uses it (the
benchmark's "aten" path); True makes a failed build an error instead of a fallback.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

FUSED_DECODE: bool | str = "auto"

SOURCE = Path(__file__).with_name("csrc") / "decode_step.c"
# Compiler flags of each ATen CPU capability on x86-64: the vector width the C code is compiled for follows the
# kernels ATen itself runs (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine gives AVX2 code in both).
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
             "AVX2": ["-mavx2", "-mfma"]}
BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=fast"]

# Threads the fused step splits its rows over while a decoding loop limits ATen's (priors.transformer.decode_threads):
# the caller's setting. None: torch.get_num_threads().
STEP_THREADS: int | None = None

# The C code's workers serve one call at a time, and ctypes releases the GIL during a call: Python threads that
# sample at once take turns here.
_CALL = threading.Lock()

_LIBRARY: tuple[ctypes.CDLL | None, str | None] | None = None
_WARNED = False


def capability() -> str:
    """The vector instruction set ATen's CPU kernels run with ("AVX512", "AVX2", "DEFAULT", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def compile_flags() -> list[str]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return BASE_FLAGS + (ISA_FLAGS.get(capability(), []) if x86 else [])


def kernel_cache() -> Path:
    root = os.environ.get("PRIORBENCH_KERNEL_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "priorbench" / "kernels"


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not found; set CC)"
    flags = compile_flags()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {cc!r} did not run: {e}"
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), version]).encode()).hexdigest()[:16]
    target = kernel_cache() / f"decode_step-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Compiled to a temporary name and renamed: processes building at once (a joblib sweep) each write
            # their own file, and the rename is atomic.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                os.unlink(tmp)
                lines = done.stderr.strip().splitlines() or ["no output"]
                first = next((line for line in lines if "error" in line), lines[0])
                return None, f"{cc} {' '.join(flags)} failed: {first.strip()}"
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"could not build {target}: {e}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"could not load {target}: {e}"
    lib.pb_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.pb_step.restype = ctypes.c_int
    lib.pb_pass.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                            ctypes.c_void_p, ctypes.c_int]
    lib.pb_pass.restype = ctypes.c_int
    lib.pb_memory.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.pb_memory.restype = ctypes.c_int
    for name in ("pb_plan_fields", "pb_layer_fields", "pb_vector_width", "pb_block_width"):
        getattr(lib, name).restype = ctypes.c_int64
    if lib.pb_plan_fields() != len(PLAN_FIELDS) or lib.pb_layer_fields() != len(LAYER_FIELDS):
        return None, f"{target} does not match this module's plan layout"
    return lib, None


def library() -> tuple[ctypes.CDLL | None, str | None]:
    """The compiled step (built on first call, then cached for the process), or None and why not."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = _build()
    return _LIBRARY


class Layout(NamedTuple):
    """The compiled code's widths: floats per vector (VW) and columns per matmul block (NB), which pad buffers."""
    vector: int
    block: int


def layout() -> Layout | None:
    """The library's Layout (built on first call), or None where it does not build."""
    lib, _ = library()
    return None if lib is None else Layout(int(lib.pb_vector_width()), int(lib.pb_block_width()))


def enabled() -> bool:
    """Whether cached CPU decoding takes the fused step (FUSED_DECODE and a library that builds)."""
    global _WARNED
    if FUSED_DECODE is False:
        return False
    lib, why = library()
    if lib is None:
        if FUSED_DECODE is True:
            raise RuntimeError(f"priors.cpu_decode.FUSED_DECODE=True but the fused decode step is unavailable: {why}")
        if not _WARNED:
            warnings.warn(f"fused CPU decode step unavailable ({why}); cached sampling uses the ATen step",
                          RuntimeWarning, stacklevel=3)
            _WARNED = True
        return False
    return True


def applies(model: torch.nn.Module, step: bool = True) -> bool:
    """Whether the fused code runs model's calls: a float32 Transformer on the CPU in eval mode, outside autograd,
    autocast and torch.compile's tracing, with the fused code enabled; a step needs an output head, a pass (no
    cache) no cross-attention."""
    w = model.tok_emb.weight
    if (model.training or w.device.type != "cpu" or w.dtype != torch.float32 or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")):
        return False
    if (model.head is None) if step else model.cfg.cross_attn:
        return False
    return enabled()


def step_threads() -> int:
    """Threads the fused step runs on: the decoding loop's caller's setting (STEP_THREADS), else ATen's."""
    return STEP_THREADS or torch.get_num_threads()


# ---- the plan: 8-byte fields in the order of decode_step.c's structs ------------------------------------------

PLAN_FIELDS = ("n_layer", "B", "D", "A", "H", "hd", "hdp", "cap", "capp", "M", "Mp", "F", "V", "vocab_in", "cross",
               "causal",
               "Dp", "Qp", "Ap", "Fp", "Vp", "Yw", "Sw", "row_floats", "KVp",
               "tok_emb", "pos_emb", "lnf_w", "lnf_b", "head_w", "head_b", "scratch", "layers", "epsf", "scale")
LAYER_FIELDS = ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "proj_w", "proj_b",
                "lnc_w", "lnc_b", "cq_w", "cq_b", "cproj_w", "cproj_b", "ck", "cv",
                "ln2_w", "ln2_b", "fc_w", "fc_b", "mp_w", "mp_b", "kt", "v", "tkv", "ckv_w", "ckv_b", "tck", "tcv",
                "eps1", "epsc", "eps2")
DOUBLES = {"epsf", "scale", "eps1", "epsc", "eps2"}


def _up(n: int, k: int) -> int:
    return -(-n // k) * k


def _fields(names: tuple[str, ...], values: dict) -> torch.Tensor:
    """The int64 words of one struct: ints as they are, tensors as their data pointers, doubles as their bits."""
    words = []
    for name in names:
        v = values[name]
        if isinstance(v, torch.Tensor):
            v = v.data_ptr()
        elif v is None:
            v = 0  # a NULL pointer
        elif name in DOUBLES:
            v = torch.tensor(float(v), dtype=torch.float64).view(torch.int64).item()
        words.append(int(v))
    return torch.tensor(words, dtype=torch.int64)


class PackedWeights:
    """A model's weights in the fused code's layout: every matmul weight transposed (K, N padded to the block
    width) with zero columns, biases and LayerNorm parameters zero-padded to the same widths. Made once per
    model and kept while its parameters are unchanged (their storage and version counters)."""

    def __init__(self, model: torch.nn.Module, lay: Layout):
        cfg = model.cfg
        D = cfg.d_model
        self.key = self.key_of(model)
        w = Widths(cfg, 0, 0, lay)
        self.Dp, self.Qp, self.Ap, self.Fp, self.Vp, self.KVp = w.Dp, w.Qp, w.Ap, w.Fp, w.Vp, w.KVp
        self.layout = lay

        def lin(layer: torch.nn.Linear, width: int) -> tuple[torch.Tensor, torch.Tensor]:
            w = F.pad(layer.weight.detach().t(), (0, width - layer.out_features)).contiguous()
            b = layer.bias.detach() if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
            return w, F.pad(b, (0, width - layer.out_features)).contiguous()

        def norm(ln: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
            pad = (0, self.Dp - D)
            return F.pad(ln.weight.detach(), pad).contiguous(), F.pad(ln.bias.detach(), pad).contiguous(), ln.eps

        self.layers = []
        for blk in model.blocks:
            p = {}
            p["ln1_w"], p["ln1_b"], p["eps1"] = norm(blk.ln_attn)
            p["qkv_w"], p["qkv_b"] = lin(blk.attn.qkv, self.Qp)
            p["proj_w"], p["proj_b"] = lin(blk.attn.proj, self.Dp)
            if blk.cross is not None:
                p["lnc_w"], p["lnc_b"], p["epsc"] = norm(blk.ln_cross)
                p["cq_w"], p["cq_b"] = lin(blk.cross.q, self.Ap)
                p["cproj_w"], p["cproj_b"] = lin(blk.cross.proj, self.Dp)
                p["ckv_w"], p["ckv_b"] = lin(blk.cross.kv, self.KVp)
            p["ln2_w"], p["ln2_b"], p["eps2"] = norm(blk.ln_mlp)
            p["fc_w"], p["fc_b"] = lin(blk.mlp.fc, self.Fp)
            p["mp_w"], p["mp_b"] = lin(blk.mlp.proj, self.Dp)
            self.layers.append(p)
        self.lnf_w, self.lnf_b, self.epsf = norm(model.ln_f)
        self.head_w, self.head_b = lin(model.head, self.Vp) if model.head is not None else (None, None)
        self.tok_emb = model.tok_emb.weight.detach().contiguous()
        self.pos_emb = model.pos_emb.weight.detach().contiguous()
        self.pool: dict[tuple, dict] = {}  # buffers of steps and passes by shape (_Fused._buffers)

    @staticmethod
    def key_of(model: torch.nn.Module) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in model.parameters())


def packed(model: torch.nn.Module) -> PackedWeights:
    pack = getattr(model, "_fused_pack", None)
    if pack is None or pack.key != PackedWeights.key_of(model):
        pack = PackedWeights(model, layout())
        model._fused_pack = pack  # a plain attribute: not a parameter, buffer or state_dict entry
    return pack


PASS_ROWS = 256  # tokens a thread takes through the layers at a time in a pass (whole sequences, at least one)
# Buffers (the fused code's key/value layouts and scratch, and the ATen cache a fused prefill allocates) are kept
# on the model for the next call of the same shapes, up to this many bytes over every model's pool, once the cache
# that used them is gone: a sampling call makes a new cache, and fresh buffers of a few MB cost a page fault per
# 4 KiB on first touch (about 5 ms per AR sample at the default shapes, a seventh of its decoding). Larger buffers
# (256-px models) are made per cache, where that cost is small against the steps' work.
POOL_BYTES = 64 << 20
_POOLED = 0


def _unpool(size: int) -> None:
    global _POOLED
    _POOLED -= size


def _nbytes(buf: dict) -> int:
    return sum(t.numel() * t.element_size() for v in buf.values() if isinstance(v, (list, torch.Tensor))
               for t in (v if isinstance(v, list) else [v]))


class Widths:
    """The padded widths of the fused code's buffers for a model config, `cap` positions and a memory of M, in a
    Layout (matmul widths padded to its block, attention's to its vector)."""

    def __init__(self, cfg, cap: int, M: int, lay: Layout):
        vector, block = lay
        D, A = cfg.d_model, cfg.inner_dim
        self.H, self.hd = cfg.n_head, A // cfg.n_head
        self.Dp, self.Qp, self.Ap = _up(D, block), _up(3 * A, block), _up(A, block)
        self.Fp, self.Vp, self.KVp = _up(4 * D, block), _up(cfg.vocab_out, block), _up(2 * A, block)
        self.hdp, self.capp, self.Mp = _up(self.hd, vector), _up(cap, vector), _up(M, vector)
        self.Yw, self.Sw = _up(A, vector), max(self.capp, self.Mp)
        self.row = self.Dp * 2 + self.Qp + self.Yw + self.Fp + self.Sw + self.Vp  # scratch floats per row
        # Per batch row and layer: keys transposed (H hd, capp) and values (cap, H hdp), and the memory's alike.
        self.copy = A * self.capp + self.H * cap * self.hdp + (A * self.Mp + self.H * M * self.hdp if M else 0)


def floats_per_row(cfg, lay: Layout) -> int:
    """Floats the fused code holds per sampled row beside the ATen cache: a step's copy of the cache in its own
    layouts (every layer, the memory's too; a decoder's memory taken as seq_len positions, as bench/memory.py
    counts the ATen cache) and its scratch row; a pass's key/value copy (its scratch, a few hundred rows per
    thread whatever the batch, is not per row). What bench/memory.py adds on a CPU."""
    if cfg.causal and cfg.vocab_out > 0:
        w = Widths(cfg, cfg.seq_len, cfg.seq_len if cfg.cross_attn else 0, lay)
        return cfg.n_layer * w.copy + w.row
    return cfg.n_layer * Widths(cfg, cfg.seq_len, 0, lay).copy


def packed_floats(cfg, lay: Layout) -> int:
    """Floats of a model's packed weights (PackedWeights: every matmul weight and bias padded, the LayerNorm
    parameters; the embeddings are used in place), kept on the model once it has sampled."""
    w = Widths(cfg, 0, 0, lay)
    D, A = cfg.d_model, cfg.inner_dim
    layer = (D + 1) * w.Qp + (A + 1) * w.Dp + (D + 1) * w.Fp + (4 * D + 1) * w.Dp + 4 * w.Dp
    if cfg.cross_attn:
        layer += 2 * w.Dp + (D + 1) * w.Ap + (A + 1) * w.Dp + (D + 1) * w.KVp
    return cfg.n_layer * layer + 2 * w.Dp + ((D + 1) * w.Vp if cfg.vocab_out > 0 else 0)


def scratch_floats(cfg, threads: int, lay: Layout) -> int:
    """At most the floats of the fused code's temporary scratch in one call, whatever the batch: a pass's or a
    prefill's rows (PASS_ROWS tokens per thread, or one whole sequence) and the memory projection's rows."""
    w = Widths(cfg, cfg.seq_len, cfg.seq_len if cfg.cross_attn else 0, lay)
    return threads * (max(PASS_ROWS, cfg.seq_len) * w.row + (cfg.seq_len * w.KVp if cfg.cross_attn else 0))


def _scratch_rows(B: int, l: int, threads: int) -> tuple[int, int]:
    """(sequences a thread takes through the layers at a time, scratch rows) of a pass over B sequences of l."""
    chunk = max(1, min(PASS_ROWS // l, -(-B // threads)))
    return chunk, threads * chunk * l


class _Fused:
    """What a fused step and a fused pass share: the plan (decode_step.c's Plan and Layers, pointing into the
    packed weights and the buffers)."""

    def __init__(self, model: torch.nn.Module, B: int, cap: int, M: int):
        lib, _ = library()
        self.lib, self.model = lib, model
        self.pack = pack = packed(model)
        cfg = model.cfg
        self.B, self.V, self.cap, self.M = B, cfg.vocab_out, cap, M
        w = Widths(cfg, cap, M, pack.layout)
        self.H, self.hd, self.hdp, self.capp, self.Mp = w.H, w.hd, w.hdp, w.capp, w.Mp
        self.Yw, self.Sw, self.row = w.Yw, w.Sw, w.row
        self.buf: dict = {}

    def _buffers(self, key: tuple, scratch_rows: int, owner: object | None, aten: bool = False) -> dict:
        """Buffers for key: the pool's, unless the object that used them last is still alive, or new ones (pooled
        when small). Uninitialised: the fused code writes every scratch lane it reads, and reads its key/value
        copies only at positions it or a copy from the ATen cache wrote (padding lanes it reads are masked out of
        the scores or land in discarded output lanes). aten: also the ATen cache (zeroed by the caller)."""
        owner_ref = weakref.ref(owner) if owner is not None else (lambda: None)
        buf = self.pack.pool.get(key)
        if buf is not None and buf["owner"]() is None and (not aten or "kv" in buf):
            buf["owner"] = owner_ref
            return buf
        n, B, H, hd, M = self.model.cfg.n_layer, self.B, self.H, self.hd, self.M
        buf = {"scratch": torch.empty(scratch_rows, self.row),
               "kt": [torch.empty(B, H, hd, self.capp) for _ in range(n)],
               "v": [torch.empty(B, H, self.cap, self.hdp) for _ in range(n)],
               "ck": [torch.empty(B, H, hd, self.Mp) for _ in range(n)] if M else [],
               "cv": [torch.empty(B, H, M, self.hdp) for _ in range(n)] if M else []}
        if aten:
            buf.update(kv=[torch.empty(2, B, H, self.cap, hd) for _ in range(n)],
                       cross_k=[torch.empty(B, H, M, hd) for _ in range(n)] if M else [],
                       cross_v=[torch.empty(B, H, M, hd) for _ in range(n)] if M else [])
        buf["owner"] = owner_ref
        global _POOLED
        size = _nbytes(buf)
        if key not in self.pack.pool and _POOLED + size <= POOL_BYTES:  # one set per key, passed on as owners go
            self.pack.pool[key] = buf
            _POOLED += size
            weakref.finalize(self.pack, _unpool, size)  # the pool goes with the model's packed weights
        return buf

    def _plan(self, layers: list | None) -> None:
        """Build the plan over self.buf; layers: the ATen cache's LayerKV of each layer (a step), None (a pass)."""
        pack, cfg, buf = self.pack, self.model.cfg, self.buf
        zeros = torch.zeros(max(pack.Dp, pack.Ap))
        words = []
        for i, p in enumerate(pack.layers):
            f = dict(p, kt=buf["kt"][i], v=buf["v"][i], tkv=None if layers is None else layers[i].kv)
            if self.M:
                f.update(ck=buf["ck"][i], cv=buf["cv"][i], tck=layers[i].cross_k, tcv=layers[i].cross_v)
            else:
                f.update({k: zeros for k in ("lnc_w", "lnc_b", "cq_w", "cq_b", "cproj_w", "cproj_b", "ck", "cv")},
                         epsc=0.0, ckv_w=None, ckv_b=None, tck=None, tcv=None)
            words.append(_fields(LAYER_FIELDS, f))
        self.layer_words, self.zeros = torch.stack(words), zeros  # the plan points into these
        plan = dict(n_layer=cfg.n_layer, B=self.B, D=cfg.d_model, A=cfg.inner_dim, H=self.H, hd=self.hd,
                    hdp=self.hdp, cap=self.cap, capp=self.capp, M=self.M, Mp=self.Mp, F=4 * cfg.d_model,
                    V=self.V, vocab_in=cfg.vocab_in, cross=int(self.M > 0), causal=int(cfg.causal), Dp=pack.Dp,
                    Qp=pack.Qp, Ap=pack.Ap, Fp=pack.Fp, Vp=pack.Vp, Yw=self.Yw, Sw=self.Sw, row_floats=self.row,
                    KVp=pack.KVp, tok_emb=pack.tok_emb, pos_emb=pack.pos_emb, lnf_w=pack.lnf_w, lnf_b=pack.lnf_b,
                    head_w=pack.head_w, head_b=pack.head_b, scratch=buf["scratch"], layers=self.layer_words,
                    epsf=pack.epsf, scale=torch.tensor(self.hd ** -0.5, dtype=torch.float32).item())
        self.plan = _fields(PLAN_FIELDS, plan)
        self.plan_ptr = self.plan.data_ptr()

    def _check(self, rc: int, what: str) -> None:
        if rc == 1:
            raise ValueError(f"{what} is outside the model's positions")
        if rc == 2:
            raise IndexError(f"a token id is outside the embedding's {self.model.cfg.vocab_in} rows")


class FusedStep(_Fused):
    """The fused steps of one KVCache: the plan, the fused code's copy of the cache in its own layouts (in step
    with the ATen cache up to position `synced`) and the per-row scratch. It holds the cache's layers, not the
    cache: a sampler's cache is then freed when the sampler returns, and its buffers go back to the pool."""

    def __init__(self, model: torch.nn.Module, cache, memory: torch.Tensor | None = None):
        """memory (B, M, D) (a fused prefill, priors.cpu_decode.prefill): the ATen cache is allocated here, from
        the pool, and the memory projected into both caches; None: the ATen cache is filled already (an ATen
        prefill), and its memory keys and values are copied in."""
        cfg = model.cfg
        if memory is not None:
            B, M, cap = memory.shape[0], memory.shape[1], cache.capacity
        else:
            first = cache.layers[0]
            _, B, _, cap, _ = first.kv.shape
            M = first.cross_k.shape[2] if cfg.cross_attn else 0
        super().__init__(model, B, cap, M)
        self.layers = cache.layers
        self.buf = self._buffers(("step", B, cap, M), B, cache, aten=memory is not None)
        if memory is not None:
            for i, lk in enumerate(self.layers):
                lk.allocate(B, self.H, self.hd, model.tok_emb.weight, kv=self.buf["kv"][i].zero_(),
                            cross=(self.buf["cross_k"][i], self.buf["cross_v"][i]) if M else None)
        else:
            for i, lk in enumerate(self.layers[:len(self.buf["ck"])]):
                self.buf["ck"][i][..., :M].copy_(lk.cross_k.transpose(-1, -2))  # (B, H, hd, Mp)
                self.buf["cv"][i][..., :self.hd].copy_(lk.cross_v)  # (B, H, M, hdp)
        self._plan(self.layers)
        self.synced = 0  # positions 0 .. synced - 1 of the ATen cache are in the fused code's copy
        if memory is not None and M:
            threads = step_threads()
            scratch = torch.empty(threads, M, self.pack.KVp)
            memory = memory.contiguous()  # held while the C code reads it
            with _CALL:
                rc = self.lib.pb_memory(self.plan_ptr, memory.data_ptr(), scratch.data_ptr(), threads)
            self._check(rc, "memory")

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, l, V) of tokens idx (B, l) at positions 0 .. l - 1, writing their keys and values into both
        caches: the forward call that fills an empty cache."""
        B, l = idx.shape
        threads = step_threads()
        chunk, rows = _scratch_rows(B, l, threads)
        scratch = torch.empty(rows, self.row)
        out = torch.empty(B, l, self.V)
        ids = idx.to(torch.int64).contiguous()  # held while the C code reads it
        with _CALL:
            rc = self.lib.pb_pass(self.plan_ptr, ids.data_ptr(), l, out.data_ptr(), chunk, scratch.data_ptr(), threads)
        self._check(rc, f"length {l}")
        self.synced = l
        return out

    def resync(self, start: int) -> None:
        """The ATen cache changed from position `start` on (a forward call, or a step that did not come here)."""
        self.synced = min(self.synced, start)

    def _copy(self, stop: int) -> None:
        s = self.synced
        for lk, kt, v in zip(self.layers, self.buf["kt"], self.buf["v"]):
            kt[:, :, :, s:stop] = lk.kv[0, :, :, s:stop].transpose(-1, -2)
            v[:, :, s:stop, :self.hd] = lk.kv[1, :, :, s:stop]
        self.synced = stop

    def __call__(self, idx: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (B, V) of tokens idx (B, 1) at position pos; the cache must hold positions 0 .. pos - 1."""
        if self.synced < pos:
            self._copy(pos)
        ids = idx.reshape(-1)
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()
        if ids.shape[0] != self.B:
            raise ValueError(f"KVCache holds batch size {self.B}, got {ids.shape[0]}; use a new cache")
        out = torch.empty(self.B, self.V)
        with _CALL:
            rc = self.lib.pb_step(self.plan_ptr, ids.data_ptr(), pos, out.data_ptr(), step_threads())
        self._check(rc, f"position {pos}")
        self.synced = max(self.synced, pos + 1)
        return out


def prefill(model: torch.nn.Module, idx: torch.Tensor, memory: torch.Tensor | None, cache) -> torch.Tensor:
    """model(idx, memory, cache=cache) for an empty cache, by the fused code: allocates the ATen cache, projects
    the memory into both caches, runs positions 0 .. l - 1 and leaves cache.fused ready for the steps. The caller
    checks applies(model)."""
    if memory is None:  # no cross-attention: a memory of no positions
        memory = model.tok_emb.weight.new_empty(idx.shape[0], 0, model.cfg.d_model)
    cache.fused = FusedStep(model, cache, memory)
    out = cache.fused.prefill(idx)
    cache.length = idx.shape[1]
    return out


def fused_pass(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """model(idx) without a cache, by the fused code: logits (B, L, V), or LN_f's hidden states (B, L, D) for a
    model without a head. The caller checks applies(model, step=False)."""
    B, L = idx.shape
    if L > model.cfg.seq_len:
        raise ValueError(f"sequence of {L} positions exceeds seq_len={model.cfg.seq_len}")
    threads = step_threads()
    f = _Fused(model, B, L, 0)
    chunk, rows = _scratch_rows(B, L, threads)
    f.buf = f._buffers(("pass", B, L, threads), rows, None)
    if "plan" not in f.buf:  # built once per pooled buffers (a pool belongs to one packing of the weights)
        f._plan(None)
        f.buf["plan"] = (f.plan, f.layer_words, f.zeros)  # the words and what they point into
    plan = f.buf["plan"][0]
    ids = idx.to(torch.int64).contiguous()  # held while the C code reads it
    out = torch.empty(B, L, model.cfg.vocab_out or model.cfg.d_model)
    with _CALL:
        rc = f.lib.pb_pass(plan.data_ptr(), ids.data_ptr(), L, out.data_ptr(), chunk, f.buf["scratch"].data_ptr(),
                           threads)
    f._check(rc, f"length {L}")
    return out
