"""PPLLaVA: prompt-guided pooling video LLM. Importable on its own (no pipeline/ or backends/)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from ppllava.config import IMAGE, MULTI_IMAGE, TEXT, VIDEO, PPLLaVAConfig
from ppllava.modeling import PPLLaVAForConditionalGeneration, PPLLaVAPreTrainedModel

# Register with transformers' Auto classes so `AutoModel*.from_pretrained(dir)` finds us.
AutoConfig.register(PPLLaVAConfig.model_type, PPLLaVAConfig, exist_ok=True)
AutoModel.register(PPLLaVAConfig, PPLLaVAForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(PPLLaVAConfig, PPLLaVAForConditionalGeneration, exist_ok=True)

__all__ = [
    "PPLLaVAConfig",
    "PPLLaVAForConditionalGeneration",
    "PPLLaVAPreTrainedModel",
    "TEXT",
    "IMAGE",
    "MULTI_IMAGE",
    "VIDEO",
]
