"""A disk cache of frozen image-tower features, one file per video.

When no trainable parameter lives in CLIP's image tower (the temporal adapter, text-side
LoRA, the caption pipeline's projector), the tower's output for a video never changes,
so it is computed once and reused across epochs, runs and methods. The cache folder is
keyed by everything the features depend on: the backbone's name and weights hash, the
frame count, the frame size and the preprocessing (interpolation, resize mode, mean,
std); a file inside is keyed by the video's path, size and modification time. Files are
safetensors, written atomically, so concurrent runs can share the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from peftlab.shared import io

from . import data

FEATURE_FORMAT = 1
"""Part of the key: bump it when what is stored changes."""


def cache_directory(setting: str) -> Path | None:
    """The task option `feature_cache`: auto (the peftlab cache folder), off, or a folder."""
    if setting == "off":
        return None
    if setting == "auto":
        return data.cache_root() / "video_features"
    return Path(setting).expanduser()


class FrameFeatureCache:
    """Per-video (frames, dim) features: in memory, then on disk, else encoded."""

    def __init__(self, directory: Path | None, backbone_info: dict, num_frames: int, preprocess: dict):
        key = {"format": FEATURE_FORMAT, "backbone": backbone_info["name"], "weights": backbone_info["weights_sha256"],
               "frames": num_frames, "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(preprocess.items())}}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.key = key
        self.directory = None if directory is None else directory / digest
        self.memory: dict[str, torch.Tensor] = {}
        self.stats = {"encoded": 0, "from_disk": 0, "from_memory": 0}
        """Videos encoded, read from disk and served from memory (tests read it)."""

    def features(self, videos: list[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """(len(videos), frames, dim) float32 on the CPU; `encode(missing)` computes the rest."""
        found: dict[str, torch.Tensor] = {}
        for video in dict.fromkeys(videos):
            fingerprint = data.video_fingerprint(video)
            if fingerprint in self.memory:
                found[video] = self.memory[fingerprint]
                self.stats["from_memory"] += 1
                continue
            file = self._file(fingerprint)
            if file is not None and file.is_file():
                try:
                    found[video] = self.memory[fingerprint] = io.load_tensors(file)["features"]
                    self.stats["from_disk"] += 1
                    continue
                except Exception:  # a torn or foreign file: encode again and overwrite it
                    pass
        missing = [v for v in dict.fromkeys(videos) if v not in found]
        if missing:
            encoded = encode(missing).detach().float().cpu()
            self.stats["encoded"] += len(missing)
            for video, features in zip(missing, encoded):
                fingerprint = data.video_fingerprint(video)
                features = features.clone()
                found[video] = self.memory[fingerprint] = features
                file = self._file(fingerprint)
                if file is not None:
                    io.save_tensors(file, {"features": features})
        return torch.stack([found[v] for v in videos])

    def _file(self, fingerprint: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{fingerprint}.safetensors"
