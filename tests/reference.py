"""The independent reference the engines are compared with: a plain transformers forward of the whole sequence (eager
attention, no KV cache) with steering applied by forward hooks at each SAE's hook point, features from sae-lens.

Nothing here imports the project's engines: module names of each family are written out below, and every activation,
reconstruction and decoder row comes from `sae_lens.SAE.load_from_disk`. A spec is the user-facing dict
(`{"edits": [...], "positions": "all" | "prompt" | [position, ...]}`).
"""

import shutil

import torch

# family (model class name prefix) -> (module whose output the layer adds at attn_out, the same for mlp_out)
SITE_MODULES = {
    "Llama": ("self_attn", "mlp"),
    "Mistral": ("self_attn", "mlp"),
    "Qwen2": ("self_attn", "mlp"),
    "Qwen3": ("self_attn", "mlp"),
    "Phi3": ("self_attn", "mlp"),
    "Gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "GPT2": ("attn", "mlp"),
    "GPTNeoX": ("attention", "mlp"),
}


def blocks(model) -> torch.nn.ModuleList:
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def family(model) -> str:
    name = type(model).__name__
    return next(f for f in sorted(SITE_MODULES, key=len, reverse=True) if name.startswith(f))


def load_lens(path):
    from sae_lens import SAE as LensSAE

    sae = LensSAE.load_from_disk(str(path), device="cpu", dtype="float32")
    return sae.eval()


def projected(h: torch.Tensor, d: torch.Tensor, e: dict) -> torch.Tensor:
    """(tokens, d) update of a projection edit written out: v = d / |d|, p = h . v; project_out moves p to 0, set to
    e["value"], cap into [e["min"], e["max"]] (a missing bound: none)."""
    v = d / d.norm()
    p = h @ v  # (tokens,)
    if e["mode"] == "project_out":
        target = torch.zeros_like(p)
    elif e["mode"] == "set":
        target = torch.full_like(p, e["value"])
    else:
        target = p.clamp(min=e.get("min"), max=e.get("max"))
    return (target - p)[:, None] * v


def holds(lens, h: torch.Tensor, when: dict) -> torch.Tensor:
    """(tokens,) bool: where an edit's condition holds, read from h as it arrives: sae-lens's activation of
    when["feature"], or the projection of h onto when["direction"] / its norm, strictly between "above" and "below"
    (a missing threshold: none)."""
    if "feature" in when:
        with torch.no_grad():
            reading = lens.encode(h)[:, when["feature"]]
    else:
        d = when["direction"].float()
        reading = h @ (d / d.norm())
    return (reading > when.get("above", -float("inf"))) & (reading < when.get("below", float("inf")))


def lens_delta(lens, h: torch.Tensor, edits: list[dict]) -> torch.Tensor:
    """(tokens, d) update of the tensor h an SAE reads, for its edits: add s * W_dec[f] (with strength_unit
    "token_norm": s * |h| * W_dec[f] / |W_dec[f]| per token); clamp/ablate: sae-lens's reconstruction with the feature
    set to the value, minus its reconstruction as is (the SAE's error is kept); project_out/cap/set: `projected` on
    the decoder row. An edit with a "direction" (a vector's at this layer) uses it instead of a decoder row; an edit
    with "when" acts only at the tokens where `holds`. Every term and every condition reads h as it arrives."""
    out = torch.zeros_like(h)
    every = torch.ones(h.shape[0], dtype=torch.bool)
    where = [holds(lens, h, e["when"]) if "when" in e else every for e in edits]  # before any encode for clamps
    clamps = [(e, w) for e, w in zip(edits, where, strict=True) if e.get("mode", "add") in ("clamp", "ablate")]
    for e, w in zip(edits, where, strict=True):
        d = e["direction"].float() if "direction" in e else lens.W_dec[e["feature"]].float()
        mode = e.get("mode", "add")
        if mode == "add" and e.get("strength_unit") == "token_norm":
            term = e["strength"] * h.norm(dim=-1, keepdim=True) * (d / d.norm())
        elif mode == "add":
            term = e["strength"] * d.expand_as(h)
        elif mode in ("project_out", "cap", "set"):
            term = projected(h, d, e)
        else:
            continue
        out += term * w[:, None]
    if clamps:
        with torch.no_grad():
            acts = lens.encode(h)
            before = lens.decode(acts)
            for e, w in clamps:
                acts[w, e["feature"]] = e.get("value", 0.0)
            lens.encode(h)  # sae-lens keeps per-token normalisation coefficients from encode for one decode
            out += lens.decode(acts) - before
    return out


def logprobs(
    model, lenses: dict, points: dict, ids: list[int], n_prompt: int, spec, grab=None, before=None, acted=None
) -> torch.Tensor:
    """(seq - 1, vocab) next-token log-probabilities after ids[:t], t >= 1, with `spec` applied at `points`
    ({layer: (layer index, site)}) through `lenses` ({layer: sae-lens SAE}). `grab`: a dict to fill with
    {layer: (seq, d) tensor at that layer's hook point after the edits there} for each layer in `points`; `before`
    (with `grab`): the same before the edits there (the edits upstream applied, as the forward went). `acted`: a
    (seq,) bool tensor in which the positions where some edit acted are set (selected, and for an edit with "when",
    where `holds` at its layer)."""
    layers, fam = blocks(model), family(model)
    seq = len(ids)
    sel = torch.zeros(seq, dtype=torch.bool)
    if spec is not None and isinstance(spec["positions"], list):  # explicit positions, found by the caller
        sel[spec["positions"]] = True
    elif spec is not None:
        sel[: n_prompt if spec["positions"] == "prompt" else seq] = True
    handles, stash = [], {}

    def steer(layer, base_of=None):
        edits = [e for e in spec["edits"] if e["layer"] == layer] if spec else []

        def apply(t):  # (1, seq, d) tensor at the hook point (resid_mid: the attention output)
            h = t[0] if base_of is None else stash.pop(layer) + t[0]
            delta = lens_delta(lenses[layer], h, edits) if edits else torch.zeros_like(h)
            for e in edits if acted is not None else ():
                acted.logical_or_(sel & holds(lenses[layer], h, e["when"]) if "when" in e else sel)
            new = t.clone()
            new[0, sel] += delta[sel]
            if before is not None:
                before[layer] = h.detach().clone()
            if grab is not None:
                after = h.clone()
                after[sel] += delta[sel]
                grab[layer] = after.detach()
            return new

        return apply

    def out_hook(fn):
        return lambda _m, _a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    steered = {e["layer"] for e in spec["edits"]} if spec else set()
    try:
        for layer in sorted(steered | (set(points) if grab is not None else set())):
            L, site = points[layer]
            attn, mlp = (getattr(layers[L], n) for n in SITE_MODULES[fam])
            if site == "resid_post":
                handles.append(layers[L].register_forward_hook(out_hook(steer(layer))))
            elif site == "resid_pre" and L > 0:
                handles.append(layers[L - 1].register_forward_hook(out_hook(steer(layer))))
            elif site == "resid_pre":
                fn = steer(layer)
                handles.append(layers[0].register_forward_pre_hook(lambda _m, a, fn=fn: (fn(a[0]), *a[1:])))
            elif site in ("attn_out", "mlp_out"):
                mod = attn if site == "attn_out" else mlp
                handles.append(mod.register_forward_hook(out_hook(steer(layer))))
            else:  # resid_mid: the layer's input plus its attention output
                handles.append(layers[L].register_forward_pre_hook(lambda _m, a, L=L: stash.__setitem__(L, a[0][0])))
                handles.append(attn.register_forward_hook(out_hook(steer(layer, base_of=L))))
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)[:-1]
    finally:
        for h in handles:
            h.remove()


def lens_top(lens, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sae-lens's own activations of h (tokens, d): (tokens, d_sae) activations and (tokens, k) top feature ids."""
    with torch.no_grad():
        acts = lens.encode(h.float())
    return acts, acts.topk(k, dim=-1).indices


def check_features(entries: list[dict], grabbed: dict, lenses: dict, min_top1: float = 0.99, rtol: float = 1e-3):
    """API feature entries against sae-lens: none listed where no feature fires; elsewhere the same top-1 feature at
    >= min_top1 of the (position, layer) pairs, and every listed activation within rtol (relative) of sae-lens's.
    Returns (pairs where some feature fires, top-1 agreement, largest relative error)."""
    same = total = 0
    worst = 0.0
    for e in entries:
        for layer, feats in e["layers"].items():
            acts, _ = lens_top(lenses[int(layer)], grabbed[int(layer)][e["position"]][None], 1)
            acts = acts[0]
            if float(acts.max()) <= 0:
                assert feats == [], (layer, e["position"])
                continue
            total += 1
            same += feats[0][0] == int(acts.argmax())
            for f, a in feats:
                ref = float(acts[f])
                err = abs(a - ref) / max(abs(ref), 1e-6)
                worst = max(worst, err)
                assert err <= rtol, (layer, e["position"], f, a, ref)
    assert same >= min_top1 * total, (same, total)
    return total, same / max(total, 1), worst


def eager_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def random_model(root, config_cls: str, tokenizer_dir, **kw):
    """A seeded random-weight model of a transformers config class, saved with the tokenizer of `tokenizer_dir`."""
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(root / "model")
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, root / "model" / f.name)
    return root / "model"


def lens_new(arch: str, d_in: int, d_sae: int, hook_name: str, norm: str = "none", seed: int = 0):
    """A new sae-lens SAE of an architecture (its own initialisation, seeded), not saved."""
    import sae_lens

    cls, cfg_cls = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
    }[arch]
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, normalize_activations=norm, **({"k": 8} if arch == "topk" else {}))
    cfg.metadata.hook_name = hook_name
    torch.manual_seed(seed)
    return cls(cfg)


def lens_sae(out_dir, arch: str, d_in: int, hook_name: str, d_sae: int = 64, norm: str = "none", seed: int = 0):
    """A random SAE saved by sae-lens itself (unit-norm decoder rows, encoder scaled to fire on a few features)."""
    sae = lens_new(arch, d_in, d_sae, hook_name, norm, seed)
    with torch.no_grad():
        w = torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=1)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T * 2.0)
        sae.b_dec.zero_()
        for name in ("b_enc", "b_gate", "b_mag"):
            if getattr(sae, name, None) is not None:
                getattr(sae, name).fill_(-0.5)
        if arch == "gated":
            sae.r_mag.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.fill_(0.1)
    sae.save_model(str(out_dir))
    return out_dir
