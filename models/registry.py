"""Versioned model artifacts: one folder per version, checksummed, with a manifest.

``<registry>/<version>/`` holds ``booster.txt`` (LightGBM, for reason codes and as the
reference), ``tree.onnx`` (exact tree ensemble), ``tree_gemm.onnx`` (the same trees as
tensor operations, for GPUs), ``neural.onnx`` (autoencoder + MLP), ``compiled/`` (the tree
model as native code, when compiling succeeded in time) and ``manifest.json``. Versions are
content hashes, so retraining the same data gives the same name and nothing is silently
overwritten; ``<registry>/LATEST`` names the version used when none is given.
Loading verifies every file's SHA-256 and the feature list against this build's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from features.definitions import FEATURE_NAMES

if TYPE_CHECKING:  # training pulls in LightGBM and scikit-learn, which workers never need
    from models.ensemble import Ensemble

log = logging.getLogger(__name__)

BOOSTER, TREE_ONNX, GEMM_ONNX, NEURAL_ONNX, COMPILED = (
    "booster.txt", "tree.onnx", "tree_gemm.onnx", "neural.onnx", "compiled")
MANIFEST, LATEST = "manifest.json", "LATEST"
FORMAT = 2


class ModelError(Exception):
    """A model cannot be used; the message says which and why."""


class ModelNotFound(ModelError, FileNotFoundError):
    """No model at the given path or version."""


class ModelCorrupt(ModelError):
    """A model's files do not match its manifest, or the manifest is unreadable."""


@dataclass(frozen=True)
class ModelRef:
    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def file(self, name: str) -> Path:
        return self.path / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_digest(*columns: np.ndarray) -> str:
    """Fingerprint of the training rows (ids, times, labels), recorded in the manifest."""
    h = hashlib.sha256()
    for c in columns:
        h.update(np.ascontiguousarray(c).tobytes())
    return h.hexdigest()


def save(
    ens: Ensemble,
    registry: Path,
    training: dict[str, Any],
    sample: np.ndarray,
    compile_timeout_s: float = 120.0,
    compile_backend: str = "auto",
) -> ModelRef:
    """Write a new version and point LATEST at it; `sample` rows check every artifact."""
    from models.ensemble import manifest_entries
    from models.export import lightgbm_to_onnx, parity

    booster_text = ens.tree.booster.model_to_string()
    neural_bytes = ens.neural.onnx_bytes
    digest = hashlib.sha256(booster_text.encode() + neural_bytes
                            + json.dumps(ens.thresholds).encode()).hexdigest()[:12]
    version = f"fs-{digest}"
    folder = registry / version
    registry.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).exists():  # same content trained again: keep the existing copy
        (registry / LATEST).write_text(version + "\n", encoding="utf-8")
        return resolve(folder)

    tmp = registry / f".{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    x = np.ascontiguousarray(sample, dtype=np.float64)
    (tmp / BOOSTER).write_text(booster_text, encoding="utf-8")
    tree_onnx = lightgbm_to_onnx(ens.tree.booster)
    (tmp / TREE_ONNX).write_bytes(tree_onnx.SerializeToString())
    (tmp / NEURAL_ONNX).write_bytes(neural_bytes)
    parities: dict[str, float | None] = {
        "onnx": parity(ens.tree.booster, tree_onnx, x),
        "neural_onnx": _neural_parity(ens),
    }
    try:
        from models.tensorized import booster_to_gemm_onnx, gemm_parity

        gemm = booster_to_gemm_onnx(ens.tree.booster)
        (tmp / GEMM_ONNX).write_bytes(gemm.SerializeToString())
        parities["gemm_onnx"] = gemm_parity(ens.tree.booster, gemm, x)
    except ImportError:
        log.warning("GEMM exporter not available: no GPU tree artifact")

    compiled: dict[str, Any] | None = None
    try:
        from models.compiled import compile_booster

        if compile_timeout_s > 0:  # 0: do not compile (ONNX Runtime serves the trees)
            compiled = compile_booster(booster_text, tmp / COMPILED, timeout_s=compile_timeout_s,
                                       backend=compile_backend)
    except ImportError:
        log.warning("tree compiler not available: scoring will use ONNX Runtime")
    if compiled is None:
        shutil.rmtree(tmp / COMPILED, ignore_errors=True)
    else:
        parities["compiled"] = compiled.get("parity_max_abs_diff")

    files = {str(p.relative_to(tmp)): sha256_file(p)
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "features": list(FEATURE_NAMES),
        "training": training,
        **manifest_entries(ens),
        "parity_max_abs_diff": parities,
        "compiled": compiled,
        "feature_quantiles": _feature_quantiles(x),
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float), encoding="utf-8")
    tmp.rename(folder)
    (registry / LATEST).write_text(version + "\n", encoding="utf-8")
    return ModelRef(folder, manifest)


def _neural_parity(ens: Ensemble) -> float:
    from models.neural import NeuralSession

    session = NeuralSession(ens.neural.onnx_bytes, ens.neural.error_quantiles)
    errors, logits = session.run(ens.neural.reference_x)
    diff = float(np.max(np.abs(errors - ens.neural.reference_error), initial=0.0))
    if logits is not None:
        diff = max(diff, float(np.max(np.abs(logits - ens.neural.reference_logit), initial=0.0)))
    return diff


def _feature_quantiles(x: np.ndarray) -> dict[str, list[float]]:
    """Deciles of each feature on the sample: the baseline for drift (PSI) reports."""
    if len(x) == 0:
        return {}
    q = np.nanquantile(x, np.linspace(0, 1, 11), axis=0)
    return {name: q[:, i].tolist() for i, name in enumerate(FEATURE_NAMES)}


def resolve(path: Path, version: str | None = None, verify: bool = True) -> ModelRef:
    """A model folder, or a registry (its LATEST or the named version), checked."""
    path = Path(path)
    if version is not None and version != "latest":
        path = path / version
    elif not (path / MANIFEST).exists() and (path / LATEST).exists():
        path = path / (path / LATEST).read_text(encoding="utf-8").strip()
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        known = versions(path.parent) if version else []
        hint = f"; known versions: {', '.join(known)}" if known else \
            " (train one with `fraudscore train`)"
        raise ModelNotFound(f"no model at {path}: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or "version" not in manifest:
            raise ValueError("not a model manifest")
    except ValueError as exc:
        raise ModelCorrupt(f"model {path}: unreadable {MANIFEST} ({exc})") from None
    if manifest.get("features") != list(FEATURE_NAMES):
        theirs = manifest.get("features") or []
        raise ModelCorrupt(
            f"model {path} was trained on {len(theirs)} features "
            f"({', '.join(sorted(set(theirs) ^ set(FEATURE_NAMES))) or 'other order'} differ) "
            f"but this build computes {len(FEATURE_NAMES)}: retrain it with this version")
    ref = ModelRef(path, manifest)
    if verify:
        verify_files(ref)
    return ref


def verify_files(ref: ModelRef) -> None:
    """Every file the manifest lists exists and has its recorded SHA-256."""
    files = ref.manifest.get("files")
    if not isinstance(files, dict) or BOOSTER not in files:
        raise ModelCorrupt(f"model {ref.path}: the manifest lists no checksummed files "
                           "(made by an older fraudscore? retrain it)")
    for name, expected in files.items():
        f = ref.path / name
        if not f.is_file():
            raise ModelCorrupt(f"model {ref.path}: {name} is missing")
        if sha256_file(f) != expected:
            raise ModelCorrupt(f"model {ref.path}: {name} does not match its checksum "
                               "(changed or corrupted since it was registered)")


def versions(registry: Path) -> list[str]:
    """Registered versions, oldest first."""
    if not registry.is_dir():
        return []
    found = [p for p in registry.iterdir() if (p / MANIFEST).is_file()]
    return [p.name for p in sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime)]
