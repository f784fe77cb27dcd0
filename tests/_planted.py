"""A tiny model with planted sinks and known tags, for the tests of tags and release (not collected).

Moved here from `catchtag.tags` (issue 14): test models live with the tests.
"""

from __future__ import annotations

import torch

from catchtag.models import Model


PLANTED_VOCAB = ["<s>", ".", "a", "b", "c", "d", "e", "f"]
PLANTED_TEXT = "<s> a b c d e . f a b c d e f a b c d e f a b c d"
# residual features of the planted model (d_model = 16)
F_BOS, F_CONST, F_DOT, F_TAG_DOT, F_TAG_BOS = 0, 1, 2, 3, 4


def planted_model(sink_strength: float = 0.6, retrieve: float = 3.0, seed: int = 0) -> Model:
    """A two-layer Llama (d_model 16, two heads of size 8, MLPs off) whose answer is known.

    Layer 0, head 0 is a sink head: every query reads a constant feature, the key of `<s>` and of
    `.` reads their own features (`.` more strongly), so tokens before the first `.` are caught by
    `<s>` and tokens after it by `.`. Its values read only the `<s>` and `.` features, and W_O
    writes them on the residual directions e_4 (the tag of `<s>`) and e_3 (the tag of `.`), so every
    head output lies in the tag subspace: EV = 1. Head 1 attends uniformly (no sink at T >= 20)
    and writes small vectors on the noise dimensions 8..15.
    Layer 1, head 0 retrieves by tag: its keys read e_3, the tag of `.`, so its queries attend to
    the tokens that `.` caught. RoPE is made negligible (theta = 1e12, signals on its slowest
    dimensions). Text goes through a whitespace word-level tokenizer (`PLANTED_VOCAB`).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from catchtag.models import _wrap

    cfg = LlamaConfig(
        vocab_size=len(PLANTED_VOCAB), hidden_size=16, intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, rope_theta=1e12,
        max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.zero_()
        emb = hf.model.embed_tokens.weight
        emb[:, F_CONST] = 1.0
        emb[0, F_BOS] = 3.0
        emb[1, F_DOT] = 2.0
        emb[2:, 8:] = torch.randn(len(PLANTED_VOCAB) - 2, 8, generator=g) * 0.5
        L0 = hf.model.layers[0].self_attn
        L0.q_proj.weight[3, F_CONST] = 2.0  # head 0, slow RoPE dimension 3
        L0.k_proj.weight[3, F_BOS] = sink_strength
        L0.k_proj.weight[3, F_DOT] = 2.5 * sink_strength
        L0.v_proj.weight[0, F_BOS] = 1.0
        L0.v_proj.weight[1, F_DOT] = 1.0
        L0.o_proj.weight[F_TAG_BOS, 0] = 1.0
        L0.o_proj.weight[F_TAG_DOT, 1] = 1.0
        for j in range(8):  # head 1: uniform attention (zero q, k), values from the noise dims
            L0.v_proj.weight[8 + j, 8 + j] = 1.0
            L0.o_proj.weight[8 + j, 8 + j] = 0.1
        L1 = hf.model.layers[1].self_attn
        L1.q_proj.weight[3, F_CONST] = 2.0
        L1.k_proj.weight[3, F_TAG_DOT] = retrieve
        L1.v_proj.weight[0, F_DOT] = 1.0
        L1.o_proj.weight[5, 0] = 1.0
        hf.lm_head.weight.copy_(torch.randn(hf.lm_head.weight.shape, generator=g))
    vocab = {t: i for i, t in enumerate(PLANTED_VOCAB)}
    tk = Tokenizer(WordLevel(vocab, unk_token="a"))
    tk.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="a")
    return _wrap("planted", hf, tok, False, None, source="tests/_planted.py")
