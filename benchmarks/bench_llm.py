"""Offline language-model speed for DnD stage 04: load time and seconds per call.

Prints, for each installed offline GGUF model: the GGUF load (transformers converts and
dequantizes it) against the converted safetensors copy the package keeps in the model cache,
then seconds per DnD call (4 simplify + 2 summarise prompts) with and without the reuse of the
prompt's fixed part, with torch at 1 and at 2 threads, and checks the answers are the same.

Run: .venv/bin/python benchmarks/bench_llm.py [model ...]   (default: every installed model)
"""
from __future__ import annotations

import resource
import sys
import time

import torch

from nd_utils.backends import language_models as lmod
from nd_utils.backends.prompt_templates import load_template
from nd_utils.errors import NdUtilsError


def _jobs():
    simp, summ = load_template("simplify.v1"), load_template("summarize.v1")
    caps = ["a photo of a goose standing in the grass", "a photo of a dung beetle",
            "a photo of a beaker, or possibly a measuring cup", "a photo of a cannon on a wall"]
    return ([simp.messages(caption=c) for c in caps]
            + [summ.messages(descriptions="\n".join(f"- {c}" for c in caps[i:] + caps[:i]))
               for i in range(2)])


def _per_call(lm, jobs, prefix: bool, threads: int) -> tuple[float, list[str]]:
    lm.cpu_threads = threads
    lm._prefixes.clear()
    if not prefix:
        lm._prefix_cache = lambda head, ids: None
    try:
        t = time.perf_counter()
        out = [lm.complete("", temperature=0.3, seed=i, messages=m) for i, m in enumerate(jobs)]
        return (time.perf_counter() - t) / len(jobs), out
    finally:
        lm.__dict__.pop("_prefix_cache", None)


def bench(model: str) -> None:
    from transformers import AutoModelForCausalLM

    if model == lmod.SMOLLM2:
        src, gguf = str(lmod.smollm2_path()), lmod.SMOLLM2_FILE
    else:
        path = lmod.qwen_coder_path()
        src, gguf = str(path.parent), path.name
    t = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    gguf_s = time.perf_counter() - t
    lmod.TransformersLM(model)  # converts once if needed
    t = time.perf_counter()
    lm = lmod.TransformersLM(model)
    conv_s = time.perf_counter() - t
    print(f"{model}: load from GGUF {gguf_s:.1f} s, from the converted copy {conv_s:.1f} s "
          f"({gguf_s / conv_s:.0f}x)")
    jobs = _jobs()
    base = None
    for threads in (1, 2):
        for prefix in (False, True):
            s, out = _per_call(lm, jobs, prefix, threads)
            base = base or s
            same = "same answers" if out == _per_call(lm, jobs, not prefix, threads)[1] else \
                "ANSWERS DIFFER"
            print(f"  threads={threads} prefix reuse={'on ' if prefix else 'off'}: "
                  f"{s:.2f} s/call ({base / s:.1f}x vs 1 thread, no reuse), {same}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    models = sys.argv[1:] or [m for m in lmod.OFFLINE_MODELS]
    for name in models:
        try:
            bench(name)
        except NdUtilsError as exc:  # a model whose package is not installed
            print(f"{name}: skipped ({exc})")
