"""GPU check: the tensorised tree graph and the neural graph on CUDA and on CPU.

    .venv/bin/python scripts/gpu_check.py [--model REGISTRY_OR_VERSION_DIR] [--rows 65536]

Scores one batch of ``--rows`` rows with each model through ONNX Runtime's CUDA execution
provider and its CPU provider, checks that the two agree (and the tree graph against
LightGBM, also on rows that probe every split threshold, NaN and ±inf), and prints one JSON
object with both throughputs. Without ``--model`` it trains a 100-tree, 31-leaf LightGBM
model and the project's neural model on synthetic rows; with it, it also times the worker's
own ``ModelRuntime`` with ``device=auto`` against ``cpu`` per batch size and counts the
decisions that differ. ``--rows-file`` scores real feature rows instead of synthetic ones.

When the GPU is there but the installed onnxruntime has no CUDA provider, it installs
onnxruntime-gpu (and NVIDIA's CUDA/cuDNN wheels when the system has no cuDNN 9) into a
cache folder, not into the project's environment (both packages claim the `onnxruntime`
module), and reruns itself with that folder first on the path. On a machine without an
NVIDIA GPU it is a dry run: CPU figures, cuda figures null, and a "reason". The whole run
is bounded to stay under 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 280.0
CPU_CHUNK = 8192  # the CPU scores in chunks: the GEMM graph's intermediates grow with rows
DEFAULT_TARGET = Path.home() / ".cache" / "fraudscore" / "onnxruntime-gpu"
Predict = Callable[[np.ndarray], np.ndarray]


def main() -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="registry or model folder (default: train)")
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--rows-file", type=Path,
                        help="feature rows (.npy, or .npz holding `x`) instead of synthetic ones; "
                             "tiled to --rows")
    parser.add_argument("--no-install", action="store_true", help="never pip install")
    parser.add_argument("--install-timeout", type=float, default=180.0)
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET,
                        help="folder for onnxruntime-gpu (kept between runs)")
    args = parser.parse_args()
    deadline = started + BUDGET_S

    gpu = gpu_name()
    import onnxruntime as ort

    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if gpu and not has_cuda_ep and not args.no_install:
        budget = min(args.install_timeout, deadline - time.monotonic() - 60)
        failure = install_onnxruntime_gpu(args.target, ort.__version__, budget)
        if failure is None:
            return rerun_with(args.target, deadline)
        note = f"onnxruntime-gpu install failed: {failure}"
    else:
        note = None

    if hasattr(ort, "preload_dlls") and gpu:
        try:
            ort.preload_dlls()  # CUDA/cuDNN from NVIDIA's wheels, when that is where they are
        except Exception as exc:
            note = note or f"preload_dlls: {exc}"
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    reason = note
    if not gpu:
        reason = "no NVIDIA GPU (nvidia-smi not found or lists none): dry run on CPU"
    elif not cuda:
        reason = reason or "onnxruntime has no CUDAExecutionProvider"

    tree, neural, lightgbm_predict, width, forest = build_models(args.model)
    x = (load_rows(args.rows_file, args.rows, width) if args.rows_file
         else synthetic_rows(args.rows, width))
    report: dict[str, Any] = {
        "device": gpu or "cpu-only",
        "providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
        "rows": args.rows,
        "cpu_threads": os.cpu_count(),
    }
    use_cuda = cuda and gpu is not None
    report["tree_gemm"], cpu_out = measure(tree, x, use_cuda)
    report["tree_gemm"]["parity_vs_lightgbm"] = float(
        np.max(np.abs(cpu_out[0][:CPU_CHUNK] - lightgbm_predict(x[:CPU_CHUNK]))))
    report["tree_gemm"]["probe_parity_vs_lightgbm"] = probe_parity(tree, forest,
                                                                   lightgbm_predict, use_cuda)
    report["neural"], _ = measure(neural, x, use_cuda)
    if args.model is not None:
        report["runtime"] = measure_runtime(args.model, x, use_cuda)
    errors = [report[k].get("cuda_error") for k in ("tree_gemm", "neural")]
    if reason is None and any(errors):
        reason = "CUDA session failed: " + "; ".join(e for e in errors if e)
    if reason:
        report["reason"] = reason
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


def gpu_name() -> str | None:
    """The first GPU nvidia-smi lists, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out else None


def install_onnxruntime_gpu(target: Path, version: str, timeout_s: float) -> str | None:
    """pip install into ``target``; None when done, else why not.

    onnxruntime-gpu is built for one CUDA major version (12 up to 1.2x, 13 since): the
    NVIDIA wheels it needs are read from its own metadata (its `cuda` and `cudnn` extras)
    and installed only when the system lacks those libraries.
    """
    if timeout_s < 10:
        return "no time left"
    end = time.monotonic() + timeout_s
    error = "not tried"
    for spec in (f"onnxruntime-gpu=={version}", "onnxruntime-gpu"):  # pinned, then latest
        error = _pip_target(target, [spec], end)
        if error is None:
            break
    if error is not None:
        return error
    wheels = cuda_wheels(target)
    if wheels and not system_has_cuda_libs(cuda_major(wheels)):
        return _pip_target(target, wheels, end)
    return None


def _pip_target(target: Path, packages: list[str], end: float) -> str | None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--upgrade", "--target", str(target), *packages]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "pip did not finish in time"
    return None if done.returncode == 0 else done.stderr.strip()[-400:]


def cuda_wheels(target: Path) -> list[str]:
    """The NVIDIA wheels that the installed onnxruntime-gpu names for CUDA and cuDNN."""
    found = sorted(target.glob("onnxruntime_gpu-*.dist-info/METADATA"))
    if not found:
        return []
    wheels = []
    for line in found[-1].read_text(encoding="utf-8", errors="replace").splitlines():
        name, _, marker = line.removeprefix("Requires-Dist:").partition(";")
        if line.startswith("Requires-Dist:") and re.search(r"extra == .(cuda|cudnn).", marker):
            wheels.append(name.strip().replace(" ", ""))
    major = cuda_major(wheels)
    if major and not any(w.startswith("nvidia-cublas") for w in wheels):
        # the extras leave cuBLAS out; the CUDA provider links it
        wheels.append(f"nvidia-cublas-cu{major}" if major < 13 else f"nvidia-cublas~={major}.0")
    return wheels


def cuda_major(wheels: list[str]) -> int | None:
    """12 from `nvidia-cuda-runtime-cu12`, 13 from `nvidia-cuda-runtime~=13.0`."""
    for wheel in wheels:
        match = re.match(r"nvidia-cuda-runtime(?:-cu(\d+))?(?:~=|==|>=)?(\d+)?", wheel)
        if match and (match.group(1) or match.group(2)):
            return int(match.group(1) or match.group(2))
    return None


def system_has_cuda_libs(major: int | None) -> bool:
    if major is None:
        return False
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return all(lib in cache for lib in (f"libcudart.so.{major}", f"libcublasLt.so.{major}",
                                        "libcudnn.so.9"))


def rerun_with(target: Path, deadline: float) -> int:
    """Run this script again with the installed onnxruntime-gpu first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    libs = sorted({str(p.parent) for p in target.glob("nvidia/**/lib*.so*")})
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*libs, env.get("LD_LIBRARY_PATH")]))
    try:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--no-install"],
                              env=env, timeout=max(10.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        print(json.dumps({"device": gpu_name(), "reason": "timed out after installing"}))
        return 1
    return done.returncode


# ---------------------------------------------------------------------------------------


def build_models(model_dir: Path | None) -> tuple[bytes, bytes, Predict, int, Any]:
    """(tree GEMM graph, neural graph, LightGBM predict, width): from a registry or trained."""
    import lightgbm as lgb

    from features.definitions import N_FEATURES
    from models.forest import read_forest
    from models.tensorized import booster_to_gemm_onnx

    neural_bytes: bytes | None = None
    if model_dir is not None:
        from models.registry import BOOSTER, NEURAL_ONNX, resolve

        ref = resolve(model_dir)
        booster = lgb.Booster(model_file=str(ref.path / BOOSTER))
        if (ref.path / NEURAL_ONNX).exists():
            neural_bytes = (ref.path / NEURAL_ONNX).read_bytes()
    else:
        from models.bench import synthetic_booster

        booster = synthetic_booster(100, 31, N_FEATURES)
    width = booster.num_feature()
    if neural_bytes is None:
        neural_bytes = train_neural(width)
    tree = booster_to_gemm_onnx(booster).SerializeToString()

    def lightgbm_predict(x: np.ndarray) -> np.ndarray:
        return booster.predict(x, num_threads=os.cpu_count() or 1)

    return tree, neural_bytes, lightgbm_predict, width, read_forest(booster)


def train_neural(width: int) -> bytes:
    """The project's neural model when models.neural offers a trainer, else a small MLP."""
    from models.bench import synthetic_data

    x, y = synthetic_data(20_000, width, seed=3)
    try:
        from models import neural
    except ImportError:
        neural = None
    if neural is not None and hasattr(neural, "fit_neural"):
        half = len(x) // 2
        return neural.fit_neural(x[:half], y[:half], x[half:], y[half:],
                                 max_rows=10_000).onnx_bytes
    if neural is not None and hasattr(neural, "fit_autoencoder"):
        return neural.fit_autoencoder(x).onnx_bytes
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=30, random_state=0)
    clf.fit(np.nan_to_num(x), y)
    return to_onnx(clf, np.zeros((1, width), dtype=np.float32),
                   options={"zipmap": False}).SerializeToString()


def synthetic_rows(n: int, width: int) -> np.ndarray:
    from models.bench import synthetic_data

    return synthetic_data(n, width, seed=11)[0]


def probe_parity(tree: bytes, forest: Any, lightgbm_predict: Predict, cuda: bool
                 ) -> dict[str, Any]:
    """The GEMM graph against LightGBM on rows built to sit on, one float32 step below and
    one above every split threshold, with NaN, ±inf and ±0 sprinkled in: where a float32
    comparison or the missing-value rule could send a row down another branch."""
    from models.forest import probe_rows

    rows = probe_rows(forest, 8192, seed=5)
    expected = lightgbm_predict(rows)
    result: dict[str, Any] = {"rows": len(rows)}
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        got = run_all(session(tree, cuda=device == "cuda", strict=False), rows, len(rows))[0]
        result[device] = float(np.max(np.abs(got.reshape(-1).astype(np.float64) - expected)))
    return result


def load_rows(path: Path, n: int, width: int) -> np.ndarray:
    """`n` rows of `width` features from a .npy, or an .npz holding `x`, tiled as needed."""
    try:
        loaded = np.load(path, allow_pickle=False)
        x = np.asarray(loaded["x"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded,
                       dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--rows-file {path}: not a numeric .npy or an .npz with `x` "
                         f"({exc})") from None
    if x.ndim != 2 or x.shape[1] != width or len(x) == 0:
        raise SystemExit(f"--rows-file {path}: expected rows of {width} features, "
                         f"got shape {x.shape}")
    return np.tile(x, (-(-n // len(x)), 1))[:n]


def measure_runtime(model_dir: Path, x: np.ndarray, cuda: bool) -> dict[str, Any]:
    """The worker's own scorer (``ModelRuntime``), CPU against CUDA, per batch size.

    ``device="auto"`` must pick CUDA by itself when the provider is there; the scores of the
    two devices are compared, with the decisions that differ at the review threshold.
    """
    from models.registry import resolve
    from models.runtime import ModelRuntime

    ref = resolve(model_dir)
    runtimes = {"cpu": ModelRuntime(ref, device="cpu")}
    if cuda:
        try:
            runtimes["cuda"] = ModelRuntime(ref, device="auto")
        except Exception as exc:  # report, do not crash: the CPU figures still stand
            return {"cuda_error": str(exc)[:400]}
    result: dict[str, Any] = {}
    scores = {}
    for name, rt in runtimes.items():
        per_batch = {}
        for batch in (1, 64, 512, 4096, 65_536):
            rows = x[:batch]
            seconds = timed(lambda rt=rt, rows=rows: rt.score(rows), min_runs=3, min_s=0.5)
            per_batch[str(batch)] = {"ms_per_call": round(seconds * 1e3, 3),
                                     "rows_per_s": round(batch / seconds, 1)}
        scores[name] = rt.score(x)
        result[name] = {"device": rt.device, "tree_backend": rt.tree_backend,
                        "batches": per_batch}
    if "cuda" in scores:
        import onnxruntime as ort

        from models.registry import GEMM_ONNX
        from models.runtime import providers

        # what ONNX Runtime really runs on: a CUDA provider that fails to load falls back
        result["cuda_session_providers"] = ort.InferenceSession(
            str(ref.path / GEMM_ONNX), providers=providers("auto")).get_providers()
        # missing and infinite features: the same defined behaviour on both devices
        bad = x[:4096].copy()
        draw = np.random.default_rng(3).random(bad.shape)
        bad[draw < 0.05] = np.nan
        bad[(draw >= 0.05) & (draw < 0.06)] = np.inf
        bad[(draw >= 0.06) & (draw < 0.07)] = -np.inf
        cpu_bad, gpu_bad = runtimes["cpu"].score(bad), runtimes["cuda"].score(bad)
        result["non_finite_rows"] = {"rows": len(bad), "cpu": runtimes["cpu"].non_finite_rows,
                                     "cuda": runtimes["cuda"].non_finite_rows,
                                     "fraud_max_abs_diff": float(np.max(np.abs(
                                         cpu_bad.fraud - gpu_bad.fraud)))}
        cpu, gpu = scores["cpu"], scores["cuda"]
        threshold = float(ref.manifest["review_threshold"])
        result["parity_max_abs_diff"] = {
            k: float(np.max(np.abs(getattr(cpu, k) - getattr(gpu, k))))
            for k in ("fraud", "anomaly", "tree")}
        result["review_threshold"] = threshold
        result["decision_flips"] = int(np.sum((cpu.fraud >= threshold)
                                              != (gpu.fraud >= threshold)))
        result["alerts_cpu"] = int(np.sum(cpu.fraud >= threshold))
    return result


def session(model: bytes, cuda: bool, strict: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if cuda and strict:  # CUDA alone: fail rather than quietly run part of the graph on CPU
        providers = ["CUDAExecutionProvider"]
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    elif cuda:
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model, sess_options=opts, providers=providers)


def run_all(sess: Any, x: np.ndarray, chunk: int) -> list[np.ndarray]:
    inp = sess.get_inputs()[0]
    dtype = np.float64 if "double" in inp.type else np.float32
    parts = [sess.run(None, {inp.name: np.ascontiguousarray(x[i:i + chunk], dtype=dtype)})
             for i in range(0, len(x), chunk)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def timed(fn: Callable[[], Any], min_runs: int = 3, min_s: float = 1.0) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times: list[float] = []
    end = time.monotonic() + min_s
    while len(times) < min_runs or (time.monotonic() < end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(u.astype(np.float64) - v.astype(np.float64)), initial=0.0))
               for u, v in zip(a, b, strict=True))


def measure(model: bytes, x: np.ndarray, cuda: bool) -> tuple[dict[str, Any], list[np.ndarray]]:
    """CPU and (when asked) CUDA rows/s, the CUDA-vs-CPU difference, and the CPU outputs."""
    cpu = session(model, cuda=False)
    cpu_out = run_all(cpu, x, CPU_CHUNK)
    result: dict[str, Any] = {
        "cpu_rows_per_s": round(len(x) / timed(lambda: run_all(cpu, x, CPU_CHUNK)), 1),
        "cuda_rows_per_s": None,
        "parity_max_abs_diff": None,
    }
    if not cuda:
        return result, cpu_out
    try:
        try:
            gpu = session(model, cuda=True)
        except Exception as exc:  # some node has no CUDA kernel: measure anyway, say so
            result["cuda_note"] = f"some nodes fell back to CPU: {str(exc)[:300]}"
            gpu = session(model, cuda=True, strict=False)
        gpu_out = run_all(gpu, x, len(x))
    except Exception as exc:  # onnxruntime raises untyped errors; report, do not crash
        result["cuda_error"] = str(exc)[:400]
        return result, cpu_out
    result["cuda_rows_per_s"] = round(len(x) / timed(lambda: run_all(gpu, x, len(x))), 1)
    result["parity_max_abs_diff"] = max_diff(gpu_out, cpu_out)
    return result, cpu_out


if __name__ == "__main__":
    sys.exit(main())
