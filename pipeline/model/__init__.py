"""Model directories: what the pipeline builds, checks, consolidates and loads for inference.

    setup.py        model, tokenizers and sample processor from a recipe (tiny / llava_next / pretrained)
    tiny.py         the few-MB model and tokenizer the tests and the CPU demo train
    consolidate.py  a DeepSpeed checkpoint (any ZeRO stage, any world size) -> one model
    check.py        SHA256SUMS of a directory, the probe input whose logits an export must reproduce
    inference.py    a model directory loaded for eval and chat: prompts, option scoring, generation
    relevance_map.py  eq.1's relevance over the frames and the pooled grid, drawn (explain)
    budget.py       each stage's LLM context against its visual tokens
    memory.py       the memory plan's accounting; meta_forward.py its counting on the meta device;
                    memory_fit.py the device verdict, the smallest change that fits, the report

The file names inside a model directory (model/, clip_tokenizer/, processor_config.json) are in
pipeline/layout.py.
"""
