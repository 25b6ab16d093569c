"""Native CPU codecs: a small C file compiled at first use, called through ctypes.

``csrc/*.c`` (plain C, no torch headers; ``activations.c``, ``quantize.c``, ``dropout.c``,
``maxpool.c`` and the shared ``float_bits.h``) make one pass per direction for the
few-bit activations: encode + pack + per-chunk count of non-finite inputs, and unpack + level
lookup + multiply; for 1-bit masks (computed by torch), packing and the non-finite counts;
for the group quantizer (:mod:`fewbit.codecs.quantize`), quantize + pack and unpack +
dequantize.
Results are byte-identical to the eager torch path (tests compare them).

Build: at the first call that needs it, ``cc -O3 -fPIC -shared`` (compiler from ``$CC``, else
``cc``; plus ``-fopenmp`` when torch's OpenMP runtime is GNU libgomp, so that the C loops run
on torch's own thread pool and follow ``torch.set_num_threads``; without OpenMP they are
serial) writes ``fewbit_codecs-<hash>.so`` into a per-user cache directory
(``$FEWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fewbit``, else ``~/.cache/fewbit``), keyed by
the hash of the sources and flags, so later processes only load it. Compiling takes well
under a second; nothing compiles at install or import time.

Eager instead of native (callers check :func:`library`, which returns ``None``):

* ``FEWBIT_COMPILE=0`` or ``FEWBIT_NATIVE=0`` in the environment (read at every call);
* no C compiler, or a failed compile or load: one ``RuntimeWarning``, then ``None`` for the
  rest of the process (results stay identical, only slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["library", "native_enabled", "uses_openmp", "fresh_buffer", "direct_call_ok", "SOURCES"]

CSRC = Path(__file__).with_name("csrc")
# Compiled together into one library; headers in CSRC are part of the cache key.
SOURCES = (
    CSRC / "activations.c", CSRC / "quantize.c", CSRC / "dropout.c", CSRC / "maxpool.c"
)
_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off", "-fno-math-errno")
# Compiler used when $CC is unset (tests point it at a missing program to check the fallback).
COMPILER = "cc"

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    # x, n, inf_bits, symmetric, bkeys, nb, nan_code, bits, out, chunk, counts, threads
    # -> non-finite
    "fewbit_encode_pack_16": (
        [_ptr, _i64, ctypes.c_uint16, _i32, _ptr, _i32, _i32, _i32, _ptr, _i64, _ptr, _i32],
        _i64,
    ),
    "fewbit_encode_pack_32": (
        [_ptr, _i64, ctypes.c_uint32, _i32, _ptr, _i32, _i32, _i32, _ptr, _i64, _ptr, _i32],
        _i64,
    ),
    "fewbit_encode_pack_64": (
        [_ptr, _i64, ctypes.c_uint64, _i32, _ptr, _i32, _i32, _i32, _ptr, _i64, _ptr, _i32],
        _i64,
    ),
}
for _width, _type in ((16, ctypes.c_uint16), (32, ctypes.c_uint32), (64, ctypes.c_uint64)):
    # x, n, inf_bits, chunk, counts, threads -> non-finite
    _SIGNATURES[f"fewbit_count_nonfinite_{_width}"] = ([_ptr, _i64, _type, _i64, _ptr, _i32], _i64)
# mask (bytes 0/1), n, out
_SIGNATURES["fewbit_pack_mask"] = ([_ptr, _i64, _ptr], None)
for _name in ("f32", "f64", "bf16", "f16"):
    # packed, n, bits, grad, out, start, stop, lut, zero_exact, threads
    _SIGNATURES[f"fewbit_decode_mul_{_name}"] = (
        [_ptr, _i64, _i32, _ptr, _ptr, _i64, _i64, _ptr, _i32, _i32],
        None,
    )
for _name in ("f32", "f64", "bf16", "f16"):
    # x, row_len, group_size, g0, g1, key, bits, flags, packed, lo, scale
    # (flags: bit 0 lo stored as fp16, bit 1 OpenMP split allowed, bit 2 portable code only)
    _SIGNATURES[f"fewbit_quantize_{_name}"] = (
        [_ptr, _i64, _i64, _i64, _i64, ctypes.c_uint32, _i32, _i32, _ptr, _ptr, _ptr],
        None,
    )
    # packed, row_len, group_size, g0, g1, bits, lo, flags, scale, out
    _SIGNATURES[f"fewbit_dequantize_{_name}"] = (
        [_ptr, _i64, _i64, _i64, _i64, _i32, _ptr, _i32, _ptr, _ptr],
        None,
    )


for _name in ("f32", "f64", "bf16", "f16"):
    # dropout.c: x, n, k0, k1, thr, scale, out, packed / packed, n, grad, scale, out
    _SIGNATURES[f"fewbit_dropout_fwd_{_name}"] = (
        [_ptr, _i64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_double, _ptr,
         _ptr],
        None,
    )
    _SIGNATURES[f"fewbit_dropout_bwd_{_name}"] = ([_ptr, _i64, _ptr, ctypes.c_double, _ptr], None)
# maxpool.c: idx, n, geometry (int64[18]), bits, packed / packed, n, geometry, bits, idx
_SIGNATURES["fewbit_maxpool_encode"] = ([_ptr, _i64, _ptr, _i32, _ptr], None)
_SIGNATURES["fewbit_maxpool_decode"] = ([_ptr, _i64, _ptr, _i32, _ptr], None)
# quantize.c: pointer, bytes (the transparent huge page hint of fresh_buffer)
_SIGNATURES["fewbit_advise_hugepages"] = ([_ptr, _i64], None)

# Fresh output buffers from this many bytes get the transparent huge page hint. glibc serves
# allocations this large (its largest dynamic mmap threshold on 64-bit) from fresh mappings,
# whose first write faults in every 4 KiB page; smaller ones mostly reuse heap memory that is
# already mapped, where the hint only costs (measured in a training step: hinting from 4 MiB
# made the 2-bit generic mode's dequantize 1.2-3.4x slower, with stalls of up to 40 ms).
HUGE_PAGE_MIN_BYTES = 32 << 20


def native_enabled() -> bool:
    """False when ``FEWBIT_COMPILE=0`` or ``FEWBIT_NATIVE=0`` (then the eager path runs)."""
    return (
        os.environ.get("FEWBIT_COMPILE", "1") != "0" and os.environ.get("FEWBIT_NATIVE", "1") != "0"
    )


def _cache_dir() -> Path:
    explicit = os.environ.get("FEWBIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fewbit"


def _torch_openmp_is_libgomp() -> bool:
    """Whether the OpenMP runtime in this process is GNU libgomp (torch's Linux wheels bundle
    it as ``libgomp.so.1``). Only then is the library built with ``-fopenmp``: its
    ``libgomp.so.1`` dependency resolves to the runtime already loaded, so fewbit's parallel
    loops run on torch's own OpenMP threads and follow ``torch.set_num_threads`` (a second
    runtime would spin against torch's threads on the same cores)."""
    try:
        with open("/proc/self/maps") as maps:
            return "libgomp" in maps.read()
    except OSError:  # not Linux
        return False


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    """Compile the sources into the cache (once per source hash and flags); the .so path."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    key = digest.hexdigest()[:16]
    target = _cache_dir() / f"fewbit_codecs-{key}.so"
    if target.exists():
        return target
    exe = shutil.which(compiler)
    if exe is None:
        raise FileNotFoundError(f"C compiler {compiler!r} not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [exe, *flags, f"-I{CSRC}", *map(str, SOURCES), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, target)  # atomic: concurrent processes see a whole file or none
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{compiler} failed: {err.stderr.strip()[:500]}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _open(compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build(compiler, flags)))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[ctypes.CDLL], bool]:
    """The loaded library (None after one warning) and whether it uses OpenMP; cached for
    the process (tests clear it with ``_load.cache_clear()``)."""
    compiler = os.environ.get("CC") or COMPILER
    if _torch_openmp_is_libgomp():
        try:
            return _open(compiler, (*_FLAGS, "-fopenmp")), True
        except Exception:  # no OpenMP support in this compiler: the serial build below
            pass
    try:
        return _open(compiler, _FLAGS), False
    except Exception as err:  # no compiler, failed compile or load: eager from now on
        warnings.warn(
            f"fewbit: building the native CPU codecs failed ({type(err).__name__}: {err}); "
            "using the eager PyTorch codecs (same results, slower). Set FEWBIT_COMPILE=0 to "
            "skip compiling.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, False


def uses_openmp() -> bool:
    """Whether the native library runs its loops on torch's OpenMP threads (False when it is
    serial, disabled or unavailable)."""
    return native_enabled() and _load()[1]


def direct_call_ok(*tensors: torch.Tensor) -> bool:
    """Whether a codec's custom op may be skipped for its implementation on these tensors:
    plain CPU tensors (no subclass: no fake, functional or distributed tensor), outside
    ``torch.compile`` tracing and with no torch function or dispatch mode active. Then the
    dispatcher would only reach the CPU implementation, at about 35 us per call (measured:
    150 calls per training step in the generic 2-bit mode)."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
    )


def fresh_buffer(lib: ctypes.CDLL, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(numel, dtype=dtype)`` on the CPU for a native pass that writes every
    element; from ``HUGE_PAGE_MIN_BYTES`` on, the kernel is asked for transparent huge pages
    on it (``madvise``, a hint: contents and semantics unchanged; Linux only). A fresh 64 MiB
    buffer takes 16384 page faults at first write, about 15 ms on this project's machine
    against 7 ms with huge pages and 3 ms for the write itself."""
    out = torch.empty(numel, dtype=dtype)
    nbytes = numel * out.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        lib.fewbit_advise_hugepages(out.data_ptr(), nbytes)
    return out


def library() -> Optional[ctypes.CDLL]:
    """The native codec library, built at first use; None when disabled or unavailable."""
    if not native_enabled():
        return None
    return _load()[0]
