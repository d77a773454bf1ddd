"""The position object of a steering spec: a base selector narrowed by token ids, windows and chat roles, and its
checks where input enters (`steering.parse_steering` for the schema and limits, `check_position_request` at a
request's edge for what only it knows: the vocabulary and whether the prompt is a chat)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from functok_vllm.core.spec import POSITIONS, ROLES, SpecError
from functok_vllm.steering_setup import SteeringLimits
from functok_vllm.validation import FieldError, Strict

TokenId = Annotated[int, Field(strict=True, ge=0)]
Count = Annotated[int, Field(strict=True, ge=1, le=1 << 20)]


class Positions(Strict):
    """Where a request's edits apply, as an object: the base selector, narrowed.

    A token is steered when all of these hold:
    1. `select` (one of `POSITIONS`) selects it;
    2. it is in the region, the UNION of the windows and roles given (every token when none is given):
       `first_generated` k (the first k generated tokens), `last_prompt` k (the last k prompt tokens),
       `last_functions` k (the last k function tokens of the prompt; `last_function` is k = 1), `roles` (chat requests:
       the tokens of the system's, the user's or earlier assistant messages' content; "assistant" also takes every
       generated token: the assistant's turn), with the chat template's own tokens and special tokens left out
       unless `template_tokens` is true (then each message also takes the template text before its content, and
       "assistant" the generation prompt);
    3. its id is in `token_ids` when that is given;
    4. its id is not in `exclude_ids`.
    """

    model_config = ConfigDict(frozen=True)
    select: Literal[POSITIONS] = "all"  # "all": the object's other fields alone say where
    token_ids: tuple[TokenId, ...] | None = None  # allowlist of token ids
    exclude_ids: tuple[TokenId, ...] | None = None  # token ids never steered
    first_generated: Count | None = None
    last_prompt: Count | None = None
    last_functions: Count | None = None
    roles: tuple[Literal[ROLES], ...] | None = None
    template_tokens: Annotated[bool, Field(strict=True)] = False

    @model_validator(mode="after")
    def _meaningful(self):
        for name in ("token_ids", "roles"):
            if getattr(self, name) == ():
                raise FieldError(name, "an empty list selects nothing; leave the field out instead")
        if self.template_tokens and not self.roles:
            raise FieldError("template_tokens", "applies to 'roles' only; give roles or leave it out")
        return self

    @property
    def has_region(self) -> bool:
        return any(getattr(self, n) is not None for n in ("first_generated", "last_prompt", "last_functions", "roles"))


def _positions_kind(v) -> str:
    return "Object" if isinstance(v, Positions | dict) else "Name"


AnyPositions = Annotated[
    Annotated[Literal[POSITIONS], Tag("Name")] | Annotated[Positions, Tag("Object")], Discriminator(_positions_kind)
]


def check_positions(spec, limits: SteeringLimits, where: str) -> None:
    """The position object's id lists within `max_position_ids`."""
    pos = spec.positions
    if isinstance(pos, str):
        return
    for name in ("token_ids", "exclude_ids"):
        ids = getattr(pos, name) or ()
        if len(ids) > limits.max_position_ids:
            msg = f"{len(ids)} token ids; at most {limits.max_position_ids} are allowed (max_position_ids)"
            raise SpecError(f"{where}.{name}", msg)


def check_position_request(spec, where: str, vocab_size: int, chat: bool) -> None:
    """What only the request's edge knows: the position object's token ids inside the vocabulary, and roles only on
    a chat request (a plain completion has no roles). SpecError naming the field (`steering.positions.roles`)."""
    if spec is None or isinstance(spec.positions, str):
        return
    pos = spec.positions
    for name in ("token_ids", "exclude_ids"):
        for i, t in enumerate(getattr(pos, name) or ()):
            if t >= vocab_size:
                raise SpecError(f"{where}.{name}[{i}]", f"token id {t} is outside the vocabulary [0, {vocab_size})")
    if pos.roles and not chat:
        raise SpecError(
            f"{where}.roles", "a plain completion has no chat roles; select by roles on /v1/chat/completions"
        )
