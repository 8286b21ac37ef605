"""Self-supervised speech encoders through transformers: WavLM, wav2vec 2.0, HuBERT, and
the Whisper encoder, by hub id, local folder, or a `tiny_*` random-init preset.

Resolution order for a name: an existing local folder (`config.json` + weights, as
transformers saves them, optionally `preprocessor_config.json`), then the Hugging Face
cache (`local_files_only=True`), then a download, unless offline (`PEFTLAB_OFFLINE=1`
or `HF_HUB_OFFLINE=1`). A name that resolves nowhere is an error that says where we
looked and how to pass a folder. Only the `tiny_*` presets are random-init, and they
are seeded, so every build gives the same weights.

Every backbone is wrapped in a `SpeechEncoder`, which turns waveforms into the
hidden states of all layers plus a mask of the valid frames, in two stages:

    embed:  CNN feature encoder + feature projection (wav2vec 2.0 family), or
            log-mel convolutions + positions (Whisper)      -> frames (B, T, D)
    encode: the transformer layers                           -> states (L + 1, B, T, D)

Between them sits the slot where the `speech_prompt` method prepends learned vectors.

`SpeechEncoder.stages()` lists the same computation as stages (embedding, the encoder's
entry: prompt slot, positional convolution and norm; each layer; the final norm), and
`forward` can run any range of them, so frozen-feature caching
(`shared/feature_cache.py`) can keep the frozen first stages' outputs between epochs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peftlab.shared import hub, io
from peftlab.shared.backbone_cache import load_once
from peftlab.shared.errors import UserError
from peftlab.shared.feature_cache import Stage
from peftlab.shared.lazy import lazy_import
from torch import nn
from torch.nn import functional as F

transformers = lazy_import("transformers")

WAV2VEC2_FAMILY = ("wav2vec2", "wavlm", "hubert")
FAMILIES = (*WAV2VEC2_FAMILY, "whisper")

PRETRAINED = {
    "microsoft/wavlm-base-plus": "wavlm",
    "facebook/wav2vec2-base": "wav2vec2",
    "facebook/hubert-base-ls960": "hubert",
    "openai/whisper-tiny": "whisper",
    "openai/whisper-base": "whisper",
}
"""The hub checkpoints PEFT-SER (Feng & Narayanan 2023) and its follow-ups compare."""

TINY_PRESETS = {"tiny_wavlm": "wavlm", "tiny_wav2vec2": "wav2vec2", "tiny_hubert": "hubert", "tiny_whisper": "whisper"}
TINY_ALIAS = "tiny_wavlm"
"""`tiny` (the name every contract test builds) is the WavLM preset: WavLM Base+ is
PEFT-SER's best backbone and the recipe's default."""
TINY_SEED = 1234

WHISPER_MAX_SECONDS = 30.0
"""Whisper's encoder has 1500 learned positions: 30 s of audio at 50 frames/s."""


def backbone_names() -> list[str]:
    return ["tiny", *TINY_PRESETS, *PRETRAINED]


# --------------------------------------------------------------------------- tiny presets
def _tiny_config(family: str):
    """Small configs with the real models' frame rate (320 samples per frame at 16 kHz).

    The CNN uses per-frame layer norm (as the Large models do) rather than Base's group
    norm over time, so padding a batch does not change a clip's features.
    """
    width = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    cnn = dict(conv_dim=(32, 32, 32, 32), conv_kernel=(10, 8, 4, 4), conv_stride=(5, 4, 4, 4),
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
               feat_extract_norm="layer", do_stable_layer_norm=False, apply_spec_augment=False)
    if family == "wav2vec2":
        return transformers.Wav2Vec2Config(**width, **cnn)
    if family == "hubert":
        return transformers.HubertConfig(**width, **cnn)
    if family == "wavlm":
        return transformers.WavLMConfig(**width, **cnn, num_buckets=32, max_bucket_distance=100)
    return transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                      decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                                      num_mel_bins=80, max_source_positions=1500)


def _tiny_model(family: str) -> nn.Module:
    config = _tiny_config(family)
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        if family == "whisper":
            return transformers.WhisperForAudioClassification(config).encoder
        return transformers.AutoModel.from_config(config)


def _default_extractor(family: str, config):
    if family == "whisper":
        return transformers.WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    # no per-utterance normalisation, so loudness stays a cue (as in WavLM Base+ and HuBERT)
    return transformers.Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True)


# --------------------------------------------------------------------------- WavLM attention
def _module_calling_attention(model: nn.Module) -> None:
    """WavLM's attention layers made to call their projections (wavlm_attention.py says why)."""
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    from .wavlm_attention import ModuleCallingWavLMAttention

    for module in model.modules():
        if type(module) is WavLMAttention:
            module.__class__ = ModuleCallingWavLMAttention


# --------------------------------------------------------------------------- the encoder
@dataclass
class Featurized:
    """A batch ready for the encoder: padded model inputs and their valid lengths."""

    inputs: torch.Tensor
    """(B, samples) waveforms, or (B, mel bins, mel frames) for Whisper."""
    lengths: torch.Tensor
    """(B,) valid samples (mel frames for Whisper) per example."""


class SpeechEncoder(nn.Module):
    """A transformers speech encoder -> hidden states of every layer + a frame mask."""

    def __init__(self, family: str, network: nn.Module, extractor, pass_attention_mask: bool = True):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}")
        self.family = family
        self.network = network
        self.extractor = extractor
        self.pass_attention_mask = pass_attention_mask
        """wav2vec2-base and HuBERT Base were pre-trained on unmasked, zero-padded
        batches (their feature extractors say return_attention_mask=False); for them the
        transformer sees the padding, as in pre-training. Pooling always ignores it."""
        if family == "whisper":
            self.width = network.config.d_model
            self.num_layers = network.config.encoder_layers
        else:
            # LayerDrop would skip layers and leave holes in the weighted layer sum.
            network.config.layerdrop = 0.0
            # Otherwise transformers marks the CNN's input as requiring grad in training
            # (for gradient checkpointing) and every step backpropagates through the
            # frozen CNN. This is what `freeze_feature_encoder()` does (HuBERT lacks the
            # public method); methods that train the CNN ("full") re-enable its parameters.
            network.feature_extractor._freeze_parameters()
            self.width = network.config.hidden_size
            self.num_layers = network.config.num_hidden_layers
            if family == "wavlm":
                _module_calling_attention(network)

    @property
    def sampling_rate(self) -> int:
        return int(self.extractor.sampling_rate)

    @property
    def num_states(self) -> int:
        """Hidden states the head weighs: the transformer's input, then each layer's output."""
        return self.num_layers + 1

    @property
    def max_seconds(self) -> float | None:
        return WHISPER_MAX_SECONDS if self.family == "whisper" else None

    @property
    def blocks_path(self) -> str:
        return "network.layers" if self.family == "whisper" else "network.encoder.layers"

    def featurize(self, waveforms: list[np.ndarray]) -> Featurized:
        """Mono float waveforms at `sampling_rate` -> padded inputs, with the backbone's own extractor."""
        lengths = [len(w) for w in waveforms]
        if self.family == "whisper":
            # Zero-padded to the batch's longest clip, not to Whisper's 30 s: the encoder
            # below runs on the actual length (see `_embed_whisper`).
            features = self.extractor(waveforms, sampling_rate=self.sampling_rate, padding="longest",
                                      return_attention_mask=False, return_tensors="np")["input_features"]
            mel_frames = [n // self.extractor.hop_length for n in lengths]
            return Featurized(torch.from_numpy(features), torch.tensor(mel_frames))
        values = self.extractor(waveforms, sampling_rate=self.sampling_rate, padding="longest",
                                return_attention_mask=True, return_tensors="np")["input_values"]
        return Featurized(torch.from_numpy(values), torch.tensor(lengths))

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid input samples (mel frames) -> valid encoder frames."""
        if self.family == "whisper":
            return (lengths - 1) // 2 + 1  # conv2: kernel 3, stride 2, padding 1
        return self.network._get_feat_extract_output_lengths(lengths)

    @property
    def padding_free(self) -> bool:
        """Whether a clip's valid frames come out the same however far its batch pads it.

        True with an attention mask and per-frame CNN norms (WavLM / wav2vec 2.0 Large,
        the tiny presets); not for Whisper (the padded log-mel frames and its convolutions
        reach into the last valid frames), group-normalised CNNs (statistics over the
        padded clip: wav2vec2-base, HuBERT Base) or encoders run without a mask."""
        return (self.family != "whisper" and self.pass_attention_mask
                and getattr(self.network.config, "feat_extract_norm", "layer") == "layer")

    def _stable_layer_norm(self) -> bool:
        """Pre-norm variants (the Large models): the encoder's norm comes after the layers."""
        return self.family != "whisper" and bool(getattr(self.network.config, "do_stable_layer_norm", False))

    def stages(self) -> list[nn.Module | Stage]:
        """The encoder in order: embedding, the entry to the layers (prompt slot,
        positional convolution, norm), each layer, the final norm (`forward`'s
        `start`/`stop` index this list; feature caching counts frozen stages in it)."""
        network = self.network
        prompt = [self.speech_prompt] if getattr(self, "speech_prompt", None) is not None else []
        if self.family == "whisper":
            embed = Stage(modules=[network.conv1, network.conv2, network.embed_positions], dropout=network.config.dropout)
            return [embed, Stage(modules=prompt), *network.layers, network.layer_norm]
        encoder = network.encoder
        stable = self._stable_layer_norm()
        embed = Stage(modules=[network.feature_extractor, network.feature_projection])
        entry = [*prompt, encoder.pos_conv_embed, encoder.dropout, *([] if stable else [encoder.layer_norm])]
        return [embed, Stage(modules=entry), *encoder.layers, Stage(modules=[encoder.layer_norm] if stable else [])]

    def stage_frames(self, lengths: torch.Tensor, stages: int) -> torch.Tensor:
        """Valid frames per example in the output of the first `stages` stages (prompt
        positions included between the entry and the final stage, which drops them)."""
        prompt = getattr(self, "speech_prompt", None)
        inside = prompt is not None and 2 <= stages <= self.num_layers + 2
        return self.frame_lengths(lengths) + (prompt.length if inside else 0)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor | None = None,
                start: int = 0, stop: int | None = None):
        """-> (states (L + 1, B, T, D), frame mask (B, T) of valid frames), after stages
        [start, stop) of `stages()`, all of them by default. Stopping earlier returns the
        states so far, stacked (the embedding's frames as one state); from `start` > 0,
        `hidden` is that output of stage start - 1 for these inputs."""
        last = self.num_layers + 2  # the final norm's index
        stop = last + 1 if stop is None else stop
        if start == 0:
            frames = self._embed_whisper(inputs) if self.family == "whisper" else self._embed_wav2vec2(inputs)
            states = frames.unsqueeze(0)
        else:
            states = hidden
        prompt = getattr(self, "speech_prompt", None)
        prompted = prompt is not None and 2 <= start <= last  # the entry stage prepended its positions
        frames = states.shape[2] - (prompt.length if prompted else 0)
        valid = self.frame_lengths(lengths.to(states.device))
        mask = torch.arange(frames, device=states.device)[None, :] < valid[:, None]
        if prompted:
            mask = torch.cat([torch.ones(mask.shape[0], prompt.length, dtype=mask.dtype, device=mask.device), mask], 1)
        if start <= 1 < stop:
            frames = states[0]
            if prompt is not None and not prompt.every_layer:  # the prompt passes the positional convolution too
                frames, mask = prompt(frames, mask)
            frames = self._enter(frames, mask)
            if prompt is not None and prompt.every_layer:  # after it: the entry sees the audio alone
                frames, mask = prompt(frames, mask)
            states = frames.unsqueeze(0)
        chosen = range(max(start, 2) - 2, max(min(stop, last) - 2, 0))
        if len(chosen):
            states = torch.cat([states, self._layers(states[-1], mask, chosen)])
        if stop <= last:
            return states
        if start <= last:
            final_norm = self.network.layer_norm if self.family == "whisper" else self.network.encoder.layer_norm
            if self.family == "whisper" or self._stable_layer_norm():  # as transformers reports the last state
                states = torch.cat([states[:-1], final_norm(states[-1:])])
            if prompt is not None:
                states, mask = states[:, :, prompt.length:], mask[:, prompt.length:]
        return states, mask

    def _embed_wav2vec2(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.network.feature_extractor(inputs).transpose(1, 2)
        projected = self.network.feature_projection(features)  # HuBERT returns a tensor, the others a pair
        return projected[0] if isinstance(projected, tuple) else projected

    def _enter(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The transformer's input: for the wav2vec 2.0 family, transformers' encoder
        steps before its layers (padding zeroed, positional convolution, norm, dropout)."""
        if self.family == "whisper":
            return frames
        encoder = self.network.encoder
        if self.pass_attention_mask:
            frames = frames.masked_fill(~mask.unsqueeze(-1), 0.0)
        frames = frames + encoder.pos_conv_embed(frames)
        if not self._stable_layer_norm():
            frames = encoder.layer_norm(frames)
        return encoder.dropout(frames)

    def _layers(self, hidden: torch.Tensor, mask: torch.Tensor, chosen: range) -> torch.Tensor:
        """The outputs of layers `chosen`, stacked, called as transformers' encoders call
        them (masks in the form each expects; WavLM's relative position bias, which its
        first layer computes from positions alone, made afresh when starting later)."""
        attention_mask = mask if self.pass_attention_mask or self.family == "whisper" else None
        wavlm = self.family == "wavlm"
        if self.family == "whisper" or not wavlm:
            config = self.network.config
            attention_mask = transformers.masking_utils.create_bidirectional_mask(
                config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        layers = self.network.layers if self.family == "whisper" else self.network.encoder.layers
        position_bias = None
        if wavlm and chosen.start > 0:
            first = layers[0].attention
            length = hidden.shape[1]
            position_bias = first.compute_bias(length, length).unsqueeze(0).repeat(hidden.shape[0], 1, 1, 1)
            position_bias = position_bias.view(hidden.shape[0] * first.num_heads, length, length)
        prompt = getattr(self, "speech_prompt", None)
        outputs = []
        for index in chosen:
            layer = layers[index]
            if prompt is not None:
                hidden = prompt.before_layer(index, hidden)
            if self.family == "whisper":
                hidden = layer(hidden, attention_mask)
            elif wavlm:
                extra = {} if self._stable_layer_norm() else {"index": index}
                hidden, position_bias = layer(hidden, attention_mask=attention_mask, position_bias=position_bias, **extra)
            else:
                hidden = layer(hidden, attention_mask=attention_mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            outputs.append(hidden)
        return torch.stack(outputs)

    def _embed_whisper(self, features: torch.Tensor) -> torch.Tensor:
        """Whisper's convolutions and positions on the actual length, not 30 s of padding.

        transformers' WhisperEncoder.forward insists on 3000 mel frames; the modules
        themselves do not, so a 2 s clip costs 2 s of compute. Positions are the first T
        of the learned table, as the full-length model gives the first T frames.
        """
        encoder = self.network
        if features.shape[-1] > 2 * encoder.config.max_source_positions:
            raise UserError(f"Whisper takes at most {WHISPER_MAX_SECONDS:.0f} s of audio; lower the task's max_seconds")
        x = F.gelu(encoder.conv1(features))
        x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
        x = x + encoder.embed_positions.weight[: x.shape[1]]
        return F.dropout(x, p=encoder.config.dropout, training=self.training)


# --------------------------------------------------------------------------- loading
@load_once
def load_backbone(name: str) -> tuple[SpeechEncoder, dict]:
    """-> (encoder, info) where info records name, source, family and a weights hash."""
    if name == "tiny" or name in TINY_PRESETS:
        family = TINY_PRESETS[TINY_ALIAS if name == "tiny" else name]
        network = _tiny_model(family)
        encoder = SpeechEncoder(family, network, _default_extractor(family, network.config))
        return encoder, _info(name, f"random-init {family} preset (seed {TINY_SEED})", encoder)
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _load_folder(path, name, str(path))
    if name.startswith(("/", "./", "../", "~")):  # a path, not a hub id: no hub advice
        raise UserError(f"speech backbone folder {path} does not exist; fix the path")
    if "/" not in name:
        raise UserError(f"unknown speech backbone {name!r}: not a local folder, and not one of {', '.join(backbone_names())}")
    try:
        return _load_folder(name, name, f"Hugging Face cache ({name})", local_files_only=True)
    except OSError:
        pass
    if reason := hub.offline():
        raise UserError(
            f"speech backbone {name!r} is not available offline ({reason}): no local folder {name!r} and nothing in the "
            f"Hugging Face cache ({_hub_cache()}); download it where you have internet "
            f"(huggingface-cli download {name}) or pass --backbone /path/to/folder with config.json and weights"
        )
    try:
        return _load_folder(name, name, f"Hugging Face hub ({name})")
    except OSError as error:
        raise UserError(
            f"speech backbone {name!r} could not be loaded from the hub ({str(error).splitlines()[0]}); "
            f"looked for a local folder and the cache {_hub_cache()}; pass --backbone /path/to/folder"
        ) from None




def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _read_config(source, local_files_only: bool) -> dict:
    if isinstance(source, Path):
        if not (source / "config.json").is_file():
            raise UserError(f"{source}: a speech backbone folder needs config.json and model weights (as transformers saves them)")
        return json.loads((source / "config.json").read_text())
    return transformers.AutoConfig.from_pretrained(source, local_files_only=local_files_only).to_dict()


def _load_folder(source, name: str, where: str, local_files_only: bool = False) -> tuple[SpeechEncoder, dict]:
    """A transformers checkpoint (folder or hub id) -> SpeechEncoder with its real weights, in fp32."""
    config = _read_config(source, local_files_only)
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{where}: model_type {family!r} is not a supported speech encoder ({', '.join(FAMILIES)})")
    architectures = config.get("architectures") or []
    common = dict(dtype=torch.float32, local_files_only=local_files_only, output_loading_info=True)
    try:
        if family == "whisper":
            # Only the encoder is kept: from an audio-classification checkpoint, or from
            # WhisperModel / WhisperForConditionalGeneration (decoder dropped).
            cls = transformers.WhisperForAudioClassification if "WhisperForAudioClassification" in architectures else transformers.WhisperModel
            full, loading = cls.from_pretrained(str(source), **common)
            network = full.encoder
            prefix = "encoder."
        else:
            network, loading = transformers.AutoModel.from_pretrained(str(source), **common)
            prefix = ""
    except (ValueError, RuntimeError) as error:
        raise UserError(f"{where}: the weights do not load into a {family} model ({str(error).splitlines()[0]})") from None
    # Never silently random: every encoder tensor must come from the checkpoint.
    # (masked_spec_embed is SpecAugment's mask vector, which fine-tuning here never uses.)
    missing = [k for k in loading.get("missing_keys", []) if k.startswith(prefix) and "masked_spec_embed" not in k]
    if missing:
        raise UserError(f"{where}: the checkpoint lacks encoder weights {missing[:3]}; it is not a complete {family} checkpoint")
    try:
        extractor = transformers.AutoFeatureExtractor.from_pretrained(str(source), local_files_only=local_files_only)
    except OSError:
        extractor = _default_extractor(family, network.config)
    pass_mask = family == "whisper" or bool(getattr(extractor, "return_attention_mask", True))
    encoder = SpeechEncoder(family, network, extractor, pass_attention_mask=pass_mask)
    return encoder, _info(name, where, encoder)


def _info(name: str, source: str, encoder: SpeechEncoder) -> dict:
    return {
        "name": name,
        "source": source,
        "family": encoder.family,
        "architecture": {"layers": encoder.num_layers, "width": encoder.width, "sampling_rate": encoder.sampling_rate},
        "weights_sha256": io.tensors_fingerprint(encoder.network.state_dict()),
    }
