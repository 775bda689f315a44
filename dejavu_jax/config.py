"""Model configuration: one frozen dataclass for the OPT and Llama families.

Code branches only on the fields (norm kind, MLP activation, position scheme, ...), never on a
model name. Presets give the public shapes; `from_dict`/`to_dict` are the on-disk form
(`config.json` in a checkpoint directory).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["relu", "swiglu"]
Positions = Literal["learned", "rope"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H (query heads)
    num_kv_heads: int  # KV; == H for multi-head attention
    head_dim: int  # Dh
    ffn_size: int  # F (MLP neurons)
    max_positions: int
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "relu"
    positions: Positions = "learned"
    position_offset: int = 0  # OPT's learned positions start at index 2
    rope_theta: float = 10000.0
    # RoPE scaling as one divisor per rotary frequency ([Dh/2]; None: plain RoPE): Llama 3.1-3.3's
    # "llama3" scaling, "linear" scaling, or a GGUF file's rope_freqs tensor (convert/ computes them).
    rope_freq_factors: tuple[float, ...] | None = None
    # YaRN's scale of cos and sin (of queries and keys alike, so the logits grow by its square); 1 for
    # every other kind of RoPE.
    rope_attention_factor: float = 1.0
    attn_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each query and key head (Dh) before RoPE (Qwen3)
    pre_norm: bool = True  # False: OPT-350m's post-LayerNorm blocks
    final_norm: bool = True
    word_embed_dim: int | None = None  # OPT project_in/out width; None means == hidden_size
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    family: str = "opt"  # informational only; used for messages and predictor compatibility checks
    name: str = ""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "ffn_size", "max_positions"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm {self.norm!r}")
        if self.activation not in ("relu", "swiglu"):
            raise ValueError(f"unknown activation {self.activation!r}")
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"unknown positions {self.positions!r}")
        if self.rope_freq_factors is not None:  # a list when read from config.json; a tuple keeps it hashable
            factors = tuple(float(f) for f in self.rope_freq_factors)
            object.__setattr__(self, "rope_freq_factors", factors)
            if self.positions != "rope" or len(factors) != self.head_dim // 2 or min(factors) <= 0:
                raise ValueError(f"rope_freq_factors must be {self.head_dim // 2} positive divisors of a RoPE "
                                 f"model's frequencies, got {len(factors)} for positions={self.positions!r}")
        if self.rope_attention_factor <= 0 or (self.rope_attention_factor != 1.0 and self.positions != "rope"):
            raise ValueError(f"rope_attention_factor must be positive and needs positions='rope', got "
                             f"{self.rope_attention_factor} for positions={self.positions!r}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT-350m embeds at 512 and projects to 1024)."""
        return self.word_embed_dim or self.hidden_size

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def up_rows(self) -> int:
        """Rows per neuron in the stacked up-projection: gate and up for SwiGLU, one for ReLU."""
        return 2 if self.activation == "swiglu" else 1

    @property
    def kv_group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        D, F, H, KV, Dh = self.hidden_size, self.ffn_size, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = H * Dh * D * 2 + 2 * KV * Dh * D + self.up_rows * F * D + F * D
        embeds = self.vocab_size * self.embed_dim
        if self.positions == "learned":
            embeds += (self.max_positions + self.position_offset) * self.hidden_size
        if not self.tie_embeddings:
            embeds += self.vocab_size * self.embed_dim
        if self.has_projections:
            embeds += 2 * self.embed_dim * self.hidden_size
        return self.num_layers * per_layer + embeds

    # Serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # Presets -------------------------------------------------------------------------------
    @classmethod
    def opt(cls, name: str, *, hidden: int, layers: int, heads: int, word_embed_dim: int | None = None,
            pre_norm: bool = True) -> "ModelConfig":
        return cls(
            vocab_size=50272, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
            head_dim=hidden // heads, ffn_size=4 * hidden, max_positions=2048, norm="layernorm", norm_eps=1e-5,
            activation="relu", positions="learned", position_offset=2, attn_bias=True, mlp_bias=True,
            pre_norm=pre_norm, final_norm=pre_norm, word_embed_dim=word_embed_dim, tie_embeddings=True,
            bos_token_id=2, eos_token_id=2, pad_token_id=1, family="opt", name=name,
        )


def _opt_presets() -> dict[str, ModelConfig]:
    shapes = {  # name: (hidden, layers, heads)
        "opt-125m": (768, 12, 12),
        "opt-1.3b": (2048, 24, 32),
        "opt-2.7b": (2560, 32, 32),
        "opt-6.7b": (4096, 32, 32),
        "opt-13b": (5120, 40, 40),
        "opt-30b": (7168, 48, 56),
        "opt-66b": (9216, 64, 72),
        "opt-175b": (12288, 96, 96),
    }
    presets = {name: ModelConfig.opt(name, hidden=h, layers=l, heads=n) for name, (h, l, n) in shapes.items()}
    # OPT-350m: post-LayerNorm blocks, no final norm, 512-wide embeddings projected to 1024.
    presets["opt-350m"] = ModelConfig.opt("opt-350m", hidden=1024, layers=24, heads=16, word_embed_dim=512,
                                          pre_norm=False)
    return presets


PRESETS: dict[str, ModelConfig] = {
    **_opt_presets(),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        ffn_size=1536, max_positions=8192, norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
        positions="rope", rope_theta=100000.0, attn_bias=False, mlp_bias=False, pre_norm=True,
        final_norm=True, tie_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        family="llama", name="smollm2-135m",
    ),
    # Llama-family shapes for timing on random weights (bench --preset); real checkpoints convert
    # with their own configs.
    "llama-2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
        ffn_size=11008, max_positions=4096, norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
        positions="rope", rope_theta=10000.0, pre_norm=True, final_norm=True, tie_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, family="llama", name="llama-2-7b",
    ),
    "llama-3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        ffn_size=14336, max_positions=8192, norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
        positions="rope", rope_theta=500000.0, pre_norm=True, final_norm=True, tie_embeddings=False,
        bos_token_id=128000, eos_token_id=128001, pad_token_id=None, family="llama", name="llama-3-8b",
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        ffn_size=12288, max_positions=40960, norm="rmsnorm", norm_eps=1e-6, activation="swiglu",
        positions="rope", rope_theta=1000000.0, qk_norm=True, pre_norm=True, final_norm=True,
        tie_embeddings=False, bos_token_id=None, eos_token_id=151645, pad_token_id=151643, family="qwen3",
        name="qwen3-8b",
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
