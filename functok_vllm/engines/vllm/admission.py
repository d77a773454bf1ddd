"""API-process side of steering on vLLM: validate a request's spec (bad spec -> HTTP 400) and salt its prefix cache.

`install()` wraps `InputProcessor.process_inputs`, the step every `LLM`/`AsyncLLM`/`vllm serve` request passes through
in the API process before it reaches the engine core. For a request with `extra_args["steering"]` it

1. parses and checks the spec (`steering.parse_steering`) against the configured SAEs (cfg.json only) and raises
   `VLLMValidationError`, which the OpenAI server answers with a 400, which `LLM.generate` raises; vector names
   (`{"vector": "calm", ...}`) are resolved here, once, from the steering library
   (`additional_config.functok.library`), or from contents that came with the request (`extra_args
   ["functok_vectors"]`, each checked against its id). A `SteeringSpec` object (what `functok serve --engine vllm`
   passes, parsed at its HTTP edge in this same process) is taken as it is: it is not parsed or checked twice;
2. replaces it with its canonical key (the user's form, vectors with their version), which the workers parse with
   the same function, and puts the contents of its vectors in `extra_args["functok_vectors"]`: the workers read
   directions from the request, never from a file, so a vector changed or deleted after admission cannot change a
   request, and workers need no shared filesystem;
3. sets `cache_salt` from that key. vLLM's prefix cache hashes the salt into the first KV block, so a steered
   request never reuses, nor leaves behind, blocks that an unsteered or differently steered request could hit.
   Where the policy depends on the prompt (`prompt`, `generated`: its length; `last_function`: the position of its
   last function token) that goes into the salt too, since the same tokens are then steered differently. A spec
   with a conditional edit (`when`) is salted by its request id: its `steered_positions` counts where its conditions
   held, which only its own forwards know.

Without `steering` in `extra_args` the wrapper only passes the call through. What admission reads once (the settings,
the library, the function-token mask) is an `Admission` built on a processor's first steered or feature request and
kept on that processor (`compat.processor_state`): state passed, not found in module caches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from functok_vllm.activation_capture import CaptureRequest
from functok_vllm.core.batch import (
    ROLE_BITS,
    StepIndex,
    build_slot_index,
    last_function_position,
    narrowing,
    policy_code,
    stack_narrowings,
)
from functok_vllm.core.function_tokens import FunctionTokens
from functok_vllm.core.spec import SpecError
from functok_vllm.core.vector import Vector, VectorError, decode_payloads, encode_payloads
from functok_vllm.engines.vllm import compat
from functok_vllm.engines.vllm.batch_state import ROLES_XARG
from functok_vllm.engines.vllm.feature_op import XFEAT
from functok_vllm.engines.vllm.series_op import XCAPTURE, XREAD
from functok_vllm.engines.vllm.settings import (
    CONFIG_KEY,
    EXTENSION,
    VECTORS,
    XARG,
    FunctokConfig,
    from_additional_config,
)
from functok_vllm.feature_request import parse_features
from functok_vllm.library.store import Library, LibraryError
from functok_vllm.positions import check_position_request
from functok_vllm.readout_request import ReadoutRequest
from functok_vllm.steering import SteeringContext, SteeringSpec, checked, parse_steering

PARAM = f"vllm_xargs.{XARG}"
FEAT_PARAM = f"vllm_xargs.{XFEAT}"


def install() -> None:
    compat.wrap_process_inputs(_process_inputs)


@dataclass
class Admission:
    """What one `InputProcessor` checks requests against, read once from its vLLM config."""

    vllm_config: object
    cfg: FunctokConfig = field(init=False)
    _library: Library | None = field(init=False, default=None)
    _fn_mask: object = field(init=False, default=None)

    def __post_init__(self):
        c = self.vllm_config
        self.cfg = from_additional_config(c.additional_config, c.model_config.model)

    @property
    def library(self) -> Library | None:
        if self._library is None and self.cfg.library is not None:
            self._library = Library(str(self.cfg.library))  # read-only here: no leftovers removed, no lock taken
        return self._library

    def fn_mask(self, vocab: int):
        if self._fn_mask is None:
            self._fn_mask = FunctionTokens.load(self.cfg.function_tokens).mask(vocab)
        return self._fn_mask


def _process_inputs(original, self, request_id, prompt, params, *args, **kwargs):
    """The wrapped `InputProcessor.process_inputs`: validate, canonicalise and salt a steered request; check a
    request for features (whose prompt is then forwarded, not read from the prefix cache, when it asks for the
    prompt's features)."""
    given_args = getattr(params, "extra_args", None) or {}
    given, feats, reads = given_args.get(XARG), given_args.get(XFEAT), given_args.get(XREAD)
    caps = given_args.get(XCAPTURE)
    if given is None and VECTORS in given_args:  # only the admission hook puts contents there, with their spec
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(f"{VECTORS} comes with a steering spec only", parameter=f"vllm_xargs.{VECTORS}")
    if given is None and feats is None and reads is None and caps is None:
        return original(self, request_id, prompt, params, *args, **kwargs)
    adm = compat.processor_state(self, Admission)
    if adm.cfg.capture_only:
        _refuse_on_capture_engine(given_args)
    prompt_features = feats is not None and _features_checked(adm, feats)
    prompt_features |= reads is not None and _readout_checked(adm.vllm_config, reads)
    prompt_features |= caps is not None and _readout_checked(adm.vllm_config, caps, "capture")
    if given is None:
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if prompt_features:
            request.sampling_params.skip_reading_prefix_cache = True
        return request
    spec = _validated(adm, given, given_args.get(VECTORS))
    request = original(self, request_id, prompt, params, *args, **kwargs)
    sp = request.sampling_params
    if prompt_features:
        sp.skip_reading_prefix_cache = True
    extra = {k: v for k, v in (sp.extra_args or {}).items() if k not in (XARG, VECTORS)}
    if spec is not None:
        vocab = self.model_config.get_vocab_size()
        roles = _roles_checked(spec, given_args.get(ROLES_XARG), request.prompt_token_ids, vocab)
        extra[XARG] = spec.key()
        if spec.contents:  # the vectors of its edits and of their conditions
            extra[VECTORS] = encode_payloads(list(spec.contents.values()))
        salt = cache_salt(spec, request.prompt_token_ids, adm.fn_mask(vocab), request_id, roles)
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
    sp.extra_args = extra or None
    return request


def _refuse_on_capture_engine(given_args: dict) -> None:
    """A capture-only engine holds encoder-only SAEs and no steering: a request that asks to steer or to read features
    is refused (a 400 / a raise from `LLM.generate`), never run unsteered."""
    from vllm.exceptions import VLLMValidationError

    asked = next(k for k in (XARG, XFEAT, XREAD, XCAPTURE) if given_args.get(k) is not None)
    raise VLLMValidationError(
        f"this engine was started for capture only (additional_config.{CONFIG_KEY}.capture_only: its SAEs have no "
        f"decoders and it installs no steering), so it cannot serve vllm_xargs.{asked}; start it without capture_only",
        parameter=f"vllm_xargs.{asked}",
    )


def _validated(adm: Admission, given, payload) -> SteeringSpec | None:
    from vllm.exceptions import VLLMValidationError

    vllm_config = adm.vllm_config
    if not _extension_loaded(vllm_config.parallel_config.worker_extension_cls):
        raise VLLMValidationError(
            f"steering needs the functok worker extension (start vLLM with --worker-extension-cls {EXTENSION})",
            parameter=PARAM,
        )
    try:
        ctx = steering_context(adm.cfg, vllm_config.model_config.get_hidden_size(), payload, adm.library)
        spec = checked(given, ctx, PARAM) if isinstance(given, SteeringSpec) else parse_steering(given, PARAM, ctx)
    except VectorError as e:
        raise VLLMValidationError(f"vllm_xargs.{VECTORS}: {e}", parameter=f"vllm_xargs.{VECTORS}") from None
    except SpecError as e:
        raise VLLMValidationError(f"{e.field}: {e.message}", parameter=e.field) from None
    return spec


def _roles_checked(spec: SteeringSpec, roles, prompt_ids, vocab: int) -> list[int] | None:
    """The request's role codes (`extra_args["functok_roles"]`, which functok serve sets from the chat template it
    renders) when its positions select by role; VLLMValidationError naming the field otherwise. Stock `vllm serve`
    renders chats without telling us where each message is, so roles there need the client to send the codes."""
    from vllm.exceptions import VLLMValidationError

    where = f"{PARAM}.positions"
    try:
        check_position_request(spec, where, vocab, chat=roles is not None)
    except SpecError as e:
        msg = e.message
        if e.field.endswith(".roles"):
            msg = (
                f"selecting by chat roles needs each prompt token's role ({ROLES_XARG}); functok serve computes them "
                "from the chat template it renders, stock vllm serve does not: use functok serve"
            )
        raise VLLMValidationError(f"{e.field}: {msg}", parameter=e.field) from None
    if not spec.roles:
        return None
    top = 1 << (2 * ROLE_BITS)
    ok = isinstance(roles, list) and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < top for c in roles)
    if not ok or prompt_ids is None or len(roles) != len(prompt_ids):
        msg = f"must be a list of one role code in [0, {top}) per prompt token"
        raise VLLMValidationError(f"vllm_xargs.{ROLES_XARG}: {msg}", parameter=f"vllm_xargs.{ROLES_XARG}")
    return roles


def _readout_checked(vllm_config, given, param: str = "readout") -> bool:
    """VLLMValidationError unless `given` is a readout (or a capture) this engine can read (`series_op.py`); whether it
    reads the prompt (whose positions must then be forwarded, not read from the prefix cache)."""
    from vllm.exceptions import VLLMValidationError

    if not isinstance(given, dict) or not _extension_loaded(vllm_config.parallel_config.worker_extension_cls):
        msg = f"needs `functok serve --engine vllm` and the functok worker extension ({EXTENSION})"
        raise VLLMValidationError(f"{param}: {msg}", parameter=param)
    if compat.cuda_graphs(vllm_config):
        msg = "needs an engine without CUDA graphs (enforce_eager, or cudagraph_mode NONE)"
        raise VLLMValidationError(f"{param}: {msg}", parameter=param)
    try:
        return ReadoutRequest.from_dict(given).prompt if param == "readout" else bool(CaptureRequest.from_dict(given))
    except (ValueError, TypeError, KeyError) as e:
        raise VLLMValidationError(f"{param}: not a {param} object ({e})", parameter=param) from None


def _features_checked(adm: Admission, given) -> bool:
    """VLLMValidationError unless `given` is a features dict this engine can read out; whether it reads the prompt."""
    from vllm.exceptions import VLLMValidationError

    vllm_config = adm.vllm_config
    if not isinstance(given, dict):
        raise VLLMValidationError(
            f"{FEAT_PARAM}: per-token SAE features need `functok serve --engine vllm` (vLLM's OpenAI responses have "
            "no field for them); a Python caller of LLM/AsyncLLM passes a dict and reads them with "
            "collective_rpc('functok_features')",
            parameter=FEAT_PARAM,
        )
    if not _extension_loaded(vllm_config.parallel_config.worker_extension_cls):
        raise VLLMValidationError(f"features need the functok worker extension ({EXTENSION})", parameter=FEAT_PARAM)
    if compat.cuda_graphs(vllm_config):
        msg = "features need an engine without CUDA graphs (enforce_eager, or cudagraph_mode NONE)"
        raise VLLMValidationError(f"{FEAT_PARAM}: {msg}", parameter=FEAT_PARAM)
    try:
        fr = parse_features(given, adm.cfg.info, FEAT_PARAM)
    except SpecError as e:
        raise VLLMValidationError(f"{e.field}: {e.message}", parameter=e.field) from None
    return fr.prompt


def vector_lookup(cfg: FunctokConfig, payload, library: Library | None = None):
    """`lookup(name, version) -> Vector` for a request: from the contents it carries (by version), else from the
    configured library (by name; `library`, opened from `cfg.library` when not given), else none (LookupError saying
    how to configure one)."""
    if payload is not None:
        carried = decode_payloads(payload)

        def from_request(name: str, version: str | None) -> Vector:
            if version not in carried:
                raise LookupError(f"vector {name!r}: the request carries no content for version {version!r}")
            return carried[version]

        return from_request
    if cfg.library is not None:
        library = library or Library(str(cfg.library))

        def from_library(name: str, version: str | None) -> Vector:
            try:
                return library.resolve(name, version)
            except LibraryError as e:
                raise LookupError(f"the steering library {library.root} cannot be read: {e}") from None

        return from_library

    def none(name: str, version: str | None) -> Vector:
        raise LookupError(
            f"no steering library is configured, so no vector {name!r} (set additional_config.{CONFIG_KEY}.library)"
        )

    return none


def steering_context(
    cfg: FunctokConfig, d_model: int | None = None, payload=None, library: Library | None = None
) -> SteeringContext:
    """What the API process parses a request's steering against: the configured SAEs and limits, and its vectors
    from the request's contents or the library (the same `parse_steering` as functok's own server)."""
    info = cfg.info_for(d_model) if d_model is not None else cfg.info
    return SteeringContext(info, cfg.limits, vector_lookup(cfg, payload, library))


def cache_salt(spec: SteeringSpec, prompt_ids: list[int] | None, fn_mask, request_id: str, roles=None) -> str:
    """Prefix-cache salt: equal only for requests whose every cached token is steered the same way."""
    key = spec.key()
    if prompt_ids is None or any(e.when is not None for e in spec.edits):  # share nothing: prompt embeddings have
        key += f"|request={request_id}"  # nothing to compare, and a conditional edit's count needs its own forwards
    elif not isinstance(spec.positions, str):  # a position object: the prompt positions it selects, exactly
        key += f"|prompt_len={len(prompt_ids)}|selected={_selected(spec, prompt_ids, fn_mask, roles)}"
    elif spec.positions in ("prompt", "generated"):
        key += f"|prompt_len={len(prompt_ids)}"
    elif spec.positions == "last_function":
        key += f"|last_function={last_function_position(prompt_ids, fn_mask)}"
    return "functok:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _selected(spec: SteeringSpec, prompt_ids: list[int], fn_mask, roles) -> str:
    """A digest of the prompt positions a position object selects (the same `build_slot_index` as the workers)."""
    ids = torch.tensor(prompt_ids, dtype=torch.long)
    n = ids.shape[0]
    nw = narrowing(spec.positions, ids, fn_mask, None if roles is None else torch.tensor(roles))
    per_req = (torch.tensor([v]) for v in (1, policy_code(spec.positions), n, last_function_position(ids, fn_mask)))
    step = StepIndex(ids, torch.arange(n), torch.zeros_like(ids), *per_req, stack_narrowings([nw], "cpu"))
    picked = build_slot_index(step, fn_mask.cpu()).ne(0).nonzero()[:, 0]
    return hashlib.sha256(picked.numpy().tobytes()).hexdigest()[:16]


def _extension_loaded(qualname: str | None) -> bool:
    if not qualname:
        return False
    if qualname == EXTENSION:
        return True
    from functok_vllm.engines.vllm.worker import SteeringWorkerExtension

    cls = compat.resolve_qualname(qualname)
    return isinstance(cls, type) and issubclass(cls, SteeringWorkerExtension)
