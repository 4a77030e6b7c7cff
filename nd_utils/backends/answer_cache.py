"""The answer cache of the language models: every answer keyed and stored in JSONL, live or replayed.

Every answer goes through `CachedLanguageModel`: a JSONL cache keyed by (model id, template id
and hash, filled prompt, temperature, seed). `mode="replay"` answers only from the cache and
raises `ReplayMissError` on a miss, so a published run can be re-executed without the model.

Example:
    >>> lm = CachedLanguageModel(load_language_model("keywords"), cache_path, temperature=0.3)
    >>> lm.ask(load_template("simplify.v1"), {"caption": "a photo of a red car"}, seed=0)
    'red car'
"""
from __future__ import annotations

from pathlib import Path

from ..errors import NdUtilsError
from ..jsonl_cache import JsonlCache
from .prompt_templates import PromptTemplate

class ReplayMissError(NdUtilsError):
    """Replay mode met a prompt that is not in the answer cache."""


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
