"""Medical imaging domain: timm ViT / ResNet backbones with the PEFT methods of Dutt et al."""

from . import (
    modules,  # noqa: F401  (registers the tsa and vpt methods)
    tasks,  # noqa: F401  (registers medical-classify)
)
