"""The steering core: SAEs, function tokens, the steering vocabulary, per-token index building and the batched steer op.

Imports torch, numpy and safetensors only (never vllm, transformers or fastapi), so every engine and the analysis
share one implementation of the steering math.
"""

from functok_vllm.core.batch import (
    POLICY_CODES,
    StepIndex,
    build_slot_index,
    last_function_position,
    narrowing,
    policy_code,
    stack_narrowings,
)
from functok_vllm.core.function_tokens import FunctionTokens
from functok_vllm.core.sae import SAE, SAEConfig, SAELoadError
from functok_vllm.core.slots import SlotsFull, SteeringTable
from functok_vllm.core.spec import MODES, POSITIONS, SpecError
from functok_vllm.core.steer import SteeringLayer
from functok_vllm.core.vector import Vector, VectorError

__all__ = [
    "MODES",
    "POLICY_CODES",
    "POSITIONS",
    "SAE",
    "FunctionTokens",
    "SAEConfig",
    "SAELoadError",
    "SlotsFull",
    "SpecError",
    "SteeringLayer",
    "SteeringTable",
    "StepIndex",
    "Vector",
    "VectorError",
    "build_slot_index",
    "last_function_position",
    "narrowing",
    "policy_code",
    "stack_narrowings",
]
