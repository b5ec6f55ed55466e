"""Loads the compiled extension seqfuse._C and says how it was built."""

from __future__ import annotations

import torch

try:
    from seqfuse import _C
except ImportError as err:  # pragma: no cover - exercised only by broken installs
    raise ImportError(
        f"seqfuse's compiled extension (seqfuse._C) could not be loaded: {err}. "
        f"Build it against the torch you run (torch {torch.__version__}) with "
        "`pip install --no-build-isolation -e .` from the seqfuse checkout."
    ) from err

_INFO = dict(_C.build_info())


def _check_cuda_version() -> None:
    built, running = _INFO["cuda"], torch.version.cuda
    if built is not None and running is not None and built.split(".")[0] != running.split(".")[0]:
        raise ImportError(
            f"seqfuse was built for CUDA {built} but torch uses CUDA {running}; rebuild it "
            "with `pip install --no-build-isolation -e .` under this torch."
        )


_check_cuda_version()


def build_info() -> dict:
    """How the extension was built: torch and CUDA versions, CUDA archs, backends.

    Returns a dict with keys ``torch`` (str), ``cuda`` (str, or None for a CPU-only
    build), ``cuda_archs`` (str, e.g. ``"8.0;9.0"``) and ``backends`` (tuple of
    ``"cpu"`` and, when compiled, ``"cuda"``).
    """
    return dict(_INFO)


def check_backend(op: str, *tensors: torch.Tensor | None) -> None:
    """Raises a clear error when a CUDA tensor reaches a CPU-only build."""
    if "cuda" in _INFO["backends"]:
        return
    for t in tensors:
        if t is not None and t.is_cuda:
            raise RuntimeError(
                f"seqfuse.{op}: got a CUDA tensor, but this seqfuse build has no CUDA "
                "kernels (built with a CPU-only torch or without nvcc). Rebuild under a "
                "CUDA torch with nvcc on PATH: `pip install --no-build-isolation -e .` "
                "(FORCE_CUDA=1 builds them even where no GPU is visible)."
            )
