"""Speech emotion domain: WavLM / wav2vec 2.0 / HuBERT / Whisper encoders (transformers)
with PEFT-SER's methods (Feng & Narayanan 2023)."""

from . import (
    modules,  # noqa: F401  (registers the speech_prompt method)
    tasks,  # noqa: F401  (registers speech-emotion)
)
