"""Rope scalers `linear`, `ntk`, `dynamic`, `yarn`, `llama3`, `longrope`: transformers' own.

Each builds a second rotary module of the model's own class from a copy of its config whose
`rope_parameters` name the rope_type, `factor` s and `original_max_position_embeddings` = L, so the
frequencies come from transformers' rope initialisers (`ROPE_INIT_FUNCTIONS`), nothing re-derived.
`ntk` is the fixed NTK-aware base change base * s^(d_r / (d_r - 2)) with the default initialiser.

Papers: Chen et al., "Extending Context Window of Large Language Models via Positional
Interpolation" (linear, arXiv:2306.15595); bloc97/emozilla, NTK-aware and dynamic NTK scaling
(Reddit r/LocalLLaMA, 2023); Peng et al., "YaRN" (arXiv:2309.00071); Meta, Llama 3.1 rope scaling;
Ding et al., "LongRoPE" (arXiv:2402.13753).
"""

from __future__ import annotations

from typing import Any

from .._compat.transformers import rope_parameters, rotary_for_rope
from ..kinds import PositionRule
from ..registry import ModelInfo, Param, at_least, optional, positive_number, register
from ..rotary import Rotary

FACTOR = Param("factor", 2.0, at_least(1.0), "s, the context multiplier")
TRANSFORMERS_OWN = "transformers' own `{}` rope initialiser, `original_max_position_embeddings` = L"


class RopeScaler(PositionRule):
    """Base: a rotary map rebuilt by transformers from a rope_type and its parameters."""

    rope_type: str = "default"

    def rope_parameters(self, base: dict[str, Any], train_len: int, rotary_dim: int) -> dict[str, Any]:
        """transformers' rope_parameters: the model's own, with this method's values (None: its default)."""
        given = {k: float(v) if isinstance(v, int) else v for k, v in self.values.items() if v is not None}
        return {**base, **given, "rope_type": self.rope_type, "original_max_position_embeddings": train_len}

    def make_rotary(self, rotary: Rotary, config: Any, info: ModelInfo) -> Rotary:
        base = rope_parameters(config, rotary.layer_type)
        rope = self.rope_parameters(base, info.train_len, rotary.layout.rotary_dim)
        module = rotary_for_rope(rotary.module, config, rope, info.train_len, rotary.layer_type)
        return Rotary(module.to(rotary.inv_freq.device), rotary.layout, rotary.layer_type)

    length_rule: bool = False  # True: the scaling follows the length it sees (dynamic); no target rule

    def target_values(self, info: ModelInfo, target_len: int) -> dict[str, Any]:
        if self.length_rule:
            return {}
        return {"factor": max(1.0, target_len / info.train_len)}

    grid_factors: tuple[float, ...] = (2.0,)  # `ctxpatch tune` also tries these multiples of the rule's factor

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict[str, Any]]:
        """The rule's factor s = T / L and `grid_factors` times it (`dynamic`: its default, and s)."""
        factor = max(1.0, target_len / info.train_len)
        if cls.length_rule:
            return [{}] + ([{"factor": round(factor, 4)}] if round(factor, 4) != FACTOR.default else [])
        return [{}] + [{"factor": round(factor * k, 4)} for k in cls.grid_factors]

    def target_problem(self, info: ModelInfo, target_len: int) -> str | None:
        if not self.length_rule and self.factor * info.train_len < target_len:
            return f"factor={self.factor} covers {self.factor * info.train_len:.0f} tokens, below target_len={target_len}"
        return None


def _scaler(name: str, rope_type: str, summary: str, extra: tuple[Param, ...] = (), **attrs: Any) -> type[RopeScaler]:
    cls = type(name.capitalize() + "Rope", (RopeScaler,), {
        **attrs,
        "__doc__": summary,
        "name": name,
        "rope_type": rope_type,
        "paper": "transformers rope_type=" + rope_type,
        "definition": TRANSFORMERS_OWN.format(rope_type),
        "params": (FACTOR, *extra),
        "__module__": __name__,
    })
    return register(cls)


Linear = _scaler("linear", "linear", "Position interpolation: positions divided by s (transformers 'linear').")
Dynamic = _scaler(
    "dynamic", "dynamic", "Dynamic NTK: base grows with the sequence past L (transformers 'dynamic').", length_rule=True
)
Llama3 = _scaler(
    "llama3", "llama3", "Llama 3.1 frequency-dependent interpolation (transformers 'llama3').",
    (
        Param("low_freq_factor", 1.0, positive_number, "Llama 3.1 low_freq_factor"),
        Param("high_freq_factor", 4.0, positive_number, "Llama 3.1 high_freq_factor"),
    ),
)


@register
class Yarn(RopeScaler):
    """YaRN: NTK-by-parts interpolation plus attention temperature (transformers 'yarn')."""

    name = "yarn"
    rope_type = "yarn"
    definition = TRANSFORMERS_OWN.format("yarn")
    paper = "YaRN (Peng et al., 2023)"
    grid_factors = (1.5, 2.0)
    params = (
        FACTOR,
        Param("beta_fast", 32.0, positive_number, "YaRN beta_fast"),
        Param("beta_slow", 1.0, positive_number, "YaRN beta_slow"),
        Param("attention_factor", None, optional(positive_number), "None: transformers' default"),
    )


@register
class LongRope(RopeScaler):
    """LongRoPE: per-frequency factors, short below L and long above (transformers 'longrope')."""

    name = "longrope"
    rope_type = "longrope"
    definition = TRANSFORMERS_OWN.format("longrope")
    paper = "LongRoPE (Ding et al., 2024)"
    grid_factors = ()  # without searched per-pair factors it is one interpolation: the rule alone
    params = (
        FACTOR,
        Param("short_factor", None, lambda v: None, "per-pair factors below L (None: all 1)"),
        Param("long_factor", None, lambda v: None, "per-pair factors above L (None: all s)"),
    )

    def check_together(self, info) -> None:
        pairs = info.rotary_dim // 2
        for name in ("short_factor", "long_factor"):
            value = self.values[name]
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != pairs):
                raise ValueError(f"longrope: {name} must be a list of {pairs} numbers (one per rotary pair)")

    def rope_parameters(self, base, train_len, rotary_dim):
        pairs = rotary_dim // 2
        short = self.short_factor if self.short_factor is not None else [1.0] * pairs
        long = self.long_factor if self.long_factor is not None else [float(self.factor)] * pairs
        return {
            **super().rope_parameters(base, train_len, rotary_dim),
            "short_factor": [float(x) for x in short],
            "long_factor": [float(x) for x in long],
        }


@register
class NTK(RopeScaler):
    """Fixed NTK-aware scaling: rope base * s^(d_r / (d_r - 2)) (default initialiser)."""

    name = "ntk"
    rope_type = "default"
    definition = "rope base × s^(d_r/(d_r − 2)) (fixed NTK-aware), transformers' default initialiser"
    paper = "NTK-aware scaled RoPE (bloc97, 2023)"
    params = (FACTOR,)

    def rope_parameters(self, base, train_len, rotary_dim):
        theta = base["rope_theta"] * float(self.factor) ** (rotary_dim / (rotary_dim - 2))
        return {**base, "rope_type": "default", "rope_theta": theta}

