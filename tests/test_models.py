"""The model registry, the converted-GGUF cache, and clear errors for bad model input."""

import dataclasses
import json

import pytest
import torch

from catchtag import models
from catchtag.errors import CatchtagError
from catchtag.models import REGISTRY, cache_entry_valid, load_model


def test_unknown_name_lists_the_registry():
    with pytest.raises(CatchtagError) as info:
        load_model("smollm-9000")
    message = str(info.value)
    assert "\n" not in message
    for name in REGISTRY:
        assert name in message


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CatchtagError, match="not in the local Hugging Face cache"):
        load_model("someone/not-a-cached-model")


def test_encoder_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(CatchtagError, match="not a causal language model"):
        load_model(str(tmp_path / "bert"))


def test_bad_dtype_and_remote():
    with pytest.raises(CatchtagError, match="dtype"):
        load_model("smollm2-135m", dtype="int3")
    with pytest.raises(CatchtagError, match="remote"):
        load_model("smollm2-135m", remote="yes")
    with pytest.raises(CatchtagError, match="NDIF does not host"):
        import os

        os.environ["NDIF_API_KEY"] = "dummy-key-for-test"
        try:
            load_model("smollm2-135m", remote=True)
        finally:
            del os.environ["NDIF_API_KEY"]


def test_corrupt_gguf_is_refused(monkeypatch):
    spec = dataclasses.replace(REGISTRY["smollm2-135m"], sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, "smollm2-135m", spec)
    with pytest.raises(CatchtagError, match="corrupt or truncated"):
        load_model("smollm2-135m")


def test_missing_model_package_names_the_install(monkeypatch):
    spec = dataclasses.replace(REGISTRY["smollm2-135m"], package="not-installed-model-pkg")
    monkeypatch.setitem(REGISTRY, "smollm2-135m", spec)
    with pytest.raises(CatchtagError, match="pip install"):
        load_model("smollm2-135m")


@pytest.mark.slow
def test_cache_is_written_then_corrupt_entry_rebuilt(monkeypatch, tmp_path):
    """First load converts the GGUF file and writes a cache entry; a damaged entry is detected and
    rebuilt, and the rebuilt model gives the same logits."""
    monkeypatch.setenv("CATCHTAG_CACHE", str(tmp_path))
    sha = REGISTRY["smollm2-135m"].sha256
    entry = models.cache_dir_for(sha)
    assert not entry.exists()
    m1 = load_model("smollm2-135m")
    assert cache_entry_valid(entry)
    manifest = json.loads((entry / "catchtag-manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    ids = torch.tensor([m1.tokenize("Hello world, this is a test.")])
    with torch.no_grad():
        ref = m1.hf(ids).logits
    # Damage the weights without changing their size: only the hash can tell.
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(data))
    assert not cache_entry_valid(entry)
    m2 = load_model("smollm2-135m")  # rebuilt from the GGUF file
    assert cache_entry_valid(entry)
    with torch.no_grad():
        assert torch.allclose(m2.hf(ids).logits, ref, atol=1e-5)
    # A cached load gives the same logits as well.
    m3 = load_model("smollm2-135m")
    with torch.no_grad():
        assert torch.allclose(m3.hf(ids).logits, ref, atol=1e-5)
    # A half-written entry (no manifest) is never used.
    (entry / "catchtag-manifest.json").unlink()
    assert not cache_entry_valid(entry)


@pytest.mark.slow
def test_bfloat16_load_is_the_same_first_time_cached_and_uncached(monkeypatch, tmp_path):
    """`load_model(dtype="bfloat16")` gives the same model whether it converts the GGUF file (first
    load, writing the cache), reads the cache, or bypasses it: weights in bfloat16, RoPE's inverse
    frequencies in float32 as transformers builds them (a `model.to(bfloat16)` would round them too,
    and the first load's numbers would differ from every later one's), the same logits bit for bit."""
    monkeypatch.setenv("CATCHTAG_CACHE", str(tmp_path))
    first = load_model("smollm2-135m", dtype="bfloat16")
    assert cache_entry_valid(models.cache_dir_for(REGISTRY["smollm2-135m"].sha256))
    cached = load_model("smollm2-135m", dtype="bfloat16")
    ids = torch.tensor([first.tokenize("Hello world, this is a test of the cache.")])
    with torch.no_grad():
        ref = first.hf(ids).logits
        for m in (first, cached):
            assert next(m.hf.parameters()).dtype == torch.bfloat16
            assert m.hf.model.rotary_emb.inv_freq.dtype == torch.float32
            assert torch.equal(m.hf(ids).logits, ref)
    # Without the cache, transformers is asked for the dtype itself (a GGUF load with it: the same
    # casts; not run here, a third conversion of the file would double the test's time)
    asked = []
    monkeypatch.setattr(models, "_load_hf", lambda source, dtype, *a, **kw: asked.append((dtype, kw)) or (first.hf, first.tokenizer))
    assert load_model("smollm2-135m", dtype="bfloat16", use_cache=False).hf is first.hf
    assert asked == [(torch.bfloat16, {"gguf_file": REGISTRY["smollm2-135m"].filename})]


def test_attention_implementation_choice():
    from transformers import Gemma2Config, GptOssConfig, LlamaConfig

    from catchtag.models import choose_attn_implementation

    assert choose_attn_implementation(LlamaConfig()) == "sdpa"
    assert choose_attn_implementation(Gemma2Config()) == "eager"  # attention softcap: no sdpa
    assert choose_attn_implementation(GptOssConfig()) == "eager"  # learned sink logits: no sdpa
    assert choose_attn_implementation(LlamaConfig(), "eager") == "eager"
    with pytest.raises(CatchtagError, match="does not support sdpa"):
        choose_attn_implementation(Gemma2Config(), "sdpa")
    with pytest.raises(CatchtagError, match="not supported"):
        load_model("smollm2-135m", attn_implementation="flash")


def test_split_character_display(smollm):
    from catchtag.models import _render_bytes

    assert _render_bytes(" 猫".encode()) == " 猫"
    assert _render_bytes(" 猫".encode()[:2]) == " <0xE7>"
    assert _render_bytes(b"\x8c\xab.") == "<0x8C><0xAB>."
    ids = smollm.tokenize("猫 and 🙂")
    shown = smollm.token_strings(ids)
    assert not any("\ufffd" in t for t in shown)
    assert len(set(shown)) == len(shown)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_cached_load_equals_transformers_load(name):
    """`_load_cached` (state dict read with safetensors, tied key filled: no random init) gives the
    weights transformers' own load of the cache entry gives, tied the same way (issue 18)."""
    spec = REGISTRY[name]
    folder = models.cache_dir_for(spec.sha256)
    if not cache_entry_valid(folder):
        load_model(name)
    fast, tok = models._load_cached(folder, torch.float32, "auto")
    slow, _ = models._load_hf(str(folder), torch.float32, "auto", False)
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fast.lm_head.weight.data_ptr() == fast.model.embed_tokens.weight.data_ptr()
    assert fast.config._attn_implementation == slow.config._attn_implementation
    assert type(tok).__name__ and tok("The cat").input_ids


def test_file_sha256_hashes_each_version_of_a_file_once(monkeypatch, tmp_path):
    """The digest is remembered with the file's size, times, inode and device; a changed file (same
    size) is hashed again; a file changed just before hashing (racy) is not remembered."""
    import hashlib
    import os

    monkeypatch.setenv("CATCHTAG_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    calls = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(p) or real(p))
    assert models.file_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(calls) == 1 and not (tmp_path / "cache" / "verified-files.json").exists()  # just written: racy
    monkeypatch.setattr(models, "RACY_NS", 0)
    models.file_sha256(f)
    assert len(calls) == 2 and (tmp_path / "cache" / "verified-files.json").exists()
    assert models.file_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest() and len(calls) == 2  # reused
    before = f.stat()
    import time

    time.sleep(0.05)  # past the file system's timestamp tick, so that the write gets a new change time
    f.write_bytes(b"b" * 1000)  # same size; even with the old modification time put back:
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert models.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 3
    (tmp_path / "cache" / "verified-files.json").write_text("not json")  # unreadable: hashed again
    assert models.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 4


def test_load_cached_falls_back_on_a_tensor_of_the_wrong_shape(tmp_path):
    """A cache entry whose weights do not fit its config (here one matrix transposed) is not used:
    `_load_cached` returns None (the caller then loads through transformers), it does not raise."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    sd[key] = sd[key].t().contiguous()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert models._load_cached(tmp_path, torch.float32, "eager") is None
