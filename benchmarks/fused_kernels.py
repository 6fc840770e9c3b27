"""The device row's fused LLM kernels against the references, at PPLLaVA's shapes, on one device.

One decoder layer of Vicuna-7B (hidden 4096, 32 heads of 128, MLP 11008; transformers' Llama with
`backends.kernels.use_kernels`), 1,024 visual tokens + text = 1,536 tokens, forward and backward:

    fused       the row's kernels (npu: npu_fusion_attention + npu_rms_norm; cuda: flash_attention_2
                if installed, else SDPA) in bf16
    reference   every op's reference (SDPA, the HF RMSNorm) in bf16: the time and memory baseline
    fp32        every op's reference in fp32: the parity baseline (the outputs, and all parameter
                gradients as one vector, within 1e-2 relative L2; the worst single parameter's is
                printed too: at initialisation the attention projections' gradients are small and
                bf16 rounding alone moves them by about 1e-2)

for an unpadded sample (causal: NPU's compressed mask, sparse_mode 3) and a right-padded pair
(an explicit mask). A profile of the fused run must show the fused kernel (and no CPU fallback
on NPU: TORCH_NPU_FALLBACK_CPU_DISABLE=1 makes one an error). Prints one table; exits 1 on a
parity miss, a fallback or a kernel not seen.

    python benchmarks/fused_kernels.py --device npu      # an Ascend 910B host (docs/ascend.md §6)
    python benchmarks/fused_kernels.py --device cuda     # a GPU
    python benchmarks/fused_kernels.py --device cpu --hidden 256 --heads 2 --sequence 96   # the script itself
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCH_NPU_FALLBACK_CPU_DISABLE", "1")  # before torch_npu loads: a CPU fallback fails

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaModel  # noqa: E402

import backends  # noqa: E402
from backends import kernels  # noqa: E402
from pooling import median_ms as timed, synchronize  # noqa: E402  (benchmarks/: one timer for both)

TOLERANCE = 1e-2
# What a profile of the fused run must contain, by attention implementation (op names, lower case).
FUSED_OPS = {"npu_fusion_attention": ("npu_fusion_attention",), "flash_attention_2": ("flash_attn",),
             "sdpa": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention")}


def layer(args, device, dtype) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.intermediate, num_hidden_layers=1, vocab_size=256,
                         max_position_embeddings=max(4096, args.sequence))
    model = LlamaModel(config)
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype)


def inputs(args, device, padded: bool):
    torch.manual_seed(1)
    batch = 2 if padded else 1
    embeds = torch.randn(batch, args.sequence, args.hidden) * 0.02
    mask = None
    if padded:
        mask = torch.ones(batch, args.sequence, dtype=torch.long)
        mask[1, args.sequence * 2 // 3:] = 0
    return embeds.to(device), None if mask is None else mask.to(device)


def step(model, embeds, mask):
    """Forward and backward of the layer; returns the valid rows' hidden states."""
    model.zero_grad(set_to_none=True)
    hidden = model(inputs_embeds=embeds.to(model.dtype).requires_grad_(), attention_mask=mask).last_hidden_state
    valid = hidden if mask is None else hidden[mask.bool()]
    # A fixed random direction per output: gradients as well conditioned as a language-model loss's
    # (a loss of squares would differentiate through the final RMSNorm's near-cancellation).
    probe = torch.randn(valid.shape, generator=torch.Generator().manual_seed(2)).to(valid.device)
    (valid.float() * probe).sum().backward()
    return valid.detach().float()


def peak_mib(fn, module) -> float | None:
    if module is None:
        return None
    module.reset_peak_memory_stats()
    before = module.memory_allocated()
    fn()
    return (module.max_memory_allocated() - before) / 2**20


def profiled_ops(fn, device) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as trace:
        fn()
        synchronize(device)
    return {event.name.lower() for event in trace.events()}


def relative_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm().clamp_min(1e-12))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="npu", choices=("npu", "cuda", "cpu"))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--sequence", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    backend = backends.select(args.device)
    device, module = backend.device(0), backend.device_module()
    backend.set_device(0)
    fused = kernels.resolve(backend.kernels)
    print(f"device {args.device} ({backend.bf16_check(0)[1]}), torch {torch.__version__}; one Llama layer: hidden "
          f"{args.hidden}, {args.heads} heads of {args.hidden // args.heads}, MLP {args.intermediate}; "
          f"{args.sequence} tokens; fused = {fused}")
    reference_model = layer(args, device, torch.float32)
    model = layer(args, device, torch.bfloat16)
    failures = []
    print("| case | out rel-L2 | grad rel-L2 | worst parameter's | fused ms | reference ms | time ratio | fused MiB | reference MiB "
          "| fused kernel seen | fallbacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for padded in (False, True):
        case = "right-padded pair" if padded else "one sample, causal"
        embeds, mask = inputs(args, device, padded)
        kernels.use_kernels(reference_model, kernels.REFERENCE)
        expected = step(reference_model, embeds, mask)
        expected_grads = {n: p.grad.float() for n, p in reference_model.named_parameters() if p.grad is not None}
        kernels.use_kernels(model, kernels.REFERENCE)
        reference_ms = timed(lambda: step(model, embeds, mask), device, args.repeats)
        reference_mib = peak_mib(lambda: step(model, embeds, mask), module)
        kernels.use_kernels(model, fused)
        before = kernels.fallback_counts()
        output = step(model, embeds, mask)
        out_error = relative_l2(output, expected)
        grads = {n: p.grad.float() for n, p in model.named_parameters() if n in expected_grads}
        grad_error = relative_l2(torch.cat([g.flatten() for g in grads.values()]),
                                 torch.cat([expected_grads[n].flatten() for n in grads]))
        worst = max(grads, key=lambda n: relative_l2(grads[n], expected_grads[n]))
        worst_error = relative_l2(grads[worst], expected_grads[worst])
        fused_ms = timed(lambda: step(model, embeds, mask), device, args.repeats)
        fused_mib = peak_mib(lambda: step(model, embeds, mask), module)
        ops = profiled_ops(lambda: step(model, embeds, mask), device)
        seen = any(name in op for name in FUSED_OPS.get(fused["attention"], ()) for op in ops)
        fallbacks = {op: kernels.fallback_counts()[op] - before[op] for op in kernels.OPS}
        if args.device != "cpu" and not seen:
            failures.append(f"{case}: no {fused['attention']} kernel in the profile")
        if any(fallbacks.values()):
            failures.append(f"{case}: calls ran the reference instead of the fused kernel: {fallbacks}")
        if out_error > TOLERANCE or grad_error > TOLERANCE:
            failures.append(f"{case}: parity miss (output {out_error:.2e}, gradients {grad_error:.2e} > {TOLERANCE})")
        mib = ["-" if v is None else f"{v:.0f}" for v in (fused_mib, reference_mib)]
        print(f"| {case} | {out_error:.2e} | {grad_error:.2e} | {worst_error:.2e} ({worst}) | {fused_ms:.2f} | {reference_ms:.2f} | "
              f"{fused_ms / reference_ms:.2f} | {mib[0]} | {mib[1]} | {'yes' if seen else 'no'} | "
              f"{sum(fallbacks.values())} |")
    for failure in failures:
        print(f"FAIL {failure}")
    print("PASS" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
