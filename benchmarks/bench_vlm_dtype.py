"""CLIP-Dissect labels with the VLM in float32 and in reduced precision (`vlm.dtype`): how often
the top-1 label of a neuron agrees, and how far the features move.

One target layer's activations `[N, K]` on N probe images, the VLM's image features `[N, D]` and
text features `[M, D]` of M concept words, once in float32 and once in the reduced dtype (float16
on CUDA, as the reference's `clip.load` runs CLIP; bfloat16 on the CPU, where float16 is slow),
both from the same weights. Both feature sets go through `soft_wpmi` (nd_utils.similarity_formulas) with the
same activations, and the labels (argmax over concepts) are compared.

Printed: the fraction of neurons whose top-1 label agrees; the fraction whose float32 top-1 is
among the reduced run's top 5; the max abs difference of image features, text features and
cosines P; the mean cosine between a float32 and a reduced feature row; and the fraction of
neurons whose float32 top-1/top-2 margin is below the largest change of any similarity score
(near ties, which any numeric change may flip).

The default VLM, `open_clip:ViT-B-16:none`, has seeded random weights: semantically meaningless,
but the same architecture and numerics as the paper's CLIP, so it measures numeric agreement
offline. With network (or a filled open_clip cache) pass `--vlm open_clip:ViT-B-16:openai`.

About 1.5 minutes on 2 CPU cores with the defaults (40 images, 300 concepts).

Usage: python benchmarks/bench_vlm_dtype.py [--n 40] [--concepts 300] [--dtype bfloat16]
       [--vlm open_clip:ViT-B-16:openai] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def features(vlm, images: list, texts: list[str], batch_size: int) -> tuple[torch.Tensor, ...]:
    from nd_utils.backends.vlm import encode_images_in_batches

    x = torch.stack([vlm.preprocess(im) for im in images])
    img = encode_images_in_batches(vlm, x, batch_size).float().cpu()
    txt = vlm.encode_texts(texts, batch_size=batch_size).float().cpu()
    return img, txt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vlm", default="open_clip:ViT-B-16:none")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None,
                    help="reduced dtype (default: float16 on CUDA, bfloat16 on the CPU)")
    ap.add_argument("--n", type=int, default=None,
                    help="probe images (default: 40 on the CPU, all 78 of offline-sample on CUDA)")
    ap.add_argument("--probe", default="offline-sample")
    ap.add_argument("--concepts", type=int, default=None,
                    help="first M words of words-3k (default: 300 on the CPU, 3000 on CUDA)")
    ap.add_argument("--target", default="efficientnet-lite0")
    ap.add_argument("--layer", default="fc")
    ap.add_argument("--top-k", type=int, default=10, help="soft_wpmi top_k (<= n)")
    ap.add_argument("--batch-size", type=int, default=64, help="vlm.batch_size")
    args = ap.parse_args()

    import nd_utils as nd
    from nd_utils.backends.vlm import load_vlm
    from nd_utils.hooks import trace_images
    from nd_utils.machine import resolve_device
    from nd_utils.probes import load_probes
    from nd_utils.similarity_formulas import soft_wpmi

    device = resolve_device(args.device)
    dtype = args.dtype or ("float16" if device.type == "cuda" else "bfloat16")
    probe = load_probes([{"name": args.probe}])
    cuda = device.type == "cuda"
    n = min(args.n or (len(probe) if cuda else 40), len(probe))
    images = [probe.load_image(i) for i in range(n)]
    texts = list(nd.load_concept_set("words-3k"))[:args.concepts or (3000 if cuda else 300)]

    t0 = time.perf_counter()
    target = nd.load_target(args.target).to(device)
    acts = trace_images(target, [args.layer], images, batch_size=args.batch_size).pooled[args.layer]
    runs, seconds = {}, {}
    for name in ("float32", dtype):
        vlm = load_vlm(args.vlm, device=device, **({} if name == "float32" else {"dtype": name}))
        t = time.perf_counter()
        runs[name] = features(vlm, images, texts, args.batch_size)
        seconds[name] = round(time.perf_counter() - t, 2)
        del vlm
    (i32, t32), (ir, tr) = runs["float32"], runs[dtype]
    p32, pr = i32 @ t32.T, ir @ tr.T
    top_k = min(args.top_k, n)
    s32 = soft_wpmi(p32, acts, top_k=top_k)
    sr = soft_wpmi(pr, acts, top_k=top_k)
    top32, topr = s32.topk(2, dim=1), sr.topk(5, dim=1)
    agree = (top32.indices[:, 0] == topr.indices[:, 0]).float().mean().item()
    in_top5 = (topr.indices == top32.indices[:, :1]).any(1).float().mean().item()
    max_sim_change = (s32 - sr).abs().max().item()
    margin = top32.values[:, 0] - top32.values[:, 1]
    result = {
        "vlm": args.vlm, "device": str(device), "reduced_dtype": dtype, "images": n,
        "concepts": len(texts), "target": args.target, "layer": args.layer,
        "neurons": int(acts.shape[1]), "soft_wpmi_top_k": top_k,
        "top1_label_agreement": round(agree, 4),
        "fp32_top1_in_reduced_top5": round(in_top5, 4),
        "max_abs_diff_image_features": float((i32 - ir).abs().max()),
        "max_abs_diff_text_features": float((t32 - tr).abs().max()),
        "max_abs_diff_cosines_P": float((p32 - pr).abs().max()),
        "mean_row_cosine_image": float((i32 * ir).sum(1).mean()),
        "mean_row_cosine_text": float((t32 * tr).sum(1).mean()),
        "max_abs_diff_similarity": max_sim_change,
        "near_tie_fraction": round(float((margin < max_sim_change).float().mean()), 4),
        "encode_seconds": seconds, "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"\n{args.vlm} on {device}: {dtype} vs float32, {n} images x {len(texts)} concepts, "
          f"{result['neurons']} neurons of {args.target}/{args.layer}: top-1 labels agree for "
          f"{agree:.1%} of neurons (float32 top-1 in the {dtype} top 5: {in_top5:.1%}); max |diff| "
          f"image features {result['max_abs_diff_image_features']:.2e}, text features "
          f"{result['max_abs_diff_text_features']:.2e}, P {result['max_abs_diff_cosines_P']:.2e}")


if __name__ == "__main__":
    main()
