"""DPO building blocks: shared visual rows in the model, the sigmoid loss and TRL's metrics."""

import pytest
import torch

from conftest import build_batch, tiny_model
from ppllava import VIDEO

pytestmark = pytest.mark.unit


def test_rows_can_share_one_visual_sample():
    """visual_rows [0, 0]: two text rows take the visual tokens of one video, exactly as if the
    video had been given twice (what DPO's chosen and rejected rows do)."""
    model = tiny_model(seed=2)
    one = build_batch(model.config, [(VIDEO, 8)], seed=4)
    twice = build_batch(model.config, [(VIDEO, 8), (VIDEO, 8)], seed=4)
    twice["pixel_values"] = torch.cat([one["pixel_values"]] * 2)
    twice["clip_input_ids"] = torch.cat([one["clip_input_ids"]] * 2)
    for key in ("input_ids", "attention_mask"):
        twice[key] = torch.cat([one[key]] * 2)
    shared = dict(one, input_ids=twice["input_ids"], attention_mask=twice["attention_mask"],
                  visual_rows=torch.tensor([0, 0]))
    shared.pop("labels")
    twice.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**shared).logits, model(**twice).logits, atol=1e-6, rtol=1e-6)


def test_sequence_logps_sums_the_labelled_tokens_only():
    from pipeline.preference import sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    total, count = sequence_logps(logits, labels)
    logprobs = torch.log_softmax(logits, dim=-1)
    # position t predicts label t + 1
    expected = [logprobs[0, 1, 3] + logprobs[0, 2, 4],
                logprobs[1, 0, 1] + logprobs[1, 1, 2] + logprobs[1, 2, 6] + logprobs[1, 3, 0]]
    torch.testing.assert_close(total, torch.stack(expected))
    assert count.tolist() == [2, 4]


def test_dpo_loss_and_metrics_equal_a_hand_computation():
    import math

    from pipeline.preference import dpo_loss

    policy_chosen, policy_rejected = torch.tensor([-10.0, -20.0]), torch.tensor([-14.0, -19.0])
    reference_chosen, reference_rejected = torch.tensor([-11.0, -19.0]), torch.tensor([-12.0, -20.0])
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)
    # pair 0: logits = (-10 + 14) - (-11 + 12) = 3; pair 1: (-20 + 19) - (-19 + 20) = -2
    expected = (math.log(1 + math.exp(-0.3)) + math.log(1 + math.exp(0.2))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    # rewards: chosen 0.1 * (1, -1); rejected 0.1 * (-2, 1)
    assert metrics["rewards/chosen"] == pytest.approx(0.0)
    assert metrics["rewards/rejected"] == pytest.approx(-0.05)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)  # pair 0 prefers chosen (0.1 > -0.2), pair 1 not
    assert metrics["rewards/margins"] == pytest.approx((0.3 + -0.2) / 2)
    assert metrics["logps/chosen"] == pytest.approx(-15.0) and metrics["logps/rejected"] == pytest.approx(-16.5)
    # swapping chosen and rejected changes the loss: the test knows which is which
    swapped, _ = dpo_loss(policy_rejected, policy_chosen, reference_rejected, reference_chosen, beta=0.1)
    assert float(swapped) != pytest.approx(float(loss), abs=1e-3)
