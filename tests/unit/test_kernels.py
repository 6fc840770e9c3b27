"""The kernel registry (backends/kernels.py): references equal the HF modules; the NPU wrappers,
run against the emulator of torch_npu's documented op semantics (fake_torch_npu.py), equal the
references forward and backward, through transformers' real Llama at the paper's head dim; and the
NPU row's LLM attention reaches the fused kernel, not a fallback, at the paper's shapes."""

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward

import backends
from backends import kernels
from backends.spec import BackendUnavailable

import fake_torch_npu

pytestmark = pytest.mark.unit

VICUNA_HEAD_DIM, VICUNA_HEADS = 128, 32  # llava-v1.6-vicuna-7b: hidden 4096 over 32 heads


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


def llm(heads: int = 2, kv_heads: int = 2, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """Transformers' Llama at the paper's head dim (128), shrunk in heads and depth only."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=heads * VICUNA_HEAD_DIM, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=64, num_hidden_layers=layers, vocab_size=128, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def masks(batch: int, length: int) -> dict[str, torch.Tensor | None]:
    right = torch.ones(batch, length, dtype=torch.long)
    right[1:, length - length // 3:] = 0  # SFT and DPO batches: answers padded on the right
    left = torch.ones(batch, length, dtype=torch.long)
    left[1:, : length // 3] = 0  # batched generation: prompts padded on the left (rows with nothing to attend)
    return {"unpadded": None, "right": right, "left": left}


def forward_and_grads(model, ids, mask, chosen):
    kernels.use_kernels(model.model, chosen)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    (logits[valid].float().pow(2).mean()).backward()
    return logits.detach()[valid], {name: p.grad.clone() for name, p in model.named_parameters()}


NPU_ROW = dict(backends.NPU.kernels)


@pytest.fixture(autouse=True)
def fresh_counts():
    kernels._fallbacks.clear()
    kernels._warned.clear()


@pytest.fixture
def npu(monkeypatch):
    return fake_torch_npu.install(monkeypatch)


def test_the_references_are_the_hf_modules_maths():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(256, eps=1e-5)
    norm.weight.data.normal_()
    hidden = torch.randn(2, 7, 256)
    torch.testing.assert_close(kernels.reference_rms_norm(norm, hidden), norm(hidden), rtol=0, atol=0)
    model = llm()
    attention = model.model.layers[0].self_attn
    query, key, value = (torch.randn(2, 2, 9, VICUNA_HEAD_DIM) for _ in range(3))
    allowed = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    allowed[1, :, :, 6:] = False
    allowed[1, :, 6:, 0] = True  # padding rows keep one key, as transformers' mask does not empty right-padded rows
    eager, _ = eager_attention_forward(attention, query, key, value, torch.zeros(allowed.shape).masked_fill(
        ~allowed, torch.finfo(torch.float32).min), scaling=attention.scaling)
    reference, _ = kernels._sdpa(attention, query, key, value, allowed, scaling=attention.scaling)
    assert relative_l2(reference, eager) < kernels.KERNELS["attention"]["sdpa"].tolerance[torch.float32]
    bf16 = [t.bfloat16() for t in (query, key, value)]
    reference_bf16, _ = kernels._sdpa(attention, *bf16, allowed, scaling=attention.scaling)
    assert relative_l2(reference_bf16, eager) < kernels.KERNELS["attention"]["sdpa"].tolerance[torch.bfloat16]


@pytest.mark.parametrize("padding", ["unpadded", "right", "left"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_npu_kernels_equal_the_references_forward_and_backward_in_fp32(npu, padding, kv_heads):
    model = llm(kv_heads=kv_heads)
    ids = torch.randint(0, 128, (2, 24))
    mask = masks(2, 24)[padding]
    reference, reference_grads = forward_and_grads(model, ids, mask, kernels.REFERENCE)
    ours, grads = forward_and_grads(model, ids, mask, kernels.resolve(NPU_ROW))
    assert len(npu.fusion_attention) == 2 and len(npu.rms_norm) == 5  # both layers' attention; 2 norms a layer + final
    assert relative_l2(ours, reference) < 1e-6
    assert max(relative_l2(grads[n], reference_grads[n]) for n in grads) < 1e-5
    call = npu.fusion_attention[0]
    if padding == "unpadded":  # causal by the compressed mask, no B x S x S mask materialised
        assert (call["sparse_mode"], call["mask"]) == (3, (2048, 2048))
    else:
        assert (call["sparse_mode"], call["mask"]) == (0, (2, 1, 24, 24))
    assert call["inner_precise"] == (2 if padding == "left" else 0)  # rows with nothing to attend: no NaN
    assert kernels.fallback_counts() == {"attention": 0, "rms_norm": 0}


def test_in_bf16_the_npu_kernels_stay_within_the_registered_tolerance_of_the_fp32_reference(npu):
    model = llm()
    ids = torch.randint(0, 128, (2, 40))
    mask = masks(2, 40)["right"]
    reference, reference_grads = forward_and_grads(model, ids, mask, kernels.REFERENCE)
    model.bfloat16()
    ours, grads = forward_and_grads(model, ids, mask, kernels.resolve(NPU_ROW))
    assert {call["dtype"] for call in npu.fusion_attention} == {torch.bfloat16}
    tolerance = kernels.KERNELS["attention"]["npu_fusion_attention"].tolerance[torch.bfloat16]
    assert relative_l2(ours, reference) < tolerance
    layer_grads = [n for n in grads if "layers" in n]
    assert max(relative_l2(grads[n], reference_grads[n]) for n in layer_grads) < tolerance


def test_at_the_papers_shapes_the_npu_llm_attention_takes_the_fused_kernel_never_a_fallback(npu):
    """1,024 pooled visual tokens + prompt and answer: ~1.5k tokens, padded batches, bf16, Vicuna's
    head dim. A mask form, rank or head dim the kernel does not take would show as a fallback here."""
    model = llm(layers=1).bfloat16()
    ids = torch.randint(0, 128, (2, 1536))
    for mask in masks(2, 1536).values():
        forward_and_grads(model, ids, mask, kernels.resolve(NPU_ROW))
    assert kernels.fallback_counts() == {"attention": 0, "rms_norm": 0}
    assert len(npu.fusion_attention) == 3
    # the 7B's own attention shapes, on the meta device: B=1, 32 heads, 4,096 context, a B1SS bool mask
    query = torch.empty(1, VICUNA_HEADS, 4096, VICUNA_HEAD_DIM, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(1, 1, 4096, 4096, dtype=torch.bool, device="meta")
    assert kernels.fusion_attention_supports(query, query, query, mask) is None
    assert kernels.fusion_attention_supports(query, query, query, None) is None


def test_supports_follows_the_documented_limits():
    def q(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    ok = q(2, 8, 64, 128)
    assert kernels.fusion_attention_supports(ok, ok, ok, None) is None
    assert kernels.fusion_attention_supports(ok, q(2, 2, 64, 128), q(2, 2, 64, 128), None) is None  # GQA 4:1
    assert "rank" in kernels.fusion_attention_supports(q(2, 64, 128), q(2, 64, 128), q(2, 64, 128), None)
    assert "whole multiple" in kernels.fusion_attention_supports(ok, q(2, 3, 64, 128), q(2, 3, 64, 128), None)
    assert "head dim 1024" in kernels.fusion_attention_supports(q(2, 8, 64, 1024), q(2, 8, 64, 1024),
                                                                q(2, 8, 64, 1024), None)
    assert kernels.fusion_attention_supports(q(2, 8, 64, 768), q(2, 8, 64, 768), q(2, 8, 64, 768), None) is None
    big = q(1, 257, 8, 64)
    assert "257 query heads" in kernels.fusion_attention_supports(big, big, big, None)
    assert "float32 attention mask" in kernels.fusion_attention_supports(ok, ok, ok, q(2, 1, 64, 64, dtype=torch.float32))
    assert kernels.fusion_attention_supports(ok, ok, ok, q(2, 1, 64, 64, dtype=torch.uint8)) is None
    assert kernels.fusion_attention_supports(ok, ok, ok, q(1, 1, 64, 64, dtype=torch.bool)) is None
    assert "shaped (2, 64, 64)" in kernels.fusion_attention_supports(ok, ok, ok, q(2, 64, 64, dtype=torch.bool))
    assert "float64" in kernels.fusion_attention_supports(*(q(2, 8, 64, 128, dtype=torch.float64),) * 3, None)
    hidden = q(2, 7, 256)
    assert kernels.rms_norm_supports(hidden, q(256)) is None
    assert "weight torch.float32" in kernels.rms_norm_supports(hidden, q(256, dtype=torch.float32))
    assert "2-8 dims" in kernels.rms_norm_supports(q(256), q(256))


def test_outside_its_limits_a_kernel_runs_the_reference_warns_once_and_counts(npu, caplog):
    model = llm(layers=2)
    ids = torch.randint(0, 128, (2, 12))
    reference = model(input_ids=ids).logits
    kernels.use_kernels(model.model, kernels.resolve(NPU_ROW))
    model.double()  # float64: neither npu_fusion_attention nor npu_rms_norm takes it
    with caplog.at_level(logging.WARNING, logger="backends.kernels"):
        ours = model(input_ids=ids).logits
        model(input_ids=ids)
    assert kernels.fallback_counts() == {"attention": 4, "rms_norm": 10}
    assert npu.fusion_attention == [] and npu.rms_norm == []
    assert caplog.text.count("npu_fusion_attention cannot run this call") == 1
    assert caplog.text.count("npu_rms_norm cannot run this call") == 1
    torch.testing.assert_close(ours.float(), reference, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_registered_for_masks_too_or_it_would_be_handed_none(npu):
    """transformers builds a mask only for implementations its mask interface knows: the
    registration in both interfaces is what gives a padded batch its mask."""
    model = llm(layers=1)
    kernels.use_kernels(model.model, kernels.resolve(NPU_ROW))
    assert ALL_MASK_ATTENTION_FUNCTIONS["npu_fusion_attention"] is kernels.npu_mask
    received = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        received.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register("attention_only_probe", probe)
    model.model.set_attn_implementation("attention_only_probe")
    model(input_ids=torch.randint(0, 128, (2, 8)), attention_mask=masks(2, 8)["right"])
    assert received == [None]  # the failure the registration in both interfaces avoids


def test_resolve_by_row_reference_and_override():
    assert kernels.resolve(backends.CPU.kernels) == {"attention": "sdpa", "rms_norm": "reference"}
    assert kernels.resolve(NPU_ROW, "reference") == kernels.REFERENCE
    if not kernels._installed("torch_npu"):  # the fake is not installed in this test
        with pytest.raises(ValueError, match="needs the torch_npu package"):
            kernels.resolve(NPU_ROW)
    assert kernels.resolve(backends.CPU.kernels, {"attention": "eager"}) == {"attention": "eager", "rms_norm": "reference"}
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        kernels.resolve(backends.CPU.kernels, {"softmax": "fused"})
    with pytest.raises(ValueError, match="unknown implementation 'flash'; expected one of sdpa, eager"):
        kernels.resolve(backends.CPU.kernels, {"attention": "flash"})
    if not kernels._installed("flash_attn"):
        with pytest.raises(ValueError, match="flash_attention_2 needs the flash_attn package"):
            kernels.resolve(backends.CPU.kernels, {"attention": "flash_attention_2"})


def test_the_rows_name_their_kernels():
    assert backends.NPU.kernels == {"attention": "npu_fusion_attention", "rms_norm": "npu_rms_norm"}
    assert backends.CUDA.kernels["attention"] in ("flash_attention_2", "sdpa")
    assert backends.CPU.kernels == kernels.REFERENCE
    assert backends.NPU.attn_implementation == "sdpa"  # what the vision tower loads with: unmasked, fused by SDPA


def test_both_allocator_settings_are_refused_and_ours_is_not_added_to_the_users():
    environ = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    applied = backends.NPU.apply_env_defaults(environ)
    assert "PYTORCH_NPU_ALLOC_CONF" not in environ and "PYTORCH_NPU_ALLOC_CONF" not in applied
    assert applied["HCCL_CONNECT_TIMEOUT"] == "1200"
    both = {"PYTORCH_ALLOC_CONF": "a", "PYTORCH_NPU_ALLOC_CONF": "b"}
    with pytest.raises(BackendUnavailable, match="PYTORCH_NPU_ALLOC_CONF=b and PYTORCH_ALLOC_CONF=a are both set"):
        backends.NPU.apply_env_defaults(both)
    assert backends.CUDA.env_conflicts(both) == []  # a CUDA job reads only PYTORCH_ALLOC_CONF's family
    fresh: dict[str, str] = {}
    assert backends.NPU.apply_env_defaults(fresh)["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"


def test_the_device_script_runs_and_prints_its_table_on_this_cpu():
    """benchmarks/fused_kernels.py is run on Ascend and GPU hosts only by hand: run it here at a
    small width (the CPU row: references against fp32), so it cannot rot unnoticed."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fused_kernels.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--hidden", "256", "--heads", "2",
                             "--intermediate", "512", "--sequence", "96", "--repeats", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| one sample") or line.startswith("| right")]
    assert len(rows) == 2 and result.stdout.strip().endswith("PASS")
