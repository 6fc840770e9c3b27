"""Benchmark prompt_guided_pool at the paper's video geometry, against two baselines in one run.

    input      [1, 32, 24, 24, 1024] projected features, relevance [1, 32, 24, 24], kernel (2,3,3)
    baselines  torch.nn.functional.avg_pool3d on the same tensor (viewed channels-first, i.e.
               channels_last_3d memory, no copy), and one copy of the input (memory-bandwidth floor)

Prints median times and ratios for fp32 and bf16, forward and forward+backward. The last line
is the headline: the fp32 forward ratio pooling / avg_pool3d (goal <= 1.0 on CPU).

    python benchmarks/pooling.py [--device cpu|cuda|npu] [--repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ppllava.pooling import prompt_guided_pool

SHAPE = (1, 32, 24, 24, 1024)
KERNEL = (2, 3, 3)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize()


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, float | None]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SHAPE, generator=generator).to(device=device, dtype=dtype)
    scores = torch.randn(SHAPE[:4], generator=generator).flatten(1).softmax(-1).reshape(SHAPE[:4]).to(device, dtype)
    channels_first = features.permute(0, 4, 1, 2, 3)  # a view: channels_last_3d memory
    grad_features = features.detach().clone().requires_grad_()
    grad_scores = scores.detach().clone().requires_grad_()
    grad_channels_first = grad_features.permute(0, 4, 1, 2, 3)

    def pool_backward():
        prompt_guided_pool(grad_features, grad_scores, KERNEL).sum().backward()

    def avg_backward():
        F.avg_pool3d(grad_channels_first, KERNEL).sum().backward()

    results: dict[str, float | None] = {
        "pool_fwd": median_ms(lambda: prompt_guided_pool(features, scores, KERNEL), device, repeats),
        "pool_fwd_bwd": median_ms(pool_backward, device, repeats),
        "copy": median_ms(lambda: features.clone(), device, repeats),
    }
    try:
        results["avg_fwd"] = median_ms(lambda: F.avg_pool3d(channels_first, KERNEL), device, repeats)
        results["avg_fwd_bwd"] = median_ms(avg_backward, device, repeats)
        # Reference only: avg_pool3d on its native contiguous channels-first layout (copy not timed).
        native = channels_first.contiguous()
        results["avg_native_fwd"] = median_ms(lambda: F.avg_pool3d(native, KERNEL), device, repeats)
    except (NotImplementedError, RuntimeError) as error:  # e.g. no bf16 avg_pool3d kernel on CPU
        print(f"  avg_pool3d unavailable for {dtype} on {device.type}: {str(error).splitlines()[0]}")
        results["avg_fwd"] = results["avg_fwd_bwd"] = None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "npu":
        import torch_npu  # noqa: F401  (registers the npu device with torch)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    print(f"input {SHAPE}, kernel {KERNEL}")
    headline = None
    for dtype in (torch.float32, torch.bfloat16):
        r = run(dtype, device, args.repeats)
        name = str(dtype).replace("torch.", "")
        print(f"{name}: pool fwd {r['pool_fwd']:.2f} ms, fwd+bwd {r['pool_fwd_bwd']:.2f} ms; copy {r['copy']:.2f} ms")
        print(f"{name}: forward ratio pooling / one input copy: {r['pool_fwd'] / r['copy']:.2f}")
        if r["avg_fwd"] is not None:
            print(f"{name}: avg_pool3d fwd {r['avg_fwd']:.2f} ms, fwd+bwd {r['avg_fwd_bwd']:.2f} ms "
                  f"(on a contiguous channels-first copy: fwd {r['avg_native_fwd']:.2f} ms)")
            print(f"{name}: fwd+bwd ratio pooling / avg_pool3d: {r['pool_fwd_bwd'] / r['avg_fwd_bwd']:.2f}")
            ratio = r["pool_fwd"] / r["avg_fwd"]
            print(f"{name}: forward ratio pooling / avg_pool3d: {ratio:.2f}")
            if dtype == torch.float32:
                headline = ratio
    print(f"forward ratio pooling / avg_pool3d (fp32): {headline:.2f}")


if __name__ == "__main__":
    main()
