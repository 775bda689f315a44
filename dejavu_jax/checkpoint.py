"""Checkpoint directories: `config.json` + orbax `params/` + tokenizer files (+ `predictors/`).

Writers build the whole directory under a temporary sibling name and rename it at the end, so an
interrupted or failed write never leaves a half checkpoint where a reader would find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from dejavu_jax.config import ModelConfig
from dejavu_jax.model import Params, check_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def parse_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False):
    """Yield a temporary directory that becomes `target` only if the block succeeds."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_params(path: str | Path, params: Params) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params)
        ckptr.wait_until_finished()


def restore_params(path: str | Path, abstract: Params) -> Params:
    """Restore a pytree saved by `save_params` into the dtypes/shardings of `abstract`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), abstract)


def save_checkpoint(directory: str | Path, cfg: ModelConfig, params: Params, *, tokenizer=None,
                    extra_files: dict[str, str | Path] | None = None, overwrite: bool = False) -> Path:
    """Write a checkpoint directory atomically. `tokenizer` is anything with `save_pretrained`."""
    check_params(params, cfg)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        cfg.save(tmp / CONFIG_FILE)
        save_params(tmp / PARAMS_DIR, params)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, src in (extra_files or {}).items():
            shutil.copy(src, tmp / name)
    return Path(directory)


def load_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a dejavu_jax checkpoint: no {CONFIG_FILE} "
                              f"(convert a Hugging Face or GGUF model with `python -m convert` first)")
    try:
        return ModelConfig.load(cfg_path)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not a dejavu_jax model config: {e}") from e


def load_checkpoint(directory: str | Path, dtype=jnp.bfloat16, sharding=None) -> tuple[ModelConfig, Params]:
    """Load (config, params) with every parameter cast to `dtype` (and placed with `sharding`).

    sharding: one jax Sharding for every leaf, or a pytree of shardings shaped like the params
    (e.g. `sharding.param_shardings(cfg, mesh)`): orbax then reads each device's slice only.
    """
    from dejavu_jax.model import param_shapes, _is_shape

    cfg = load_config(directory)
    params_dir = Path(directory) / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory} has a config but no {PARAMS_DIR}/ (incomplete checkpoint)")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding),
                                          param_shapes(cfg), is_leaf=_is_shape)
    else:  # a pytree of shardings, one per parameter
        try:
            abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh),
                                              param_shapes(cfg), sharding, is_leaf=_is_shape)
        except ValueError as e:
            raise CheckpointError(f"the sharding tree does not match {directory}'s parameters: {e}") from e
    try:
        params = restore_params(params_dir, abstract)
    except Exception as e:  # orbax raises a variety of errors for mismatched trees/shapes
        raise CheckpointError(f"could not restore parameters from {params_dir}: {e}") from e
    check_params(params, cfg)
    return cfg, params


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside the params (transformers AutoTokenizer), or None if absent."""
    directory = Path(directory)
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))

