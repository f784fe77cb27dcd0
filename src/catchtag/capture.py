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
  `AttnInputs` stores keys and values once per kv head (`k_kv`, `v_kv`: (kv heads, T, head_dim))
  and repeats them only when `k` or `v` is read.
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


@dataclasses.dataclass(init=False, eq=False)
class AttnInputs:
    """The inputs of one layer's attention call for one prompt (batch dimension dropped).

    Keys and values are stored per kv head (`k_kv`, `v_kv`: (Hkv, T, dh)); `k` and `v` are the
    (H, T, dh) tensors repeated over the query heads that share them (`repeat_kv`), made on the
    first access and kept (they are the stored tensors themselves when Hkv = H), so code that needs
    one kv head per query head reads `ai.k`, and code that can work on the kv heads (`grouped_matmul`)
    reads `ai.k_kv` and never pays for the copy. The constructor takes `k`/`v` either per kv head or
    already repeated (any Hkv dividing H); `n_kv_heads` says which."""

    q: torch.Tensor  # (H, T, dh) after RoPE (and QK-norm, where the model has it)
    k_kv: torch.Tensor  # (Hkv, T, dh)
    v_kv: torch.Tensor  # (Hkv, T, dh)
    mask: torch.Tensor | None  # (T, T) additive mask, or None for plain causal attention
    scaling: float
    sliding_window: int | None = None
    sink_logits: torch.Tensor | None = None  # (H,) learned per-head sink logits (gpt-oss)
    softcap: float | None = None

    def __init__(self, q, k=None, v=None, mask=None, scaling=None, sliding_window=None,
                 sink_logits=None, softcap=None, *, k_kv=None, v_kv=None):
        k = k_kv if k is None else k
        v = v_kv if v is None else v
        if k is None or v is None or scaling is None:
            raise CatchtagError("AttnInputs needs q, k (or k_kv), v (or v_kv) and scaling")
        H = q.shape[0]
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 3 or x.shape[1] != q.shape[1] or H % x.shape[0]:
                raise CatchtagError(
                    f"AttnInputs: {name} has shape {tuple(x.shape)}; it must be (Hkv, T, dh) with "
                    f"T = {q.shape[1]} and Hkv dividing the {H} query heads"
                )
        self.q, self.k_kv, self.v_kv = q, k, v
        self.mask, self.scaling, self.sliding_window = mask, scaling, sliding_window
        self.sink_logits, self.softcap = sink_logits, softcap
        self._repeated = {}

    def _repeat(self, name: str) -> torch.Tensor:
        x = getattr(self, name)
        cached = self._repeated.get(name)
        if cached is None or cached[0] is not x:  # made once per stored tensor
            cached = self._repeated[name] = (x, repeat_kv(x, self.q.shape[0]))
        return cached[1]

    @property
    def k(self) -> torch.Tensor:
        """(H, T, dh): keys repeated over the query heads (query head h reads kv head h // (H/Hkv))."""
        return self._repeat("k_kv")

    @property
    def v(self) -> torch.Tensor:
        """(H, T, dh): values repeated over the query heads."""
        return self._repeat("v_kv")

    @property
    def n_kv_heads(self) -> int:
        return self.k_kv.shape[0]

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


def grouped_matmul(x: torch.Tensor, y_kv: torch.Tensor) -> torch.Tensor:
    """x (H, M, n) @ repeat_kv(y_kv, H) (H, n, m) -> (H, M, m), without repeating y_kv (Hkv, n, m):
    the query heads that share a kv head are multiplied by it in one product."""
    H, Hkv = x.shape[0], y_kv.shape[0]
    if H == Hkv:
        return torch.matmul(x, y_kv)
    rep = H // Hkv
    M = x.shape[1]
    out = torch.matmul(x.reshape(Hkv, rep * M, x.shape[2]), y_kv)  # (Hkv, rep*M, m)
    return out.view(H, M, y_kv.shape[-1])


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
    return _encode(model, text)[0]


def _encode(model: Model, text: str) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
    """(`tokenize`'s ids, the tokens' character spans or None) from one call of the tokenizer."""
    if not isinstance(text, str) or not text.strip():
        raise CatchtagError("the text is empty: pass at least one word")
    ids, offsets = model.encode(text)
    ids = torch.tensor(ids, dtype=torch.long)
    if offsets is not None and len(offsets) != len(ids):
        offsets = None
    if len(ids) > model.max_length:
        raise CatchtagError(
            f"the text is {len(ids)} tokens long, more than {model.name}'s context of "
            f"{model.max_length}: shorten it"
        )
    return ids, offsets


def capture(
    model: Model,
    prompts: str | Sequence[str],
    layers: Sequence[int] | None = None,
    resid: bool = True,
    logits: bool = False,
    remote: bool | str = False,
    progress: bool = True,
    batch_size: int = 1,
) -> list[Capture]:
    """Run the prompts through the model and return one `Capture` per prompt.

    `batch_size` prompts per forward pass (default 1: one prompt per pass, no padding at all).
    Batches are padded on the right and no attention mask is passed: under causal attention a real
    token never sees the padding after it, its position ids (0..n-1, transformers' default) are those
    of the prompt alone, and each prompt's captured tensors are cut to its own n tokens, so a
    batched capture equals the one-prompt-at-a-time capture up to float rounding
    (tests/test_batched_capture.py: within 1e-5). `layers` restricts which layers' attention inputs
    are kept (default: all). `remote` is passed to nnsight's trace.
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CatchtagError(f"batch_size={batch_size!r} is not valid: use a whole number of prompts >= 1")
    op = attention_op_name(model)
    out = []
    groups = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    bar = progress_bar(groups, f"capture {model.name}", enabled=progress and len(groups) > 1)
    for group in bar:
        encoded = [_encode(model, text) for text in group]
        caps = _capture_batch(model, group, [ids for ids, _ in encoded], layers, resid, logits, kwargs, op)
        for cap, (_, offsets) in zip(caps, encoded):
            cap.offsets = offsets
        out.extend(caps)
    return out


def capture_ids(model: Model, ids: torch.Tensor, layers: Sequence[int] | None = None,
                resid: bool = True, logits: bool = False, text: str = "") -> Capture:
    """`capture` of one prompt given as token ids (T,), locally; for benchmarks and tests."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if len(ids) == 0 or len(ids) > model.max_length:
        raise CatchtagError(f"{len(ids)} token ids: pass 1 to {model.max_length} ids")
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    for layer in layers:
        model.check_layer_head(layer)
    return _capture_one(model, text, ids, layers, resid, logits, {}, attention_op_name(model))


def _capture_one(model, text, ids, layers, resid, want_logits, kwargs, op) -> Capture:
    return _capture_batch(model, [text], [ids], layers, resid, want_logits, kwargs, op)[0]


def _capture_batch(model, texts, ids_list, layers, resid, want_logits, kwargs, op) -> list[Capture]:
    """One forward pass over the prompts, right-padded (see `capture`); one Capture per prompt."""
    import nnsight

    lm = model.lm
    wanted = set(layers)
    last = max(layers) if not resid and not want_logits else model.n_layers - 1
    lengths = [len(ids) for ids in ids_list]
    T = max(lengths)
    batch = torch.zeros(len(ids_list), T, dtype=torch.long)  # padding id 0: never seen (right padding)
    for b, ids in enumerate(ids_list):
        batch[b, : len(ids)] = ids
    # Without logits nothing after the last needed layer is read: stop the forward pass there (no
    # later layers, no final norm, no T x vocab LM head: 262k columns for Gemma). With residuals
    # the last layer's output is read first, then the pass stops. Not on NDIF (remote=True), where
    # an early stop has not been tried: remote="local" runs this same code and stops.
    stop_early = not want_logits and kwargs.get("remote") is not True
    with torch.no_grad(), lm.trace(batch, **kwargs) as tracer:
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
    B = len(ids_list)
    per = [dict() for _ in range(B)]
    saved = list(saved)[::-1]
    for layer in layers:
        # pop, so each layer's batched tensors are freed as soon as they are cut per prompt
        q, k, v, mask, scaling, window, sinks, softcap = saved.pop()
        if scaling is None:
            scaling = 1.0 / math.sqrt(q.shape[-1])
        for b, n in enumerate(lengths):
            m = mask
            if mask is not None and mask.dim() == 4:
                m = mask[b if mask.shape[0] > 1 else 0][None]  # the model may broadcast one mask
            m = mask_2d(m, T)
            per[b][layer] = AttnInputs(
                q=q[b, :, :n].float().contiguous(),
                k=k[b, :, :n].float().contiguous(),  # per kv head; `ai.k` repeats it
                v=v[b, :, :n].float().contiguous(),
                mask=None if m is None else m[:n, :n].contiguous(),
                scaling=float(scaling),
                sliding_window=int(window) if window else None,
                sink_logits=None if sinks is None else sinks.detach().float().reshape(-1),
                softcap=float(softcap) if softcap else None,
            )
    out = []
    for b, (text, ids) in enumerate(zip(texts, ids_list)):
        n = lengths[b]
        out.append(
            Capture(
                model=model.name,
                text=text,
                input_ids=ids,
                tokens=model.token_strings(ids),
                layers=list(layers),
                attn_inputs=per[b],
                resid_post=torch.stack([r[b, :n].float() for r in resids]) if resid else None,
                logits=lg[b, :n].float() if want_logits else None,
            )
        )
    return out


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
    scores = grouped_matmul(q, ai.k_kv.transpose(-1, -2)) * ai.scaling
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
    z = grouped_matmul(attention_probs(ai), ai.v_kv)  # (H, T, dh)
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
    z = grouped_matmul(attention_probs(ai), ai.v_kv)  # (H, T, dh)
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
