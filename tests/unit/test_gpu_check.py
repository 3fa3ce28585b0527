"""scripts/gpu_check.py: which NVIDIA wheels an onnxruntime-gpu build asks for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _metadata(target: Path, version: str, lines: list[str]) -> None:
    info = target / f"onnxruntime_gpu-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("\n".join(["Name: onnxruntime-gpu", *lines]) + "\n")


def test_cuda13_build_names_its_extras_and_cublas(gpu_check: ModuleType, tmp_path: Path) -> None:
    # as onnxruntime-gpu 1.31.1's METADATA has them
    _metadata(tmp_path, "1.31.1", [
        "Requires-Dist: numpy>=1.21.6",
        'Requires-Dist: sympy; extra == "symbolic"',
        'Requires-Dist: nvidia-cuda-nvrtc~=13.0; extra == "cuda"',
        'Requires-Dist: nvidia-cuda-runtime~=13.0; extra == "cuda"',
        'Requires-Dist: nvidia-curand~=10.0; extra == "cuda"',
        'Requires-Dist: nvidia-cudnn-cu13~=9.0; extra == "cudnn"',
    ])
    wheels = gpu_check.cuda_wheels(tmp_path)
    assert wheels == ["nvidia-cuda-nvrtc~=13.0", "nvidia-cuda-runtime~=13.0",
                      "nvidia-curand~=10.0", "nvidia-cudnn-cu13~=9.0", "nvidia-cublas~=13.0"]
    assert gpu_check.cuda_major(wheels) == 13


def test_cuda12_names_and_no_metadata(gpu_check: ModuleType, tmp_path: Path) -> None:
    assert gpu_check.cuda_major(["nvidia-cuda-runtime-cu12==12.4.127"]) == 12
    assert gpu_check.cuda_major(["nvidia-cudnn-cu12"]) is None
    assert gpu_check.cuda_wheels(tmp_path) == []  # nothing installed: nothing to add
    assert gpu_check.system_has_cuda_libs(None) is False


def test_rows_file_is_checked_and_tiled(gpu_check: ModuleType, tmp_path: Path) -> None:
    good = tmp_path / "rows.npz"
    np.savez_compressed(good, x=np.arange(12.0).reshape(4, 3))
    x = gpu_check.load_rows(good, 10, 3)
    assert x.shape == (10, 3) and np.array_equal(x[4:8], x[:4])
    with pytest.raises(SystemExit, match="expected rows of 5 features"):
        gpu_check.load_rows(good, 10, 5)
    garbage = tmp_path / "rows.npy"
    garbage.write_bytes(b"not numpy at all")
    with pytest.raises(SystemExit, match=r"not a numeric \.npy"):
        gpu_check.load_rows(garbage, 10, 3)
    with pytest.raises(SystemExit, match=r"not a numeric \.npy"):
        gpu_check.load_rows(tmp_path / "missing.npz", 10, 3)
