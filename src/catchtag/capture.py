"""Capture what the chapters need from a forward pass, through nnsight, locally or on NDIF.

We never ask the model for its attention maps. Under sdpa (what NDIF and fast local runs use) the
model has none, and under eager attention a stack of L x H x T x T probabilities costs gigabytes at
a few thousand tokens. Instead we save the inputs of each layer's attention call, the queries and
keys after RoPE and QK-norm, the values, the mask and the scale, and recompute the probabilities
one layer (and, for long inputs, one chunk of queries) at a time. A test checks that the
recomputed probabilities equal the eager ones to 1e-5 on both offline models.

Names (one per quantity, whatever the architecture):

- `q`, `k`, `v`: (heads, T, head_dim) for one layer, keys and values repeated over the query heads
  that share them under grouped-query attention, so head h of `k` is the key head h reads.
- `attn`: (heads, queries, keys) probabilities, rows summing to 1, or to less than 1 where the
  model has learned sink logits (reported, never renormalised).
- `z`: (heads, T, head_dim) = attn @ v, the per-head result before the output projection.
- `head_out`: (heads, T, d_model) = W_O^h z_h, head h's contribution to the residual stream.
- `resid_post`: (layers, T, d_model), the residual stream after each layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from .errors import CatchtagError
from .models import Model
from .remote import trace_kwargs


@dataclasses.dataclass
class AttnInputs:
    """The inputs of one layer's attention call for one prompt (batch dimension dropped)."""

    q: torch.Tensor  # (H, T, dh) after RoPE (and QK-norm, where the model has it)
    k: torch.Tensor  # (H, T, dh), kv heads repeated to the query heads
    v: torch.Tensor  # (H, T, dh), likewise
    mask: torch.Tensor | None  # (T, T) additive mask, or None for plain causal attention
    scaling: float
    sliding_window: int | None = None
    sink_logits: torch.Tensor | None = None  # (H,) learned per-head sink logits (gpt-oss)
    softcap: float | None = None

    @property
    def n_tokens(self) -> int:
        return self.q.shape[1]


@dataclasses.dataclass
class Capture:
    """Everything captured for one prompt. `layers` lists the layers in `attn_inputs`."""

    model: str
    text: str
    input_ids: torch.Tensor  # (T,)
    tokens: list[str]
    layers: list[int]
    attn_inputs: dict[int, AttnInputs]
    resid_post: torch.Tensor | None  # (n_layers, T, d_model) or None
    logits: torch.Tensor | None = None  # (T, vocab) or None
    # (T,) character span (start, stop) of each token in `text`, from the tokenizer's offsets
    # (`Model.encode`); None for slow tokenizers. Use these, not `tokens`, to align with the text.
    offsets: list[tuple[int, int]] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(Hkv, T, d) -> (H, T, d): query head h reads kv head h // (H / Hkv), as transformers does."""
    rep = n_heads // x.shape[0]
    return x if rep == 1 else x.repeat_interleave(rep, dim=0)


def attention_op_name(model: Model) -> str:
    names = [n for n in model.lm.model.layers[0].self_attn.source.names if n.startswith("attention_interface_")]
    if not names:
        raise CatchtagError(
            f"model {model.name!r}: no attention_interface call found in its attention forward; "
            "catchtag needs a transformers attention module that calls attention_interface"
        )
    return names[-1]  # _0 looks the interface up, the last one calls it


def tokenize(model: Model, text: str) -> torch.Tensor:
    """Token ids of `text` as the model's tokenizer gives them (Gemma adds <bos>, SmolLM2 does not).

    A text that already starts with the model's BOS string ("<bos>..." for Gemma) keeps that one
    BOS: the tokenizer's own is not added a second time (`Model.encode`)."""
    if not isinstance(text, str) or not text.strip():
        raise CatchtagError("the text is empty: pass at least one word")
    ids = torch.tensor(model.tokenize(text), dtype=torch.long)
    if len(ids) > model.max_length:
        raise CatchtagError(
            f"the text is {len(ids)} tokens long, more than {model.name}'s context of "
            f"{model.max_length}: shorten it"
        )
    return ids


def capture(
    model: Model,
    prompts: str | Sequence[str],
    layers: Sequence[int] | None = None,
    resid: bool = True,
    logits: bool = False,
    remote: bool | str = False,
    progress: bool = True,
) -> list[Capture]:
    """Run each prompt through the model once and return one `Capture` per prompt.

    One prompt per forward pass, so no padding ever enters an attention map. `layers` restricts
    which layers' attention inputs are kept (default: all). `remote` is passed to nnsight's trace.
    """
    from .progress import progress as progress_bar

    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise CatchtagError("no prompts given: pass at least one prompt (n_prompts >= 1)")
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    for layer in layers:
        model.check_layer_head(layer)
    kwargs = trace_kwargs(remote)
    if remote is True and model.remote is not True:
        raise CatchtagError(
            f"model {model.name!r} was loaded here, not for NDIF: load it with "
            "load_model(<Hugging Face id>, remote=True) to run on NDIF (offline GGUF checkpoints "
            "cannot), or use remote='local' for an offline dry run"
        )
    op = attention_op_name(model)
    out = []
    bar = progress_bar(prompts, f"capture {model.name}", enabled=progress and len(prompts) > 1)
    for text in bar:
        ids = tokenize(model, text)
        out.append(_capture_one(model, text, ids, layers, resid, logits, kwargs, op))
        offsets = model.encode(text)[1]
        out[-1].offsets = offsets if offsets is not None and len(offsets) == len(ids) else None
    return out


def _capture_one(model, text, ids, layers, resid, want_logits, kwargs, op) -> Capture:
    import nnsight

    lm = model.lm
    wanted = set(layers)
    last = max(layers) if not resid and not want_logits else model.n_layers - 1
    # Locally, nothing after the last wanted layer's attention inputs is needed without residuals
    # or logits: stop the forward pass there (no later layers, no T x vocab logits).
    stop_early = not resid and not want_logits and not kwargs
    with torch.no_grad(), lm.trace(ids[None, :], **kwargs) as tracer:
        saved = nnsight.save([])
        resids = nnsight.save([])
        for layer in range(last + 1):
            block = lm.model.layers[layer]
            if layer in wanted:
                args, kw = getattr(block.self_attn.source, op).inputs
                saved.append(
                    (
                        args[1],
                        args[2],
                        args[3],
                        args[4] if len(args) > 4 else kw.get("attention_mask"),
                        kw.get("scaling"),
                        kw.get("sliding_window"),
                        kw.get("s_aux"),
                        kw.get("softcap"),
                    )
                )
            if resid:
                h = block.output
                resids.append(h[0] if isinstance(h, tuple) else h)
        if want_logits:
            lg = nnsight.save(lm.lm_head.output)
        if stop_early:
            tracer.stop()
    H = model.n_heads
    T = len(ids)
    attn_inputs = {}
    saved = list(saved)[::-1]
    for layer in layers:
        # pop, so each layer's un-repeated k and v are freed as soon as they are repeated
        q, k, v, mask, scaling, window, sinks, softcap = saved.pop()
        if scaling is None:
            scaling = 1.0 / math.sqrt(q.shape[-1])
        attn_inputs[layer] = AttnInputs(
            q=q[0].float(),
            k=repeat_kv(k[0].float(), H),
            v=repeat_kv(v[0].float(), H),
            mask=mask_2d(mask, T),
            scaling=float(scaling),
            sliding_window=int(window) if window else None,
            sink_logits=None if sinks is None else sinks.detach().float().reshape(-1),
            softcap=float(softcap) if softcap else None,
        )
    resid_post = None
    if resid:
        resid_post = torch.stack([r[0].float() for r in resids])
    return Capture(
        model=model.name,
        text=text,
        input_ids=ids,
        tokens=model.token_strings(ids),
        layers=list(layers),
        attn_inputs=attn_inputs,
        resid_post=resid_post,
        logits=lg[0].float() if want_logits else None,
    )


def mask_2d(mask, T: int) -> torch.Tensor | None:
    """The model's mask as a (T, T) additive float mask, or None when it passed none (causal)."""
    if mask is None:
        return None
    m = mask[0, 0] if mask.dim() == 4 else mask
    m = m[-T:, -T:]
    if m.dtype == torch.bool:  # sdpa-style: True = may attend
        return torch.zeros(m.shape, dtype=torch.float32).masked_fill(~m, float("-inf"))
    return m.float().masked_fill(m <= torch.finfo(m.dtype).min / 2, float("-inf"))


# --------------------------------------------------------------------------------------------------
# Recomputing attention


def attention_logits(ai: AttnInputs, queries: slice | None = None) -> torch.Tensor:
    """(H, Tq, T) masked attention logits for the query rows in `queries` (default: all)."""
    T = ai.n_tokens
    queries = queries or slice(0, T)
    q = ai.q[:, queries]
    scores = torch.matmul(q, ai.k.transpose(-1, -2)) * ai.scaling
    if ai.softcap:
        scores = torch.tanh(scores / ai.softcap) * ai.softcap
    rows = torch.arange(T)[queries][:, None]
    cols = torch.arange(T)[None, :]
    if ai.mask is not None:
        scores = scores + ai.mask[queries]
    else:
        allowed = cols <= rows
        if ai.sliding_window:
            allowed &= rows - cols < ai.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def attention_probs(ai: AttnInputs, queries: slice | None = None) -> torch.Tensor:
    """(H, Tq, T) attention probabilities, recomputed from the attention call's inputs.

    With learned sink logits (gpt-oss's `s_aux`), the softmax runs over the keys and the sink
    together and the sink's column is dropped, so rows sum to less than 1, exactly as the model
    computes them.
    """
    scores = attention_logits(ai, queries)
    if ai.sink_logits is None:
        return torch.softmax(scores, dim=-1)
    sink = ai.sink_logits.reshape(-1, 1, 1).expand(scores.shape[0], scores.shape[1], 1)
    full = torch.softmax(torch.cat([scores, sink.to(scores.dtype)], dim=-1), dim=-1)
    return full[..., :-1]


def o_proj_weight(model: Model, layer: int) -> torch.Tensor:
    """W_O of a layer as (d_model, H * head_dim); head h's slice is columns h*dh:(h+1)*dh.

    For a model loaded with remote=True the local module holds meta tensors only, so the output
    projections of all layers are fetched from NDIF in one trace the first time and kept."""
    weight = model.lm.model.layers[layer].self_attn.o_proj.weight
    if weight.device.type != "meta":
        return weight.detach().float()
    cache = model.__dict__.setdefault("_o_proj_cache", {})
    if not cache:
        import nnsight

        with torch.no_grad(), model.lm.trace(torch.tensor([[0]]), **trace_kwargs(model.remote)):
            fetched = nnsight.save(
                [model.lm.model.layers[l].self_attn.o_proj.weight for l in range(model.n_layers)]
            )
        cache.update({l: w.detach().float() for l, w in enumerate(fetched)})
    return cache[layer]


def head_outputs(model: Model, cap: Capture, layer: int) -> torch.Tensor:
    """(H, T, d_model): o_i^h = W_O^h sum_j A_ij v_j, each head's contribution to the residual."""
    ai = cap.attn_inputs[layer]
    z = attention_probs(ai) @ ai.v  # (H, T, dh)
    return per_head_project(model, layer, z)


def per_head_project(model: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Map per-head vectors x (H, ..., dh) through each head's slice of W_O: (H, ..., d_model)."""
    w = o_proj_weight(model, layer)  # (d, H*dh)
    H, dh = model.n_heads, model.head_dim
    w_h = w.reshape(w.shape[0], H, dh).permute(1, 2, 0)  # (H, dh, d)
    shape = x.shape
    return (x.reshape(H, -1, dh) @ w_h).reshape(*shape[:-1], w.shape[0])


def eager_attention(model: Model, text: str) -> list[torch.Tensor]:
    """The model's own eager attention probabilities, (H, T, T) per layer: a reference for tests."""
    hf = model.hf
    ids = tokenize(model, text)
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(ids[None, :], output_attentions=True)
    finally:
        hf.set_attn_implementation(previous)
    return [a[0].float() for a in out.attentions]


# --------------------------------------------------------------------------------------------------
# What a head writes into the residual stream (through Gemma's post-attention norm)


def post_attention_norm(model: Model, layer: int):
    """The RMSNorm applied to the attention block's output before it is added to the residual
    stream, or None when the model adds W_O z directly (Llama, Qwen, Mistral, gpt-oss).

    Gemma-2 and Gemma-3 normalise the attention output (`post_attention_layernorm`, then a separate
    `pre_feedforward_layernorm` before the MLP); in Llama-style layers `post_attention_layernorm` is
    the MLP's input norm and never touches the attention output, so it is not returned.
    Returns (gain (d_model,), eps) with gain = 1 + weight (Gemma's RMSNorm scales by 1 + w)."""
    block = model.hf.model.layers[layer]
    if not hasattr(block, "pre_feedforward_layernorm") or not hasattr(block, "post_attention_layernorm"):
        return None
    norm = block.post_attention_layernorm
    w = norm.weight.detach().float()
    gain = 1.0 + w if "Gemma" in type(norm).__name__ else w
    return gain, float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


def attention_rms(model: Model, cap: Capture, layer: int) -> torch.Tensor | None:
    """(T,) root mean square of the attention block's output o_proj(z) at each position: the
    divisor of Gemma's post-attention norm, sqrt(mean(o^2) + eps). None without such a norm."""
    norm = post_attention_norm(model, layer)
    if norm is None:
        return None
    ai = cap.attn_inputs[layer]
    z = attention_probs(ai) @ ai.v  # (H, T, dh)
    total = per_head_project(model, layer, z).sum(0)  # (T, d)
    bias = model.hf.model.layers[layer].self_attn.o_proj.bias
    if bias is not None:
        total = total + bias.detach().float()
    return torch.sqrt(total.pow(2).mean(-1) + norm[1])


def to_residual(model: Model, layer: int, x: torch.Tensor, rms: torch.Tensor | None = None) -> torch.Tensor:
    """Map head-output vectors x (..., d_model) (W_O^h z, `per_head_project`) to what they add to
    the residual stream: unchanged where the model has no post-attention norm; for Gemma, times the
    norm's gain and divided by `rms` (broadcast against x's leading dims, e.g. (T, 1) for x of
    shape (H, T, d) -> pass rms[:, None]; omit it for a direction, which the gain alone fixes).

    The norm is linear in each head's output once the position's rms is fixed, so the heads'
    writes still sum to the block's write (a test checks it against the layer's real output)."""
    norm = post_attention_norm(model, layer)
    if norm is None:
        return x
    out = x * norm[0]
    return out if rms is None else out / rms[..., None]


def head_writes(model: Model, cap: Capture, layer: int) -> torch.Tensor:
    """(H, T, d_model): what each head adds to the residual stream at each position. W_O^h z_h
    (`head_outputs`), passed through the post-attention norm where the model has one (Gemma):
    gain * W_O^h z_h / rms(sum_h W_O^h z_h). Summed over heads (plus the o_proj bias, through the
    same norm, where there is one) it is the attention block's contribution to the residual."""
    out = head_outputs(model, cap, layer)
    rms = attention_rms(model, cap, layer)
    return to_residual(model, layer, out, rms[None, :] if rms is not None else None)
