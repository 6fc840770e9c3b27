"""LoRA adapters on the tiny model: what they adapt, and merging them (ppllava/lora.py)."""

import copy

import pytest
import torch

from conftest import tiny_model
from pipeline.model.consolidate import model_from_state_dict
from ppllava.lora import add_lora, lora_config, lora_parameters, save_lora_config


def adapted_model():
    model = tiny_model()
    add_lora(model, lora_config(model, rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for _, parameter in lora_parameters(model):
            parameter.normal_(0, 0.05)
    return model


def test_only_the_llms_linear_layers_get_adapters():
    adapted = {name.split(".lora_")[0] for name, _ in lora_parameters(adapted_model())}
    assert adapted and all(name.startswith("language_model.model.layers.") for name in adapted)
    assert not any(name.endswith("lm_head") for name in adapted)
    with pytest.raises(ValueError, match="not linear layers of the LLM"):
        lora_config(tiny_model(), 4, 8, 0.0, target_modules=["q_proj", "out_proj"])  # out_proj is CLIP's


def test_a_bf16_export_merges_from_the_fp32_adapters(tmp_path):
    """The adapters are merged in fp32 into bf16 weights (one rounding), not rounded to bf16 first."""
    model = adapted_model()
    model.config.save_pretrained(tmp_path)
    save_lora_config(lora_config(tiny_model(), rank=4, alpha=8, dropout=0.0), tmp_path)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    merged = model_from_state_dict(state, tmp_path, torch.bfloat16)
    layer = "language_model.model.layers.0.self_attn.q_proj"
    a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
    expected = state[f"{layer}.base_layer.weight"].to(torch.bfloat16) + (b @ a) * (8 / 4)
    assert torch.equal(merged.state_dict()[f"{layer}.weight"], expected.to(torch.bfloat16))
    assert merged.state_dict()[f"{layer}.weight"].dtype == torch.bfloat16


def test_the_adapter_disabled_reference_gives_a_separate_frozen_references_dpo_losses():
    """DPO with LoRA takes the reference from the policy with its adapters off; with trained
    (non-zero) adapters that gives the losses a separate frozen copy of the start model gives."""
    from conftest import build_batch
    from pipeline.preference import dpo_loss, sequence_logps
    from ppllava import IMAGE, VIDEO
    from ppllava.lora import adapters_disabled

    start = tiny_model().eval()
    reference = copy.deepcopy(start)           # the second copy a LoRA run does without
    policy = start
    add_lora(policy, lora_config(policy, rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for _, parameter in lora_parameters(policy):
            parameter.normal_(0, 0.05)          # as after some training: the policy has moved
    batch = build_batch(policy.config, [(VIDEO, 4), (IMAGE, 3), (VIDEO, 4), (IMAGE, 3)], seed=5)
    chosen, rejected = slice(0, 2), slice(2, 4)

    def pair_logps(model):
        logps, _ = sequence_logps(model(**batch).logits, batch["labels"])
        return logps[chosen], logps[rejected]

    with torch.no_grad():
        policy_chosen, policy_rejected = pair_logps(policy)
        with adapters_disabled(policy):
            disabled = pair_logps(policy)
        separate = pair_logps(reference)
    loss_disabled, _ = dpo_loss(policy_chosen, policy_rejected, *disabled, beta=0.1)
    loss_separate, _ = dpo_loss(policy_chosen, policy_rejected, *separate, beta=0.1)
    assert (policy_chosen - separate[0]).abs().max() > 1e-3    # the adapters change the policy's log-probs
    assert loss_disabled.item() == pytest.approx(loss_separate.item(), abs=1e-5)
    assert torch.allclose(torch.stack(disabled), torch.stack(separate), atol=1e-5, rtol=0)
