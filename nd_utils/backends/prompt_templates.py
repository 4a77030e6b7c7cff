"""Prompt templates: the versioned chat files `nd_utils/prompts/<name>.<version>.txt` and their loader.

Example:
    >>> load_template("simplify.v1").fill(caption="a photo of a red car")  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import unknown_name

PROMPT_DIR = Path(__file__).resolve().parents[1] / "prompts"  # nd_utils/prompts


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
