"""python -m convert: Hugging Face OPT/Llama/Mistral/Qwen2/Qwen3 directories, hub ids, GGUF files or random presets ->
a dejavu_jax checkpoint directory (config.json + orbax params/ + tokenizer files).

    python -m convert path/to/hf-opt-dir checkpoints/opt-125m
    python -m convert facebook/opt-125m checkpoints/opt-125m            # when the hub is reachable
    python -m convert model.Q4_1.gguf checkpoints/smollm2 --dtype fp32
    python -m convert --preset opt-6.7b checkpoints/opt-6.7b-random --dtype fp16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from convert.hf import ConversionError
from dejavu_jax.cli import HelpFormatter


def convert(source: str | None, out: str | Path, *, preset: str | None = None, dtype: str = "fp32",
            seed: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert one source into a checkpoint directory, atomically. Returns the directory."""
    from dejavu_jax.checkpoint import parse_dtype, save_checkpoint
    from dejavu_jax.config import preset as get_preset
    from dejavu_jax.model import init_params

    jdtype = parse_dtype(dtype)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    tokenizer, extra = None, {}
    if preset is not None:
        if source is not None:
            raise ValueError("give either a source or --preset, not both")
        cfg = get_preset(preset)
        params = init_params(cfg, jax.random.PRNGKey(seed), jdtype)
    elif source is None:
        raise ValueError("nothing to convert: give a source (HF directory, hub id or .gguf file) or --preset")
    elif str(source).endswith(".gguf"):
        from convert.gguf import load_gguf

        if not Path(source).is_file():
            raise ConversionError(f"GGUF file {source} does not exist")
        cfg, params, tokenizer = load_gguf(source, progress=progress)
    else:
        from convert.hf import load_hf, tokenizer_files

        cfg, params, directory = load_hf(source, progress=progress)
        extra = tokenizer_files(directory)
    if preset is None:
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jdtype), params)
    return save_checkpoint(out, cfg, params, tokenizer=tokenizer, extra_files=extra, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a Hugging Face OPT, Llama, Mistral, Qwen2 or Qwen3 model (local directory with "
                    "safetensors or pytorch .bin shards, or a hub id when the network allows), a GGUF file, or a "
                    "random preset into a dejavu_jax checkpoint directory. The output appears only when conversion "
                    "succeeds.",
        formatter_class=HelpFormatter)
    p.add_argument("source", nargs="?", help="HF model directory, hub id (org/name) or .gguf file")
    p.add_argument("out", help="checkpoint directory to create")
    p.add_argument("--preset", help="random weights at a preset's shapes instead of a source "
                                    "(e.g. opt-125m ... opt-66b, opt-175b, smollm2-135m)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="stored parameter dtype")
    p.add_argument("--seed", type=int, default=0, help="seed for --preset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(args.source, args.out, preset=args.preset, dtype=args.dtype, seed=args.seed,
                      overwrite=args.overwrite)
    except (ConversionError, ValueError, FileExistsError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
