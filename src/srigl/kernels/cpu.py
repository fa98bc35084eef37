"""The compiled CPU backend: builds ``csrc/`` on first use and calls its torch operators.

Why compile at run time (JIT) rather than at install time
    A build-time torch extension (``setup.py`` with ``CppExtension``) needs torch *inside* pip's
    isolated build environment. pip would then resolve an unpinned torch there (the default
    wheel is a multi-gigabyte CUDA build) and compile against it, which may not even be the
    pinned runtime torch the binary is then loaded into. Building on first use against the torch
    already imported avoids both problems, keeps ``pip install`` a pure-Python install, and keeps
    the library usable with no compiler at all: any build failure falls back to the pure-torch
    backend (``reference.py``), with one ``RuntimeWarning`` naming the cause and the fix (the
    fallback is slower than a dense layer, so a silent one would mislead). The first build of a
    process prints one line to stderr while it runs (tens of seconds, once per CPU level and
    source version; later processes load the cached binary).

Why these compiler flags
    ``-march=native`` would make the cached binary valid only on CPUs at least as capable as the
    one that built it, and the build cache (``~/.cache/torch_extensions`` or
    ``$TORCH_EXTENSIONS_DIR``) may be shared by machines with different CPUs (an NFS home, a
    container image built elsewhere). Instead the ISA level comes from the capability torch
    itself detected at run time (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or
    baseline) and is spelled out as explicit ``-m`` flags; that level is part of the extension's
    name, so a cached build is reused only by a process whose CPU has the same capability, and
    an edited source gets a new name through its hash.

Why this registration
    The source registers plain torch operators (``TORCH_LIBRARY``) instead of a pybind11 module:
    that header set compiles in seconds rather than tens of seconds and needs no Python headers.
    ``-fopenmp`` is needed because ``at::parallel_for`` is a header template containing the
    ``omp parallel`` region; the resulting library links ``libgomp.so.1``, which resolves to the
    copy torch has already loaded, so there is one OpenMP pool and ``torch.set_num_threads``
    governs the kernels.

Why bfloat16 needs no flag of its own
    bf16 operands are widened to float inside the kernel (a 16-bit shift, any x86 level) and the
    products accumulate in float. The one AVX-512-BF16 instruction used (``vdpbf16ps``, in the
    small-batch gather route) sits in a function with a ``target("avx512bf16")`` attribute and is
    chosen at run time from CPUID (:func:`bf16_route`), so every AVX-512 CPU can load the same
    cached binary, and the ISA level in the extension's name stays torch's own.

Why fake implementations
    ``torch.compile`` traces with FakeTensors (shapes, no data), and an operator registered from
    C++ for the CPU only has no way to say what it returns without running. :func:`_build`
    therefore registers a fake ("meta") implementation of each operator right after loading it
    (``torch.library.register_fake``), so dynamo and inductor put the operators into their graphs
    as opaque calls instead of breaking the graph there. They live on the Meta dispatch key and
    leave the eager CPU dispatch untouched.

The build happens at most once per process (a lock makes concurrent first calls wait for one
build); torch's file lock in the build directory serialises concurrent processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "build", "load_error", "forward", "forward_op", "forward_rows_op", "densify_op", "place_columns_op", "window_ops", "backward", "backward_with_bias", "conv_forward", "conv_backward", "conv_pixels", "bf16_route", "FORWARD_GATHER_MAX_BATCH", "BACKWARD_GATHER_MAX_BATCH"]

_log = logging.getLogger("srigl.kernels")

# One translation unit, csrc/ops.cpp, which includes the other files of csrc/ (one header per route).
_SOURCE_DIR = Path(__file__).with_name("csrc")
_SOURCE = _SOURCE_DIR / "ops.cpp"
_OP_NAMESPACE = "srigl_fanin"

#: Batches up to these sizes use the gather layout, larger ones the transposed layout. The forward
#: gather's cost grows with every batch row while the transposed path's is flat over the first few;
#: the backward gather (a gather plus a scalar scatter per row) already loses at batch 2. The
#: measured crossovers are in results/kernel_tuning.md.
FORWARD_GATHER_MAX_BATCH = 2
BACKWARD_GATHER_MAX_BATCH = 1

_lock = threading.Lock()
# "ops", "forward_op", "forward_rows_op" (and "window_ops" on AVX-512) on success, "error" on
# failure; empty until the first try.
_state: dict[str, object] = {}


def _isa_flags() -> tuple[str, list[str]]:
    """The ISA level torch detected on this CPU, and the matching compiler flags."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic", []
    if capability == "AVX512":
        # torch's AVX512 level means F+BW+VL+DQ; prefer 512-bit vectors (GCC tunes for 256 otherwise).
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                          "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def _extension_name(level: str, flags: list[str]) -> str:
    """``srigl_fanin_<level>_<hash>``, the hash over every file of ``csrc/`` (names and bytes) and the
    flags: editing any source, header included, gives a new name and so a fresh build."""
    digest = hashlib.sha256()
    for path in sorted(_SOURCE_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(flags).encode())
    return f"srigl_fanin_{level}_{digest.hexdigest()[:12]}"


def _ninja_path() -> str | None:
    """A directory to add to PATH so torch finds ninja, or None when PATH already has it.

    ``pip install ninja`` puts the executable next to the interpreter of the environment, which
    is not on PATH when that interpreter is called by its full path (``.venv/bin/python``).
    """
    import shutil

    if shutil.which("ninja") is not None:
        return None
    candidate = Path(sys.executable).parent
    return str(candidate) if (candidate / "ninja").exists() else None


def _is_cached(cpp_extension, name: str) -> bool:
    """Whether a binary built for ``name`` is in torch's extension cache (loading it takes a moment)."""
    try:
        directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # a private helper of torch: if it moves, say nothing rather than fail
        return True
    return (directory / f"{name}.so").exists()


def build() -> str:
    """Build (or load from the cache) the C++ kernel now; returns where it came from or raises
    RuntimeError with the compiler's output. ``srigl kernels build`` calls it ahead of time."""
    if not available():
        raise RuntimeError(f"srigl C++ kernel could not be built: {load_error()}")
    return f"srigl C++ kernel ready ({_isa_flags()[0]})"


def _build() -> object:
    """Compiles and loads the extension; returns ``torch.ops.srigl_fanin``. Raises on failure."""
    from torch.utils import cpp_extension  # lazy: it imports setuptools machinery

    level, isa = _isa_flags()
    flags = ["-O3", "-fopenmp", *isa]  # torch adds the -std it was built with
    extra_path = _ninja_path()
    old_path = os.environ.get("PATH", "")
    if extra_path is not None:
        # Scoped to the build; the lock keeps other srigl builds from seeing a half-set PATH.
        os.environ["PATH"] = extra_path + os.pathsep + old_path
    name = _extension_name(level, flags)
    if not _is_cached(cpp_extension, name):
        print(f"srigl: compiling the C++ fan-in kernel for this CPU ({level}; once, about 20 s)...", file=sys.stderr,
              flush=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    finally:
        if extra_path is not None:
            os.environ["PATH"] = old_path
    _register_fakes()
    return getattr(torch.ops, _OP_NAMESPACE)


def _check_fake_operands(x, values, indices) -> None:
    # The shape checks of the kernel's check_operands, so that a traced graph fails where eager would.
    torch._check(x.dim() == 2, lambda: f"srigl_fanin: x must be 2-D (batch, in_features), got {x.dim()} dims")
    torch._check(
        values.dim() == 2 and indices.shape == values.shape,
        lambda: f"srigl_fanin: values {tuple(values.shape)} and indices {tuple(indices.shape)} must be (out, k)",
    )


def _forward_fake(x, values, indices, bias, gather_max_batch, max_width, chunk_rows):
    _check_fake_operands(x, values, indices)
    return x.new_empty(x.shape[0], values.shape[0])  # (batch, out), contiguous as the kernel's


def _forward_rows_fake(x, values, indices, bias, rows, out_full, gather_max_batch, max_width, chunk_rows):
    _check_fake_operands(x, values, indices)
    return x.new_empty(x.shape[0], out_full)  # (batch, out_full)


def _backward_fake(grad_y, x, values, indices, need_grad_x, need_grad_values, need_grad_bias,
                   gather_max_batch, max_width, chunk_rows):
    _check_fake_operands(x, values, indices)
    # The kernel returns undefined tensors (None in Python) for the gradients it was not asked for.
    return (
        x.new_empty(x.shape) if need_grad_x else None,  # (batch, in)
        values.new_empty(values.shape) if need_grad_values else None,  # (out, k)
        x.new_empty(values.shape[0]) if need_grad_bias else None,  # (out,)
    )


def _densify_fake(values, indices, in_features):
    return values.new_empty((values.shape[0], in_features))


def _place_columns_fake(active, rows, bias, out_full):
    return active.new_empty((active.shape[0], out_full))


def _conv_out_size(x, kernel, stride, padding, dilation) -> tuple[int, int]:
    padded = (x.shape[2] + padding[2] + padding[3], x.shape[3] + padding[0] + padding[1])
    return tuple((padded[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(2))


def _conv_forward_fake(x, values, indices, rows, out_channels, kernel, stride, padding, dilation, groups, max_tile):
    torch._check(x.dim() == 4, lambda: f"srigl_fanin: conv x must be 4-D (N, C, H, W), got {x.dim()} dims")
    return x.new_empty(x.shape[0], out_channels, *_conv_out_size(x, kernel, stride, padding, dilation))


def _conv_backward_fake(grad_y, x, values, indices, rows, out_channels, kernel, stride, padding, dilation, groups,
                        need_grad_x, need_grad_values, max_tile):
    return (x.new_empty(x.shape) if need_grad_x else None, values.new_empty(values.shape) if need_grad_values else None)


def _conv_pixels_fake(x, values, indices, rows, bias, out_channels, kernel, stride, padding, dilation, groups):
    torch._check(x.dim() == 4, lambda: f"srigl_fanin: conv x must be 4-D (N, C, H, W), got {x.dim()} dims")
    return x.new_empty(x.shape[0], out_channels, *_conv_out_size(x, kernel, stride, padding, dilation))


def _register_fakes() -> None:
    """Shape-only implementations of the operators, for tracing (see the module docstring)."""
    for name, fake in (("forward", _forward_fake), ("forward_rows", _forward_rows_fake),
                       ("backward", _backward_fake), ("densify", _densify_fake), ("place_columns", _place_columns_fake), ("conv_forward", _conv_forward_fake),
                       ("conv_backward", _conv_backward_fake), ("conv_pixels", _conv_pixels_fake)):
        torch.library.register_fake(f"{_OP_NAMESPACE}::{name}", fake)


def _ops() -> object | None:
    """The loaded operator namespace, building it on the first call; None if it cannot be built."""
    ops = _state.get("ops")
    if ops is not None or "error" in _state:
        return ops
    with _lock:
        if not _state:
            try:
                ops = _build()
                # Looked up once here rather than on first use, so that code traced by
                # torch.compile only reads _state (a write there would fail dynamo's guards on
                # the next call and compile the graph a second time).
                _state.update(ops=ops, forward_op=ops.forward.default, forward_rows_op=ops.forward_rows.default,
                              densify_op=ops.densify.default, place_columns_op=ops.place_columns.default)
                if _isa_flags()[0] == "avx512":  # the window kernel is AVX-512 only (csrc/window.h says why)
                    _state["window_ops"] = (ops.pack_windows.default, ops.forward_windows.default)
            except Exception as error:  # any failure (no compiler, no ninja, ...) means: fall back
                _state["error"] = f"{type(error).__name__}: {error}"
                _log.debug("srigl C++ kernel unavailable, using the torch fallback: %s", _state["error"])
                first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
                warnings.warn(
                    f"srigl: the C++ fan-in kernel could not be built ({type(error).__name__}: {first_line[:200]}); "
                    "condensed layers fall back to pure torch, which is slower than dense. Install a C++ compiler "
                    "and ninja (pip install ninja), then `srigl kernels build`; srigl.kernels.cpu.load_error() has "
                    "the full output; SRIGL_DISABLE_EXTENSION=1 chooses the fallback without trying",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _state.get("ops")


def _loaded_ops() -> object:
    """:func:`_ops`, raising where it is None (the kernel cannot be built here)."""
    ops = _ops()
    if ops is None:
        raise RuntimeError(f"srigl C++ kernel is not available: {load_error()}")
    return ops


def _conv_fan_in(x: torch.Tensor, groups: int, kernel_size: tuple[int, int]) -> int:
    """A conv row's fan-in, ``C / groups * kh * kw``, for ``x`` (N, C, H, W)."""
    return x.shape[1] // groups * kernel_size[0] * kernel_size[1]


def _loaded_op(key: str):
    """A compiled operator handle stored at load time (see :func:`_ops`); builds on first use."""
    op = _state.get(key)
    if op is None:
        _loaded_ops()
        op = _state[key]
    return op


def forward_op():
    """The compiled forward as an ``OpOverload`` (``srigl_fanin::forward``), for hot paths.

    Calling it skips this module's wrapper (a visible cost at batch 1); arguments as :func:`forward`'s
    operator: ``(x, values, indices, bias, gather_max_batch, max_width, chunk_rows)`` with int16
    or int32 indices. Raises RuntimeError when the kernel is not available.
    """
    return _loaded_op("forward_op")


def forward_rows_op():
    """The compiled ``srigl_fanin::forward_rows`` (see :func:`srigl.kernels.fanin_matmul_rows`):
    ``(x, values, indices, bias, rows, out_full, gather_max_batch, max_width, chunk_rows)``."""
    return _loaded_op("forward_rows_op")


def densify_op():
    """The compiled ``srigl_fanin::densify(values, indices, in_features) -> (n_active, in_features)``:
    the rows of a condensed layer as a dense matrix, zeros where no index points (duplicates add up),
    float32/float64/bfloat16 values with int16/int32 indices; every index is range-checked."""
    return _loaded_op("densify_op")


def place_columns_op():
    """The compiled ``srigl_fanin::place_columns(active, rows, bias, out_full) -> (batch, out_full)``:
    column ``rows[o]`` is ``active[:, o]``, every other column its bias (or 0); rows checked."""
    return _loaded_op("place_columns_op")


def window_ops() -> tuple[object, object] | None:
    """``(pack_windows, forward_windows)``, the window layout's operators, or None where the
    kernel is unavailable or was not built for AVX-512 (see ``csrc/window.h``).

    ``pack_windows(values, indices, in_features) -> packed`` (float32, in_features >= 32; uint8
    buffer) and ``forward_windows(x, packed, bias, rows, out_full) -> y``, where ``rows`` (or None)
    and ``bias`` are as :func:`forward_rows_op`'s.
    """
    if _ops() is None:
        return None
    return _state.get("window_ops")


def bf16_route(portable: bool | None = None) -> str:
    """Which bf16 dot product the small-batch (gather) route uses: ``"avx512_bf16"`` (``vdpbf16ps``,
    where the CPU has AVX-512-BF16) or ``"portable"`` (bf16 widened to float, the float gather).

    Args:
        portable: True forces the portable route in this process (tests compare the two on one
            machine), False lets the CPU decide again; None only asks.

    Raises:
        RuntimeError: the kernel is not available.
    """
    ops = _loaded_ops()
    return ops.bf16_route(-1 if portable is None else int(portable))


def available() -> bool:
    """True when the compiled kernel is (or could just now be) loaded. Builds on the first call."""
    return _ops() is not None


def load_error() -> str | None:
    """Why the build failed (compiler output included), or None if it succeeded or was not tried."""
    error = _state.get("error")
    return None if error is None else str(error)


def _narrow(indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """int64 indices as int32 (the kernel is built for int16/int32 only, to keep its build short).

    Costs one copy of the index matrix per call; :func:`srigl.kernels.index_dtype_for` avoids it.
    """
    if indices.dtype != torch.int64:
        return indices
    if in_features - 1 > torch.iinfo(torch.int32).max:
        raise RuntimeError(f"srigl C++ kernel addresses at most 2**31 inputs, got in_features={in_features}")
    return indices.to(torch.int32)


def forward(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    gather_max_batch: int = FORWARD_GATHER_MAX_BATCH,
    max_width: int = 0,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for the condensed ``W``; x is (batch, in), contiguous, float32/64 or
    bfloat16 (float accumulation, one rounding per output).

    Args:
        x: (batch, in_features), contiguous.
        values: (out_features, k), contiguous, x's dtype.
        indices: (out_features, k), contiguous int16/int32/int64 (int64 is narrowed per call),
            already validated.
        bias: (out_features,) or None.
        gather_max_batch: tuning knob, largest batch that uses the gather layout.
        max_width: tuning knob, batch columns per transposed tile (0: sized for L2).
        chunk_rows: tuning knob, input rows per cache chunk of the tiled loops (0: automatic).

    Returns:
        (batch, out_features).
    """
    ops = _loaded_ops()
    return ops.forward(x, values, _narrow(indices, x.shape[1]), bias, gather_max_batch, max_width, chunk_rows)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    need_grad_x: bool,
    need_grad_values: bool,
    *,
    gather_max_batch: int = BACKWARD_GATHER_MAX_BATCH,
    max_width: int = 0,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`forward` w.r.t. x (batch, in) and values (out, k); None where not needed."""
    grad_x, grad_values, _ = backward_with_bias(
        grad_y, x, values, indices, need_grad_x, need_grad_values, False,
        gather_max_batch=gather_max_batch, max_width=max_width, chunk_rows=chunk_rows,
    )
    return grad_x, grad_values


def backward_with_bias(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    need_grad_x: bool,
    need_grad_values: bool,
    need_grad_bias: bool,
    *,
    gather_max_batch: int = BACKWARD_GATHER_MAX_BATCH,
    max_width: int = 0,
    chunk_rows: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`backward` plus the bias gradient (out,), ``grad_y.sum(0)``, summed by the kernel from
    the grad_y tiles it transposes anyway; None where not needed.

    bf16 operands run the float32 backward on widened copies and the gradients are rounded back to
    bf16: the kernel's backward accumulates into its outputs across tiles and input chunks, which
    in bf16 would round at every step. The copies cost a pass over x, grad_y and values, small
    next to the product.
    """
    ops = _loaded_ops()
    if values.dtype is torch.bfloat16:
        grads = backward_with_bias(
            grad_y.float(), x.float(), values.float(), indices, need_grad_x, need_grad_values, need_grad_bias,
            gather_max_batch=gather_max_batch, max_width=max_width, chunk_rows=chunk_rows,
        )
        return tuple(None if grad is None else grad.to(torch.bfloat16) for grad in grads)
    grad_x, grad_values, grad_bias = ops.backward(
        grad_y, x, values, _narrow(indices, x.shape[1]), need_grad_x, need_grad_values, need_grad_bias,
        gather_max_batch, max_width, chunk_rows,
    )
    return (
        grad_x if need_grad_x else None,
        grad_values if need_grad_values else None,
        grad_bias if need_grad_bias else None,
    )


def conv_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    rows: torch.Tensor,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    max_tile: int = 0,
) -> torch.Tensor:
    """The condensed conv2d of ``x`` (N, C, H, W) zero-padded on the fly, without an im2col tensor.

    ``y[n, rows[i], p] = sum_j values[i, j] * x_pad[n, c, p * stride + (a, b) * dilation]`` where
    ``indices[i, j]`` is the position ``(c, a, b)`` in the row's ``(C / groups, kh, kw)`` fan-in (its
    group's channels); channels no row names are 0.

    Args:
        x: (N, C, H, W), contiguous float32/64.
        values, indices: (n_active, k), contiguous; indices int16/int32/int64 (int64 narrowed per call).
        rows: (n_active,) int64, the output channel of each row of ``values``.
        out_channels, kernel_size, stride, dilation, groups: the convolution's.
        padding: zero padding ``(left, right, top, bottom)``, as ``F.pad`` takes it.
        max_tile: tuning knob, most batch entries per transposed tile (0: sized for L2).

    Returns:
        (N, out_channels, Ho, Wo).
    """
    ops = _loaded_ops()
    fan_in = _conv_fan_in(x, groups, kernel_size)
    return ops.conv_forward(x, values, _narrow(indices, fan_in), rows, out_channels, list(kernel_size), list(stride),
                            list(padding), list(dilation), groups, max_tile)


def conv_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    rows: torch.Tensor,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    need_grad_x: bool,
    need_grad_values: bool,
    *,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    max_tile: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`conv_forward` w.r.t. x (N, C, H, W) and values (n_active, k), from a
    contiguous ``grad_y`` (N, out_channels, Ho, Wo); None where not needed."""
    ops = _loaded_ops()
    fan_in = _conv_fan_in(x, groups, kernel_size)
    grad_x, grad_values = ops.conv_backward(
        grad_y, x, values, _narrow(indices, fan_in), rows, out_channels, list(kernel_size), list(stride),
        list(padding), list(dilation), groups, need_grad_x, need_grad_values, max_tile,
    )
    return (grad_x if need_grad_x else None, grad_values if need_grad_values else None)


def conv_pixels(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """The condensed conv2d of :func:`conv_forward` plus ``bias``, for inference (no backward): output
    pixels are the vector lanes (``csrc/conv_pixels.h``), so it wastes no lanes at batch 1 and
    reads and writes NCHW in place, where :func:`conv_forward` transposes tiles of the batch.

    Args:
        x: (N, C, H, W), contiguous float32/64.
        values, indices: (n_active, k), contiguous; indices int16/int32/int64 (int64 narrowed per call).
        rows: (n_active,) int64, the output channel of each row of ``values``.
        bias: (out_channels,) or None; channels no row names output their bias (or 0).
        out_channels, kernel_size, stride, dilation, groups: the convolution's.
        padding: zero padding ``(left, right, top, bottom)``, as ``F.pad`` takes it.

    Returns:
        (N, out_channels, Ho, Wo).
    """
    ops = _loaded_ops()
    fan_in = _conv_fan_in(x, groups, kernel_size)
    return ops.conv_pixels(x, values, _narrow(indices, fan_in), rows, bias, out_channels, list(kernel_size),
                           list(stride), list(padding), list(dilation), groups)
