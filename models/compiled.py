"""LightGBM compiled to a native shared library, called through ctypes.

Two code generators are supported. Measured on 2 shared cores (batch 4096, one thread):
100 trees x 31 leaves, lleaves (LLVM, inlined) 1.18M rows/s vs tl2cgen (gcc) 0.29M and
LightGBM 0.14M, compiled in 9.5 s vs 4.6 s; 500 x 63, lleaves (not inlined) 78k vs 63k rows/s,
36 s vs 55 s. lleaves is the default and tl2cgen stays selectable. Both are wrapped in the
same small C entry points (``fs_predict_f32`` / ``fs_predict_f64``) that first read each
input the way LightGBM does (|x| <= 1e-35 as 0.0, ±inf as ±1e300), so both agree with
``Booster.predict`` to ~1e-16, NaN included: a NaN follows LightGBM's missing-value rule
for its split (the learned side, or 0.0's side where training saw no NaN).

Compiling runs in a child process with a hard deadline (its process group is killed when
the deadline passes), so a slow compile never blocks training; `compile_booster` then
returns None and the caller scores with ONNX Runtime's tree ensemble (`load_scorer`).

``python -m models.compiled build --backend B --model booster.txt --n-features F --out LIB``
is the child's entry point; it is not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.forest import Forest, probe_rows, read_forest

if TYPE_CHECKING:  # LightGBM takes seconds to import; scoring and the build child skip it
    import lightgbm as lgb

log = logging.getLogger(__name__)

ABI_VERSION = 1
BACKENDS = ("lleaves", "tl2cgen")
DEFAULT_BACKEND = "lleaves"
INLINE_MAX_LEAVES = 4000  # lleaves' inlining pays ~25 % speed but its compile time explodes
PARITY_LIMIT = 1e-5
PARITY_ROWS = 4096
_ROOT = Path(__file__).resolve().parents[1]


class CompiledModelError(ValueError):
    """A compiled model that cannot be used: missing, corrupt, or built for something else."""


class Scorer(Protocol):
    """What the runtime needs from a tree model: fraud probabilities for a batch."""

    def predict(self, x: np.ndarray) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------
# C glue shared by both backends
# ---------------------------------------------------------------------------------------

_WRAPPER_HEAD = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#define FS_ABI %(abi)d
#define NF %(nf)d
/* rows cleaned per call into the forest: 128 KB of stack; 32 KB chunks scored 3-5 %% fewer
   rows/s at batch 4096 (the tree code is walked once per chunk) */
#define CHUNK_ROWS (NF >= 16384 ? 1 : 16384 / NF)

/* LightGBM reads |x| <= kZeroThreshold as 0.0 and compares beyond ±1e300 as ±1e300. */
static inline double fs_clean(double v) {
  if (fabs(v) <= 1.0000000180025095e-35) return 0.0;
  if (v > 1e300) return 1e300;
  if (v < -1e300) return -1e300;
  return v;
}
static void fs_rows(double* rows, int64_t n, double* out);

int fs_abi(void) { return FS_ABI; }
int fs_num_feature(void) { return NF; }

void fs_predict_f64(const double* x, int64_t n, double* out) {
  double buf[CHUNK_ROWS * NF];
  for (int64_t r0 = 0; r0 < n; r0 += CHUNK_ROWS) {
    int64_t m = n - r0 < CHUNK_ROWS ? n - r0 : CHUNK_ROWS;
    const double* src = x + r0 * NF;
    for (int64_t i = 0; i < m * NF; ++i) buf[i] = fs_clean(src[i]);
    fs_rows(buf, m, out + r0);
  }
}

void fs_predict_f32(const float* x, int64_t n, double* out) {
  double buf[CHUNK_ROWS * NF];
  for (int64_t r0 = 0; r0 < n; r0 += CHUNK_ROWS) {
    int64_t m = n - r0 < CHUNK_ROWS ? n - r0 : CHUNK_ROWS;
    const float* src = x + r0 * NF;
    for (int64_t i = 0; i < m * NF; ++i) buf[i] = fs_clean((double)src[i]);
    fs_rows(buf, m, out + r0);
  }
}
"""

_LLEAVES_CORE = r"""
void forest_root(double* data, double* out, int start, int end);
static void fs_rows(double* rows, int64_t n, double* out) { forest_root(rows, out, 0, (int)n); }
"""

# tl2cgen marks a missing value by writing -1 into the low 32 bits of the double; a real
# double with those bits is moved one ulp up (exact unless a threshold has the same bits).
_TL2CGEN_CORE = r"""
#include "header.h"
static void fs_rows(double* rows, int64_t n, double* out) {
  union Entry e[NF];
  for (int64_t r = 0; r < n; ++r) {
    const double* row = rows + r * NF;
    for (int j = 0; j < NF; ++j) {
      double v = row[j];
      if (isnan(v)) { e[j].missing = -1; continue; }
      uint64_t bits; memcpy(&bits, &v, sizeof bits);
      if ((uint32_t)bits == 0xFFFFFFFFu) v = nextafter(v, INFINITY);
      e[j].fvalue = v;
    }
    out[r] = 0.0;
    predict(e, 0, out + r);
  }
}
"""


def _gcc(args: list[str], cwd: Path) -> None:
    done = subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"gcc {' '.join(args)} failed: {done.stderr[-2000:]}")


def _build_lleaves(model_file: Path, n_features: int, inline: bool, work: Path,
                   lib: Path) -> dict[str, Any]:
    """lleaves emits position-independent object code; gcc links it with the glue."""
    import lleaves

    # a baseline CPU keeps the library portable across x86-64 hosts; it measured as fast
    target = "x86-64" if platform.machine() in ("x86_64", "AMD64") else "generic"
    lleaves.Model(model_file=str(model_file)).compile(
        cache=str(work / "forest.o"), finline=inline, target_cpu=target, target_cpu_features=""
    )
    (work / "glue.c").write_text(
        _WRAPPER_HEAD % {"abi": ABI_VERSION, "nf": n_features} + _LLEAVES_CORE, encoding="utf-8"
    )
    _gcc(["-O2", "-fPIC", "-shared", "glue.c", "forest.o", "-o", str(lib), "-lm"], work)
    return {"finline": inline, "target_cpu": target}


def _build_tl2cgen(model_file: Path, n_features: int, inline: bool, work: Path,
                   lib: Path) -> dict[str, Any]:
    """tl2cgen writes C; the trees go into several files compiled side by side (no inlining
    switch: gcc decides)."""
    import tl2cgen
    import treelite

    model = treelite.frontend.load_lightgbm_model(str(model_file))
    units = max(1, model.num_tree // 25)
    src = work / "src"
    tl2cgen.generate_c_code(model, src, params={"quantize": 1, "parallel_comp": units})
    (src / "glue.c").write_text(
        _WRAPPER_HEAD % {"abi": ABI_VERSION, "nf": n_features} + _TL2CGEN_CORE, encoding="utf-8"
    )
    sources = sorted(p.name for p in src.glob("*.c"))
    jobs = max(1, os.cpu_count() or 1)
    running: list[subprocess.Popen[bytes]] = []
    for name in sources:  # -O1: -O2 took 4x longer on 500 trees for ~3 % speed
        running.append(subprocess.Popen(["gcc", "-O1", "-fPIC", "-c", name, "-o", name + ".o"],
                                        cwd=src, stderr=subprocess.PIPE))
        if len(running) >= jobs:
            _wait_gcc(running.pop(0))
    for proc in running:
        _wait_gcc(proc)
    _gcc(["-shared", *[n + ".o" for n in sources], "-o", str(lib), "-lm"], src)
    return {"quantize": 1, "units": units, "opt": "-O1"}


def _wait_gcc(proc: subprocess.Popen[bytes]) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"gcc failed: {err.decode(errors='replace')[-2000:]}")


def _child_main(argv: list[str]) -> int:
    """Build one library and print a JSON line with the options used (child process)."""
    parser = argparse.ArgumentParser(prog="python -m models.compiled")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--n-features", type=int, required=True)
    parser.add_argument("--inline", type=int, choices=[0, 1], default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    build = _build_lleaves if args.backend == "lleaves" else _build_tl2cgen
    options = build(args.model, args.n_features, bool(args.inline), args.out.parent, args.out)
    print(json.dumps(options))
    return 0


# ---------------------------------------------------------------------------------------
# Compile (parent side)
# ---------------------------------------------------------------------------------------

class _CompileTimeout(Exception):
    pass


def compile_booster(
    booster_text: str,
    out_dir: Path,
    timeout_s: float = 120.0,
    backend: str = "auto",
    sample: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """Compile the model into ``out_dir``; the manifest entry, or None (logged) on failure.

    ``backend="auto"`` tries lleaves, then tl2cgen if lleaves fails (not if it times out:
    the deadline covers everything). The library is checked against ``Booster.predict`` on
    ``sample`` plus rows that probe every threshold, NaN and ±inf; a difference above
    1e-5 counts as a failure, so a wrong library is never handed out.
    """
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, not {backend!r}")
    import lightgbm as lgb

    deadline = time.monotonic() + timeout_s
    try:
        booster = lgb.Booster(model_str=booster_text)
        forest = read_forest(booster)
    except (lgb.basic.LightGBMError, ValueError) as exc:
        log.warning("compiled model skipped: %s", exc)
        return None
    if shutil.which("gcc") is None:
        log.warning("compiled model skipped: gcc is not on PATH")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()  # gcc runs in the build folder: a relative path would miss
    candidates = BACKENDS if backend == "auto" else (backend,)
    for name in candidates:
        try:
            return _compile_one(name, booster_text, booster, forest, out_dir, deadline, sample)
        except _CompileTimeout:
            log.warning("compiling with %s passed the %.0f s limit; using ONNX Runtime",
                        name, timeout_s)
            return None
        except Exception as exc:  # any failure means: fall back, never a broken library
            log.warning("compiling with %s failed: %s", name, exc)
    return None


def _compile_one(backend: str, booster_text: str, booster: lgb.Booster, forest: Forest,
                 out_dir: Path, deadline: float, sample: np.ndarray | None) -> dict[str, Any]:
    started = time.monotonic()
    n_features = forest.n_features
    with tempfile.TemporaryDirectory(prefix=f".build-{backend}-", dir=out_dir) as tmp:
        work = Path(tmp)
        model_file = work / "booster.txt"
        model_file.write_text(booster_text, encoding="utf-8")
        lib_tmp = work / "forest.so"
        stdout = _run_child(
            ["build", "--backend", backend, "--model", str(model_file),
             "--n-features", str(n_features), "--out", str(lib_tmp),
             "--inline", str(int(forest.n_leaves <= INLINE_MAX_LEAVES))],
            deadline,
        )
        options = json.loads(stdout.strip().splitlines()[-1])
        digest = hashlib.sha256(lib_tmp.read_bytes()).hexdigest()
        name = f"tree-{backend}-{digest[:12]}.so"
        os.replace(lib_tmp, out_dir / name)
    entry: dict[str, Any] = {
        "backend": backend,
        "library": name,
        "sha256": digest,
        "abi": ABI_VERSION,
        "n_features": n_features,
        "machine": platform.machine(),
        "system": platform.system(),
        "options": options,
        "compile_s": round(time.monotonic() - started, 3),
    }
    model = load_compiled(out_dir, entry, n_features)
    entry["parity_max_abs_diff"] = _parity(booster, forest, model, sample)
    if entry["parity_max_abs_diff"] > PARITY_LIMIT:
        (out_dir / name).unlink(missing_ok=True)
        raise RuntimeError(f"parity {entry['parity_max_abs_diff']:.3g} above {PARITY_LIMIT}")
    return entry


def _run_child(args: list[str], deadline: float) -> str:
    """Run the build in its own process group, killed whole (gcc included) at the deadline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "models.compiled", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may have ended just now
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise _CompileTimeout from None
    if proc.returncode != 0:
        raise RuntimeError(f"build exited with {proc.returncode}: {err.strip()[-2000:]}")
    return out


def _parity(booster: lgb.Booster, forest: Forest, model: Scorer,
            sample: np.ndarray | None) -> float:
    """Largest difference on float32 and float64 rows; a NaN anywhere counts as infinite."""
    rows = [probe_rows(forest, PARITY_ROWS)]
    if sample is not None and len(sample):
        rows.append(np.asarray(sample, dtype=np.float64))
    worst = 0.0
    for x in rows:
        for xs in (x.astype(np.float32), x.astype(np.float64)):
            diff = np.abs(model.predict(xs) - booster.predict(xs, num_threads=1))
            worst = max(worst, float(np.max(np.nan_to_num(diff, nan=np.inf), initial=0.0)))
    return worst


# ---------------------------------------------------------------------------------------
# Load and score
# ---------------------------------------------------------------------------------------

SMALL_BATCH = 64  # rows copied into buffers whose addresses are cached: no per-call lookup


class CompiledModel:
    """Fraud probabilities from the compiled trees; single-threaded, NaN as in LightGBM.

    ``predict`` takes a 2-D array of width ``n_features`` (float32 and float64 are passed
    as they are, other dtypes converted, non-contiguous ones copied) and returns float64
    probabilities. Batches up to 64 rows go through preallocated buffers (cheaper than
    looking up each array's address), guarded by a lock so threads may share an instance.
    """

    def __init__(self, path: Path, n_features: int, backend: str) -> None:
        self.n_features = n_features
        self.backend = backend
        self.path = path
        # PyDLL keeps the GIL for the short calls (cheaper); CDLL drops it for batches
        small_lib, batch_lib = ctypes.PyDLL(str(path)), ctypes.CDLL(str(path))
        self._libs = (small_lib, batch_lib)  # keep the library mapped
        self._small = small_lib.fs_predict_f64
        self._f32 = batch_lib.fs_predict_f32
        self._f64 = batch_lib.fs_predict_f64
        for fn in (self._small, self._f32, self._f64):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            fn.restype = None
        self._in = np.zeros((SMALL_BATCH, n_features), dtype=np.float64)
        self._out = np.zeros(SMALL_BATCH, dtype=np.float64)
        self._in_ptr = self._in.ctypes.data
        self._out_ptr = self._out.ctypes.data
        self._in_views = [self._in[:k] for k in range(SMALL_BATCH + 1)]
        self._out_views = [self._out[:k] for k in range(SMALL_BATCH + 1)]
        self._lock = threading.Lock()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Fraud probability per row."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got shape {x.shape}")
        n = x.shape[0]
        if n <= SMALL_BATCH:
            with self._lock:
                np.copyto(self._in_views[n], x)
                self._small(self._in_ptr, n, self._out_ptr)
                return self._out_views[n].copy()
        if x.dtype == np.float32:
            fn = self._f32
        else:
            fn = self._f64
            if x.dtype != np.float64:
                x = x.astype(np.float64)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        out = np.empty(n, dtype=np.float64)
        fn(x.ctypes.data, n, out.ctypes.data)
        return out


def load_compiled(out_dir: Path, entry: dict[str, Any], n_features: int) -> CompiledModel:
    """Open a library that `compile_booster` made; CompiledModelError says what is wrong."""
    try:
        path = out_dir / str(entry["library"])
        expected = (str(entry["sha256"]), int(entry["abi"]), int(entry["n_features"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CompiledModelError(f"compiled-model entry is incomplete: {exc!r}") from exc
    if not path.is_file():
        raise CompiledModelError(f"compiled model missing: {path}")
    if hashlib.sha256(path.read_bytes()).hexdigest() != expected[0]:
        raise CompiledModelError(f"compiled model {path} fails its checksum")
    if expected[2] != n_features:
        raise CompiledModelError(
            f"compiled model {path} takes {expected[2]} features, the scorer has {n_features}")
    if expected[1] != ABI_VERSION:
        raise CompiledModelError(f"compiled model {path} has ABI {expected[1]}, this build "
                                 f"expects {ABI_VERSION}: recompile it")
    here = (platform.system(), platform.machine())
    built = (entry.get("system"), entry.get("machine"))
    if built != here:
        raise CompiledModelError(f"compiled model {path} was built for {built}, this is {here}")
    try:
        lib = ctypes.CDLL(str(path))
        lib.fs_abi.restype = ctypes.c_int
        lib.fs_num_feature.restype = ctypes.c_int
        abi, width = lib.fs_abi(), lib.fs_num_feature()
    except (OSError, AttributeError) as exc:
        raise CompiledModelError(f"compiled model {path} is not a loadable library: {exc}") from exc
    if (abi, width) != (ABI_VERSION, n_features):
        raise CompiledModelError(f"compiled model {path} reports ABI {abi} and {width} features")
    return CompiledModel(path, n_features, str(entry.get("backend", "?")))


class OnnxTreeModel:
    """The fallback: ONNX Runtime's tree ensemble behind the same ``predict``."""

    def __init__(self, model: bytes | Path, n_features: int) -> None:
        import onnxruntime as ort

        from models.export import INPUT_NAME

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model
        self._session = ort.InferenceSession(source, sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._input = INPUT_NAME
        self._output = self._session.get_outputs()[1].name
        self.n_features = n_features
        self.backend = "onnxruntime"

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Fraud probability per row (the ONNX input is float32)."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got shape {x.shape}")
        feed = {self._input: np.ascontiguousarray(x, dtype=np.float32)}
        return self._session.run([self._output], feed)[0][:, 1].astype(np.float64)


def load_scorer(out_dir: Path, entry: dict[str, Any] | None, n_features: int,
                onnx_model: bytes | Path) -> Scorer:
    """The compiled model when there is a usable one, else ONNX Runtime (logged why)."""
    if entry is not None:
        try:
            return load_compiled(out_dir, entry, n_features)
        except CompiledModelError as exc:
            log.warning("compiled model not used, scoring with ONNX Runtime: %s", exc)
    return OnnxTreeModel(onnx_model, n_features)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
