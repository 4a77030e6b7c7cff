"""Benchmark of Describe-and-Dissect, offline profile: 20 neurons through stages 03-06.

Prints seconds per neuron (per stage and in all), concept images synthesised per neuron,
language-model calls per neuron and the cache hit rates (captions, LLM answers, concept images),
beside the reference implementation's design: 5 candidates x 10 generated images = 50 images and
about 15 sequential LLM calls per neuron, nothing shared between neurons, ~38.8 s per neuron on a
V100 (METHODS.md section 3).

The DnD stages start cold in a fresh store; stage 01 (activations and the retrieval pool's image
features) is linked in from `data/` when it is there, else computed first (not timed as DnD).
A second pass over the same neurons then shows the warm (all-cached) cost.

Usage: python benchmarks/bench_dnd.py [--neurons 10] [--layers head,fc] [--llm transformers]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def link_stage_01(src: Path, dst: Path) -> int:
    """Hard-link finished stage-01 artifacts (content-addressed, so safe to share)."""
    n = 0
    for stage in ("01_activation_caching", "01_image_features"):
        for art in (src / "artifacts" / stage).glob("*"):
            if not (art / "manifest.json").is_file():
                continue
            target = dst / "artifacts" / stage / art.name
            for f in art.rglob("*"):
                if f.is_file():
                    out = target / f.relative_to(art)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(f, out)
                    except OSError:
                        out.write_bytes(f.read_bytes())
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--neurons", type=int, default=10, help="neurons per layer")
    ap.add_argument("--layers", default="head,fc")
    ap.add_argument("--llm", default="transformers")
    args = ap.parse_args()

    import nd_utils as nd
    from nd_utils.store import ArtifactStore
    from nd_utils.stages.captions import caption_cache
    from nd_utils.stages.candidate_concepts import language_model_from_config

    layers = args.layers.split(",")
    store = Path(tempfile.mkdtemp(prefix="nd-bench-dnd-"))
    cfg = nd.load_config("offline", [f"data_dir={store}", f"dnd.layers=[{', '.join(layers)}]",
                                     f"dnd.neurons={args.neurons}", f"llm.name={args.llm}"])
    linked = link_stage_01(nd.load_config("offline").data_dir, store)
    nd.cache_activations(cfg, progress=False)
    n_neurons = args.neurons * len(layers)
    print(f"DnD benchmark: {n_neurons} neurons ({args.neurons} in each of {layers}), "
          f"captioner {cfg['captioner.name']}, llm {cfg['llm.name']}, synthesis "
          f"{cfg['synthesis.name']}; stage-01 artifacts linked: {linked}")

    times = {}
    t = time.perf_counter()
    nd.dnd_top_images(cfg, progress=False)
    times["03 top images + crops"] = time.perf_counter() - t
    t = time.perf_counter()
    nd.dnd_captions(cfg, progress=False)
    times["03 captions"] = time.perf_counter() - t
    lm = language_model_from_config(cfg)
    t = time.perf_counter()
    concepts = nd.dnd_concepts(cfg, progress=False, lm=lm)
    times["04 concepts (LLM)"] = time.perf_counter() - t
    t = time.perf_counter()
    images, synth_stats = nd.dnd_synthesis(cfg, progress=False)
    times["05 synthesis"] = time.perf_counter() - t
    t = time.perf_counter()
    nd.dnd_selection(cfg, progress=False)
    times["06 selection"] = time.perf_counter() - t
    cold = sum(times.values())

    t = time.perf_counter()
    nd.dnd_selection(cfg, progress=False)
    warm = time.perf_counter() - t

    n_candidates = sum(len(lc.candidates) for lc in concepts.values())
    per_image = int(cfg["synthesis.images_per_concept"])
    llm = lm.stats()
    captions = caption_cache(cfg.data_dir)
    cap_manifests = [a.manifest.get("cache", {}) for a in
                     ArtifactStore(cfg.data_dir).find("03_captions")]
    cap_hits = sum(m.get("hits", 0) for m in cap_manifests)
    cap_total = cap_hits + sum(m.get("misses", 0) for m in cap_manifests)
    result = {
        "neurons": n_neurons,
        "seconds_per_neuron": round(cold / n_neurons, 2),
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "warm_rerun_seconds": round(warm, 1),
        "candidates_per_neuron": round(n_candidates / n_neurons, 2),
        "concept_images_synthesised_per_neuron": round(
            synth_stats["synthesised"] * per_image / n_neurons, 2),
        "concept_images_needed_without_sharing_per_neuron": round(
            n_candidates * per_image / n_neurons, 2),
        "llm_calls_per_neuron": round(llm["model_calls"] / n_neurons, 2),
        "llm_requests_per_neuron": round((llm["hits"] + llm["misses"]) / n_neurons, 2),
        "llm_cache_hit_rate": llm["hit_rate"],
        "caption_cache_hit_rate": round(cap_hits / cap_total, 3) if cap_total else None,
        "captions_cached": len(captions),
        "concept_image_reuse_rate": round(synth_stats["reused"] / synth_stats["concepts"], 3)
        if synth_stats["concepts"] else None,
        "distinct_concepts": synth_stats["concepts"],
        "reference_design_per_neuron": {"generated_images": 50, "llm_calls": 15,
                                        "seconds_v100": 38.8, "sharing": "none"},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
