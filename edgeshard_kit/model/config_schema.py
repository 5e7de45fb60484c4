"""The schema of a Llama checkpoint's config.json (pydantic) and the tensor shapes it implies.

`check_config` refuses, in one line naming config.json and the field, what transformers would accept
until something breaks later (`num_hidden_layers: -1`, `hidden_size: 0`, heads that do not divide the
hidden size, a pad id outside the vocabulary). `expected_shape` is the shape config.json gives each
checkpoint tensor, so a weight file that does not match its config is refused before loading.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictBool, model_validator

from edgeshard_kit.core.schema import Name, OpenFileModel, validate

__all__ = ["LlamaConfigIn", "check_config", "expected_shape"]

DTYPES = ("float32", "float16", "bfloat16", "float64", "float", "half", "double")


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    return v


def _dtype(v: Any) -> Any:
    if isinstance(v, str) and v.removeprefix("torch.") not in DTYPES:
        raise ValueError(f"{v!r} is not a floating-point dtype ({', '.join(DTYPES[:3])})")
    return v


Size = Annotated[int, Field(ge=1, le=2**31), BeforeValidator(_not_bool)]     # a dimension or count
TokenId = Annotated[int, Field(ge=0, le=2**31), BeforeValidator(_not_bool)]
Positive = Annotated[float, Field(gt=0), BeforeValidator(_not_bool)]


class LlamaConfigIn(OpenFileModel):
    """The fields of config.json the kit's stages read (others are transformers' business and ignored)."""

    model_type: Name
    num_hidden_layers: Annotated[int, Field(ge=1, le=100_000), BeforeValidator(_not_bool)]
    hidden_size: Size
    intermediate_size: Size
    num_attention_heads: Size
    num_key_value_heads: Size | None = None
    head_dim: Size | None = None
    vocab_size: Size
    max_position_embeddings: Size | None = None
    rms_norm_eps: Positive | None = None
    rope_theta: Positive | None = None
    tie_word_embeddings: StrictBool | None = None
    attention_bias: StrictBool | None = None
    mlp_bias: StrictBool | None = None
    torch_dtype: Annotated[str | None, BeforeValidator(_dtype)] = None
    dtype: Annotated[str | None, BeforeValidator(_dtype)] = None
    bos_token_id: TokenId | list[TokenId] | None = None
    eos_token_id: TokenId | list[TokenId] | None = None
    pad_token_id: TokenId | None = None
    transformers_weights: Name | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "LlamaConfigIn":
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        if self.hidden_size % heads:  # transformers' rule, also with an explicit head_dim
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {heads}")
        if heads % kv:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:  # the embedding's padding row
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary "
                             f"(vocab_size {self.vocab_size})")
        return self


def check_config(raw: Any, where: str) -> LlamaConfigIn:
    """config.json's data checked; KitError "WHERE: field: why" (one line) otherwise."""
    return validate(LlamaConfigIn, raw, where)


def expected_shape(config, name: str) -> list[int] | None:
    """The shape config.json implies for the checkpoint tensor `name` (None for a tensor the kit does not read)."""
    h, v, inter = config.hidden_size, config.vocab_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return [v, h]
    if name == "model.norm.weight":
        return [h]
    if not name.startswith("model.layers."):
        return None
    part = name.split(".", 3)[3]
    return {"self_attn.q_proj.weight": [heads * hd, h], "self_attn.k_proj.weight": [kv * hd, h],
            "self_attn.v_proj.weight": [kv * hd, h], "self_attn.o_proj.weight": [h, heads * hd],
            "self_attn.q_proj.bias": [heads * hd], "self_attn.k_proj.bias": [kv * hd],
            "self_attn.v_proj.bias": [kv * hd], "self_attn.o_proj.bias": [h],
            "mlp.gate_proj.weight": [inter, h], "mlp.up_proj.weight": [inter, h], "mlp.down_proj.weight": [h, inter],
            "mlp.gate_proj.bias": [inter], "mlp.up_proj.bias": [inter], "mlp.down_proj.bias": [h],
            "input_layernorm.weight": [h], "post_attention_layernorm.weight": [h]}.get(part)
