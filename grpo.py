"""GRPO: group-relative advantages and the clipped policy-gradient loss (README.md, "The method").

After the rewards of a step are known (reward.py), `advantages` turns each group of G samples
into advantages, the one entry point for every setting: GRPO's z-score (`group_advantages`) or
RLOO's leave-one-out (`rloo_advantages`), plus the within-presentation term of a referee group
whose samples saw the candidates in several orders (`presentation_advantages`); after the
trainer has recomputed the completions' log-probabilities, `grpo_loss` gives the scalar to
back-propagate. Player and referee samples
go through the same two functions: URPO's single loop is this file.

Notation, per token t of completion s:
    ratio     = exp(logp_new - logp_old)
    surrogate = -min(ratio * A_s, clip(ratio, 1 - clip_low, 1 + clip_high) * A_s) [* is_weight]
    k3 KL     = exp(ref - new) - (ref - new) - 1          (only with a reference model)
    loss_t    = surrogate + kl_coef * k3
and `agg` chooses how the loss_t of the completion tokens (mask == 1) become one number.

Shapes: S completions (the samples of a micro-batch), C completion-token positions (the longest
completion): column j of row s is token j of completion s, the layout model.collate gives in
either packing; `mask` is 1 on real tokens. All tensors are plain torch tensors; nothing of the
project is imported.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean", "seq-sum-norm")


def group_advantages(
    rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6
) -> Tensor:
    """Advantages of N = num_groups * group_size rewards, groups being consecutive blocks.

    A_i = (r_i - mean(r)) / (std(r) + eps), std with Bessel's correction (as TRL and verl);
    with `scale=False` (Dr. GRPO) A_i = r_i - mean(r). A group whose rewards are all equal, or a
    group of one sample, has nothing to compare and gives exactly 0.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}; "
            f"pass the rewards of whole groups, each group's samples consecutive"
        )
    grouped = rewards.float().view(-1, group_size)  # [N/G, G]
    if group_size == 1:
        return torch.zeros_like(grouped).flatten()  # [N]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # [N/G, G]
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)  # [N/G, G]
    # Rounding leaves r - mean(r) at ~1e-8 for equal rewards, which std + eps would blow up.
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [N/G, 1]
    return torch.where(all_equal, 0.0, advantages).flatten()  # [N]


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO's advantages (Ahmadian et al., arXiv 2402.14740) of N = num_groups * group_size
    rewards: each sample's reward minus the mean of the OTHER samples of its group,
    A_i = r_i - (sum(r) - r_i) / (G - 1) = G / (G - 1) * (r_i - mean(r)); never divided by a
    std. A group of equal rewards, or of one sample, gives exactly 0.

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    tensor([ 1.0000, -0.3333, -0.3333, -0.3333])
    """
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [N/G, G]
    if group_size == 1:
        return torch.zeros_like(grouped).flatten()  # [N]
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [N/G, G]
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [N/G, 1]
    return torch.where(all_equal, 0.0, grouped - others).flatten()  # [N]


ESTIMATORS = ("grpo", "rloo")  # --advantage


def advantages(rewards: Tensor, presentations: int = 1, estimator: str = "grpo",
               scale: bool = True) -> Tensor:
    """The one entry point: the advantages of ONE group of G rewards, every group of the step
    (player answers, referee verdicts) through here. `estimator` "grpo": the z-score of
    `group_advantages` (`scale=False`: Dr. GRPO's r - mean(r)); "rloo": `rloo_advantages`
    (`scale` must be False: it has no std). `presentations` > 1: the group's samples saw its
    candidates in that many orders, G / presentations consecutive samples each, and the
    within-presentation term of `presentation_advantages` is added (--referee_advantage
    group+order); 1: the plain group advantage (--referee_advantage group, and every player
    group). ValueError on an unknown estimator or rloo with scale.

    >>> advantages(torch.tensor([1.0, 1.0, 1.0, 0.0]), estimator="rloo", scale=False)
    tensor([ 0.3333,  0.3333,  0.3333, -1.0000])
    """
    if estimator not in ESTIMATORS or (estimator == "rloo" and scale):
        raise ValueError(f"estimator {estimator!r} with scale={scale}: use grpo (scaled or "
                         "not) or rloo unscaled")
    return presentation_advantages(rewards, presentations, scale, estimator=estimator)


def presentation_advantages(
    rewards: Tensor, presentations: int, scale: bool = True, eps: float = 1e-6,
    estimator: str = "grpo"
) -> Tensor:
    """Advantages of ONE referee group of G samples whose candidates were shown in
    `presentations` orders, G / presentations consecutive samples each: this project's variant
    (`--referee_advantage group+order`), not J4R's EIS-GRPO (arXiv 2505.13346), which pools the
    samples of equivalent presentations into one z-score, as `group_advantages` over the G
    samples does (`--referee_advantage group`). Ours adds the advantage within the sample's
    presentation, then rescales the sum to the size of the plain group advantage:

        s_i = z(r_i; all G rewards) + z(r_i; the rewards of its presentation)
        A_i = s_i * ||z(r; all G)|| / ||s||

    each z as `group_advantages` (0 where its rewards are all equal; with estimator "rloo", each
    z is `rloo_advantages` instead). Why the second term: with
    the first alone, a presentation the referee mostly gets wrong (the gold answer shown in its
    disfavoured position) gives its right samples little credit next to the easy
    presentation's. Why the rescaling: the sum of two z-scores is up to ~2x the size of one, and
    the referee's groups share one token-mean loss with the player's, so unscaled the variant
    would also change the referee's gradient scale against the player's (a second factor in any
    comparison). One presentation: the plain advantage.

    >>> presentation_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0]), presentations=2)
    tensor([ 0.3314,  0.3314,  0.8001, -1.4629])
    """
    group_size = rewards.numel()
    if presentations < 1 or group_size % presentations:
        raise ValueError(f"{group_size} rewards do not split into {presentations} presentations")
    def centred(size: int) -> Tensor:  # [G]: one advantage per block of `size` samples
        if estimator == "rloo":
            return rloo_advantages(rewards, size)
        return group_advantages(rewards, size, scale, eps)
    advantages = centred(group_size)  # [G]
    if presentations == 1:
        return advantages
    total = advantages + centred(group_size // presentations)  # [G]
    size = torch.linalg.vector_norm(total)  # []
    if size == 0:
        return total
    return total * (torch.linalg.vector_norm(advantages) / size)  # [G]


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO surrogate loss with asymmetric clipping ("clip-higher"), and the ratio.

    The min picks the clipped term only where clipping lowers the objective: a positive
    advantage stops pushing once ratio > 1 + clip_high, a negative one once ratio < 1 - clip_low.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # [S, C]
    advantages = advantages.unsqueeze(1)  # [S, 1]
    unclipped = ratio * advantages  # [S, C]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages  # [S, C]
    return -torch.minimum(unclipped, clipped), ratio  # [S, C], [S, C]


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(new || ref): exp(ref - new) - (ref - new) - 1 >= 0."""
    log_ratio = ref_logprobs - logprobs  # [S, C]
    return torch.exp(log_ratio) - log_ratio - 1  # [S, C]


def truncated_is_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(exp(logp_old - logp_sampler), cap), without gradient.

    vLLM samples with kernels whose log-probabilities differ slightly from the trainer's; these
    weights reweight each token's surrogate towards the trainer's distribution, and the cap keeps
    one rare token from dominating the step.
    """
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()  # [S, C]


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    agg: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """One loss from per-token losses over the completion tokens (mask == 1).

    - token-mean (DAPO): sum over tokens / num_tokens;
    - seq-mean (original GRPO): each sequence's token mean, summed / num_seqs;
    - seq-sum-norm (Dr. GRPO): sum over tokens / (num_seqs * max_len).
    The denominators are the step's global counts (all micro-batches, all ranks), so the loss
    of a micro-batch is its share of the step's loss: summing the micro-batch losses (and the
    gradients, across ranks) gives the loss of the whole step, whatever the split. When None,
    this call's own counts are used: num_tokens = mask.sum(), num_seqs = S (every sequence,
    counting any without completion tokens, which add 0), max_len = C.
    """
    masked = per_token * mask  # [S, C]
    if agg == "token-mean":
        num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked.sum() / num_tokens  # []
    num_seqs = mask.shape[0] if num_seqs is None else num_seqs
    if agg == "seq-mean":
        seq_means = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [S]
        return seq_means.sum() / num_seqs  # []
    if agg == "seq-sum-norm":
        max_len = mask.shape[1] if max_len is None else max_len
        return masked.sum() / (num_seqs * max_len)  # []
    raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {AGGREGATIONS}")


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_coef: float = 0.0,
    is_weights: Tensor | None = None,
    agg: str = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of a micro-batch, and its metrics (0-dim tensors, see `loss_metrics`).

    `logprobs` (with gradient), `old_logprobs`, `ref_logprobs`, `is_weights` and `mask` are
    [S, C]; `advantages` is [S]. Values where mask == 0 are ignored but must be finite.
    See `aggregate` for `agg`, `num_tokens`, `num_seqs`, `max_len`.

    Metrics, over this call's completion tokens: `clip_frac_low` (ratio < 1 - clip_low with
    A < 0), `clip_frac_high` (ratio > 1 + clip_high with A > 0), `ratio_mean`, `kl_mean` (k3,
    0.0 without a reference).
    """
    mask = mask.to(logprobs.dtype)  # [S, C]
    surrogate, ratio = clipped_surrogate(
        logprobs, old_logprobs, advantages, clip_low, clip_high
    )  # [S, C], [S, C]
    if is_weights is not None:
        surrogate = surrogate * is_weights.detach()  # [S, C]
    no_reference = ref_logprobs is None
    kl = torch.zeros_like(logprobs) if no_reference else k3_kl(logprobs, ref_logprobs)  # [S, C]
    per_token = surrogate + kl_coef * kl  # [S, C]
    loss = aggregate(per_token, mask, agg, num_tokens, num_seqs, max_len)  # []
    return loss, loss_metrics(ratio, advantages, kl, mask, clip_low, clip_high)


@torch.no_grad()
def loss_metrics(
    ratio: Tensor, advantages: Tensor, kl: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> dict[str, Tensor]:
    """Means over the completion tokens of the clipping rates, the ratio and the k3 KL.

    Each is a 0-dim tensor on the loss's device: reading a number back is a host sync on a GPU,
    so the caller collects a whole step's metrics and reads them in one go (`float(m)` for one).
    """
    count = mask.sum().clamp(min=1)  # []
    advantages = advantages.unsqueeze(1)  # [S, 1]
    clipped_low = (ratio < 1 - clip_low) & (advantages < 0)  # [S, C]
    clipped_high = (ratio > 1 + clip_high) & (advantages > 0)  # [S, C]
    return {
        "clip_frac_low": (clipped_low * mask).sum() / count,
        "clip_frac_high": (clipped_high * mask).sum() / count,
        "ratio_mean": (ratio * mask).sum() / count,
        "kl_mean": (kl * mask).sum() / count,
    }


# ---------------------------------------------------------------------------------------------
# The step's samples in micro-batches under a token budget (train.update; model.collate makes
# the tensors). The loss's denominators are the step's global counts (aggregate), so any split
# gives the same loss and gradient.
# ---------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One completion to train on."""
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    sampler_logprobs: list[float] | None = None  # vLLM's, for the IS correction
    temperature: float = 1.0  # it was sampled at: its log-probs are taken at it (logits / T)


def row_tokens(row: list[Sample]) -> int:
    """Length of a row scored as one sequence: the shared prompt, then every completion."""
    return len(row[0].prompt_ids) + sum(len(s.completion_ids) for s in row)


def rows_of(samples: list[Sample], share_prompt: bool, token_budget: int) -> list[list[Sample]]:
    """The sequences the trainer runs: one per sample, or with `share_prompt` the samples of one
    prompt packed behind it, as many per row as `token_budget` allows (a GRPO group's prompt then
    goes through the model once instead of G times: model.pack_rows)."""
    if not share_prompt:
        return [[s] for s in samples]
    by_prompt = {}  # (prompt, temperature) -> its samples, in first-seen order
    for s in samples:
        by_prompt.setdefault((tuple(s.prompt_ids), s.temperature), []).append(s)
    rows = []
    for group in by_prompt.values():
        row = []
        for s in group:
            if row and row_tokens(row + [s]) > token_budget:
                rows.append(row)
                row = []
            row.append(s)
        rows.append(row)
    return rows


def micro_batches(rows: list[list[Sample]], token_budget: int) -> list[list[list[Sample]]]:
    """Pack rows, longest first, so that (padded length x rows) stays within the budget, and
    never rows of two sampling temperatures together (a micro-batch's log-probs are taken at one:
    player answers at the player's, verdicts at the referee's).

    Sorting by length puts rows of similar length together, which cuts padding; a row longer
    than the budget still gets a micro-batch of its own."""
    batches = []
    for temperature in sorted({row[0].temperature for row in rows}):
        current = []
        for row in sorted((row for row in rows if row[0].temperature == temperature),
                          key=row_tokens, reverse=True):
            if current and row_tokens(current[0]) * (len(current) + 1) > token_budget:
                batches.append(current)
                current = []
            current.append(row)
        batches += [current] if current else []
    return batches
