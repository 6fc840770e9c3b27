"""The two record kinds every source produces, and the error that names a bad one."""

from __future__ import annotations

from dataclasses import dataclass, field

# Modality names as annotations, manifests and recipes write them (ppllava.config.MODALITY_NAMES
# maps the model's integer ids to the same names).
MODALITIES = ("text", "image", "multi_image", "video")
# The visual modalities SFT mixes: data.weights keys, shard streams.
VISUAL_MODALITIES = ("video", "image", "multi_image")
IMAGE_PLACEHOLDER = "<image>"


class RecordError(ValueError):
    """A malformed annotation record: says which file, which line or index, and why."""

    def __init__(self, file: str, location: str, reason: str) -> None:
        super().__init__(f"{file}, {location}: {reason}")
        self.file, self.location, self.reason = file, location, reason


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    content: str


@dataclass
class Sample:
    """An instruction-tuning sample. ``media`` holds paths relative to the card's media root:
    one for an image or a video, several for multi-image, none for text. The first user turn
    carries one ``<image>`` placeholder per visual input (one for a video). ``system``: the
    sample's own system text (a VideoChat2 instruction), which replaces the template's."""

    key: str
    modality: str
    media: list[str]
    turns: list[Turn]
    dataset: str = ""
    system: str = ""
    bounds: list[float] | None = None  # a video's (start, end) in seconds: only that part is sampled

    def to_json(self) -> dict:
        return {"key": self.key, "modality": self.modality, "media": self.media, "dataset": self.dataset,
                "system": self.system, "bounds": self.bounds,
                "turns": [{"role": t.role, "content": t.content} for t in self.turns]}

    @classmethod
    def from_json(cls, data: dict) -> "Sample":
        return cls(data["key"], data["modality"], list(data["media"]),
                   [Turn(t["role"], t["content"]) for t in data["turns"]], data.get("dataset", ""),
                   data.get("system", ""), data.get("bounds"))


@dataclass
class PreferencePair:
    """A DPO pair on one video (LLaVA-Hound style)."""

    key: str
    video: str
    prompt: str
    chosen: str
    rejected: str
    dataset: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"key": self.key, "video": self.video, "prompt": self.prompt, "chosen": self.chosen,
                "rejected": self.rejected, "dataset": self.dataset}

    modality = "video"  # LLaVA-Hound pairs are video-only (a card of format dpo must say so)

    @classmethod
    def from_json(cls, data: dict) -> "PreferencePair":
        return cls(data["key"], data["video"], data["prompt"], data["chosen"], data["rejected"], data.get("dataset", ""))
