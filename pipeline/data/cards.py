"""Dataset cards: one YAML file per dataset, validated before anything reads the data.

    name: videochat2_it                      # unique; becomes the prefix of every sample key
    format: videochat2                       # llava | videochat2 | dpo
    annotation: ${DATA_ROOT}/videochat2/train.json
    media_root: ${DATA_ROOT}/videochat2/videos
    modality: video                          # image | video | multi_image | mixed
    weight: 1.0                              # default mixture weight (recipes may override)
    license: ...                             # free text, carried into the manifest
    description: ...                         # optional

Relative paths are relative to the card's folder; ``${NAME}`` is taken from the variables the
caller passes, then from the environment. Cards are data: read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from pipeline.data.records import VISUAL_MODALITIES
from pipeline.data.sources import READERS

FORMATS = tuple(READERS)  # a card's format names its annotation reader
CARD_MODALITIES = (*VISUAL_MODALITIES, "mixed")
REQUIRED = ("name", "format", "annotation", "media_root", "modality")
OPTIONAL = ("weight", "repeat", "license", "description")


class CardError(ValueError):
    """A dataset card that cannot be used; the message names the card file and the key."""


@dataclass(frozen=True)
class DatasetCard:
    name: str
    format: str
    annotation: Path
    media_root: Path
    modality: str
    weight: float
    license: str
    description: str
    source: Path  # the card file itself
    repeat: int = 1  # times its samples go into an epoch of the mixture (the authors' `repeat`)

    def check_paths(self) -> None:
        if not self.annotation.is_file():
            raise CardError(f"{self.source}: annotation file {self.annotation} does not exist")
        if not self.media_root.is_dir():
            raise CardError(f"{self.source}: media_root {self.media_root} is not a directory")

    def media_path(self, relative: str) -> Path:
        """A media path of an annotation record, refused if it leaves the media root."""
        try:
            return media_under_root(self.media_root, relative)
        except ValueError as error:
            raise CardError(f"{self.name}: {error}") from None


def media_under_root(root: Path, relative: str) -> Path:
    """``relative`` resolved under ``root``; ValueError when it is absolute or leaves ``root``
    (through ``..`` or a link). Annotation files are untrusted data: a record may not make us read
    a file outside the media root its card (or eval.media_root) names."""
    if Path(relative).is_absolute():
        raise ValueError(f"media path {relative!r} is absolute; it must be relative to the media root {root} and "
                         f"stay in it")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"media path {relative!r} resolves outside media_root {root}; it must be relative to the "
                         f"media root and stay in it")
    return resolved


def _expand(value: str, variables: Mapping[str, str], card: Path, key: str) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name in variables:
            return str(variables[name])
        if name in os.environ:
            return os.environ[name]
        raise CardError(f"{card}: '{key}' uses ${{{name}}}, which is neither a pipeline variable nor set in the "
                        f"environment (export {name}=... or fill the path in)")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", replace, value)


def load_card(path: str | Path, variables: Mapping[str, str] | None = None) -> DatasetCard:
    path = Path(path)
    variables = variables or {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise CardError(f"{path}: cannot read the card: {error}") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: a card is a YAML mapping of keys, got {type(data).__name__}")
    for key in data:
        if key not in REQUIRED + OPTIONAL:
            close = difflib.get_close_matches(str(key), REQUIRED + OPTIONAL, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CardError(f"{path}: unknown key '{key}'{hint}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [key for key in REQUIRED if data.get(key) in (None, "")]
    if missing:
        raise CardError(f"{path}: missing required key(s) {', '.join(missing)}")
    if data["format"] not in FORMATS:
        raise CardError(f"{path}: format '{data['format']}' is not one of {', '.join(FORMATS)}")
    if data["modality"] not in CARD_MODALITIES:
        raise CardError(f"{path}: modality '{data['modality']}' is not one of {', '.join(CARD_MODALITIES)}")
    if data["format"] == "dpo" and data["modality"] != "video":
        raise CardError(f"{path}: DPO pairs are video-only (paper §3.3); set modality: video")
    weight = data.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise CardError(f"{path}: weight must be a positive number, got {weight!r}")
    repeat = data.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise CardError(f"{path}: repeat must be a positive whole number, got {repeat!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(data["name"])):
        raise CardError(f"{path}: name {data['name']!r} may only hold letters, digits, '_', '.' and '-'")

    def location(key: str) -> Path:
        expanded = Path(_expand(str(data[key]), variables, path, key)).expanduser()
        return Path(os.path.normpath(expanded if expanded.is_absolute() else path.parent / expanded))

    return DatasetCard(
        name=str(data["name"]), format=data["format"], annotation=location("annotation"),
        media_root=location("media_root"), modality=data["modality"], weight=float(weight),
        license=str(data.get("license", "")), description=str(data.get("description", "")), source=path,
        repeat=repeat,
    )
