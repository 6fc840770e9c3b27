"""The paper's model and data layouts, written here (nothing downloaded), for rehearsal tests.

MODEL_ROOT holds the two checkpoints the cluster recipes name, as config files and tokenizers
(a rehearsal reads no weights):

    llava-v1.6-vicuna-7b-hf/       LlavaNextConfig of the real 7B (vocabulary 32064, <image> 32000,
                                   4096 positions, CLIP ViT-L/14-336 tower), a Llama-style tokenizer
                                   with Vicuna's special ids (<unk> 0, <s> 1, </s> 2, <image> 32000,
                                   <pad> 32001)
    clip-vit-large-patch14-336/    CLIPConfig of the real model, with OpenAI's legacy text ids
                                   (bos 0, eos 2, pad 1, 77 positions), and CLIP's real BPE tokenizer

DATA_ROOT holds every dataset card of recipes/*.yaml laid out like the real sets: 10 s clips at
30 fps at 336 px (and one shorter than 32 frames), COCO-style image paths of real sizes, text-only
and multi-turn LLaVA conversations, VideoChat2 QA with instructions, multi-image sets, LLaVA-Hound
DPO pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clip_vocabulary import write_clip_tokenizer
from pipeline.data.synthetic import encode_jpeg, encode_mp4

LLAVA_NEXT = "llava-v1.6-vicuna-7b-hf"
CLIP = "clip-vit-large-patch14-336"
VICUNA_VOCAB, IMAGE_TOKEN, PAD_TOKEN = 32064, 32000, 32001
CLIP_VISION_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def vicuna_like_tokenizer():
    """A byte-level BPE trained here, stretched to Vicuna's 32000 base tokens, with its special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    corpus = [SENTENCES * 3]
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(model.to_str())
    vocabulary = data["model"]["vocab"]
    for index in range(len(vocabulary), IMAGE_TOKEN):  # never produced: they only make the ids real
        vocabulary[f"<unused_{index}>"] = index
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, IMAGE_TOKEN,
                                                                                              PAD_TOKEN]
    tokenizer.model_max_length = 4096
    return tokenizer


SENTENCES = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: Describe the video in detail. "
    "What is the man doing? He walks to the door, opens it slowly and looks outside at the rain. "
    "Which image shows the red car? The first image. Answer with the option's letter from the given choices. "
    "Carefully watch the video and pay attention to the cause and sequence of events. Best option: (A) "
)


def write_model_root(root: Path) -> Path:
    from transformers import CLIPConfig, LlavaNextConfig

    llava = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", **CLIP_VISION_L14_336},
        text_config={"model_type": "llama", "vocab_size": VICUNA_VOCAB, "hidden_size": 4096, "intermediate_size": 11008,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                     "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)
    llava.save_pretrained(root / LLAVA_NEXT)
    vicuna_like_tokenizer().save_pretrained(root / LLAVA_NEXT)
    clip = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 2,
                     "pad_token_id": 1},
        vision_config=CLIP_VISION_L14_336, projection_dim=768)
    clip.save_pretrained(root / CLIP)
    write_clip_tokenizer(root / CLIP)
    return root


def _clip(seconds: float, fps: int, size: int, seed: int) -> bytes:
    """A moving-square clip: real length, frame rate and size."""
    frames = np.full((int(seconds * fps), size, size, 3), 40, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    colour = rng.integers(60, 255, size=3)
    for index, frame in enumerate(frames):
        x = int(index * (size - 64) / max(1, len(frames) - 1))
        frame[size // 2 - 32: size // 2 + 32, x: x + 64] = colour
    return encode_mp4(frames, fps)


def _image(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.broadcast_to(rng.integers(0, 255, size=(1, 1, 3), dtype=np.uint8), (height, width, 3)).copy()
    image[height // 4: height // 2, width // 4: width // 2] = 255
    return encode_jpeg(image)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def write_data_root(root: Path) -> Path:
    """Every card's annotation and media for recipes/sft_*.yaml and dpo_*.yaml, a few records each."""
    clips = {"long_0.mp4": _clip(10, 30, 336, 0), "long_1.mp4": _clip(10, 30, 384, 1), "short.mp4": _clip(0.8, 30, 336, 2)}
    answer = "He walks to the door, opens it slowly and looks outside at the rain. " * 3

    videochat2 = root / "videochat2_it"
    for name, data in clips.items():
        _write(videochat2 / "videos" / "clevrer" / name, data)
    qa = []
    for index, name in enumerate(["long_0.mp4", "long_1.mp4", "short.mp4"] * 4):  # 12: more than a rehearsal reads
        rounds = [{"i": "Carefully watch the video and pay attention to the cause and sequence of events.",
                   "q": "What is the man doing?", "a": answer}]
        if index % 2:
            rounds.append({"i": "", "q": "And then?", "a": "He closes the door."})
        qa.append({"video": f"clevrer/{name}", "QA": rounds})
    _write(videochat2 / "video_train.json", json.dumps(qa))

    llava = root / "llava_v1_5"
    sizes = [(480, 640), (375, 500), (640, 427), (336, 336), (1024, 768)]
    records = []
    for index, (height, width) in enumerate(sizes):
        path = f"coco/train2017/{index:012d}.jpg"
        _write(llava / "images" / path, _image(height, width, index))
        records.append({"id": f"{index:012d}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A white square."},
            {"from": "human", "value": "Describe it in detail."}, {"from": "gpt", "value": answer}]})
    records.append({"id": "sharegpt_0", "conversations": [  # LLaVA-665k's text-only ShareGPT turns
        {"from": "human", "value": "Write a haiku about rain."}, {"from": "gpt", "value": "Rain on the window."}]})
    _write(llava / "llava_v1_5_mix665k.json", json.dumps(records))

    multi = root / "multi_image"
    sets = []
    for index in range(3):
        paths = [f"set_{index}/{k}.jpg" for k in range(2 + index)]
        for k, path in enumerate(paths):
            _write(multi / "images" / path, _image(300 + 40 * k, 400, 10 * index + k))
        sets.append({"id": f"m{index}", "images": paths, "conversations": [
            {"from": "human", "value": "Which image shows the largest square?"}, {"from": "gpt", "value": "The first image."}]})
    _write(multi / "train.json", json.dumps(sets))

    hound = root / "llava_hound"
    for name in ("long_0.mp4", "short.mp4"):
        _write(hound / "videos" / name, clips[name])
    pairs = [{"id": f"p{index}", "video": name, "prompt": "<video>\nWhat is the man doing?", "chosen": answer,
              "rejected": "A cat sleeps on a sofa."} for index, name in enumerate(["long_0.mp4", "short.mp4"] * 2)]
    _write(hound / "sft_dpo_17k.jsonl", "\n".join(json.dumps(p) for p in pairs) + "\n")

    mvbench = root / "mvbench"  # recipes/eval_gpu.yaml: MVBench's json/<task>.json beside video/<source>/
    for name in ("long_0.mp4", "long_1.mp4"):
        _write(mvbench / "video" / "star" / name, clips[name])
    for task in ("action_sequence", "object_interaction"):
        questions = [{"video": f"star/{name}", "question": "What did the person do after opening the door?",
                      "candidates": ["Looked outside.", "Sat down.", "Closed the window."], "answer": "Looked outside."}
                     for name in ("long_0.mp4", "long_1.mp4")]
        _write(mvbench / "json" / f"{task}.json", json.dumps(questions))
    return root
