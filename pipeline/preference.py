"""DPO maths (Rafailov et al. 2023, sigmoid loss) with TRL's metric names.

    logp(y | x)   = sum of the answer tokens' log-probabilities (labels != -100)
    logits        = (logp_pi(chosen) - logp_pi(rejected)) - (logp_ref(chosen) - logp_ref(rejected))
    loss          = -log sigmoid(beta * logits), averaged over pairs
    rewards/x     = beta * (logp_pi(x) - logp_ref(x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ppllava.config import IGNORE_INDEX


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """The positions a causal LM loss is taken on, [R, L-1]: labels[:, 1:] not ignored (position t
    predicts token t + 1), as transformers' loss counts them."""
    return labels[:, 1:] != IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of the labelled tokens, their count) per row; logits [R, L, V], labels [R, L].
    Position t predicts token t + 1; computed in fp32."""
    targets = labels[:, 1:]
    mask = answer_mask(labels)
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1), mask.sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, normaliser: float | None = None,
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss over the pairs, summed and divided by ``normaliser`` (None: the mean over
    these pairs), and its metrics (means over the pairs). Training passes the global batch's pair
    count per micro-batch (``TrainingRun.per_micro_batch``), so every pair weighs the same however
    the global batch is split."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * logits)
    loss = losses.mean() if normaliser is None else losses.sum() / normaliser
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    metrics = {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "logps/chosen": float(policy_chosen.detach().mean()),
        "logps/rejected": float(policy_rejected.detach().mean()),
    }
    return loss, metrics
