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
30 fps at 336 px (and one shorter than 32 frames), a TGIF-style GIF, a clip bounded by start/end
seconds, COCO-style image paths of real sizes, text-only and multi-turn LLaVA conversations,
VideoChat2 QA with instructions, multi-image sets, LLaVA-Hound DPO pairs on frame folders
({:0>6}.jpg, one shorter than 32 frames), MVBench task files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from clip_vocabulary import write_clip_tokenizer
from pipeline.data.synthetic import encode_jpeg, encode_mp4

LLAVA_NEXT = "llava-v1.6-vicuna-7b-hf"
CLIP = "clip-vit-large-patch14-336"
AUTHORS_RELEASE = "ppllava_weight/ppllava_vicuna7b_image_video"
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
    write_authors_release_config(root / AUTHORS_RELEASE, llava, clip)
    return root


def write_authors_release_config(directory: Path, llava, clip) -> None:
    """The config.json of the authors' released ppllava_vicuna7b_image_video (their
    LlavaInterleave layout at the real sizes); a rehearsal reads the config and no weights. Their
    release names its CLIP and tokenizer on the hub: recipes point at local copies."""
    vision = {**clip.vision_config.to_dict(), "depth": 4, "max_T": 64}
    config = {
        "architectures": ["LlavaInterleaveForConditionalGeneration"], "model_type": "llava_next",
        "vision_config": vision, "text_config": llava.text_config.to_dict(),
        "image_token_index": IMAGE_TOKEN, "image_grid_pinpoints": PINPOINTS, "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu", "pooling": "ppllava",
        "pooling_kernel": [2, 3, 3], "pooling_stride": [2, 3, 3], "image_pooling_kernel": [1, 3, 3],
        "image_pooling_stride": [1, 3, 3], "frame_shape": [24, 24], "btadapter": True, "btadapter_depth": 4,
        "max_T": 64, "extend_clip": True, "pooling_temp": 0.01, "clip_weight": "openai/clip-vit-large-patch14-336",
        "clip_post_pretrain": None, "qwen": False, "pad_token_id": 0, "torch_dtype": "bfloat16"}
    _write(directory / "config.json", json.dumps(config, indent=1, default=str))


def _clip(seconds: float, fps: int, size: int, seed: int) -> bytes:
    """A moving-square clip: real length, frame rate and size."""
    frames = np.full((int(seconds * fps), size, size, 3), 40, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    colour = rng.integers(60, 255, size=3)
    for index, frame in enumerate(frames):
        x = int(index * (size - 64) / max(1, len(frames) - 1))
        frame[size // 2 - 32: size // 2 + 32, x: x + 64] = colour
    return encode_mp4(frames, fps)


def _portrait_clip(seconds: float, fps: int, width: int, height: int) -> bytes:
    """A phone clip: stored landscape (width x height), its display matrix turning it 90 degrees,
    so a player (and both decoders) shows it portrait."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.set_display_rotation(90)
        for index in range(int(seconds * fps)):
            pixels = np.full((height, width, 3), 40, np.uint8)
            pixels[:, : width // 4] = 200 + index % 50
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _gif(frames: int, size: int, seed: int) -> bytes:
    """A TGIF-style animated GIF."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(np.full((size, size, 3), rng.integers(0, 255), dtype=np.uint8)) for _ in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=40, loop=0)
    return buffer.getvalue()


def _frame_folder(folder: Path, seconds: float, fps: int, size: int, seed: int) -> None:
    """LLaVA-Hound's layout: a video as a folder of {:0>6}.jpg frames, numbered from 1."""
    rng = np.random.default_rng(seed)
    for index in range(int(seconds * fps)):
        frame = np.full((size, size, 3), 30, dtype=np.uint8)
        frame[:, index % size: index % size + 8] = rng.integers(60, 255, size=3)
        _write(folder / f"{index + 1:0>6}.jpg", encode_jpeg(frame))


def _image(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.broadcast_to(rng.integers(0, 255, size=(1, 1, 3), dtype=np.uint8), (height, width, 3)).copy()
    image[height // 4: height // 2, width // 4: width // 2] = 255
    return encode_jpeg(image)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def write_authors_sets(root: Path, clips: dict[str, bytes], answer: str) -> None:
    """The sets of recipes/sft_authors*.yaml in the authors' QA layout (their ppllava_json files)."""
    annotations = root / "ppllava_json"
    question = [{"i": "", "q": "<image>\nDescribe it.", "a": answer}, {"i": "", "q": "Anything else?", "a": "No."}]
    images = []
    for index, (height, width) in enumerate([(480, 640), (427, 640), (500, 375)]):
        path = f"coco/train2017/{index:012d}.jpg"
        _write(root / "llava_v1p5" / path, _image(height, width, 40 + index))
        images.append({"image": path, "QA": question})
    _write(annotations / "llava_v1p5_300k.json", json.dumps(images))
    for index in range(2):
        _frame_folder(root / "llava_hound" / "train_300k" / f"video_{index}", 8 - 5 * index, 5, 336, 50 + index)
    hound = [{"video": f"video_{index}", "QA": question} for index in range(2)]
    _write(annotations / "llavahound_all_vid.json", json.dumps(hound))
    for name, path in [("k710", "classification/k710"), ("ssv2", "classification/ssv2"), ("next_qa", "reasoning/next_qa"),
                       ("clevrer_qa", "reasoning/clevrer_qa"), ("clevrer_mc", "reasoning/clevrer_mc")]:
        _write(root / "videochat2_videos" / name / "clip.mp4", clips["long_0.mp4"])
        records = [{"video": "clip.mp4", "QA": [{"i": "Answer the question about the video.", "q": "What happens?",
                                                  "a": "A man opens a door."}]}]
        _write(root / "VideoChat2-IT" / "video" / path / "train.json", json.dumps(records))
    sets = []
    for index in range(2):
        paths = [f"set_{index}/{k}.png" for k in range(3)]
        for k, path in enumerate(paths):
            _write(root / "M4-Instruct-Data" / path, _image(256, 320, 60 + 3 * index + k))
        sets.append({"multi-image": paths, "QA": [{"i": "", "q": "<image>\n<image>\n<image>\nWhich differs?",
                                                   "a": "The second."}]})
    _write(annotations / "m4_multiimage.json", json.dumps(sets))


def write_data_root(root: Path) -> Path:
    """Every card's annotation and media for recipes/sft_*.yaml and dpo_*.yaml, a few records each."""
    clips = {"long_0.mp4": _clip(10, 30, 336, 0), "long_1.mp4": _clip(10, 30, 384, 1), "short.mp4": _clip(0.8, 30, 336, 2)}
    answer = "He walks to the door, opens it slowly and looks outside at the rain. " * 3

    videochat2 = root / "videochat2_it"
    for name, data in clips.items():
        _write(videochat2 / "videos" / "clevrer" / name, data)
    _write(videochat2 / "videos" / "tgif" / "tumblr_0.gif", _gif(20, 240, 3))
    # what users' data holds: a rotation-tagged phone clip (both decoders read it portrait) and a
    # JPEG saved as .mp4 (PyAV reads one frame, decord refuses it: the shard stage must refuse it)
    _write(videochat2 / "videos" / "phone" / "portrait.mp4", _portrait_clip(2, 30, 480, 272))
    _write(videochat2 / "videos" / "phone" / "photo.mp4", _image(336, 336, 7))
    qa = []
    names = ["clevrer/long_0.mp4", "clevrer/long_1.mp4", "clevrer/short.mp4", "tgif/tumblr_0.gif",
             "phone/portrait.mp4", "phone/photo.mp4"] * 2
    for index, name in enumerate(names):  # 12: more than a rehearsal reads
        rounds = [{"i": "Carefully watch the video and pay attention to the cause and sequence of events.",
                   "q": "What is the man doing?", "a": answer}]
        if index % 2:
            rounds.append({"i": "", "q": "And then?", "a": "He closes the door."})
        qa.append({"video": name, "QA": rounds})
    qa[1].update(start=2.5, end=7.0)  # a clip of a longer video, in seconds
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

    hound = root / "llava_hound"  # ShareGPTVideo's frames: one folder per video
    _frame_folder(hound / "videos" / "v_0", 10, 5, 336, 4)
    _frame_folder(hound / "videos" / "v_1", 3, 5, 336, 5)  # 15 frames: fewer than 32
    pairs = [{"id": f"p{index}", "video": name, "prompt": "<video>\nWhat is the man doing?", "chosen": answer,
              "rejected": "A cat sleeps on a sofa."} for index, name in enumerate(["v_0", "v_1"] * 2)]
    _write(hound / "sft_dpo_17k.jsonl", "\n".join(json.dumps(p) for p in pairs) + "\n")

    write_authors_sets(root, clips, answer)

    # recipes/eval_gpu.yaml: MVBench as published, json/<task>.json with bare video names, each task's
    # videos in its own folder under video/ (both tasks here: star/Charades_v1_480)
    mvbench = root / "mvbench"
    for name in ("long_0.mp4", "long_1.mp4"):
        _write(mvbench / "video" / "star" / "Charades_v1_480" / name, clips[name])
    for task in ("action_sequence", "object_interaction"):
        questions = [{"video": name, "question": "What did the person do after opening the door?",
                      "candidates": ["Looked outside.", "Sat down.", "Closed the window."], "answer": "Looked outside."}
                     for name in ("long_0.mp4", "long_1.mp4")]
        _write(mvbench / "json" / f"{task}.json", json.dumps(questions))
    write_published_benchmarks(root, clips)
    return root


def write_published_benchmarks(root: Path, clips: dict[str, bytes]) -> None:
    """recipes/eval_benchmarks_gpu.yaml's benchmarks as their releases lay them out, a record or two
    each: MVBench (a bounded task in star/, an unbounded one in ssv2_video/), VideoMME (parquet,
    a short and a medium video, one with subtitles), MSVD-QA (integer video_id through
    youtube_mapping.txt to YouTubeClips-style .avi names), MSR-VTT-QA (video<N>.mp4),
    ActivityNet-QA (questions and answers apart, v_ names) and Video-ChatGPT's three QA files."""
    mvbench = root / "MVBench"
    for filename, folder, extra in (("action_sequence.json", "star/Charades_v1_480", {"start": 1.0, "end": 8.0}),
                                    ("action_antonym.json", "ssv2_video", {})):
        _write(mvbench / "video" / folder / "1234.mp4", clips["long_0.mp4"])
        _write(mvbench / "json" / filename, json.dumps([{
            "video": "1234.mp4", "question": "What is the person doing?", "candidates": ["Walking.", "Sitting."],
            "answer": "Walking.", **extra}]))
    import pyarrow
    import pyarrow.parquet

    videomme = root / "Video-MME"
    rows = [{"video_id": f"00{i}", "duration": duration, "domain": "Knowledge", "sub_category": "Humanity",
             "url": "", "videoID": video, "question_id": f"00{i}-1", "task_type": "Action Recognition",
             "question": "What does the man do?", "options": ["A. Walks.", "B. Sits.", "C. Runs.", "D. Sleeps."],
             "answer": "A"} for i, (duration, video) in enumerate([("short", "fFjv93ACGo8"), ("medium", "hxyKfQx1PkU")])]
    (videomme / "videomme").mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), videomme / "videomme" / "test-00000-of-00001.parquet")
    for row, clip in zip(rows, ("long_0.mp4", "long_1.mp4")):
        _write(videomme / "data" / f"{row['videoID']}.mp4", clips[clip])
    _write(videomme / "subtitle" / "hxyKfQx1PkU.srt", "1\n00:00:00,000 --> 00:00:05,000\nHe walks to the door.\n\n"
                                                    "2\n00:00:05,000 --> 00:00:10,000\nHe opens it.\n")
    msvd = root / "MSVD-QA"
    _write(msvd / "test_qa.json", json.dumps([{"answer": "door", "id": 0, "question": "what does the man open?",
                                               "video_id": 1}]))
    _write(msvd / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\n")
    _write(msvd / "videos" / "-4wsuPCjDBc_5_15.avi", clips["long_0.mp4"])
    msrvtt = root / "MSRVTT-QA"
    _write(msrvtt / "test_qa.json", json.dumps([{"answer": "man", "id": 0, "question": "who opens the door?",
                                                 "video_id": 7010}]))
    _write(msrvtt / "videos" / "video7010.mp4", clips["long_1.mp4"])
    anet = root / "ActivityNet-QA"
    _write(anet / "test_q.json", json.dumps([{"question": "what does the man open", "question_id": "v_sJFgo9H6zNo_1",
                                              "video_name": "sJFgo9H6zNo"}]))
    _write(anet / "test_a.json", json.dumps([{"answer": "door", "question_id": "v_sJFgo9H6zNo_1", "type": 0}]))
    _write(anet / "videos" / "v_sJFgo9H6zNo.mp4", clips["long_0.mp4"])
    vcg = root / "video_chatgpt"
    _write(vcg / "Test_Videos" / "v_Lf_7RurLgp0.mp4", clips["long_1.mp4"])
    qa = vcg / "Benchmarking_QA"
    _write(qa / "generic_qa.json", json.dumps([{"Q": "What happens in the video?", "A": "A man opens a door.",
                                               "video_name": "v_Lf_7RurLgp0"}]))
    _write(qa / "temporal_qa.json", json.dumps([{"Q": "What does he do first?", "A": "He walks to the door.",
                                                "video_name": "v_Lf_7RurLgp0"}]))
    _write(qa / "consistency_qa.json", json.dumps([{"Q1": "What does the man open?", "Q2": "Which thing does he open?",
                                                   "A": "A door.", "video_name": "v_Lf_7RurLgp0"}]))
