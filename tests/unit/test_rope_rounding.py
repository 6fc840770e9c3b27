"""eval.authors_rope_rounding: the LLM's RoPE frequencies as the authors' benchmark scripts leave
them (built with from_config, cast to fp16: the buffer rounded), the rest of the model untouched."""

import pytest
import torch

from conftest import build_batch, tiny_model
from pipeline.model.inference import round_rotary_frequencies
from pipeline.recipe import RecipeError, parse_recipe, validate
from ppllava import VIDEO

pytestmark = pytest.mark.unit


def test_rounding_leaves_fp16_values_in_the_buffers_dtype_and_moves_the_logits():
    model = tiny_model().eval()
    llm = model.language_model
    (rotary,) = [m for m in llm.modules() if hasattr(m, "inv_freq")]
    exact = rotary.inv_freq.clone()
    weights = {name: p.clone() for name, p in model.named_parameters()}
    batch = build_batch(model.config, [(VIDEO, 4)])
    with torch.no_grad():
        before = model(**batch).logits

    assert round_rotary_frequencies(llm) == 1
    assert rotary.inv_freq.dtype == exact.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, exact.half().float()) and not torch.equal(rotary.inv_freq, exact)
    assert torch.equal(rotary.original_inv_freq, exact.half().float())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    with torch.no_grad():
        after = model(**batch).logits
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=1e-2)


def test_the_key_is_off_by_default_and_typed():
    recipe = parse_recipe({"name": "e", "run_dir": "runs/e", "eval": {"model_path": ".", "open_ended": ["q.json"]}})
    assert recipe.eval.authors_rope_rounding is False
    with pytest.raises(RecipeError, match="authors_rope_rounding"):
        validate(parse_recipe({"name": "e", "run_dir": "runs/e", "eval": {"model_path": ".", "open_ended": ["q.json"],
                                                                          "authors_rope_rounding": "maybe"}}))
