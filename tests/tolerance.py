"""Float tolerances derived from the arithmetic, not from the machine a test was written on.

A test that compares two floating-point routes to the same number (a resampler against the direct metric, a
cached decode against the full forward, an N x N eigenproblem against the D x D one) may not use a tolerance that
was read off one machine: another BLAS kernel (OpenBLAS picks SkylakeX, Haswell, Zen or Prescott code at run
time), another ATen vector width (ATEN_CPU_CAPABILITY) or another thread count sums in another order and rounds
differently. The bounds below hold for every summation order, so for every kernel:

- `gamma(n)`: Higham's gamma_n = n u / (1 - n u), u = eps / 2. A sum or dot product of n terms computed in any
  order (blocked, vectorised, fused multiply-add, split over threads) is within gamma_{n-1} * sum |terms| of the
  exact value (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5 and Sec. 4.2).
- `gamma_random(n)`: the probabilistic counterpart (Higham & Mary, SIAM J. Sci. Comput. 2019, Thm. 2.4): with
  rounding errors modelled as independent and mean-zero, the error is below lam * sqrt(n) * u except with
  probability 2 exp(-lam^2 / 2) (lam = 8: 3e-14). Used for float32 networks, where the worst case (n u summed
  over every layer) is too loose to detect anything; `transformer_error` chains it over a block's reductions.
- `symmetric_eig_error(m, norm)`: a backward-stable symmetric eigensolver returns eigenvalues within
  p(m) u ||A||_2 of the exact ones (Weyl; LAPACK Users' Guide, Sec. 4.7, p(m) "a modestly growing function",
  taken as m).
- `sqrt_sum_error(eigenvalues, delta)`: sqrt is 1/2-Hoelder: |sqrt(l + e) - sqrt(l)| <= min(sqrt(e), e / (2
  sqrt(l))) for |e| <= delta. An eigenvalue that is zero in exact arithmetic (the centring direction, duplicated
  rows) comes back as rounding noise of size delta and adds up to sqrt(delta) to a trace of square roots: that,
  not eps, sets the agreement of two FID routes.

Each bound is multiplied by SAFETY where a constant of the underlying theorem (an eigensolver's p(m), a layer's
condition) is not known exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS64 = float(np.finfo(np.float64).eps)  # 2.2e-16
EPS32 = float(np.finfo(np.float32).eps)  # 1.2e-7
SAFETY = 10.0  # for the unknown modest constants (p(m) of an eigensolver, the model of gamma_random)
LAM = 8.0  # gamma_random's confidence: failure probability 2 exp(-LAM^2 / 2) = 3e-14 per quantity


def unit(eps: float) -> float:
    return eps / 2


def gamma(n: int, eps: float = EPS64) -> float:
    """Worst-case relative error of an n-term sum or dot product, any order (relative to sum |terms|)."""
    nu = max(n, 1) * unit(eps)
    if nu >= 1:
        raise ValueError(f"gamma_{n} undefined at eps={eps}: n u >= 1")
    return nu / (1 - nu)


def gamma_random(n: int, eps: float = EPS32, lam: float = LAM) -> float:
    """Probabilistic relative error of an n-term sum or dot product (relative to sum |terms|)."""
    u = unit(eps)
    return math.expm1(lam * math.sqrt(max(n, 1)) * u + max(n, 1) * u * u / (1 - u))


def network_error(reductions: list[int], eps: float = EPS32, condition: float = 1.0) -> float:
    """First-order relative error of a chain of layers, layer i reducing over reductions[i] terms (an inner
    dimension, a conv's in_channels x kernel area, a softmax or norm's length): errors of a chain add to first
    order, each amplified by the layer's condition. condition = 1 for layers that do not amplify relative errors
    (ReLU, normalised activations); larger where the test's weights are far from an initialisation."""
    return condition * sum(gamma_random(k, eps) for k in reductions)


def transformer_error(d_model: int, n_layer: int, seq_len: int, memory_len: int = 0, mlp_ratio: int = 4,
                      eps: float = EPS32) -> float:
    """Relative error of a pre-LayerNorm transformer's logits (relative to their largest magnitude), any kernel.

    A block reduces over: LayerNorm (d), q/k/v (d), scores (d_head <= d), softmax and the weighted sum of values
    (seq_len), the output projection (d), LayerNorm (d), the MLP (d, then mlp_ratio d); with cross-attention also
    LayerNorm, q (d), scores (d), softmax and sum over the memory, output (d). Then the final LayerNorm and head (d).
    """
    d = d_model
    block = [d, d, d, seq_len, seq_len, d, d, d, mlp_ratio * d]
    if memory_len:
        block += [d, d, d, memory_len, memory_len, d]
    # The tests' transformers carry weights of scale 0.5-1 (so their conditionals are far from uniform): softmax
    # and residual sums of large terms amplify relative errors; SAFETY stands for that condition.
    return network_error(block * n_layer + [d, d], eps, condition=SAFETY)


def symmetric_eig_error(m: int, norm: float, eps: float = EPS64) -> float:
    """Absolute error bound of each eigenvalue of an m x m symmetric matrix with 2-norm `norm`."""
    return SAFETY * m * unit(eps) * norm


def sqrt_sum_error(eigenvalues: np.ndarray, delta: float) -> float:
    """Bound on |sum sqrt(max(l_hat, 0)) - sum sqrt(l)| when every eigenvalue is off by at most delta."""
    lam = np.clip(np.asarray(eigenvalues, np.float64).real, 0.0, None)
    per = np.minimum(math.sqrt(delta), delta / (2 * np.sqrt(np.maximum(lam, 1e-300))))
    return float(per.sum())


def fid_gram_error(x: np.ndarray, sigma_r: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Absolute rounding bound of a FID computed through the n x n eigenproblem of Xc S_r Xc^T / (n - 1).

    Three parts: forming the n x n matrix (entries are d-term and d^2-term dot products: error gamma_{d^2} times
    |Xc| |S_r| |Xc^T|, whose 2-norm bounds the eigenvalue shift), the eigensolver (symmetric_eig_error), then the
    square roots (sqrt_sum_error, times 2 in the FID), plus the traces and the mean term (gamma over n d terms of
    their absolute sums)."""
    y = np.asarray(x, np.float64) if idx is None else np.asarray(x, np.float64)[idx]
    n, d = y.shape
    yc = y - y.mean(0)
    small = yc @ sigma_r @ yc.T / (n - 1)
    # |y| + |mean| bounds the rows whether a route centres before forming the product or after (the resampler
    # forms X S_r X^T, then subtracts row and column means).
    mag = np.abs(y) + np.abs(y.mean(0))
    abs_small = mag @ np.abs(sigma_r) @ mag.T / (n - 1)
    norm = float(np.linalg.norm(small, 2))
    delta = gamma(d * d + n) * float(np.linalg.norm(abs_small, 2)) + symmetric_eig_error(n, norm)
    traces = gamma(n * d + d) * (float(np.abs(yc).sum() ** 2 / n) + float(np.abs(np.diag(sigma_r)).sum())
                                 + float((y ** 2).sum()))
    return 2 * sqrt_sum_error(np.linalg.eigvalsh(small), delta) + SAFETY * traces


def fid_sqrtm_error(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Absolute rounding bound of a FID computed by torch-fidelity: scipy's Schur-based sqrtm of the d x d
    product S_a S_b (not symmetric). Its eigenvalues are those of the symmetric S_a^(1/2) S_b S_a^(1/2); the
    similarity that links the two has condition kappa(S_a)^(1/2), which scales the eigenvalue error of the
    nonsymmetric solver (Bauer-Fike)."""
    sa, sb = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    d = sa.shape[0]
    wa, va = np.linalg.eigh(sa)
    wa = np.clip(wa, 0.0, None)
    kappa = float(wa.max() / wa[wa > wa.max() * d * EPS64].min())
    root = (va * np.sqrt(wa)) @ va.T
    inner = root @ sb @ root
    norm = float(np.linalg.norm(sa, 2) * np.linalg.norm(sb, 2))
    delta = math.sqrt(kappa) * (gamma(d) * norm + symmetric_eig_error(d, norm))
    traces = gamma(d) * float(np.abs(np.diag(sa)).sum() + np.abs(np.diag(sb)).sum())
    return 2 * sqrt_sum_error(np.linalg.eigvalsh(inner), delta) + SAFETY * traces


def kid_error(real: np.ndarray, fake: np.ndarray) -> float:
    """Absolute rounding bound of the unbiased polynomial-kernel MMD^2 (KID) of two float64 feature sets.

    Each kernel value (x.y / d + 1)^3: a d-term dot product (gamma_d relative to |x|.|y| / d), one addition and a
    cube (three roundings, and the cube triples the inner relative error); then means over at most n^2 values
    (gamma_{n^2} relative to their absolute sum). The three means of KID add their bounds."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d = real.shape[1]

    def abs_kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        return float(((np.abs(a) @ np.abs(b).T / d + 1) ** 3).mean())

    size = abs_kernel_mean(fake, fake) + abs_kernel_mean(real, real) + 2 * abs_kernel_mean(fake, real)
    terms = max(len(real), len(fake)) ** 2
    return SAFETY * (3 * gamma(d + 3) + gamma(terms)) * size


def conv_network_error(net: torch.nn.Module, eps: float = EPS32) -> float:
    """Relative float32 rounding bound of a feature row of a convolutional network (condition 1: batch norms, ReLU
    and pooling do not amplify relative errors): network_error over every convolution's in_channels x kernel area,
    plus one rounding each for weights that were folded with a batch norm. A bound for any path through the
    network, which passes fewer of them."""
    return network_error([int(np.prod(p.shape[1:])) + 1 for _, p in net.named_parameters() if p.ndim == 4], eps)


def rows_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Every row of a within rel * ||row of b|| (2-norm) of it."""
    return bool(((a - b).norm(dim=1) <= rel * b.norm(dim=1)).all())


def code_distances(z: torch.Tensor, embedding: torch.Tensor, rel: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.return_types.sort, torch.Tensor]:
    """The nearest-code decision of a quantizer, with its rounding band: for the code vectors of z (B, C, h, w),
    (squared distances (N, K) to the codebook `embedding` (K, C), in float64; the band (N,) by which rounding in
    the encoder can move them, 2 |z| max|e| times the encoder's relative bound rel (plus the distances' own sums);
    the codes ranked by distance per row; decided (N,): best and second best further apart than the band). Where a
    row is decided, the nearest code is the same on every kernel; inside the band either code is a correct
    rounding of the same computation."""
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    e = embedding.double()
    dist = torch.cdist(rows, e) ** 2
    band = (2 * rows.norm(dim=1) * e.norm(dim=1).max() * 2 * rel).detach()
    ranked = dist.sort(dim=1)
    return dist, band, ranked, ranked.values[:, 1] - ranked.values[:, 0] > band


def assert_nearest_codes_equal(ours: torch.Tensor, theirs: torch.Tensor, z: torch.Tensor, embedding: torch.Tensor,
                               rel: float) -> None:
    """Two encoders' code ids of the same code vectors z agree wherever the choice is decided (code_distances),
    most rows are decided (so the check has teeth), and inside the band each side's code is within the band of
    the other's."""
    dist, band, _, decided = code_distances(z, embedding, rel)
    assert decided.float().mean() > 0.9
    ours, theirs = ours.flatten(), theirs.flatten()
    assert torch.equal(ours[decided], theirs[decided])
    tied = ~decided
    assert (dist[tied, theirs[tied]] - dist[tied, ours[tied]] <= band[tied]).all()


def max_row_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ||a_i - b_i|| / ||b_i|| over rows: the quantity conv_network_error bounds."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def log_softmax_error(logits: torch.Tensor, rel: float = 0.0) -> float:
    """Absolute error bound of each log-softmax entry of `logits` (..., V) computed in the logits' dtype, when
    the logits themselves carry an error of rel * max |logit| (a network's rounding, e.g. transformer_error; 0
    when both sides share the very same logits). d log_softmax_i = dz_i - sum_j p_j dz_j moves by at most
    2 max |dz|; the max-shifted logsumexp over V terms adds gamma_V of its terms (|z| + log V)."""
    z = float(logits.detach().abs().max())
    eps = float(torch.finfo(logits.dtype).eps) if logits.dtype.is_floating_point else EPS32
    v = int(logits.shape[-1])
    return 2 * rel * z + SAFETY * gamma(v + 2, eps) * (2 * z + math.log(v))
