"""`python -m pipeline synth`: real MP4/JPEG files and annotations every reader accepts."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from pipeline.__main__ import main
from pipeline.data.cards import load_card
from pipeline.data.media import MediaError, PyAVDecoder, read_image, read_video
from pipeline.data.records import RecordError
from pipeline.data.sources import read_dpo, read_llava, read_videochat2, strict
from pipeline.data.synthetic import EVAL_FILES, SynthSettings, generate

pytestmark = pytest.mark.integration


def test_generated_data_reads_back_and_is_deterministic(tmp_path):
    settings = SynthSettings(seed=3, videos=4, images=3, multi_images=2, eval_questions=2, dpo_pairs=2, broken=1)
    counts = generate(tmp_path / "a", settings)
    assert counts == {"videos": 5, "images": 4, "multi_images": 2, "eval_questions": 6, "dpo_pairs": 2, "broken": 2}
    generate(tmp_path / "b", settings)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")

    root = tmp_path / "a"
    videos = list(strict(read_videochat2(root / "video_qa.json", "synthetic_video")))
    images = list(strict(read_llava(root / "image_conversations.json", "synthetic_image")))
    multi = list(strict(read_llava(root / "multi_image_conversations.json", "synthetic_multi_image")))
    pairs = list(strict(read_dpo(root / "dpo_pairs.jsonl", "synthetic_dpo")))
    assert [len(videos), len(images), len(multi), len(pairs)] == [5, 4, 2, 2]
    assert {s.modality for s in multi} == {"multi_image"} and all(len(s.media) == 3 for s in multi)

    good_videos = [s for s in videos if "broken" not in s.media[0]]
    frames = read_video((root / "media" / good_videos[0].media[0]).read_bytes(), 8, True, good_videos[0].key,
                        video_decoder=PyAVDecoder())
    assert frames.shape == (8, 64, 64, 3)
    with pytest.raises(MediaError):
        read_video((root / "media/videos/broken_0000.mp4").read_bytes(), 8, True, "broken")
    with pytest.raises(MediaError):
        read_image((root / "media/images/broken_0000.jpg").read_bytes(), "broken")

    # Answers depend on the question: the shape asked about is the one in the answer.
    for sample in (videos[0], images[0], multi[0]):
        question, answer = sample.turns[0].content, sample.turns[1].content
        shape = question.split("the ")[-1].rstrip("?")
        assert answer.startswith(f"The {shape} is ")
    # One multiple-choice file per modality, four options, the others' colours among the wrong ones.
    for modality, name in EVAL_FILES.items():
        records = json.loads((root / name).read_text())
        assert len(records) == 2 and all(len(r["options"]) == 4 and r["answer"] in "ABCD" for r in records)
        assert ("video" if modality == "video" else "image") in records[0]
    assert len(json.loads((root / "eval_multi_image.json").read_text())[0]["image"]) == 3
    assert sorted(p.name for p in (root / "cards").iterdir()) == [
        "synthetic_dpo.yaml", "synthetic_image.yaml", "synthetic_multi_image.yaml", "synthetic_video.yaml"]
    assert not isinstance(pairs[0], RecordError) and pairs[0].chosen != pairs[0].rejected


def _tree_bytes(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_videos_are_a_function_of_the_seed_byte_for_byte(tmp_path):
    """The same seed gives the same MP4 bytes, in this process (torch imported) and in a fresh one
    that never imports torch: x264 without mbtree and with one thread is deterministic. Enough clips
    that the old setting (mbtree on: about one clip in seven differed) would fail this."""
    settings = SynthSettings(seed=5, videos=24, images=0, multi_images=0, eval_questions=0, dpo_pairs=0)
    generate(tmp_path / "here", settings)
    generate(tmp_path / "again", settings)
    script = ("import sys; from pipeline.data.synthetic import EVAL_FILES, SynthSettings, generate; "
              "generate(sys.argv[1], SynthSettings(seed=5, videos=24, images=0, multi_images=0, eval_questions=0, "
              "dpo_pairs=0)); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "fresh")], check=True, cwd=REPO_ROOT)
    here = _tree_bytes(tmp_path / "here")
    assert len([name for name in here if name.endswith(".mp4")]) == 24
    assert here == _tree_bytes(tmp_path / "again") == _tree_bytes(tmp_path / "fresh")


def test_synth_command_writes_cards_that_validate(tmp_path, capsys):
    assert main(["synth", str(tmp_path), "--videos", "2", "--images", "1", "--multi-images", "1",
                 "--eval-questions", "1", "--dpo-pairs", "1"]) == 0
    assert "wrote 2 videos" in capsys.readouterr().out
    for card_file in sorted((tmp_path / "cards").glob("*.yaml")):
        card = load_card(card_file)
        card.check_paths()
        assert card.annotation.parent == tmp_path
