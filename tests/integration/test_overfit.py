"""A tiny PPLLaVA can learn: 30 optimizer steps on one fixed interleaved batch."""

import pytest
import torch

from conftest import INTERLEAVED, build_batch, tiny_model
from ppllava import TEXT

pytestmark = pytest.mark.integration


def test_thirty_steps_drive_the_loss_below_a_tenth():
    model = tiny_model(seed=5).train()
    model.set_trainable_parts(vision=False, projector=True, clip_text=True, llm=True)  # paper SFT
    batch = build_batch(model.config, INTERLEAVED + [(TEXT, 0)], seed=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
