"""API-process side of steering on vLLM: validate a request's spec (bad spec -> HTTP 400) and salt its prefix cache.

`install()` wraps `InputProcessor.process_inputs`, the step every `LLM`/`AsyncLLM`/`vllm serve` request passes through
in the API process before it reaches the engine core. For a request with `extra_args["steering"]` it

1. parses and checks the spec against the configured SAEs (cfg.json only) and raises `VLLMValidationError`, which
   the OpenAI server answers with a 400, which `LLM.generate` raises;
2. rewrites the spec to its canonical key, so the workers parse one well-formed string;
3. sets `cache_salt` from that key. vLLM's prefix cache hashes the salt into the first KV block, so a steered
   request never reuses, nor leaves behind, blocks that an unsteered or differently steered request could hit.
   Where the policy depends on the prompt (`prompt`, `generated`: its length; `last_function`: the position of its
   last function token) that goes into the salt too, since the same tokens are then steered differently.

It also checks a request's `extra_args["functok_features"]` (`readout.py`): a dict from a Python caller (functok's
`VLLMEngine`, or an `LLM`/`AsyncLLM` user who reads the results with `collective_rpc("functok_features")`), checked
against the SAEs; with `prompt` it turns off reading the prefix cache, whose positions are never forwarded. Through
stock `vllm serve` it is refused: vLLM's responses have no field for per-token features. So are features on an engine
that replays CUDA graphs (the readout op's Python would not run).

Without either key in `extra_args` the wrapper only passes the call through.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from functok_vllm.core.batch import last_function_position
from functok_vllm.core.function_tokens import FunctionTokens
from functok_vllm.core.spec import SpecError, SteeringSpec
from functok_vllm.engines.vllm import compat
from functok_vllm.engines.vllm.config import EXTENSION, XARG, FunctokConfig, from_additional_config
from functok_vllm.engines.vllm.readout import XFEAT
from functok_vllm.feature_request import parse_features
from functok_vllm.steering import check_steering, parse_steering

PARAM = f"vllm_xargs.{XARG}"
FEAT_PARAM = f"vllm_xargs.{XFEAT}"


def install() -> None:
    compat.wrap_process_inputs(_process_inputs)


def _process_inputs(original, self, request_id, prompt, params, *args, **kwargs):
    """The wrapped `InputProcessor.process_inputs`: validate, canonicalise and salt a steered request."""
    extra_args = getattr(params, "extra_args", None) or {}
    given, feats = extra_args.get(XARG), extra_args.get(XFEAT)
    if given is None and feats is None:
        return original(self, request_id, prompt, params, *args, **kwargs)
    prompt_features = feats is not None and _features_checked(self.vllm_config, feats)
    if given is None:
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if prompt_features:
            request.sampling_params.skip_reading_prefix_cache = True
        return request
    spec, cfg = _validated(self.vllm_config, given)
    request = original(self, request_id, prompt, params, *args, **kwargs)
    sp = request.sampling_params
    if prompt_features:
        sp.skip_reading_prefix_cache = True
    extra = {k: v for k, v in (sp.extra_args or {}).items() if k != XARG}
    if spec is not None:
        extra[XARG] = spec.key()
        vocab = self.model_config.get_vocab_size()
        salt = cache_salt(spec, request.prompt_token_ids, _fn_mask(str(cfg.function_tokens), vocab), request_id)
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
    sp.extra_args = extra or None
    return request


def _validated(vllm_config, given) -> tuple[SteeringSpec | None, FunctokConfig]:
    from vllm.exceptions import VLLMValidationError

    if not _extension_loaded(vllm_config.parallel_config.worker_extension_cls):
        raise VLLMValidationError(
            f"steering needs the functok worker extension (start vLLM with --worker-extension-cls {EXTENSION})",
            parameter=PARAM,
        )
    cfg = from_additional_config(vllm_config.additional_config, vllm_config.model_config.model)
    try:
        spec = parse_user_spec(given, cfg)
    except SpecError as e:
        raise VLLMValidationError(f"{e.field}: {e.message}", parameter=e.field) from None
    return spec, cfg


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


def parse_user_spec(given, cfg: FunctokConfig) -> SteeringSpec | None:
    """A client's spec (JSON string or dict) -> SteeringSpec checked against the SAEs; None for no edits. The one
    steering parser (`functok_vllm.steering`), so both servers accept and refuse exactly the same objects."""
    spec = parse_steering(given, PARAM, cfg.limits)
    if spec is not None:
        check_steering(spec, cfg.info, cfg.limits, PARAM)
    return spec


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
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from functok_vllm.engines.vllm.worker import SteeringWorkerExtension

    cls = resolve_obj_by_qualname(qualname)
    return isinstance(cls, type) and issubclass(cls, SteeringWorkerExtension)


@lru_cache(maxsize=4)
def _fn_mask(path: str, vocab: int):
    return FunctionTokens.load(path).mask(vocab)
