"""CLIP text tower with its context stretched from 77 to 248 positions (paper eq.4, asymmetric).

CLIP's early positional embeddings are the best trained (short captions dominate its data), so
the first ``keep`` rows are copied untouched and only the rest is interpolated, four new rows per
old gap. During training the copied rows stay frozen and only the stretched rows learn; the two
live in separate parameters so that no optimizer (weight decay included) can move the frozen ones.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel


def extend_positions(weight: torch.Tensor, keep: int = 20, factor: int = 4) -> torch.Tensor:
    """Stretch a ``[L, D]`` positional table to ``[keep + factor * (L - keep), D]``.

    Row ``keep + factor*i + k`` is ``old[keep+i] + k/factor * (old[keep+i+1] - old[keep+i])``;
    the row after the last one, ``old[L]``, is extrapolated as ``2*old[L-1] - old[L-2]``.
    With CLIP's 77 rows and the defaults this gives the paper's 248.
    """
    length, dim = weight.shape
    if not 2 <= keep + 1 <= length or factor < 1:
        raise ValueError(f"cannot extend {length} positions keeping {keep} with factor {factor}")
    table = weight.detach().float()
    starts = table[keep:]
    extrapolated = 2 * table[-1] - table[-2]
    ends = torch.cat([table[keep + 1 :], extrapolated[None]], dim=0)
    fractions = torch.arange(factor, dtype=table.dtype, device=table.device) / factor
    stretched = starts[:, None, :] + fractions[None, :, None] * (ends - starts)[:, None, :]
    extended = torch.cat([table[:keep], stretched.reshape(-1, dim)], dim=0)
    return extended.to(weight.dtype)


def extended_length(original_length: int, keep: int = 20, factor: int = 4) -> int:
    return keep + factor * (original_length - keep)


class SplitPositionEmbedding(nn.Module):
    """Positional table made of a frozen head (rows < keep) and a trainable tail (rows >= keep).

    The head is a persistent *buffer*: saved and loaded with the model, but invisible to
    optimizers, requires_grad switches and ZeRO partitioning, so nothing can ever train it.
    """

    def __init__(self, num_positions: int, dim: int, keep: int) -> None:
        super().__init__()
        if not 0 < keep < num_positions:
            raise ValueError(f"keep={keep} must be inside (0, {num_positions})")
        self.register_buffer("frozen_head", torch.zeros(keep, dim), persistent=True)
        self.trainable_tail = nn.Parameter(torch.zeros(num_positions - keep, dim))

    @property
    def weight(self) -> torch.Tensor:
        # transformers' CLIP code reads `position_embedding.weight.shape[0]` as the context length.
        return torch.cat([self.frozen_head.to(self.trainable_tail.dtype), self.trainable_tail], dim=0)

    def load_table(self, table: torch.Tensor) -> None:
        keep = self.frozen_head.shape[0]
        with torch.no_grad():
            self.frozen_head.copy_(table[:keep])
            self.trainable_tail.copy_(table[keep:])

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(position_ids, self.weight)


class ExtendedCLIPTextModel(CLIPTextModel):
    """transformers' CLIPTextModel whose position table is a :class:`SplitPositionEmbedding`.

    ``config.max_position_embeddings`` is the *extended* length (248); ``keep_positions`` rows
    are frozen. Attention and masks are transformers' own code; the text feature is read with
    :meth:`end_token_states`, not transformers' ``pooler_output``.
    """

    def __init__(self, config: CLIPTextConfig, keep_positions: int = 20) -> None:
        super().__init__(config)
        self.embeddings.position_embedding = SplitPositionEmbedding(
            config.max_position_embeddings, config.hidden_size, keep_positions
        )
        nn.init.normal_(self.embeddings.position_embedding.frozen_head, std=0.01)
        nn.init.normal_(self.embeddings.position_embedding.trainable_tail, std=0.01)

    def end_token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final (layer-normed) hidden state at each row's end token, [B, hidden]: the last attended
        position (inputs are [BOS] text [EOS] plus padding), or the last position without a mask.

        Not ``pooler_output``: for a config carrying the legacy ``eos_token_id`` 2 (OpenAI's CLIP
        checkpoints, or any tokenizer whose end token is id 2) transformers pools at
        ``argmax(input_ids)``, which is the end token only for CLIP's own vocabulary (its end token
        has the highest id) and an arbitrary prompt token for any other. By position, both agree.
        """
        hidden = self(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        if attention_mask is None:
            ends = positions[-1].expand(rows)
        else:
            ends = (positions * (attention_mask != 0)).amax(dim=-1)
        return hidden[torch.arange(rows, device=hidden.device), ends.to(hidden.device)]

    def load_from_clip(self, source: CLIPTextModel, keep: int, factor: int) -> None:
        """Copy a (77-position) CLIP text tower into this one, stretching its positions by eq.4."""
        state = {k: v for k, v in source.state_dict().items() if "position_embedding" not in k}
        missing, unexpected = self.load_state_dict(state, strict=False)
        positional = [k for k in missing if "position_embedding" not in k]
        if positional or unexpected:
            raise ValueError(f"CLIP text weights do not fit: missing {positional}, unexpected {unexpected}")
        table = extend_positions(source.embeddings.position_embedding.weight, keep=keep, factor=factor)
        if table.shape[0] != self.config.max_position_embeddings:
            raise ValueError(
                f"extending {source.config.max_position_embeddings} positions gives {table.shape[0]}, "
                f"but the PPLLaVA config asks for clip_context_length={self.config.max_position_embeddings}"
            )
        self.embeddings.position_embedding.load_table(table)
