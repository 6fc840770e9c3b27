"""Dataset cards: every shipped card validates; bad cards name the file and the key."""

from pathlib import Path

import pytest

from pipeline.data.cards import CardError, load_card

pytestmark = pytest.mark.unit

SHIPPED = sorted((Path(__file__).resolve().parents[2] / "datasets").glob("*.yaml"))


@pytest.mark.parametrize("card", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_cards_validate(card):
    loaded = load_card(card, {"DATA_ROOT": "/data", "SYNTH_DIR": "/synth"})
    assert loaded.name == card.stem and loaded.annotation.is_absolute()


def write(tmp_path, text):
    path = tmp_path / "card.yaml"
    path.write_text(text)
    return path


GOOD = "name: demo\nformat: videochat2\nannotation: ann.json\nmedia_root: media\nmodality: video\n"


def test_relative_paths_and_variables(tmp_path, monkeypatch):
    card = load_card(write(tmp_path, GOOD))
    assert card.annotation == tmp_path / "ann.json" and card.weight == 1.0
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "env"))
    card = load_card(write(tmp_path, GOOD.replace("ann.json", "${DATA_ROOT}/a.json")))
    assert card.annotation == tmp_path / "env" / "a.json"
    card = load_card(write(tmp_path, GOOD.replace("ann.json", "${DATA_ROOT}/a.json")), {"DATA_ROOT": "/given"})
    assert card.annotation == Path("/given/a.json")


@pytest.mark.parametrize("text,message", [
    (GOOD + "wieght: 2\n", "unknown key 'wieght' (did you mean 'weight'?)"),
    (GOOD.replace("format: videochat2", "format: csv"), "format 'csv' is not one of llava, videochat2, dpo"),
    (GOOD.replace("modality: video", "modality: audio"), "modality 'audio' is not one of"),
    (GOOD + "weight: -1\n", "weight must be a positive number"),
    (GOOD.replace("name: demo\n", ""), "missing required key(s) name"),
    (GOOD.replace("ann.json", "${NOT_SET_ANYWHERE}/a.json"), "'annotation' uses ${NOT_SET_ANYWHERE}"),
    (GOOD.replace("format: videochat2", "format: dpo").replace("modality: video", "modality: image"), "video-only"),
    ("- a list\n", "a card is a YAML mapping"),
    ("name: [unclosed\n", "cannot read the card"),
])
def test_bad_cards_are_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(CardError) as error:
        load_card(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_media_paths_cannot_escape_the_root(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "ann.json").write_text("[]")
    card = load_card(write(tmp_path, GOOD))
    card.check_paths()
    assert card.media_path("videos/a.mp4") == (tmp_path / "media/videos/a.mp4").resolve()
    with pytest.raises(CardError, match="resolves outside media_root"):
        card.media_path("../../etc/passwd")
    with pytest.raises(CardError, match="is absolute"):
        card.media_path("/etc/passwd")
    (tmp_path / "ann.json").unlink()
    with pytest.raises(CardError, match="annotation file .* does not exist"):
        card.check_paths()
