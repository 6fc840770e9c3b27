"""PPLLaVAForConditionalGeneration: CLIP ViT -> projector -> prompt-guided pooling -> LLM.

One forward takes an *interleaved* batch: samples of different modalities and frame counts are
mixed, their frames packed into one flat ``pixel_values`` [F, 3, S, S] with ``frame_counts`` [B]
saying how many belong to each sample, in order. The vision tower runs once over all F frames;
each sample is then pooled with its own kernel, guided by its own CLIP text (eq.1-3), and its
pooled tokens replace that sample's image-token placeholders in the LLM input (the processor
expands each placeholder to exactly the pooled token count, so shapes are known before the
forward and labels line up).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from ppllava.bt_adapter import BTAdapter, ZeroInitLinear
from ppllava.clip_text import ExtendedCLIPTextModel
from ppllava.config import IGNORE_INDEX, IMAGE, MULTI_IMAGE, MODALITY_NAMES, TEXT, VIDEO, PPLLaVAConfig
from ppllava.pooling import pool_tokens, relevance
from ppllava.processing import image_grid, unpadded_window


class PPLLaVAMultiModalProjector(nn.Module):
    """LLaVA-NeXT's MLP (same parameter names, so its weights load as they are)."""

    def __init__(self, config: PPLLaVAConfig) -> None:
        super().__init__()
        vision, llm = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision, llm, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(llm, llm, bias=config.multimodal_projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class PPLLaVAPreTrainedModel(PreTrainedModel):
    config_class = PPLLaVAConfig
    config: PPLLaVAConfig
    base_model_prefix = "ppllava"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "TemporalAdapterLayer", "SpatialAdapterLayer", "LlamaDecoderLayer",
                         "MistralDecoderLayer", "Qwen2DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PPLLaVAForConditionalGeneration):
            with torch.no_grad():
                module.image_newline.normal_(0.0, 1 / math.sqrt(self.config.text_config.hidden_size))
                module.logit_scale.fill_(self.config.logit_scale_init_value)
        elif isinstance(module, ZeroInitLinear):
            with torch.no_grad():  # the temporal block's output: an untrained one leaves its input unchanged
                module.weight.zero_()
                module.bias.zero_()
        elif isinstance(module, BTAdapter):
            with torch.no_grad():
                module.cls_token.zero_()


def import_submodel_classes(config: PPLLaVAConfig) -> None:
    """Import the vision tower's and the LLM's transformers modules now, before any ``zero.Init``.

    A transformers modeling module imported for the first time inside ``deepspeed.zero.Init``
    (ZeRO-3 construction) loses the ``__init__`` that the ``kernels`` package's
    ``use_kernelized_func`` installs on its attention class: DeepSpeed wraps the class as it is
    created, the decorator then wraps DeepSpeed's wrapper, and DeepSpeed's exit restores the
    original it saved first. The model built inside works; the *next* one built in the process
    (DPO's live reference, an export after ZeRO-3 training) fails with "'LlamaAttention' object
    has no attribute '_kernel_funcs'". Resolving the auto classes imports the modules first.
    """
    AutoModel._model_mapping[type(config.vision_config)]
    AutoModelForCausalLM._model_mapping[type(config.text_config)]


def clip_lengths(frame_counts: list[int], modalities: list[int]) -> list[int]:
    """How the frames of a batch group into clips for the BT-Adapter's attention over time: a
    video's frames and a multi-image sample's images are one clip each, every tile of an image its
    own clip of one frame (the authors' code passes images to the vision tower one tile at a time)."""
    lengths: list[int] = []
    for count, modality in zip(frame_counts, modalities):
        if count:
            lengths.extend([1] * count if modality == IMAGE else [count])
    return lengths


class PPLLaVAForConditionalGeneration(PPLLaVAPreTrainedModel, GenerationMixin):
    @classmethod
    def _from_config(cls, config: PPLLaVAConfig, **kwargs):
        import_submodel_classes(config)
        return super()._from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        config = kwargs.get("config")
        if not isinstance(config, PPLLaVAConfig):  # read config.json once more: kwargs may override its keys
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
        import_submodel_classes(config)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def __init__(self, config: PPLLaVAConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.bt_adapter = (BTAdapter(config.vision_config, config.bt_adapter_depth, config.bt_adapter_max_frames,
                                     config.bt_adapter_drop_path) if config.bt_adapter_depth else None)
        self.multi_modal_projector = PPLLaVAMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.clip_text = ExtendedCLIPTextModel(config.clip_text_config, keep_positions=config.clip_keep_positions)
        # CLIP's projections into the joint space: only used to score relevance (eq.1).
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.clip_text_config.hidden_size, config.projection_dim, bias=False)
        # CLIP's log temperature (eq.1's tau = exp). A buffer: the official code never trains it.
        self.register_buffer("logit_scale", torch.tensor(config.logit_scale_init_value), persistent=True)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # -- plumbing transformers expects ------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # -- vision side ----------------------------------------------------------------------------
    def encode_frames(
        self, pixel_values: torch.Tensor, clip_lengths: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All frames at once -> (projected features [F, P, D_llm], CLIP visual embeds [F, P, D_clip]).

        Patch tokens of ``vision_feature_layer`` (penultimate by default), CLS dropped, with the
        BT-Adapter mixed in when the config has one (``clip_lengths`` then groups the F frames
        into clips: a video's frames, a multi-image sample's images, or one image tile each;
        default: every frame alone). The projector runs *before* pooling (paper Fig.2, official
        code); the relevance branch goes through CLIP's post-layernorm and visual projection as
        CLIP itself would.
        """
        pixel_values = pixel_values.to(dtype=self.vision_tower.dtype)
        outputs = self.vision_tower(pixel_values, output_hidden_states=True)
        index = self.config.vision_feature_layer % len(outputs.hidden_states)
        if self.bt_adapter is None:
            states = outputs.hidden_states[index]
        else:
            lengths = [1] * pixel_values.shape[0] if clip_lengths is None else clip_lengths
            position_embedding = self.vision_tower.embeddings.position_embedding
            states = self.bt_adapter.features(outputs.hidden_states, index, lengths, position_embedding)
        patches = states[:, 1:]
        projected = self.multi_modal_projector(patches)
        clip_visual = self.visual_projection(self.vision_tower.post_layernorm(patches))
        return projected, clip_visual

    def encode_prompts(self, clip_input_ids: torch.Tensor, clip_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """CLIP text feature of each sample's prompt: end token's state -> text projection, [B, D_clip]."""
        return self.text_projection(self.clip_text.end_token_states(clip_input_ids, clip_attention_mask))

    def pooling_geometry(self, modality: int, kernel_override: torch.Tensor | None):
        kernel, stride = self.config.pooling_geometry(modality)
        if kernel_override is not None and int(kernel_override.sum()) > 0:
            kernel = tuple(int(k) for k in kernel_override.tolist())
            stride = kernel
        return kernel, stride

    def visual_tokens(
        self,
        pixel_values: torch.Tensor,
        frame_counts: torch.Tensor,
        modalities: torch.Tensor,
        clip_input_ids: torch.Tensor,
        clip_attention_mask: torch.Tensor | None = None,
        pool_kernels: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Pooled visual tokens of every sample, [N_i, D_llm] each (N_i = 0 for text-only samples).

        ``pool_kernels`` [B, 3] overrides the configured kernel (stride = kernel) per sample, e.g.
        64 test frames with (4, 3, 3) (paper Table 8); a row of zeros keeps the configured one.
        """
        counts = [int(c) for c in frame_counts.tolist()]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(f"frame_counts sum to {sum(counts)} but pixel_values holds {pixel_values.shape[0]} frames")
        projected, clip_visual = self.encode_frames(pixel_values, clip_lengths(counts, modalities.tolist()))
        prompts = self.encode_prompts(clip_input_ids, clip_attention_mask)
        side = self.config.patches_per_side
        tokens, start = [], 0
        for index, count in enumerate(counts):
            modality = int(modalities[index])
            if count == 0 or modality == TEXT:
                if count:
                    raise ValueError(f"sample {index} is text-only but has {count} frames")
                tokens.append(projected.new_zeros(0, projected.shape[-1]))
                continue
            frames = slice(start, start + count)
            start += count
            scores = relevance(clip_visual[frames].reshape(1, -1, clip_visual.shape[-1]), prompts[index : index + 1], self.logit_scale)
            features = projected[frames].reshape(1, count, side, side, -1)
            kernel, stride = self.pooling_geometry(modality, None if pool_kernels is None else pool_kernels[index])
            # The Table 7 ablations are about video; images always use the weighted pool.
            mode = self.config.pooling_mode if modality == VIDEO else "weighted"
            if modality == IMAGE and image_sizes is None:
                raise ValueError(f"sample {index} is an image: pass image_sizes [B, 2] (height, width of each image)")
            pooled = pool_tokens(
                features,
                scores.reshape(1, count, side, side).to(features.dtype),
                kernel,
                stride,
                self.config.window_temperature,
                mode,
                self.config.second_video_kernel,
            )[0]
            if modality == IMAGE:
                pooled = self._arrange_image(pooled, count, image_sizes[index])
            tokens.append(pooled)
        return tokens

    def _arrange_image(self, pooled: torch.Tensor, tiles: int, image_size: torch.Tensor) -> torch.Tensor:
        """Base view's tokens, then the grid tiles as one mosaic without the padding, a newline
        token after every row (LLaVA-NeXT's layout, at the pooled resolution)."""
        pooled = pooled.reshape(tiles, -1, pooled.shape[-1])
        per_tile = pooled.shape[1]
        side = math.isqrt(per_tile)
        base, grid = pooled[0], pooled[1:]
        rows, cols = image_grid(image_size.tolist(), self.config)
        if rows * cols != tiles - 1:
            raise ValueError(f"an image of size {image_size.tolist()} has 1 + {rows}x{cols} tiles, got {tiles}")
        mosaic = grid.reshape(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
        top, bottom, left, right = unpadded_window(image_size.tolist(), (rows * side, cols * side))
        mosaic = mosaic[top:bottom, left:right]
        if self.config.use_image_newline:
            newline = self.image_newline.to(mosaic.dtype).expand(mosaic.shape[0], 1, -1)
            mosaic = torch.cat([mosaic, newline], dim=1)
        return torch.cat([base, mosaic.reshape(-1, mosaic.shape[-1])], dim=0)

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        frame_counts: torch.LongTensor | None = None,
        modalities: torch.LongTensor | None = None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        pool_kernels: torch.LongTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        visual_rows: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """LM forward; with ``pixel_values`` the pooled visual tokens fill the image-token slots.

        ``visual_rows`` [rows] says which visual sample fills each row of ``input_ids`` (default:
        row i takes sample i). DPO passes [0..B-1, 0..B-1]: the chosen and the rejected answer of a
        pair share one vision pass and one pooling.

        Visual inputs are only needed on the prefill step of ``generate`` (transformers drops
        ``pixel_values`` afterwards, and without them the call is a plain LM step).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            placeholders = input_ids == self.config.image_token_index
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
            # A text-only batch from the collate carries an empty [0, 3, S, S] pixel tensor.
            has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
            if has_pixels:
                visual = self.visual_tokens(pixel_values, frame_counts, modalities, clip_input_ids, clip_attention_mask,
                                            pool_kernels, image_sizes)
                if visual_rows is not None:
                    visual = [visual[index] for index in visual_rows.tolist()]
                inputs_embeds = self._splice_visual_tokens(input_ids, inputs_embeds, placeholders, visual)
            elif bool(placeholders.any()) and kwargs.get("cache") is None:
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
            if self.training:
                inputs_embeds = self._keep_every_parameter_in_the_graph(inputs_embeds, has_pixels, modalities)
            if labels is not None:
                labels = labels.masked_fill(placeholders, IGNORE_INDEX)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )

    def _keep_every_parameter_in_the_graph(
        self, embeds: torch.Tensor, ran_vision: bool, modalities: torch.Tensor | None
    ) -> torch.Tensor:
        """Add zero times every otherwise-unused path to the embeddings.

        In data-parallel training each rank must produce a gradient for every trainable
        parameter in every step, and under ZeRO-3 each rank must call every module: a
        micro-batch with no image (image newline unused) or no visual input at all (vision,
        projector and CLIP text unused) on one rank only would leave the ranks' collectives
        disagreeing. One dummy frame through the vision path costs little next to the LLM.
        """
        anchor = embeds.new_zeros(())
        if not ran_vision:
            size = self.config.vision_config.image_size
            projected, clip_visual = self.encode_frames(embeds.new_zeros(1, 3, size, size))
            eos = self.config.clip_text_config.eos_token_id
            prompt = self.encode_prompts(torch.full((1, 1), eos, device=embeds.device), None)
            anchor = anchor + projected.sum() + clip_visual.sum() + prompt.sum()
        newline_used = ran_vision and modalities is not None and bool((modalities == IMAGE).any())
        if self.config.use_image_newline and not newline_used:
            anchor = anchor + self.image_newline.sum()
        return embeds + 0.0 * anchor.to(embeds.dtype)

    def _splice_visual_tokens(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, placeholders: torch.Tensor, tokens: list[torch.Tensor]
    ) -> torch.Tensor:
        expected = placeholders.sum(dim=1).tolist()
        if len(tokens) != len(expected):
            raise ValueError(f"{len(tokens)} samples of visual inputs for a batch of {len(expected)} sequences")
        for index, (slots, visual) in enumerate(zip(expected, tokens)):
            if slots != visual.shape[0]:
                raise ValueError(
                    f"sample {index}: {slots} image-token slots in input_ids but its visual input pools to "
                    f"{visual.shape[0]} tokens; expand placeholders with the processor of this config"
                )
        visual = torch.cat(tokens, dim=0).to(embeds.dtype)
        return embeds.masked_scatter(placeholders[..., None].expand_as(embeds), visual)

    # -- trainable parts --------------------------------------------------------------------------
    def set_trainable_parts(
        self, vision: bool = False, projector: bool = True, clip_text: bool = True, llm: bool = True,
        clip_projections: bool | None = None, bt_adapter: bool = False,
    ) -> None:
        """Paper settings: SFT trains projector + CLIP text + LLM; DPO trains the LLM only.

        The BT-Adapter (when the config has one) follows ``bt_adapter`` (the authors train it in
        SFT, not in DPO), except its layers past ``vision_feature_layer``: they cannot change the
        features, get no gradient and stay frozen.

        The CLIP text tower's first ``clip_keep_positions`` positional rows never train (they are
        a buffer, not a parameter); its stretched rows and layers follow ``clip_text``. CLIP's two
        projections (they score relevance) follow ``clip_projections`` (None: as ``clip_text``);
        the authors' released code trains them with the tower frozen (``clip_text=False,
        clip_projections=True``). CLIP's temperature is a buffer and never trains, as in the
        official code: eq.1 stays as sharp as CLIP was trained to be.
        """
        projections = clip_text if clip_projections is None else clip_projections
        parts = {
            "vision_tower": vision,
            "multi_modal_projector": projector,
            "image_newline": projector,
            "clip_text": clip_text,
            "visual_projection": projections,
            "text_projection": projections,
            "language_model": llm,
            "bt_adapter": bt_adapter,
        }
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(parts[name.split(".")[0]])
        if self.bt_adapter is not None:
            layers = self.config.vision_config.num_hidden_layers
            used = self.bt_adapter.layers_used(layers, self.config.vision_feature_layer % (layers + 1))
            for unreachable in (*self.bt_adapter.temporal_layers[used:], *self.bt_adapter.spatial_layers[used:]):
                unreachable.requires_grad_(False)

    def init_bt_adapter_from_vision_tower(self) -> None:
        """The authors' starting point for a new adapter: each spatial block a copy of the CLIP
        layer it runs beside (the last ``depth`` ones); temporal blocks as initialised (their
        output linear at zero, so the untrained adapter adds no temporal mixing)."""
        clip_layers = self.vision_tower.encoder.layers
        for spatial, clip_layer in zip(self.bt_adapter.spatial_layers, clip_layers[-self.bt_adapter.depth:]):
            spatial.load_state_dict(clip_layer.state_dict())  # same parameter names; strict

    def trainable_parts(self) -> dict[str, bool]:
        """Which top-level parts have any parameter that requires grad."""
        parts: dict[str, bool] = {}
        for name, parameter in self.named_parameters():
            part = name.split(".")[0]
            parts[part] = parts.get(part, False) or parameter.requires_grad
        return parts


__all__ = ["PPLLaVAForConditionalGeneration", "PPLLaVAPreTrainedModel", "MODALITY_NAMES", "IMAGE", "MULTI_IMAGE", "VIDEO", "TEXT"]
