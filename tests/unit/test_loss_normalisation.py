"""The training objective does not depend on how a global batch is split (micro x accumulation x
ranks): every answer token (SFT) and every pair (DPO) of the global batch weighs the same."""

import pytest
import torch

from conftest import build_batch, tiny_model
from pipeline.preference import dpo_loss, sequence_logps
from pipeline.training import answer_tokens, micro_batch_normaliser
from ppllava import IMAGE, MULTI_IMAGE, VIDEO

pytestmark = pytest.mark.unit

# Eight samples whose answers have very different lengths: where per-micro-batch means go wrong.
KINDS = [(VIDEO, 8), (IMAGE, 3), (MULTI_IMAGE, 2), (VIDEO, 4)]
ANSWER_LENGTHS = [1, 12, 3, 7, 2, 15, 5, 1]


def one(config, index):
    return build_batch(config, [KINDS[index % len(KINDS)]], seed=100 + index, answer_len=ANSWER_LENGTHS[index])


def merged(config, indices):
    """One right-padded micro-batch of the given samples (as the collate makes it)."""
    parts = [one(config, i) for i in indices]
    length = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)  # noqa: E731
    batch = {"input_ids": torch.cat([pad(p["input_ids"], config.text_config.pad_token_id) for p in parts]),
             "attention_mask": torch.cat([pad(p["attention_mask"], 0) for p in parts]),
             "labels": torch.cat([pad(p["labels"], -100) for p in parts])}
    for key in ("pixel_values", "frame_counts", "modalities", "clip_input_ids", "clip_attention_mask", "image_sizes"):
        batch[key] = torch.cat([p[key] for p in parts])
    return batch


def step_gradient(model, micro: int, normalised: bool) -> torch.Tensor:
    """The gradient one optimizer step applies on samples 0..7 split into micro-batches of ``micro``,
    with DeepSpeed's semantics (each backward divided by the accumulation steps; one rank)."""
    model.zero_grad(set_to_none=True)
    accumulation = len(ANSWER_LENGTHS) // micro
    window = [merged(model.config, range(k * micro, (k + 1) * micro)) for k in range(accumulation)]
    per_micro = micro_batch_normaliser(sum(int(answer_tokens(b["labels"]).sum()) for b in window), 1, accumulation)
    for batch in window:
        loss = model(**batch, num_items_in_batch=per_micro).loss if normalised else model(**batch).loss
        (loss / accumulation).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_sft_gradients_are_the_same_for_1x8_2x4_4x2_and_were_not_before():
    model = tiny_model().train()
    model.config.text_config.use_cache = False
    new = {micro: step_gradient(model, micro, normalised=True) for micro in (1, 2, 4)}
    old = {micro: step_gradient(model, micro, normalised=False) for micro in (1, 2, 4)}
    for micro in (2, 4):
        torch.testing.assert_close(new[micro], new[1], atol=1e-6, rtol=1e-4)
        assert (old[micro] - old[1]).abs().max() > 1e-3  # the per-micro-batch mean weighed tokens unequally
    # and the normalised objective is the mean over all 8 samples' answer tokens
    whole = merged(model.config, range(8))
    model.zero_grad(set_to_none=True)
    model(**whole).loss.backward()
    everything = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(new[1], everything, atol=1e-6, rtol=1e-4)


def test_dpo_pairs_weigh_the_same_however_the_batch_is_split():
    torch.manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(8, requires_grad=i < 2) for i in range(4))

    def gradient(micro: int, normalised: bool):
        accumulation = 8 // micro
        per_micro = micro_batch_normaliser(8, 1, accumulation)
        chosen.grad = rejected.grad = None
        for k in range(accumulation):
            part = slice(k * micro, (k + 1) * micro)
            loss, _ = dpo_loss(chosen[part], rejected[part], ref_chosen[part], ref_rejected[part], 0.1,
                               normaliser=per_micro if normalised else None)
            (loss / accumulation).backward()
        return chosen.grad.clone()

    torch.testing.assert_close(gradient(2, True), gradient(1, True))
    torch.testing.assert_close(gradient(4, True), gradient(8, True))
    full, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1)
    summed, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, normaliser=8)
    assert abs(float(full.detach()) - float(summed.detach())) < 1e-6


def test_answer_tokens_count_what_the_loss_is_taken_on():
    labels = torch.tensor([[-100, -100, 5, 6, 2], [7, -100, 8, -100, -100]])
    logits = torch.zeros(2, 5, 10)
    assert answer_tokens(labels).tolist() == sequence_logps(logits, labels)[1].tolist() == [3, 1]
