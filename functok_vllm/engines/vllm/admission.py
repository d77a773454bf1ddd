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
   last function token) that goes into the salt too, since the same tokens are then steered differently.

Without `steering` in `extra_args` the wrapper only passes the call through.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from functok_vllm.activation_capture import CaptureRequest
from functok_vllm.core.batch import last_function_position
from functok_vllm.core.function_tokens import FunctionTokens
from functok_vllm.core.spec import SpecError
from functok_vllm.core.vector import Vector, VectorError, decode_payloads, encode_payloads
from functok_vllm.engines.vllm import compat
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
from functok_vllm.readout_request import ReadoutRequest
from functok_vllm.steering import SteeringContext, SteeringSpec, checked, parse_steering

PARAM = f"vllm_xargs.{XARG}"
FEAT_PARAM = f"vllm_xargs.{XFEAT}"


def install() -> None:
    compat.wrap_process_inputs(_process_inputs)


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
    prompt_features = feats is not None and _features_checked(self.vllm_config, feats)
    prompt_features |= reads is not None and _readout_checked(self.vllm_config, reads)
    prompt_features |= caps is not None and _readout_checked(self.vllm_config, caps, "capture")
    if given is None:
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if prompt_features:
            request.sampling_params.skip_reading_prefix_cache = True
        return request
    spec, cfg = _validated(self.vllm_config, given, given_args.get(VECTORS))
    request = original(self, request_id, prompt, params, *args, **kwargs)
    sp = request.sampling_params
    if prompt_features:
        sp.skip_reading_prefix_cache = True
    extra = {k: v for k, v in (sp.extra_args or {}).items() if k not in (XARG, VECTORS)}
    if spec is not None:
        extra[XARG] = spec.key()
        if spec.vectors:
            extra[VECTORS] = encode_payloads(list({v.version: v.content for v in spec.vectors}.values()))
        vocab = self.model_config.get_vocab_size()
        salt = cache_salt(spec, request.prompt_token_ids, _fn_mask(str(cfg.function_tokens), vocab), request_id)
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
    sp.extra_args = extra or None
    return request


def _validated(vllm_config, given, payload) -> tuple[SteeringSpec | None, FunctokConfig]:
    from vllm.exceptions import VLLMValidationError

    if not _extension_loaded(vllm_config.parallel_config.worker_extension_cls):
        raise VLLMValidationError(
            f"steering needs the functok worker extension (start vLLM with --worker-extension-cls {EXTENSION})",
            parameter=PARAM,
        )
    cfg = from_additional_config(vllm_config.additional_config, vllm_config.model_config.model)
    try:
        ctx = steering_context(cfg, vllm_config.model_config.get_hidden_size(), payload)
        spec = checked(given, ctx, PARAM) if isinstance(given, SteeringSpec) else parse_steering(given, PARAM, ctx)
    except VectorError as e:
        raise VLLMValidationError(f"vllm_xargs.{VECTORS}: {e}", parameter=f"vllm_xargs.{VECTORS}") from None
    except SpecError as e:
        raise VLLMValidationError(f"{e.field}: {e.message}", parameter=e.field) from None
    return spec, cfg


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


def _features_checked(vllm_config, given) -> bool:
    """VLLMValidationError unless `given` is a features dict this engine can read out; whether it reads the prompt."""
    from vllm.exceptions import VLLMValidationError

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
    cfg = from_additional_config(vllm_config.additional_config, vllm_config.model_config.model)
    try:
        fr = parse_features(given, cfg.info, FEAT_PARAM)
    except SpecError as e:
        raise VLLMValidationError(f"{e.field}: {e.message}", parameter=e.field) from None
    return fr.prompt


def vector_lookup(cfg: FunctokConfig, payload):
    """`lookup(name, version) -> Vector` for a request: from the contents it carries (by version), else from the
    configured library (by name), else none (LookupError saying how to configure one)."""
    if payload is not None:
        carried = decode_payloads(payload)

        def from_request(name: str, version: str | None) -> Vector:
            if version not in carried:
                raise LookupError(f"vector {name!r}: the request carries no content for version {version!r}")
            return carried[version]

        return from_request
    if cfg.library is not None:
        library = _library(str(cfg.library))

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


def steering_context(cfg: FunctokConfig, d_model: int | None = None, payload=None) -> SteeringContext:
    """What the API process parses a request's steering against: the configured SAEs and limits, and its vectors
    from the request's contents or the library (the same `parse_steering` as functok's own server)."""
    info = cfg.info_for(d_model) if d_model is not None else cfg.info
    return SteeringContext(info, cfg.limits, vector_lookup(cfg, payload))


@lru_cache(maxsize=4)
def _library(root: str) -> Library:
    return Library(root)  # read-only here: no leftovers removed, no lock taken


def cache_salt(spec: SteeringSpec, prompt_ids: list[int] | None, fn_mask, request_id: str) -> str:
    """Prefix-cache salt: equal only for requests whose every cached token is steered the same way."""
    key = spec.key()
    if prompt_ids is None:  # prompt embeddings: nothing to compare, share nothing
        key += f"|request={request_id}"
    elif spec.positions in ("prompt", "generated"):
        key += f"|prompt_len={len(prompt_ids)}"
    elif spec.positions == "last_function":
        key += f"|last_function={last_function_position(prompt_ids, fn_mask)}"
    return "functok:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _extension_loaded(qualname: str | None) -> bool:
    if not qualname:
        return False
    if qualname == EXTENSION:
        return True
    from functok_vllm.engines.vllm.worker import SteeringWorkerExtension

    cls = compat.resolve_qualname(qualname)
    return isinstance(cls, type) and issubclass(cls, SteeringWorkerExtension)


@lru_cache(maxsize=4)
def _fn_mask(path: str, vocab: int):
    return FunctionTokens.load(path).mask(vocab)
