"""Which chat message each token of a rendered chat prompt belongs to: the role codes that positions by role select.

The server renders the chat template (`Engine.encode_chat`), so it is where the roles of the prompt's tokens are
known: each message's content is found in the rendered text (in order), the text is tokenized with character offsets
(the same ids the engine runs), and each token gets a code, content role | turn role << ROLE_BITS (role code:
`ROLES` index + 1, 0 for none):

- content role: the role of the message whose content holds the token entirely, 0 for the template's own tokens
  (headers, separators), for a token straddling a content boundary, and for special tokens;
- turn role: the role of the message whose turn holds the token's first character, where a message's turn is its
  content and the template text before it, back to the previous message's content (the first message's turn also
  takes everything before it); the text after the last message (the generation prompt) is the assistant's.

Roles other than system, user and assistant (e.g. tool) get 0. The codes travel with the request to either engine
(`GenerateRequest.prompt_roles`), which turns them into a prompt mask once (`core.batch.narrowing`).
"""

from __future__ import annotations

import torch

from functok_vllm.core.batch import ROLE_BITS
from functok_vllm.core.spec import ROLES


class RolesUnavailable(ValueError):
    """The chat prompt's tokens cannot be mapped to its messages (why, for a 400)."""


def role_codes(tokenizer, messages: list[dict], ids: list[int]) -> list[int]:
    """(prompt tokens,) role codes of the chat prompt `ids` rendered from `messages` ({"role", "content"})."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not getattr(tokenizer, "is_fast", False):
        raise RolesUnavailable("this model's tokenizer gives no character offsets, so roles cannot be located")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise RolesUnavailable("the chat prompt's tokens differ when tokenized with offsets")
    starts, ends, cursor = [], [], 0
    for i, m in enumerate(messages):
        at = text.find(m["content"], cursor)
        if at < 0:
            raise RolesUnavailable(f"the chat template changes the content of messages[{i}]")
        starts.append(at)
        ends.append(at + len(m["content"]))
        cursor = ends[-1]
    code = torch.tensor([ROLES.index(m["role"]) + 1 if m["role"] in ROLES else 0 for m in messages] + [3])
    off = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)  # (tokens, 2) character spans
    s, e = off[:, 0].contiguous(), off[:, 1]
    ends_t = torch.tensor(ends, dtype=torch.long)
    turn = torch.searchsorted(ends_t, s, right=True)  # (tokens,) the message whose turn holds the first character
    msg = turn.clamp(max=len(messages) - 1)
    inside = (s >= torch.tensor(starts)[msg]) & (e <= ends_t[msg]) & (e > s) & (turn < len(messages))
    special = torch.isin(torch.tensor(ids, dtype=torch.long), torch.tensor(sorted(tokenizer.all_special_ids)))
    content = torch.where(inside & ~special, code[msg], 0)
    return (content | code[turn] << ROLE_BITS).tolist()
