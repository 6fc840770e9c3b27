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
