"""The authors' released checkpoints: converted into our model, the same logits as their forward.

The reference below is the authors' forward written out step by step from reading their code
(clip_btadapter.py: forward_patch, forward_BTAdapter, input_ini, CLIPLayer_AttnTime,
CLIPLayer_Spatial, get_combined_embedding; llava_projector.py: LLaVACLIP3DMultiModalProjector;
utils.py: weighted_adaptive_avg_pool3d_unfold; llava_interleave_meta.py: encode_image,
encode_video), on the raw tensors of a checkpoint in their layout, with their own tensor layouts
((b t), (p t), (l t)). Only the LLM is transformers' Llama, as in theirs.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from authors_layout import write_authors_checkpoint
from conftest import build_batch
from ppllava import IMAGE, MULTI_IMAGE, VIDEO, PPLLaVAConfig
from ppllava.authors import AuthorsCheckpointError, is_authors_checkpoint
from ppllava.convert import from_authors

pytestmark = pytest.mark.unit

V, P = "vision_tower.vision_model.", "multi_modal_projector."
SAMPLES = [(VIDEO, 8), (IMAGE, 3), (MULTI_IMAGE, 3)]


class AuthorsReference:
    """Their model's forward on their tensors ``w`` (eval mode: drop path off)."""

    def __init__(self, w: dict, config: dict, clip_config: dict):
        self.w, self.config = w, config
        self.vision = config["vision_config"]
        self.text = clip_config["text_config"]
        self.depth = config["btadapter_depth"] if config["btadapter"] else 0
        llm = LlamaForCausalLM(LlamaConfig(**config["text_config"]))
        llm.load_state_dict({k[len("language_model."):]: v for k, v in w.items() if k.startswith("language_model.")})
        self.llm = llm.eval()

    # -- CLIP building blocks (transformers 4.4x CLIP, written out) ------------------------------
    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], 1e-5)

    def linear(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def attention(self, x, name, heads, causal=False):
        n, length, width = x.shape
        split = lambda t: t.reshape(n, length, heads, width // heads).transpose(1, 2)  # noqa: E731
        q = split(self.linear(x, name + ".q_proj") * (width // heads) ** -0.5)
        k, v = split(self.linear(x, name + ".k_proj")), split(self.linear(x, name + ".v_proj"))
        scores = q @ k.transpose(-1, -2)
        if causal:
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
        return self.linear(out, name + ".out_proj")

    def mlp(self, x, name):
        hidden = self.linear(x, name + ".fc1")
        return self.linear(hidden * torch.sigmoid(1.702 * hidden), name + ".fc2")  # quick_gelu

    def clip_layer(self, x, name, heads, causal=False):
        x = x + self.attention(self.ln(x, name + ".layer_norm1"), name + ".self_attn", heads, causal)
        return x + self.mlp(self.ln(x, name + ".layer_norm2"), name + ".mlp")

    # -- CLIPVisionTransformer_BTAdapter ----------------------------------------------------------
    def vision_states(self, pixels, T):
        w, heads = self.w, self.vision["num_attention_heads"]
        patch = F.conv2d(pixels, w[V + "embeddings.patch_embedding.weight"], stride=self.vision["patch_size"])
        patch = patch.flatten(2).transpose(1, 2)
        x = torch.cat([w[V + "embeddings.class_embedding"].expand(pixels.shape[0], 1, -1), patch], dim=1)
        x = self.ln(x + w[V + "embeddings.position_embedding.weight"], V + "pre_layrnorm")
        total, x2, states = self.vision["num_hidden_layers"], None, []
        for idx in range(total):
            states.append(x if x2 is None else self.combined(x, x2, T))
            x = self.clip_layer(x, f"{V}encoder.layers.{idx}", heads)
            if self.depth and idx >= total - self.depth:
                x2 = self.bt_adapter(x, x2, idx + self.depth - total, T)
        states.append(x if x2 is None else self.combined(x, x2, T))
        return states

    def combined(self, x, x2, T):
        p = x.shape[1] - 1
        x2_patch = rearrange(x2[:, 1:], "b (p t) m -> (b t) p m", p=p)
        return torch.cat([x[:, :1], (x[:, 1:] + x2_patch) / 2], dim=1)

    def bt_adapter(self, x1, x2, layer, T):
        x1 = rearrange(x1, "(b t) l d -> b t l d", t=T)
        if x2 is not None:
            cls = x1[:, :, 0, :].mean(dim=1).unsqueeze(1)
            x = x2 + torch.cat([cls, rearrange(x1[:, :, 1:, :], "b t l d -> b (l t) d")], dim=1)
        else:
            x = x1
        if layer == 0:
            x = self.input_ini(x)
        x = self.temporal_layer(x, T, f"{V}btadapter_T_layers.{layer}")
        return self.spatial_layer(x, T, f"{V}btadapter_S_layers.{layer}")

    def input_ini(self, x):
        w = self.w
        cls_old = x[:, :, 0, :].mean(dim=1).unsqueeze(1)
        x = x[:, :, 1:, :]
        B, T, L, D = x.shape
        x = rearrange(x, "b t l d -> (b t) l d")
        x = torch.cat([w[V + "btadapter_cls_token"].expand(x.shape[0], 1, -1), x], dim=1)
        x = x + w[V + "embeddings.position_embedding.weight"][: x.shape[1]]
        cls = x[:B, 0, :].unsqueeze(1)
        x = rearrange(x[:, 1:, :], "(b t) l d -> (b l) t d", b=B)
        x = x + w[V + "btadapter_time_embed.weight"][: x.shape[1]]
        x = rearrange(x, "(b l) t d -> b (l t) d", b=B)
        return torch.cat([(cls_old + cls) / 2, x], dim=1)

    def temporal_layer(self, x, T, name):
        residual, cls, query = x[:, 1:, :], x[:, :1, :], x[:, 1:, :]
        b, pt, m = query.shape
        h = query.reshape(b * (pt // T), T, m)
        h = self.attention(self.ln(h, name + ".layer_norm1"), name + ".self_attn", self.vision["num_attention_heads"])
        h = self.linear(h, name + ".temporal_fc").reshape(b, pt, m)
        return torch.cat([cls, residual + h], dim=1)

    def spatial_layer(self, x, T, name):
        residual, cls, query = x, x[:, :1, :], x[:, 1:, :]
        b, pt, m = query.shape
        p = pt // T
        cls = cls.unsqueeze(1).repeat(1, T, 1, 1).reshape(b * T, 1, m)
        h = torch.cat([cls, rearrange(query, "b (p t) m -> (b t) p m", p=p, t=T)], dim=1)
        h = self.attention(self.ln(h, name + ".layer_norm1"), name + ".self_attn", self.vision["num_attention_heads"])
        cls = h[:, :1, :].reshape(b, T, 1, m).mean(dim=1)
        h = torch.cat([cls, rearrange(h[:, 1:, :], "(b t) p m -> b (p t) m", p=p, t=T)], dim=1) + residual
        return h + self.mlp(self.ln(h, name + ".layer_norm2"), name + ".mlp")

    # -- LLaVACLIP3DMultiModalProjector -----------------------------------------------------------
    def clip_text_feature(self, ids):
        w, t = self.w, P + "clip_text_model."
        x = F.embedding(ids, w[t + "embeddings.token_embedding.weight"])
        n = ids.shape[1]
        keep = (torch.arange(248) < 20).float()[:, None]
        x = x + (w[t + "embeddings.position_embedding"][:n] * keep[:n] + w[t + "embeddings.position_embedding_res"][:n] * (1 - keep[:n]))
        for i in range(self.text["num_hidden_layers"]):
            x = self.clip_layer(x, f"{t}encoder.layers.{i}", self.text["num_attention_heads"], causal=True)
        x = self.ln(x, t + "final_layer_norm")
        pooled = x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]  # the end token: CLIP's highest id
        return self.linear(pooled, P + "clip_text_projection")

    def project_and_pool(self, features, clip_ids, frames, kernel):
        image_embeds = self.linear(self.ln(features, P + "clip_visual_ln"), P + "clip_visual_projection")
        image_embeds = rearrange(image_embeds, "(B T) L D -> B (T L) D", T=frames)
        text_embeds = self.clip_text_feature(clip_ids)
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits = torch.einsum("ad,bvd->abv", text_embeds, image_embeds).diagonal(dim1=0, dim2=1).transpose(0, 1)
        side = self.config["frame_shape"][0]
        weights = rearrange(torch.softmax(logits * self.w[P + "logit_scale"].exp(), dim=-1), "B (T W H) -> B T W H",
                            T=frames, W=side)
        hidden = self.linear(F.gelu(self.linear(features, P + "linear_1")), P + "linear_2")
        hidden = rearrange(hidden, "(B T) (W H) D -> B D T W H", T=frames, W=side)
        kd, kh, kw = kernel
        unf = hidden.unfold(2, kd, kd).unfold(3, kh, kh).unfold(4, kw, kw)
        n, c, od, oh, ow = unf.shape[:5]
        unf = unf.contiguous().view(n, c, od, oh, ow, -1)
        w_unf = weights.unfold(1, kd, kd).unfold(2, kh, kh).unfold(3, kw, kw).contiguous().view(n, od, oh, ow, -1)
        pooled = (unf * F.softmax(w_unf / self.config["pooling_temp"], dim=-1).unsqueeze(1)).sum(dim=-1)
        return rearrange(pooled, "B D T W H -> B (T W H) D")

    # -- encode_video / encode_image and the LLM --------------------------------------------------
    def visual_tokens(self, pixels, modality, clip_ids, image_size):
        layer = self.config["vision_feature_layer"]
        frames = pixels.shape[0]
        if modality == IMAGE:  # tiles through the vision tower as images (T = 1 each), image kernel
            features = self.vision_states(pixels, 1)[layer][:, 1:]
            tokens = self.project_and_pool(features, clip_ids, frames, self.config["image_pooling_kernel"])
            tiles = rearrange(tokens, "B (T L) D -> (B T) L D", T=frames)
            side = int(tiles.shape[1] ** 0.5)
            base, grid = tiles[0], tiles[1:]
            rows, cols = get_anyres_image_grid_shape(image_size, self.config["image_grid_pinpoints"],
                                                     self.vision["image_size"])
            grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            grid = unpad_image(grid, image_size)
            newline = self.w["image_newline"][:, None, None].expand(*grid.shape[:-1], 1)
            grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
            return torch.cat([base, grid], dim=0)
        # video and multi-image: the frames / images as one clip (T = their number)
        features = self.vision_states(pixels, frames)[layer][:, 1:]
        kernel = self.config["pooling_kernel"] if modality == VIDEO else self.config["image_pooling_kernel"]
        return self.project_and_pool(features, clip_ids, frames, kernel)[0]

    def logits(self, batch):
        embeds = self.llm.get_input_embeddings()(batch["input_ids"].clamp(max=self.llm.config.vocab_size - 1))
        start = 0
        for row, count in enumerate(batch["frame_counts"].tolist()):
            pixels = batch["pixel_values"][start : start + count]
            start += count
            tokens = self.visual_tokens(pixels, int(batch["modalities"][row]), batch["clip_input_ids"][row : row + 1],
                                        batch["image_sizes"][row].tolist())
            slots = batch["input_ids"][row] == self.config["image_token_index"]
            assert int(slots.sum()) == tokens.shape[0]
            embeds[row, slots] = tokens
        return self.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    directory = tmp_path_factory.mktemp("released")
    tensors = write_authors_checkpoint(directory, PPLLaVAConfig.tiny(), depth=2)
    return directory, tensors


def test_converted_model_gives_the_authors_logits(released):
    directory, tensors = released
    config = json.loads((directory / "config.json").read_text())
    clip_config = json.loads((directory / "clip" / "config.json").read_text())
    model = from_authors(directory).eval()
    assert is_authors_checkpoint(directory) and model.config.bt_adapter_depth == 2
    batch = build_batch(model.config, SAMPLES)
    batch.pop("labels")
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = AuthorsReference(tensors, config, clip_config).logits(batch)
    attended = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[attended], theirs[attended], atol=1e-5, rtol=1e-5)
    # the adapter matters: without it the logits move
    model.bt_adapter = None
    with torch.no_grad():
        assert (model(**batch).logits[attended] - theirs[attended]).abs().max() > 1e-3


def test_a_checkpoint_without_the_adapter_or_extended_clip_converts_too(tmp_path):
    tensors = write_authors_checkpoint(tmp_path, PPLLaVAConfig.tiny(), depth=0, extend_clip=False)
    model = from_authors(tmp_path).eval()
    assert model.bt_adapter is None and model.config.clip_context_length == 77
    config = json.loads((tmp_path / "config.json").read_text())
    clip_config = json.loads((tmp_path / "clip" / "config.json").read_text())
    # the reference reads extended positions; give it the plain table split the same way
    table = tensors.pop(P + "clip_text_model.embeddings.position_embedding.weight")
    padded = torch.cat([table, table.new_zeros(248 - 77, table.shape[1])])
    tensors[P + "clip_text_model.embeddings.position_embedding"] = padded
    tensors[P + "clip_text_model.embeddings.position_embedding_res"] = padded
    batch = build_batch(model.config, SAMPLES)
    batch.pop("labels")
    with torch.no_grad():
        ours, theirs = model(**batch).logits, AuthorsReference(tensors, config, clip_config).logits(batch)
    attended = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[attended], theirs[attended], atol=1e-5, rtol=1e-5)


def _copy(released, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(released[0], target)
    return target


def test_a_renamed_tensor_is_named(released, tmp_path):
    directory = _copy(released, tmp_path)
    shard = directory / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    name = next(k for k in tensors if "btadapter_T_layers.1.temporal_fc.weight" in k or "btadapter" in k)
    tensors[name.replace("btadapter", "bt_adaptor")] = tensors.pop(name)
    save_file(tensors, str(shard))
    with pytest.raises(AuthorsCheckpointError) as error:
        from_authors(directory)
    assert name.replace("btadapter", "bt_adaptor") in str(error.value) and "unexpected" in str(error.value)
    assert "missing" in str(error.value)


def test_a_missing_or_truncated_shard_is_named(released, tmp_path):
    directory = _copy(released, tmp_path)
    shard = directory / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(AuthorsCheckpointError, match="model-00002-of-00002.safetensors: cannot be read"):
        from_authors(directory)
    shard.unlink()
    with pytest.raises(AuthorsCheckpointError, match=r"shard\(s\) model-00002-of-00002.safetensors missing"):
        from_authors(directory)


def test_a_tensor_of_the_wrong_shape_is_named(released, tmp_path):
    directory = _copy(released, tmp_path)
    shard_of = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    name = V + "btadapter_time_embed.weight"
    shard = directory / shard_of[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:10]
    save_file(tensors, str(shard))
    with pytest.raises(AuthorsCheckpointError, match="wrong shape: bt_adapter.time_embedding.weight"):
        from_authors(directory)


def test_the_qwen_variant_is_refused_with_what_is_missing(released, tmp_path):
    directory = _copy(released, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "qwen": True}))
    with pytest.raises(AuthorsCheckpointError, match="SigLIP"):
        from_authors(directory)
