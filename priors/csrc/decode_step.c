/* The one-token decode step of priors/transformer.py's Transformer, fused for a CPU (priors/cpu_decode.py).

   One call runs the whole step for a batch: embedding, every block (LayerNorm, q/k/v, cache write, attention
   over the written prefix, output projection, cross-attention to the cached memory, MLP with exact GELU) and the
   final LayerNorm and head, writing the logits. The batch's rows are independent from the embedding to the
   logits, so the rows are split over the threads once per step and each thread runs every layer on its own rows:
   one fork and join per token, where the ATen step forks per kernel (about sixty per step).

   Every row's arithmetic is the same whatever the batch size, the thread count or the row block it falls in
   (each output is accumulated over k in order, with the same vector code), so the step is batch- and
   thread-invariant bit for bit. Against ATen's step it differs by float rounding only: other summation orders,
   and GELU's erf and softmax's exp from the polynomials below, which are ATen's own vectorised ones (erf:
   Abramowitz & Stegun 7.1.26, |error| < 1.5e-7; exp: Cephes' expf, within 2 ulp).

   Vectors are GCC's vector extensions at the width of the instruction set the file is compiled for (16 floats
   with AVX-512, 8 with AVX, 4 otherwise), so one source serves every ATen CPU capability; priors/cpu_decode.py
   compiles it with the flags of the capability ATen runs with.

   Layouts (all float32; "padded" widths are multiples of the matmul block NB, or of VW for the caches):
   - matmul weights packed transposed: W^T (K, N padded) with zero columns, so a block of NB outputs reads
     contiguous rows; biases and LayerNorm parameters padded with zeros to the same widths;
   - self-attention keys transposed (B, H, hd, cap padded): the scores of one query are a vector over positions;
     values (B, H, cap, hd padded): the weighted sum is a vector over the head's dimensions; the same for the
     cross-attention's memory (M positions). The step also writes each new key and value into ATen's cache
     (2, B, H, cap, hd), so the two stay the same cache.
   - scratch: one row of row_floats per batch row (its residual, normed input, q/k/v, attention output, MLP
     hidden, scores and logits), so that a thread touches its own rows only. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
/* A matmul block is MR rows by NV vectors (MR * NV accumulators in registers): 4 x 2 where there are 32 vector
   registers (AVX-512) or the vectors are 4 floats, 3 x 4 with AVX2's 16 (7-9% faster than 4 x 2 in a step there). */
#ifndef NV
#if VW == 8
#define NV 4
#else
#define NV 2
#endif
#endif
#ifndef MR
#if VW == 8
#define MR 3
#else
#define MR 4
#endif
#endif
#define NB (NV * VW)  /* columns of a matmul block; packed weight widths are multiples of it */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4), may_alias));  /* unaligned access */

static inline vf ld(const float *p) { return *(const vfu *)p; }
static inline void st(float *p, vf v) { *(vfu *)p = v; }
static inline vf splat(float x) { return x - (vf){0}; }  /* x - 0 keeps -0.0 (0 + -0.0 would give +0.0) */
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }  /* m ? a : b per lane */

static inline vi lanes_below(int64_t k) {  /* lane j is set where j < k */
    vi io;
    for (int j = 0; j < VW; j++) io[j] = j;
    return io < ((vi){0} + (int32_t)(k < VW ? k : VW));
}

static inline float hsum(vf v) { float s = 0.f; for (int j = 0; j < VW; j++) s += v[j]; return s; }
static inline float hmax(vf v) { float s = v[0]; for (int j = 1; j < VW; j++) s = v[j] > s ? v[j] : s; return s; }

static inline vf vexp(vf x) {  /* Cephes expf: 2^n e^r, |r| <= ln2 / 2, degree-5 polynomial */
    x = sel(x > splat(88.0f), splat(88.0f), x);
    x = sel(x < splat(-87.33654f), splat(-87.33654f), x);
    vf fx = x * 1.44269504088896341f + 0.5f;
    vf t = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
    fx = t - (vf)((vi)(t > fx) & (vi)splat(1.0f));  /* floor */
    x = x - fx * 0.693359375f;
    x = x - fx * -2.12194440e-4f;
    vf z = x * x;
    vf y = (((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x
             + 1.6666665459e-1f) * x + 5.0000001201e-1f) * z + x + 1.0f;
    vi n = __builtin_convertvector(fx, vi);
    return y * (vf)((n + 127) << 23);
}

static inline vf verf(vf x) {  /* sign(x) (1 - t r(t) exp(-x^2)), t = 1 / (1 + p |x|): ATen's vectorised erf */
    const vi sign_bit = (vi){0} + INT32_MIN;
    vi sign = (vi)x & sign_bit;
    vf ax = (vf)((vi)x & ~sign_bit);
    vf t = 1.0f / (0.3275911f * ax + 1.0f);
    vf r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f;
    vf y = -(vexp(-(x * x)) * t) * r + 1.0f;
    return (vf)((vi)y ^ sign);
}

static inline vf vgelu(vf x) { return x * 0.5f * (verf(x * 0.70710678118654752f) + 1.0f); }

/* ---- matmul: C[0:m, 0:Np) (op)= A[0:m, 0:K) @ W (K, Np) + bias --------------------------------------------- */

enum { STORE = 0, GELU = 1, ADD = 2 };

static inline __attribute__((always_inline)) void mm_block(const int mr, int64_t K, const float *a, int64_t lda,
                                                           const float *w, int64_t ldw, const float *bias,
                                                           float *c, int64_t ldc, int op) {
    vf acc[MR][NV];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < NV; j++) acc[r][j] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        vf wv[NV];
        for (int j = 0; j < NV; j++) wv[j] = ld(w + k * ldw + j * VW);
        for (int r = 0; r < mr; r++) {
            vf av = splat(a[r * lda + k]);
            for (int j = 0; j < NV; j++) acc[r][j] += av * wv[j];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < NV; j++) {
            vf y = acc[r][j] + ld(bias + j * VW);
            float *out = c + r * ldc + j * VW;
            if (op == GELU) y = vgelu(y);
            if (op == ADD) y = y + ld(out);
            st(out, y);
        }
}

static void mm(int64_t m, int64_t K, const float *a, int64_t lda, const float *w, int64_t Np, const float *bias,
               float *c, int64_t ldc, int op) {
    for (int64_t n0 = 0; n0 < Np; n0 += NB) {  /* one K x NB panel of W stays in L1 over the rows */
        int64_t r = 0;
        for (; r + MR <= m; r += MR) mm_block(MR, K, a + r * lda, lda, w + n0, Np, bias + n0, c + r * ldc + n0, ldc, op);
        switch (m - r) {  /* the last rows: a constant mr per case, so each case is its own unrolled kernel */
#define TAIL(k) case k: if (k < MR) mm_block(k < MR ? k : 1, K, a + r * lda, lda, w + n0, Np, bias + n0, \
                                              c + r * ldc + n0, ldc, op); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
        default: break;
        }
    }
}

/* ---- LayerNorm over D of each row; x's lanes D .. Dp are zero, w and b are zero there ------------------------- */

static void layernorm(int64_t m, const float *x, int64_t ldx, float *o, int64_t ldo, int64_t D, int64_t Dp,
                      const float *w, const float *b, double eps) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * ldx;
        float *orow = o + r * ldo;
        vf s = (vf){0};
        for (int64_t i = 0; i < Dp; i += VW) s += ld(xr + i);
        float mean = hsum(s) / (float)D;
        vf q = (vf){0};
        for (int64_t i = 0; i < Dp; i += VW) {
            vf d = (vf)((vi)(ld(xr + i) - mean) & lanes_below(D - i));
            q += d * d;
        }
        float rstd = 1.0f / sqrtf(hsum(q) / (float)D + (float)eps);
        for (int64_t i = 0; i < Dp; i += VW) st(orow + i, (ld(xr + i) - mean) * rstd * ld(w + i) + ld(b + i));
    }
}

/* ---- one query's attention over n positions: keys kt (hd, ldk) transposed, values v (n, hdp) ----------------- */

/* Scores of `nb` consecutive blocks of VW positions (nb <= 4, a constant per call site), over even and odd d in
   separate accumulators: 2 nb independent FMA chains instead of one. Unmasked: the caller masks positions >= n. */
static inline __attribute__((always_inline)) void score_blocks(const int nb, const float *qs, int64_t hd,
                                                               const float *kt, int64_t ldk, float *s) {
    vf acc[2][4] = {{{0}}};
    int64_t d = 0;
    for (; d + 2 <= hd; d += 2) {
        vf q0 = splat(qs[d]), q1 = splat(qs[d + 1]);
        for (int j = 0; j < nb; j++) {
            acc[0][j] += q0 * ld(kt + d * ldk + j * VW);
            acc[1][j] += q1 * ld(kt + (d + 1) * ldk + j * VW);
        }
    }
    if (d < hd) {
        vf q0 = splat(qs[d]);
        for (int j = 0; j < nb; j++) acc[0][j] += q0 * ld(kt + d * ldk + j * VW);
    }
    for (int j = 0; j < nb; j++) st(s + j * VW, acc[0][j] + acc[1][j]);
}

static void attend(const float *q, float scale, const float *kt, int64_t ldk, const float *v, int64_t hdp,
                   int64_t n, int64_t hd, float *s, float *y) {
    float qs[hd];
    for (int64_t d = 0; d < hd; d++) qs[d] = q[d] * scale;  /* rounded as ATen's q * scale */
    const int64_t blocks = (n + VW - 1) / VW;  /* kt's rows hold ldk >= blocks * VW positions */
    int64_t i = 0;
    for (; i + 4 <= blocks; i += 4) score_blocks(4, qs, hd, kt + i * VW, ldk, s + i * VW);
    switch (blocks - i) {
    case 3: score_blocks(3, qs, hd, kt + i * VW, ldk, s + i * VW); break;
    case 2: score_blocks(2, qs, hd, kt + i * VW, ldk, s + i * VW); break;
    case 1: score_blocks(1, qs, hd, kt + i * VW, ldk, s + i * VW); break;
    default: break;
    }
    vf vmax = splat(-INFINITY);
    for (int64_t j = 0; j < blocks; j++) {
        vf x = sel(lanes_below(n - j * VW), ld(s + j * VW), splat(-INFINITY));
        vmax = sel(x > vmax, x, vmax);
    }
    const float mx = hmax(vmax);
    vf vsum = (vf){0};
    for (int64_t j = 0; j < blocks; j++) {
        vf e = (vf)((vi)vexp(ld(s + j * VW) - mx) & lanes_below(n - j * VW));  /* positions >= n: weight 0 */
        st(s + j * VW, e);
        vsum += e;
    }
    const vf inv = splat(1.0f / hsum(vsum));
    for (int64_t j = 0; j < blocks; j++) st(s + j * VW, ld(s + j * VW) * inv);  /* the softmax: s / sum */
    /* y = sum_i p_i v_i, one column vector at a time over positions, with four accumulators (four independent
       chains instead of one, in registers) */
    float tmp[hdp + VW];
    for (int64_t j = 0; j < hdp; j += 2 * VW) {  /* two column vectors at a time (the second may be padding) */
        const float *c = v + j;
        const int two = j + VW < hdp;
        vf a0 = (vf){0}, a1 = (vf){0}, a2 = (vf){0}, a3 = (vf){0};
        int64_t k = 0;
        if (two) {
            for (; k + 2 <= n; k += 2) {
                vf p0 = splat(s[k]), p1 = splat(s[k + 1]);
                a0 += p0 * ld(c + k * hdp);
                a1 += p0 * ld(c + k * hdp + VW);
                a2 += p1 * ld(c + (k + 1) * hdp);
                a3 += p1 * ld(c + (k + 1) * hdp + VW);
            }
            for (; k < n; k++) {
                a0 += splat(s[k]) * ld(c + k * hdp);
                a1 += splat(s[k]) * ld(c + k * hdp + VW);
            }
            st(tmp + j, a0 + a2);
            st(tmp + j + VW, a1 + a3);
        } else {
            for (; k + 4 <= n; k += 4) {
                a0 += splat(s[k]) * ld(c + k * hdp);
                a1 += splat(s[k + 1]) * ld(c + (k + 1) * hdp);
                a2 += splat(s[k + 2]) * ld(c + (k + 2) * hdp);
                a3 += splat(s[k + 3]) * ld(c + (k + 3) * hdp);
            }
            for (; k < n; k++) a0 += splat(s[k]) * ld(c + k * hdp);
            st(tmp + j, (a0 + a1) + (a2 + a3));
        }
    }
    memcpy(y, tmp, hd * sizeof(float));
}

/* ---- the plan: what priors/cpu_decode.py passes, as 8-byte fields in this order ------------------------------ */

typedef struct {
    const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
    const float *lnc_w, *lnc_b, *cq_w, *cq_b, *cproj_w, *cproj_b;
    float *ck, *cv;  /* the memory's keys transposed (B, H, hd, Mp) and values (B, H, M, hdp) */
    const float *ln2_w, *ln2_b, *fc_w, *fc_b, *mp_w, *mp_b;
    float *kt, *v, *tkv;  /* the fused code's key/value layouts, and ATen's cache (2, B, H, cap, hd) or NULL */
    const float *ckv_w, *ckv_b;  /* the memory's key/value projection (D, 2A padded) */
    float *tck, *tcv;            /* ATen's memory keys and values (B, H, M, hd) */
    double eps1, epsc, eps2;
} Layer;

typedef struct {
    int64_t n_layer, B, D, A, H, hd, hdp, cap, capp, M, Mp, F, V, vocab_in, cross, causal;
    int64_t Dp, Qp, Ap, Fp, Vp, Yw, Sw, row_floats;  /* padded widths: D, 3A (q/k/v), A, 4D, V, y, scores */
    int64_t KVp;  /* padded width of the memory's keys and values, 2A */
    const float *tok_emb, *pos_emb, *lnf_w, *lnf_b, *head_w, *head_b;  /* head_w NULL: no head, out is LN_f(x) */
    float *scratch;  /* (B, row_floats) for a step; a pass's threads get theirs from the call */
    const Layer *layers;
    double epsf;
    double scale;  /* 1 / sqrt(hd), a float32 value (ATen's rounding of it) */
} Plan;

int64_t pb_plan_fields(void) { return sizeof(Plan) / 8; }
int64_t pb_layer_fields(void) { return sizeof(Layer) / 8; }
int64_t pb_vector_width(void) { return VW; }
int64_t pb_block_width(void) { return NB; }

/* Rows r0 .. r1 of a step (L = 0: row r is batch row r at position pos; idx (B,)) or of a pass (L > 0: row r is
   position r % L of sequence r / L, and r0, r1 are whole sequences; idx (B, L)). S: the rows' scratch, out: the
   logits (or LN_f(x) without a head) of every row, at row r. */
static void run_rows(const Plan *P, const int64_t *idx, int64_t r0, int64_t r1, int64_t L, int64_t pos, float *S,
                     float *out) {
    const int64_t m = r1 - r0, W = P->row_floats, D = P->D, A = P->A, H = P->H, hd = P->hd, hdp = P->hdp;
    const int64_t B = P->B, cap = P->cap, capp = P->capp;
    float *X = S, *Hn = X + P->Dp, *QKV = Hn + P->Dp, *Y = QKV + P->Qp, *Fh = Y + P->Yw;
    float *Sc = Fh + P->Fp, *LG = Sc + P->Sw;
#define ROW_B(r) (L ? (r0 + (r)) / L : r0 + (r))
#define ROW_P(r) (L ? (r0 + (r)) % L : pos)
    for (int64_t r = 0; r < m; r++) {  /* token embedding + the position's row */
        const float *te = P->tok_emb + idx[r0 + r] * D, *pe = P->pos_emb + ROW_P(r) * D;
        float *x = X + r * W;
        for (int64_t d = 0; d < D; d++) x[d] = te[d] + pe[d];
        for (int64_t d = D; d < P->Dp; d++) x[d] = 0.f;
    }
    for (int64_t l = 0; l < P->n_layer; l++) {
        const Layer *Ly = P->layers + l;
        layernorm(m, X, W, Hn, W, D, P->Dp, Ly->ln1_w, Ly->ln1_b, Ly->eps1);
        mm(m, D, Hn, W, Ly->qkv_w, P->Qp, Ly->qkv_b, QKV, W, STORE);
        for (int64_t r = 0; r < m; r++) {  /* every row's key and value first: a pass's rows attend to each other */
            const int64_t b = ROW_B(r), p = ROW_P(r);
            const float *qkv = QKV + r * W;
            for (int64_t h = 0; h < H; h++) {
                const float *k = qkv + A + h * hd, *vv = qkv + 2 * A + h * hd;
                float *kt = Ly->kt + (b * H + h) * hd * capp, *v = Ly->v + (b * H + h) * cap * hdp;
                for (int64_t d = 0; d < hd; d++) kt[d * capp + p] = k[d];
                memcpy(v + p * hdp, vv, hd * sizeof(float));
                if (Ly->tkv) {
                    float *tk = Ly->tkv + ((b * H + h) * cap + p) * hd;
                    memcpy(tk, k, hd * sizeof(float));
                    memcpy(tk + B * H * cap * hd, vv, hd * sizeof(float));
                }
            }
        }
        for (int64_t r = 0; r < m; r++) {
            const int64_t b = ROW_B(r), n = (!L || P->causal) ? ROW_P(r) + 1 : L;  /* keys this query sees */
            for (int64_t h = 0; h < H; h++)
                attend(QKV + r * W + h * hd, (float)P->scale, Ly->kt + (b * H + h) * hd * capp, capp,
                       Ly->v + (b * H + h) * cap * hdp, hdp, n, hd, Sc + r * W, Y + r * W + h * hd);
        }
        mm(m, A, Y, W, Ly->proj_w, P->Dp, Ly->proj_b, X, W, ADD);
        if (P->cross) {
            layernorm(m, X, W, Hn, W, D, P->Dp, Ly->lnc_w, Ly->lnc_b, Ly->epsc);
            mm(m, D, Hn, W, Ly->cq_w, P->Ap, Ly->cq_b, QKV, W, STORE);
            for (int64_t r = 0; r < m; r++) {
                const int64_t b = ROW_B(r);
                for (int64_t h = 0; h < H; h++)
                    attend(QKV + r * W + h * hd, (float)P->scale, Ly->ck + (b * H + h) * hd * P->Mp, P->Mp,
                           Ly->cv + (b * H + h) * P->M * hdp, hdp, P->M, hd, Sc + r * W, Y + r * W + h * hd);
            }
            mm(m, A, Y, W, Ly->cproj_w, P->Dp, Ly->cproj_b, X, W, ADD);
        }
        layernorm(m, X, W, Hn, W, D, P->Dp, Ly->ln2_w, Ly->ln2_b, Ly->eps2);
        mm(m, D, Hn, W, Ly->fc_w, P->Fp, Ly->fc_b, Fh, W, GELU);
        mm(m, P->F, Fh, W, Ly->mp_w, P->Dp, Ly->mp_b, X, W, ADD);
    }
#undef ROW_B
#undef ROW_P
    layernorm(m, X, W, Hn, W, D, P->Dp, P->lnf_w, P->lnf_b, P->epsf);
    if (!P->head_w) {
        for (int64_t r = 0; r < m; r++) memcpy(out + (r0 + r) * D, Hn + r * W, D * sizeof(float));
        return;
    }
    mm(m, D, Hn, W, P->head_w, P->Vp, P->head_b, LG, W, STORE);
    for (int64_t r = 0; r < m; r++) memcpy(out + (r0 + r) * P->V, LG + r * W, P->V * sizeof(float));
}

/* ---- threads: a pool of workers that spin briefly between steps -------------------------------------------- */

/* A decoding loop calls the step once per token, with a few dozen microseconds of sampling in between. A worker
   that sleeps between steps (OpenMP under OMP_WAIT_POLICY=passive) is woken at every step and joins tens of
   microseconds late, a tenth of the step; one that spins forever (OpenMP's active policy) takes a core from
   whatever else runs. These workers spin for at most SPIN_NS after their last step, which covers the gap
   between the steps of a loop, then sleep until the next one. */
#define MAX_WORKERS 255
#define SPIN_NS 200000L

typedef struct {
    const Plan *P;
    const int64_t *idx;
    int64_t pos;      /* a step's position */
    int64_t L;        /* a pass's length (0: a step) */
    int64_t chunk;    /* a pass: sequences a thread runs through the layers at a time */
    float *scratch;   /* a pass: chunk * L rows per thread */
    float *out;
    const float *memory;  /* the memory's projection: (B, M, D); NULL otherwise */
    int64_t units;    /* what the threads split: MR-row blocks of a step, sequences of a pass or a memory */
    int nt;           /* threads: the caller and nt - 1 workers */
} Job;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_long posted;   /* generation of the last job posted */
    atomic_int pending;   /* workers not yet done with it */
    int started;          /* workers running */
    Job job;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, {0}};


static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* The memory keys and values of batch rows b0 .. b1 in every layer: one matmul per row and layer into the scratch
   S (M rows of KVp), then into the fused layouts and ATen's. */
static void project_memory(const Plan *P, const float *memory, int64_t b0, int64_t b1, float *S) {
    const int64_t M = P->M, D = P->D, A = P->A, H = P->H, hd = P->hd, hdp = P->hdp, Mp = P->Mp;
    for (int64_t l = 0; l < P->n_layer; l++) {
        const Layer *Ly = P->layers + l;
        for (int64_t b = b0; b < b1; b++) {
            mm(M, D, memory + b * M * D, D, Ly->ckv_w, P->KVp, Ly->ckv_b, S, P->KVp, STORE);
            for (int64_t h = 0; h < H; h++) {
                float *ck = Ly->ck + (b * H + h) * hd * Mp, *cv = Ly->cv + (b * H + h) * M * hdp;
                float *tk = Ly->tck + (b * H + h) * M * hd, *tv = Ly->tcv + (b * H + h) * M * hd;
                for (int64_t i = 0; i < M; i++) {
                    const float *k = S + i * P->KVp + h * hd, *v = S + i * P->KVp + A + h * hd;
                    for (int64_t d = 0; d < hd; d++) ck[d * Mp + i] = k[d];
                    memcpy(cv + i * hdp, v, hd * sizeof(float));
                    memcpy(tk + i * hd, k, hd * sizeof(float));
                    memcpy(tv + i * hd, v, hd * sizeof(float));
                }
            }
        }
    }
}

static void run_share(const Job *j, int t) {  /* thread t's share of the units, split evenly */
    const Plan *P = j->P;
    int64_t u0 = j->units * t / j->nt, u1 = j->units * (t + 1) / j->nt;
    if (j->memory) {
        project_memory(P, j->memory, u0, u1, j->scratch + t * P->M * P->KVp);
        return;
    }
    if (!j->L) {  /* a step: whole MR-row blocks */
        int64_t b0 = u0 * MR, b1 = u1 * MR < P->B ? u1 * MR : P->B;
        if (b0 < b1) run_rows(P, j->idx, b0, b1, 0, j->pos, P->scratch + b0 * P->row_floats, j->out);
        return;
    }
    float *S = j->scratch + t * j->chunk * j->L * P->row_floats;
    for (int64_t s = u0; s < u1; s += j->chunk) {  /* a pass: chunks of whole sequences */
        int64_t e = s + j->chunk < u1 ? s + j->chunk : u1;
        run_rows(P, j->idx, s * j->L, e * j->L, j->L, 0, S, j->out);
    }
}

static void *worker(void *arg) {
    /* this worker's share (1 .. started), and the generation posted before it was created: it may start running
       after the caller has posted its first job, which it must not skip */
    const int t = (int)((intptr_t)arg & 0xff);
    long seen = (long)((intptr_t)arg >> 8);
    for (;;) {
        long start = now_ns(), g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool.posted, memory_order_acquire)) == seen) {
            if ((++spins & 255) == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&pool.mu);
                while ((g = atomic_load(&pool.posted)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                pthread_mutex_unlock(&pool.mu);
                break;
            }
            relax();
        }
        seen = g;
        if (t < pool.job.nt) run_share(&pool.job, t);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void after_fork_in_child(void) {  /* a forked child has the caller's thread only */
    pool.started = 0;
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
}

static int ensure_workers(int n) {  /* at least n workers running; returns how many are */
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, after_fork_in_child);
        registered = 1;
    }
    while (pool.started < n && pool.started < MAX_WORKERS) {
        pthread_t th;
        intptr_t arg = ((intptr_t)atomic_load(&pool.posted) << 8) | (pool.started + 1);
        if (pthread_create(&th, NULL, worker, (void *)arg) != 0) break;
        pthread_detach(th);
        pool.started++;
    }
    return pool.started;
}

static void run_job(Job job, int threads) {
    if (threads > job.units) threads = (int)job.units;
    if (threads > 1) threads = 1 + (ensure_workers(threads - 1) < threads - 1 ? pool.started : threads - 1);
    job.nt = threads > 1 ? threads : 1;
    if (job.nt == 1) {
        run_share(&job, 0);
        return;
    }
    pool.job = job;
    atomic_store(&pool.pending, pool.started);
    pthread_mutex_lock(&pool.mu);  /* posted under the lock: a worker about to sleep sees it or gets the signal */
    atomic_fetch_add_explicit(&pool.posted, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    run_share(&job, 0);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) relax();
}

/* Calls are not reentrant: one at a time per process (the workers serve one job). Both return 0, or 1 for a
   position or length outside the model's, 2 for a token id outside the embedding (nothing written). */

/* A step: logits out (B, V) of tokens idx (B,) at position pos, with the cache holding 0 .. pos - 1; rows split over
   at most `threads` threads (the caller and threads - 1 workers). */
int pb_step(const Plan *P, const int64_t *idx, int64_t pos, float *out, int threads) {
    if (pos < 0 || pos >= P->cap) return 1;
    for (int64_t b = 0; b < P->B; b++)
        if (idx[b] < 0 || idx[b] >= P->vocab_in) return 2;
    Job job = {P, idx, pos, 0, 0, NULL, out, NULL, (P->B + MR - 1) / MR, 1};
    run_job(job, threads);
    return 0;
}

/* A pass over positions 0 .. L - 1: out (B, L, V) logits, or (B, L, D) LN_f(x) without a head, of tokens idx
   (B, L); causal or bidirectional as the plan says. It writes every position's keys and values (into ATen's cache
   too where the plan has it: a prefill). The key/value buffers hold cap >= L positions; scratch: threads * chunk * L
   rows of row_floats (threads as given here). Cross-attention reads the memory pb_memory projected. */
int pb_pass(const Plan *P, const int64_t *idx, int64_t L, float *out, int64_t chunk, float *scratch, int threads) {
    if (L < 1 || L > P->cap) return 1;
    for (int64_t i = 0; i < P->B * L; i++)
        if (idx[i] < 0 || idx[i] >= P->vocab_in) return 2;
    Job job = {P, idx, 0, L, chunk, scratch, out, NULL, P->B, 1};
    run_job(job, threads);
    return 0;
}

/* The memory's keys and values (B, M, D) -> every layer's fused layouts and ATen's cross-attention cache;
   scratch: threads * M * KVp floats. */
int pb_memory(const Plan *P, const float *memory, float *scratch, int threads) {
    if (!P->cross) return 1;
    Job job = {P, NULL, 0, 0, 0, scratch, NULL, memory, P->B, 1};
    run_job(job, threads);
    return 0;
}
