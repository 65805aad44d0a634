"""Natural morph generation (paper III.C): widen a search radius until N in-range values exist.

For code i of an instance with value z_i, iteration t = 1, 2, ... draws B perturbations
Δ ~ U(−t·Δr_i, t·Δr_i) and keeps those with z_i + Δ inside the normal range [lo_i, hi_i],
until N are kept. Δr_i is a fraction of the range width, so codes of any scale behave alike.

The uniform draws are common random numbers: one table u (T, M, B) in [−1, 1] from the seed, the
same for every instance. So an input's morphs depend only on the input and the seed, never on
which batch it arrives in, and a saved defense reproduces its decisions exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MorphConfig:
    """Natural-morph search settings (paper: N = 100; B and Δr unspecified there)."""

    n_morphs: int = 100  # N: natural values per code
    draws_per_iter: int = 10  # B
    step_frac: float = 0.05  # Δr as a fraction of the code's normal-range width
    max_iters: int = 2000  # search cap; values still missing are drawn uniformly in range
    seed: int = 0


def draw_table(cfg: MorphConfig, n_codes: int) -> torch.Tensor:
    """The common uniform draws u: (max_iters, n_codes, B) in [−1, 1]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.rand(cfg.max_iters, n_codes, cfg.draws_per_iter, generator=gen) * 2 - 1


def natural_deltas(
    values: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    table: torch.Tensor,
    cfg: MorphConfig,
    block: int = 64,
) -> torch.Tensor:
    """Perturbations Δ (n, m, N) whose z + Δ lie in [lo, hi], found by the widening search.

    values: (n, m) code values; lo, hi: (m,); table: (T, m, B) from `draw_table`.
    """
    n, m = values.shape
    N = cfg.n_morphs
    out = torch.empty(n, m, N)
    count = torch.zeros(n, m, dtype=torch.long)
    step = (hi - lo) * cfg.step_frac  # (m,)
    for t0 in range(0, cfg.max_iters, block):
        u = table[t0 : t0 + block]  # (b, m, B)
        radius = torch.arange(t0 + 1, t0 + 1 + len(u)).view(-1, 1, 1) * step.view(1, -1, 1)
        delta = (u * radius).permute(1, 0, 2).reshape(m, -1)  # (m, b*B), in draw order
        cand = values.unsqueeze(-1) + delta  # (n, m, b*B)
        ok = (cand >= lo.view(1, -1, 1)) & (cand <= hi.view(1, -1, 1))
        pos = count.unsqueeze(-1) + ok.long().cumsum(-1) - 1  # slot of each accepted draw
        keep = ok & (pos < N)
        idx = keep.nonzero(as_tuple=True)
        out[idx[0], idx[1], pos[keep]] = delta.expand(n, m, -1)[keep]
        count = torch.clamp(count + ok.long().sum(-1), max=N)
        if bool((count == N).all()):
            return out
    return _fill_uniform(out, count, values, lo, hi, cfg.seed)


def shuffled(deltas: torch.Tensor, seed: int) -> torch.Tensor:
    """The N morphs of every (input, code) in one seeded random order (n, m, N): the search
    emits its smallest perturbations first, so only a shuffled prefix is a random sample.
    The same permutation for every input keeps morphs batch-independent."""
    gen = torch.Generator().manual_seed(seed + 2)
    return deltas[..., torch.randperm(deltas.shape[-1], generator=gen)]


def _fill_uniform(
    out: torch.Tensor,
    count: torch.Tensor,
    values: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """Fallback after `max_iters`: missing slots get values uniform in [lo, hi] (rare)."""
    n, m, N = out.shape
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(m, N, generator=gen)  # common across instances, like the main table
    target = lo.view(1, -1, 1) + u.unsqueeze(0) * (hi - lo).view(1, -1, 1)  # (1, m, N)
    missing = torch.arange(N).view(1, 1, -1) >= count.unsqueeze(-1)
    fill = (target - values.unsqueeze(-1)).expand(n, m, N)
    return torch.where(missing, fill, out)


def morph_codes(codes: torch.Tensor, code_idx: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Latent codes of every morph: code `code_idx[j]` shifted by `deltas[:, j, k]`.

    codes: (n, M[, h, w]); code_idx: (m,); deltas: (n, m, N) -> (n, m, N, M[, h, w]).
    For feature-map codes every element of the channel moves by the same amount.
    """
    n, m, N = deltas.shape
    rest = codes.shape[1:]
    out = codes.view(n, 1, 1, *rest).repeat(1, m, N, *([1] * len(rest)))
    for j, i in enumerate(code_idx.tolist()):
        out[:, j, :, i] += deltas[:, j, :].view(n, N, *([1] * (len(rest) - 1)))
    return out


def morph_rows(
    codes: torch.Tensor, code_idx: torch.Tensor, deltas: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start:stop of `morph_codes(...).flatten(0, 2)` and the input each belongs to,
    built alone: a batch's morphs, not a whole chunk's (n·m·N image-sized maps need GBs).

    codes: (n, M[, h, w]); deltas: (n, m, N) -> (stop − start, M[, h, w]), (stop − start,)
    """
    _, m, N = deltas.shape
    flat = torch.arange(start, stop)
    owner, j = flat // (m * N), flat // N % m
    out = codes[owner].clone()  # (b, M[, h, w])
    shift = deltas.reshape(-1)[flat].view(-1, *([1] * (codes.dim() - 2)))  # (b[, 1, 1])
    rows = torch.arange(len(flat))
    out[rows, code_idx[j]] += shift
    return out, owner
