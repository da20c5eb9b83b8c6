"""Models: tokenizers, the AR prior, and their export to safetensors plus JSON."""

from wartok_cli.models.conv_tokenizer import ConvTokenizer, TokenizerOutput
from wartok_cli.models.prior import ARPrior
from wartok_cli.models.quantizer import CosineQuantizer, QuantizerOutput
from wartok_cli.models.vit_tokenizer import ViTTokenizer

TOKENIZER_FAMILIES = {"conv2d": ConvTokenizer, "vit1d": ViTTokenizer}


def build_tokenizer(config: dict) -> ConvTokenizer | ViTTokenizer:
    """Build a tokenizer from its architecture config (the content of tokenizer.json)."""
    options = dict(config)
    family = options.pop("family")
    return TOKENIZER_FAMILIES[family](**options)


__all__ = [
    "ARPrior",
    "ConvTokenizer",
    "CosineQuantizer",
    "QuantizerOutput",
    "TOKENIZER_FAMILIES",
    "TokenizerOutput",
    "ViTTokenizer",
    "build_tokenizer",
]
