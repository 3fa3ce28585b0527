"""Versioned model artifacts: one folder per version with a manifest.

``<registry>/<version>/{model.onnx, booster.txt, manifest.json}``; ``<registry>/LATEST``
names the version `run` uses when none is given. Versions are content hashes, so the
same training run always gets the same name and nothing is silently overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from features.definitions import FEATURE_NAMES
from models.export import lightgbm_to_onnx, parity
from models.train import TrainedModel


class ModelNotFound(FileNotFoundError):
    """No model at the given path or version."""


@dataclass(frozen=True)
class ModelRef:
    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def save(trained: TrainedModel, registry: Path, training: dict[str, Any],
         sample: np.ndarray) -> ModelRef:
    """Write a new version (ONNX + LightGBM text + manifest) and point LATEST at it."""
    onnx_model = lightgbm_to_onnx(trained.booster)
    onnx_bytes = onnx_model.SerializeToString()
    booster_text = trained.booster.model_to_string()
    digest = hashlib.sha256(onnx_bytes).hexdigest()[:12]
    version = f"lgbm-{digest}"
    manifest = {
        "version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "kind": "lightgbm-onnx",
        "features": list(FEATURE_NAMES),
        "review_threshold": trained.review_threshold,
        "block_threshold": trained.block_threshold,
        "metrics": trained.metrics,
        "training": training,
        "onnx_parity_max_abs_diff": parity(trained.booster, onnx_model, sample),
        "score_quantiles": np.quantile(trained.train_scores, np.linspace(0, 1, 11)).tolist(),
    }
    folder = registry / version
    tmp = registry / f".{version}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.onnx").write_bytes(onnx_bytes)
    (tmp / "booster.txt").write_text(booster_text, encoding="utf-8")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if folder.exists():  # same content trained again: keep the existing copy
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    else:
        tmp.rename(folder)
    (registry / "LATEST").write_text(version + "\n", encoding="utf-8")
    return ModelRef(folder, manifest)


def resolve(path: Path, version: str | None = None) -> ModelRef:
    """A model folder, a registry (its LATEST or the named version)."""
    if version is not None:
        path = path / version
    elif not (path / "manifest.json").exists() and (path / "LATEST").exists():
        path = path / (path / "LATEST").read_text(encoding="utf-8").strip()
    manifest_file = path / "manifest.json"
    if not manifest_file.exists():
        raise ModelNotFound(f"no model at {path} (expected manifest.json; train one with "
                            "`fraudscore train`)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("features") != list(FEATURE_NAMES):
        raise ModelNotFound(f"model {path} was trained on other features than this build has")
    return ModelRef(path, manifest)
