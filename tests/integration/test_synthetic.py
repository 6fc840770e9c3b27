"""`python -m pipeline synth`: real MP4/JPEG files and annotations every reader accepts."""

import json

import pytest

from pipeline.__main__ import main
from pipeline.data.cards import load_card
from pipeline.data.media import MediaError, PyAVDecoder, read_image, read_video
from pipeline.data.records import RecordError
from pipeline.data.sources import read_dpo, read_llava, read_videochat2, strict
from pipeline.data.synthetic import SynthSettings, generate

pytestmark = pytest.mark.integration


def test_generated_data_reads_back_and_is_deterministic(tmp_path):
    settings = SynthSettings(seed=3, videos=4, images=3, multi_images=2, eval_questions=2, dpo_pairs=2, broken=1)
    counts = generate(tmp_path / "a", settings)
    assert counts == {"videos": 5, "images": 4, "multi_images": 2, "eval_questions": 2, "dpo_pairs": 2, "broken": 2}
    generate(tmp_path / "b", settings)
    for name in ("video_qa.json", "image_conversations.json", "dpo_pairs.jsonl", "media/images/image_0001.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # x264's low bits follow the process's floating-point state, so compare decoded frames.
    first, second = (read_video((tmp_path / d / "media/videos/video_0001.mp4").read_bytes(), 16, False, "v")
                     for d in ("a", "b"))
    assert abs(first.astype(int) - second.astype(int)).mean() < 1.0

    root = tmp_path / "a"
    videos = list(strict(read_videochat2(root / "video_qa.json", "synthetic_video")))
    images = list(strict(read_llava(root / "image_conversations.json", "synthetic_image")))
    multi = list(strict(read_llava(root / "multi_image_conversations.json", "synthetic_multi_image")))
    pairs = list(strict(read_dpo(root / "dpo_pairs.jsonl", "synthetic_dpo")))
    assert [len(videos), len(images), len(multi), len(pairs)] == [5, 4, 2, 2]
    assert {s.modality for s in multi} == {"multi_image"} and all(2 <= len(s.media) <= 4 for s in multi)

    good_videos = [s for s in videos if "broken" not in s.media[0]]
    frames = read_video((root / "media" / good_videos[0].media[0]).read_bytes(), 8, True, good_videos[0].key,
                        video_decoder=PyAVDecoder())
    assert frames.shape == (8, 64, 64, 3)
    with pytest.raises(MediaError):
        read_video((root / "media/videos/broken_0000.mp4").read_bytes(), 8, True, "broken")
    with pytest.raises(MediaError):
        read_image((root / "media/images/broken_0000.jpg").read_bytes(), "broken")

    # Answers depend on the question: the colour asked about is the one in the answer.
    question, answer = videos[0].turns[0].content, videos[0].turns[1].content
    shape = question.split("the ")[-1].rstrip("?")
    assert answer.startswith(f"The {shape} is ")
    choice = json.loads((root / "eval_multiple_choice.json").read_text())[0]
    assert len(choice["options"]) == 4 and choice["answer"] in "ABCD"
    assert sorted(p.name for p in (root / "cards").iterdir()) == [
        "synthetic_dpo.yaml", "synthetic_image.yaml", "synthetic_multi_image.yaml", "synthetic_video.yaml"]
    assert not isinstance(pairs[0], RecordError) and pairs[0].chosen != pairs[0].rejected


def test_synth_command_writes_cards_that_validate(tmp_path, capsys):
    assert main(["synth", str(tmp_path), "--videos", "2", "--images", "1", "--multi-images", "1",
                 "--eval-questions", "1", "--dpo-pairs", "1"]) == 0
    assert "wrote 2 videos" in capsys.readouterr().out
    for card_file in sorted((tmp_path / "cards").glob("*.yaml")):
        card = load_card(card_file)
        card.check_paths()
        assert card.annotation.parent == tmp_path
