"""Sentence embeddings through transformers directly, bit for bit as sentence-transformers.

`load_sentence_encoder(name)` returns a function texts -> embeddings for the models of
`sentence_models` (all-mpnet-base-v2 for the evaluation, all-MiniLM-L6-v2 for ConSE). Local
mean-pooled folders run through `MeanPooledSentenceEncoder`, so a notebook kernel that only needs
embeddings does not import sentence-transformers (5.6 s: it pulls in scikit-learn and timm).

Example:
    >>> encode, used = load_sentence_encoder("all-mpnet-base-v2")        # doctest: +SKIP
    >>> encode(["a dog", "a red car"]).shape
    torch.Size([2, 768])
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..machine import resolve_device
from .sentence_models import MPNET, load_sentence_model, resolve_sentence_model


def load_sentence_encoder(name: str = MPNET, device: str = "cpu", batch_size: int = 128,
                          cache_dir=None) -> tuple[Callable[[list[str]], torch.Tensor], str]:
    """(texts -> embeddings `[M, D]` on the CPU, name actually used), as
    `load_sentence_model(name).encode(texts, batch_size=batch_size)` gives them, bit for bit.

    A local mean-pooled model (mpnet, MiniLM) runs through `MeanPooledSentenceEncoder`, without
    importing sentence-transformers; anything else through sentence-transformers.

    Example:
        >>> encode, used = load_sentence_encoder("all-mpnet-base-v2")    # doctest: +SKIP
        >>> encode(["a dog", "a red car"]).shape
        torch.Size([2, 768])
    """
    source, used = resolve_sentence_model(name, cache_dir)
    if Path(source).is_dir():
        try:
            enc = MeanPooledSentenceEncoder(source, device=device)
        except (ValueError, OSError):  # another architecture: sentence-transformers reads it
            enc = None
        if enc is not None:
            return (lambda texts: enc.encode(texts, batch_size=batch_size,
                                             normalize=False).cpu()), used
    model, used = load_sentence_model(name, device=device, cache_dir=cache_dir)
    return (lambda texts: torch.as_tensor(model.encode(list(texts), batch_size=batch_size,
                                                       show_progress_bar=False))), used


class MeanPooledSentenceEncoder:
    """A sentence-transformers folder of the form Transformer -> mean Pooling -> Normalize
    (all-MiniLM-L6-v2, all-mpnet-base-v2), run through transformers directly.

    `encode(texts, batch_size, normalize)` gives the same bits as `SentenceTransformer(path)
    .encode(texts, batch_size=batch_size, normalize_embeddings=normalize, convert_to_tensor=True)`:
    texts sorted by length as sentence-transformers sorts them, padded batches, masked mean,
    unit norm (`tests/test_sentence_models.py` checks it on MiniLM and mpnet). It exists because
    importing sentence-transformers (it pulls in scikit-learn and timm) took 5.6 s in every
    notebook kernel that loads `conse` or the evaluation's sentence model.

    Example:
        >>> enc = MeanPooledSentenceEncoder(mpnet_path())                   # doctest: +SKIP
        >>> enc.encode(["dog", "a red car"]).shape                           # doctest: +SKIP
        torch.Size([2, 768])
    """

    def __init__(self, path: "str | Path", device="cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        modules = [m["type"].rsplit(".", 1)[-1]
                   for m in json.loads((path / "modules.json").read_text())]
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if modules != ["Transformer", "Pooling", "Normalize"] or not pooling.get(
                "pooling_mode_mean_tokens") or sum(bool(v) for k, v in pooling.items()
                                                  if k.startswith("pooling_mode")) != 1:
            raise ValueError(f"{path} is not a Transformer -> mean Pooling -> Normalize model")
        settings = json.loads((path / "sentence_bert_config.json").read_text())
        self.max_seq_length = int(settings.get("max_seq_length") or 512)
        self.lower_case = bool(settings.get("do_lower_case"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().to(resolve_device(device))
        # the tokenizer's outputs the model takes (MPNet has no token_type_ids)
        self._inputs = set(inspect.signature(self.model.forward).parameters)

    def to(self, device) -> "MeanPooledSentenceEncoder":
        self.model.to(resolve_device(device))
        return self

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: "int | None" = None,
               normalize: bool = True) -> torch.Tensor:
        """Texts -> embeddings `[M, D]` on the model's device (unit norm either way).

        `batch_size`: texts per padded batch (None: all in one); `normalize`: normalise once
        more after the model's Normalize module, as `normalize_embeddings=True` does.
        """
        import numpy as np

        texts = [t.lower() for t in texts] if self.lower_case else list(texts)
        order = np.argsort([-len(t) for t in texts])  # sentence-transformers' order and sort
        step = int(batch_size or max(len(texts), 1))
        device = next(self.model.parameters()).device
        parts = []
        for start in range(0, len(texts), step):
            batch = self.tokenizer([texts[i] for i in order[start:start + step]], padding=True,
                                   truncation="longest_first", return_tensors="pt",
                                   max_length=self.max_seq_length)
            batch = {k: v.to(device) for k, v in batch.items() if k in self._inputs}
            tokens = self.model(**batch)[0]
            mask = batch["attention_mask"].unsqueeze(-1).expand(tokens.size()).to(tokens.dtype)
            emb = torch.sum(tokens * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)  # the Normalize module
            parts.append(torch.nn.functional.normalize(emb, p=2, dim=1) if normalize else emb)
        if not parts:
            return torch.empty(0, self.model.config.hidden_size, device=device)
        emb = torch.cat(parts)
        out = torch.empty_like(emb)
        out[torch.as_tensor(order, device=device)] = emb
        return out
