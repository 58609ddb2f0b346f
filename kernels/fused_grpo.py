"""lm_head + log-prob + GRPO-family loss + KL in one pass over each row chunk, gradients produced in the forward.

d loss / d logp of a token depends on that token (its logp, old/ref logps, advantage and an aggregation weight
known before the pass) and, with a sequence-level ratio or VESPO, on the log-probs of its own sequence only. So
the whole gradient is formed in the forward and `backward` only scales it by grad_output (the design of Liger's
chunked loss, fused further).

Per row chunk (rows bounded so the [rows, V] fp32 buffer fits `chunk_bytes`), Triton path:
  1. `_logits_partials_kernel` (2-D grid of row x vocab tiles): logits tile = hidden @ W^T via `tl.dot`
     (fp32 accumulate), + bias, / T; stored in the buffer; its epilogue writes the tile's partial max,
     sum of exp and entropy term, and the label logit: the online logsumexp split over vocab tiles.
  2. `_grpo_rows_kernel`: merges the partials -> lse, logp, entropy.
  3. `grpo_loss.token_stats`: the token math (`_grpo_token_kernel`) -> per-token loss, KL, ratio, clip flag
     and coef = weight * d loss / d logp (with the per-sequence reductions of a sequence-level ratio or VESPO).
  4. `_grpo_dz_kernel`: in place, d-logits = coef * (onehot - softmax) / T.
  5. two Triton GEMMs: grad_hidden = dz @ W; grad_weight += dz^T @ hidden (fp32, deterministic);
     grad_bias += column sums of dz.
Three GEMM-sized passes in all (logits, two gradient contractions): the logits are never recomputed.
Work memory: the chunk buffer + an fp32 [V, H] weight-gradient accumulator + [rows, V / BLOCK_V] partials.

Sequence-level ratios and VESPO need every log-prob of a sequence before any of its tokens' gradient: the chunks
then hold whole sequences (rows rounded down to a multiple of T, so a few more chunks), and the pass stays one
pass. When one sequence's [T, V] fp32 logits exceed `chunk_bytes`, a forward-only log-prob pass over all rows
runs first (`linear_logprobs`), the token math is done on its result, and the main pass only forms d-logits:
one more logits GEMM, four GEMM-sized passes instead of three.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rarl_kernels._lm_head import chunk_logits, contract_dlogits, contract_dlogits_torch, logit_tile
from rarl_kernels._utils import (
    chunk_rows,
    dot_flags,
    fit_block,
    kernel_out_dtype,
    launch,
    resolve_impl,
    row_buffer,
    tile_config,
)
from rarl_kernels.aggregation import grpo_metrics, token_weights
from rarl_kernels.grpo_loss import TOKEN_STATS, TokenOperands, per_token_inputs, token_stats
from rarl_kernels.linear_logprobs import (
    LogitForm,
    fused_linear_logprobs,
    linear_logprobs_fwd_chunked,
    linear_logprobs_fwd_triton,
)
from rarl_kernels.loss_types import LossOptions, LuspoReduction
from rarl_kernels.reference import fused_linear_grpo_loss_ref, fused_linear_logprobs_ref, grpo_token_loss_ref

# Rows of the per-token output block: what `_grpo_rows_kernel` writes, then `grpo_loss.TOKEN_STATS`.
STATS = ("logp", "lse", "entropy", *TOKEN_STATS)
_TOKEN = STATS.index(TOKEN_STATS[0])


class FusedOptions(NamedTuple):
    """The scalar settings of one fused call."""

    loss: LossOptions
    """the loss type and its options"""
    temperature: float
    """logits are divided by it before the softmax"""
    entropy: bool
    """compute the policy entropy (the chunked torch path spends a pass on it; the Triton path gets it free)"""
    seq_len: int
    """T: the rows are B sequences of T tokens each"""


def plan_chunks(n_rows: int, vocab: int, opts: FusedOptions, chunk_bytes, multiple: int, device) -> tuple[int, bool]:
    """(rows per chunk, whether a log-prob pre-pass is needed). Chunks hold whole sequences when the loss needs
    them and one fits the budget; otherwise the pre-pass supplies the log-probs of every sequence."""
    rows = chunk_rows(n_rows, vocab, chunk_bytes, multiple=multiple, device=device)
    if not opts.loss.needs_whole_sequences or rows >= n_rows:
        return rows, False
    budget = chunk_rows(n_rows, vocab, chunk_bytes, device=device)
    if budget >= opts.seq_len:
        return budget - budget % opts.seq_len, False
    return rows, True


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _logits_partials_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, z_ptr, pm_ptr, ps_ptr, pu_ptr, zl_ptr,
    N, V, H, s_hn, s_hh, s_wv, s_wh, s_zn, s_pn, inv_t,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_v = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, s_hn, s_hh, s_wv, s_wh, inv_t,
                    HAS_BIAS, DOT_F32, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)  # fmt: skip
    rmask = rows < N
    cmask = cols < V
    tl.store(z_ptr + rows[:, None] * s_zn + cols[None, :], z, mask=rmask[:, None] & cmask[None, :])
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    tl.store(pm_ptr + rows * s_pn + pid_v, m, mask=rmask)
    tl.store(ps_ptr + rows * s_pn + pid_v, tl.sum(e, axis=1), mask=rmask)
    u = tl.sum(e * tl.where(cmask[None, :], z - m[:, None], 0.0), axis=1)
    tl.store(pu_ptr + rows * s_pn + pid_v, u, mask=rmask)
    labels = tl.load(y_ptr + rows, mask=rmask, other=-1)
    in_tile = (labels >= pid_v * BLOCK_V) & (labels < pid_v * BLOCK_V + BLOCK_V) & (labels < V)
    z_label = tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    tl.store(zl_ptr + rows, z_label, mask=rmask & in_tile)


# Row count and vocabulary size only bound masks and label checks here: not specialized on.
@triton.jit(do_not_specialize=["N", "V"])
def _grpo_rows_kernel(
    pm_ptr, ps_ptr, pu_ptr, zl_ptr, y_ptr, st_ptr, N, V, NVB, s_pn, s_st, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    M = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
    S = tl.zeros((BLOCK_N,), dtype=tl.float32)
    U = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, NVB, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        offs = rows[:, None] * s_pn + ps[None, :]
        pmask = rmask[:, None] & (ps[None, :] < NVB)
        m_p = tl.load(pm_ptr + offs, mask=pmask, other=-1e30)
        s_p = tl.load(ps_ptr + offs, mask=pmask, other=0.0)
        u_p = tl.load(pu_ptr + offs, mask=pmask, other=0.0)
        M_new = tl.maximum(M, tl.max(m_p, axis=1))
        alpha = tl.exp(M - M_new)
        sc = tl.exp(m_p - M_new[:, None])
        U = alpha * (U + (M - M_new) * S) + tl.sum(sc * (u_p + (m_p - M_new[:, None]) * s_p), axis=1)
        S = alpha * S + tl.sum(sc * s_p, axis=1)
        M = M_new
    S = tl.where(rmask, S, 1.0)  # rows past the end: keep log() finite
    log_s = tl.log(S)
    labels = tl.load(y_ptr + rows, mask=rmask, other=-1)
    valid = (labels >= 0) & (labels < V)
    # (z - M) - log S, not z - lse: exact for the top tokens however large |logits| is
    logp = tl.where(valid, (tl.load(zl_ptr + rows, mask=rmask, other=0.0) - M) - log_s, 0.0)
    tl.store(st_ptr + 0 * s_st + rows, logp, mask=rmask)
    tl.store(st_ptr + 1 * s_st + rows, M + log_s, mask=rmask)
    tl.store(st_ptr + 2 * s_st + rows, log_s - U / S, mask=rmask)


# The row count only bounds masks across rows: not specialized on (no recompile per chunk length).
@triton.jit(do_not_specialize=["N"])
def _grpo_dz_kernel(z_ptr, y_ptr, lse_ptr, coef_ptr, N, V, s_zn, inv_t, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < V)
    ptrs = z_ptr + rows[:, None] * s_zn + cols[None, :]
    z = tl.load(ptrs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    labels = tl.load(y_ptr + rows, mask=rmask, other=-1)
    coef = tl.where((labels >= 0) & (labels < V), tl.load(coef_ptr + rows, mask=rmask, other=0.0), 0.0)
    dz = tl.where(cols[None, :] == labels[:, None], coef[:, None], 0.0) - coef[:, None] * tl.exp(z - lse[:, None])
    tl.store(ptrs, dz * inv_t, mask=mask)


def fused_grpo_chunks_triton(hidden, weight, bias, labels, tok: TokenOperands, needs, opts: FusedOptions, chunk_bytes):
    """hidden [N,H], weight [V,H], labels [N]; tok: the per-token operands, `weight` and `mask` included; needs:
    which of (hidden, weight, bias) get a gradient. Returns stats [len(STATS), N] fp32 and (grad_h, grad_w,
    grad_b). The entropy comes free from the partials here, so it is always computed."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = tile_config(dev, hidden.dtype)
    bn, bv = fit_block(cfg["BLOCK_N"], N, cfg["MIN_M"]), cfg["BLOCK_V"]
    rows, prepass = plan_chunks(N, V, opts, chunk_bytes, bn, dev)
    nvb = triton.cdiv(V, bv)
    z = row_buffer(rows, V, device=dev, dtype=torch.float32)
    part = torch.empty(3, rows, nvb, device=dev, dtype=torch.float32)
    z_label = torch.zeros(N, device=dev, dtype=torch.float32)
    stats = torch.empty(len(STATS), N, device=dev, dtype=torch.float32)
    gh = torch.empty(N, H, device=dev, dtype=kernel_out_dtype(hidden.dtype)) if needs[0] else None
    gw = torch.empty(V, H, device=dev, dtype=torch.float32) if needs[1] else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if needs[2] else None
    inv_t = 1.0 / opts.temperature
    if prepass:
        logp = linear_logprobs_fwd_triton(hidden, weight, labels, bias, LogitForm(opts.temperature), frozenset())[0]
        token_stats(logp, tok, opts.loss, opts.seq_len, stats[_TOKEN:], "triton")
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n, h_c, z_c, st = r1 - r0, hidden[r0:r1], z[: r1 - r0], stats[:, r0:r1]
        launch(
            "grpo_logits_partials", _logits_partials_kernel, (triton.cdiv(n, bn), nvb),
            h_c, weight, bias if bias is not None else h_c, labels[r0:r1], z_c, part[0], part[1], part[2],
            z_label[r0:r1], n, V, H, *h_c.stride(), *weight.stride(), z_c.stride(0), part.stride(1), inv_t,
            HAS_BIAS=bias is not None, **dot_flags(hidden.dtype),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        launch(
            "grpo_rows", _grpo_rows_kernel, (triton.cdiv(n, cfg["BLOCK_R"]),),
            part[0], part[1], part[2], z_label[r0:r1], labels[r0:r1], st, n, V, nvb, part.stride(1), st.stride(0),
            BLOCK_N=cfg["BLOCK_R"], BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["rows_warps"],
        )  # fmt: skip
        if not prepass:
            token_stats(st[0], tok.rows(r0, r1), opts.loss, opts.seq_len, st[_TOKEN:], "triton")
        if not any(needs):
            continue
        launch(
            "grpo_dz", _grpo_dz_kernel, (triton.cdiv(n, bn), nvb),
            z_c, labels[r0:r1], st[STATS.index("lse")], st[STATS.index("coef")], n, V, z_c.stride(0), inv_t,
            BLOCK_N=bn, BLOCK_V=bv, num_warps=cfg["num_warps"],
        )  # fmt: skip
        contract_dlogits(z_c, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb, accumulate=r0 > 0)
    return stats, _cast_grads(gh, gw, gb, hidden, weight, bias)


def _cast_grads(gh, gw, gb, hidden, weight, bias):
    return (
        gh.to(hidden.dtype) if gh is not None else None,
        gw.to(weight.dtype) if gw is not None else None,
        gb.to(bias.dtype) if gb is not None else None,
    )


def fused_grpo_chunks_torch(hidden, weight, bias, labels, tok: TokenOperands, needs, opts: FusedOptions, chunk_bytes):
    """Plain-torch twin of `fused_grpo_chunks_triton` (same outputs; entropy only if opts.entropy, it
    costs two passes over each chunk), memory O(rows * V)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    rows, prepass = plan_chunks(N, V, opts, chunk_bytes, 1, dev)
    stats = torch.empty(len(STATS), N, device=dev, dtype=torch.float32)
    gh = torch.empty_like(hidden) if needs[0] else None
    gw = torch.zeros(V, H, device=dev, dtype=torch.float32) if needs[1] else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if needs[2] else None
    inv_t = 1.0 / opts.temperature
    if prepass:
        logp = linear_logprobs_fwd_chunked(hidden, weight, labels, bias, LogitForm(opts.temperature), chunk_bytes,
                                           frozenset())[0]
        token_stats(logp, tok, opts.loss, opts.seq_len, stats[_TOKEN:], "torch")
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c, y, st = hidden[r0:r1], labels[r0:r1], stats[:, r0:r1]
        z = chunk_logits(h_c, weight, bias, inv_t)
        m = z.amax(-1)
        z.sub_(m[:, None])  # z - m, then log p = (z - m) - log-sum: exact for the top tokens (see linear_logprobs)
        valid = (y >= 0) & (y < V)
        z_label = z.gather(1, y.clamp(0, V - 1)[:, None]).squeeze(1)
        if opts.entropy:
            p = z.exp()
            total = p.sum(-1)
            # H = log-sum - sum(e^(z-m) (z-m)) / sum(e^(z-m)); bmm forms the row dot products without a [rows, V]
            st[2] = total.log() - torch.bmm(p[:, None, :], z[:, :, None]).view(-1) / total
        else:
            p = z.exp_()  # in place: one [rows, V] buffer per chunk (logsumexp would allocate a second)
            total = p.sum(-1)
            st[2] = 0.0
        log_sum = total.log()
        st[0] = torch.where(valid, z_label - log_sum, 0.0)
        st[1] = m + log_sum
        p.div_(total[:, None])
        if not prepass:
            token_stats(st[0], tok.rows(r0, r1), opts.loss, opts.seq_len, st[_TOKEN:], "torch")
        if any(needs):
            coef = torch.where(valid, st[STATS.index("coef")], 0.0)
            dz = p.mul_(-coef[:, None]).scatter_add_(1, y.clamp(0, V - 1)[:, None], coef[:, None]).mul_(inv_t)
            contract_dlogits_torch(dz, h_c, weight, gh[r0:r1] if gh is not None else None, gw, gb)
        z = p = dz = None  # free this chunk's buffers before the next chunk's logits are allocated
    return stats, (gh, *_cast_grads(None, gw, gb, hidden, weight, bias)[1:])


class _FusedLinearGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tok, needs, opts, impl, chunk_bytes):
        run = fused_grpo_chunks_triton if impl == "triton" else fused_grpo_chunks_torch
        stats, grads = run(hidden, weight, bias, labels, tok, needs, opts, chunk_bytes)
        loss = (stats[STATS.index("loss")] * tok.weight).sum()
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _):
        scaled = [None if t is None else t * g_loss.to(t.dtype) for t in ctx.saved_tensors]
        return scaled[0], scaled[1], scaled[2], *([None] * 6)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logp_old: torch.Tensor | None = None,
    logp_ref: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    is_ratio: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.04,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    bias_correction_kl: bool = False,
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    world_size: int | None = None,
    luspo_reduction: LuspoReduction = "row_sum",
    temperature: float = 1.0,
    compute_entropy: bool = True,
    impl: str | None = None,
    chunk_bytes: int | None = None,
    return_per_token: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """GRPO-family loss straight from the policy's last hidden states, never holding the [B*T, V] logits.

    hidden [B, T, H]; weight [V, H]; labels, mask [B, T]; advantages [B]; bias [V] | None; logp_old,
    logp_ref [B, T] | None (logp_ref None with ref_hidden [B, T, H] + ref_weight [V, H] (+ ref_bias):
    computed here without gradient); is_ratio [B, T] | [B, 1] | [B] | None, the rollout importance weights.
    The loss options (loss_type ... bias_correction_kl) are `loss_types.LossOptions`' and the math is
    `grpo_loss`'s; max_completion_length, num_items_in_batch, world_size and luspo_reduction (`token_weights`)
    feed the aggregation. Metrics: `grpo_loss`'s, plus "entropy_mean" (of the policy at temperature T) when
    compute_entropy. Differentiable w.r.t. hidden, weight and bias; the gradients are computed during the
    forward (see the module docstring). With return_per_token, a third output holds the per-token values of the
    pass, [B, T] fp32 without gradient: "logp", "kl", "ratio", "clipped" and "entropy" (when compute_entropy),
    for a trainer that logs statistics of its own.
    """
    o = LossOptions(loss_type, importance_sampling_level, eps_low, eps_high, beta, delta, sapo_temperature_pos,
                    sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
                    bool(bias_correction_kl)).checked()  # fmt: skip
    impl = resolve_impl(impl, hidden.device)
    agg = dict(max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
               world_size=world_size, luspo_reduction=luspo_reduction)  # fmt: skip
    if logp_ref is None and ref_hidden is not None and beta != 0.0:
        with torch.no_grad():
            logp_ref = fused_linear_logprobs(ref_hidden, ref_weight, labels, temperature=temperature, bias=ref_bias,
                                             impl=impl, chunk_bytes=chunk_bytes)  # fmt: skip
    if impl == "torch":
        out = fused_linear_grpo_loss_ref(
            hidden, weight, labels, mask, advantages, bias=bias, logp_old=logp_old, logp_ref=logp_ref,
            is_ratio=is_ratio, temperature=temperature, compute_entropy=compute_entropy, **agg, **o._asdict(),
        )  # fmt: skip
        if not return_per_token:
            return out
        return *out, _per_token_ref(hidden, weight, labels, mask, advantages, bias, logp_old, logp_ref, is_ratio,
                                    temperature, compute_entropy, o)  # fmt: skip
    B, T, H = hidden.shape
    h2 = hidden.reshape(B * T, H)
    w = weight if weight.dtype == h2.dtype else weight.to(h2.dtype)
    tok = per_token_inputs(logp_old, logp_ref, advantages, is_ratio, mask, o)
    tok = tok._replace(weight=token_weights(mask, loss_type, **agg).reshape(-1).contiguous())
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)  # fmt: skip
    y = labels.reshape(-1).long().contiguous()
    opts = FusedOptions(o, temperature=float(temperature), entropy=compute_entropy, seq_len=T)
    loss, stats = _FusedLinearGRPO.apply(h2, w, bias, y, tok, needs, opts, impl, chunk_bytes)
    st = {k: stats[i].view(B, T) for i, k in enumerate(STATS)}
    entropy = st["entropy"] if compute_entropy else None
    metrics = grpo_metrics(mask, st["kl"], st["ratio"], st["clipped"], beta, entropy)
    if not return_per_token:
        return loss, metrics
    per_token = {k: st[k] for k in ("logp", "kl", "ratio", "clipped")}
    return loss, metrics, per_token | ({"entropy": entropy} if compute_entropy else {})


def _per_token_ref(hidden, weight, labels, mask, advantages, bias, logp_old, logp_ref, is_ratio, temperature, entropy,
                   o: LossOptions):  # fmt: skip
    """`return_per_token`'s values on the reference path (a second materializing pass, without gradient)."""
    with torch.no_grad():
        logp, ent = fused_linear_logprobs_ref(hidden, weight, labels, temperature=temperature, bias=bias,
                                              return_entropy=True)  # fmt: skip
        if is_ratio is not None:
            is_ratio = is_ratio.float().reshape(is_ratio.shape[0], -1)
        _, kl, ratio, clipped = grpo_token_loss_ref(logp, logp_old, logp_ref, advantages, mask, o, is_ratio)
    out = {"logp": logp, "kl": kl, "ratio": ratio, "clipped": clipped}
    return out | ({"entropy": ent} if entropy else {})
