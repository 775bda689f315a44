"""Helpers shared by the kernel files: power-of-two sizes and launch parameters.

Triton-backed Pallas needs every in-kernel array size to be a power of two, so the wrappers round
block sizes up with `pow2_ceil` and mask the loads and stores that run past the real extent.
"""
from __future__ import annotations

import dataclasses

import jax

# A row-block program that owns fewer entries than this is not worth launching; the wrappers aim
# for several programs per SM (132 SMs on an H100) so that enough loads are in flight.
TARGET_PROGRAMS = 264


def pow2_ceil(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pow2_floor(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Triton launch parameters; None lets Pallas pick."""

    num_warps: int | None = 4
    num_stages: int | None = None


def check_pow2(**sizes: int) -> None:
    for name, n in sizes.items():
        if n < 1 or n & (n - 1):
            raise ValueError(f"{name}={n} must be a power of two")


def check_block_keys(blocks: dict, allowed: tuple[str, ...], op: str) -> None:
    unknown = sorted(set(blocks) - set(allowed))
    if unknown:
        raise TypeError(f"{op}: unknown block arguments {unknown}; valid ones are {list(allowed)}")


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"
