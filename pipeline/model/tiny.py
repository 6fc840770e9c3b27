"""The tiny PPLLaVA of tests and the CPU demo: a byte-level BPE tokenizer trained here on a few
sentences (nothing is downloaded) and the tiny model configuration sized to it. The same
tokenizer serves as the LLM's and the CLIP text tower's (both configs take its ids).
"""

from __future__ import annotations

from ppllava import PPLLaVAConfig

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512, chat_template: bool = False):
    """A byte-level BPE tokenizer trained here on a few sentences (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.synthetic import VOCABULARY
    from pipeline.data.templates import VICUNA_SYSTEM

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT: What colour is the red circle? It moves left right up down.",
              "Which image contains the blue square? Image 1. There are 3 shapes. The triangle is green.",
              VOCABULARY]
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=specials[4:])
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_config_for(tokenizer, **overrides) -> PPLLaVAConfig:
    """The tiny PPLLaVA sized to a tokenizer: its vocabulary and special ids for both the LLM
    and the CLIP text tower (the tiny tokenizer serves as both in data tests)."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    # Sub-config overrides (e.g. a wider LLM) merge with the ids rather than replace them.
    text = {**ids, **(overrides.pop("text_config", None) or {})}
    clip_text = {**ids, **(overrides.pop("clip_text_config", None) or {})}
    return PPLLaVAConfig.tiny(text_config=text, clip_text_config=clip_text,
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **overrides)


# Width and depth of a rehearsal model: everything else (vocabularies, special ids, image and patch
# size, positions, kernels, frames) stays the real model's. Depth 3 for the vision tower, so the
# feature layer -2 is an inner layer as in the real tower.
SHRUNK_WIDTH = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4},
    "clip_text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
SHRUNK_PROJECTION = 16
SHRUNK_BT_ADAPTER_DEPTH = 2  # beside vision layers 2 and 3 of 3: the first reaches the features (-2)


def shrunk_config(config: PPLLaVAConfig) -> PPLLaVAConfig:
    """``config`` at the tiny width and depth (SHRUNK_WIDTH), every other value kept."""
    data = config.to_dict()
    for part, sizes in SHRUNK_WIDTH.items():
        sub = data[part]
        grouped = sub.get("num_key_value_heads") and sub["num_key_value_heads"] < sub.get("num_attention_heads", 0)
        sub.update(sizes)
        if sub.get("num_key_value_heads"):  # grouped-query attention stays grouped
            sub["num_key_value_heads"] = 2 if grouped else sizes["num_attention_heads"]
        if sub.get("head_dim"):
            sub["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
        if "projection_dim" in sub:
            sub["projection_dim"] = SHRUNK_PROJECTION
    data["projection_dim"] = SHRUNK_PROJECTION
    if data.get("bt_adapter_depth"):  # as in the real tower: some adapter layers reach the features, one lies past
        data["bt_adapter_depth"] = SHRUNK_BT_ADAPTER_DEPTH
    for key in ("model_type", "transformers_version", "architectures"):
        data.pop(key, None)
    return PPLLaVAConfig(**data)
