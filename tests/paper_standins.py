"""Stand-ins for every download of the paper profile, of the same classes as the real ones.

The paper profile (`configs/paper.yaml`) needs the internet: ResNet-50's ImageNet weights, CLIP,
BLIP, Stable Diffusion, the OpenAI API, ImageNet val and Broden. None can be fetched here, so
each is replaced by a local object that the *real* loading code accepts unchanged:

* ResNet-50 keeps its real name `resnet50:IMAGENET1K_V1`: a seeded random-weight state dict is
  written where torchvision's loader looks (`$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth`);
* CLIP: `open_clip:ViT-B-16:none` (the paper's architecture, seeded random weights);
* BLIP and Stable Diffusion: tiny `save_pretrained` folders (`tests/tiny_models.py`);
* the `openai` backend talks to :class:`ConceptServer`, an OpenAI-compatible chat server on
  127.0.0.1 (through `OPENAI_BASE_URL`), whose answers are a deterministic function of the prompt;
* ImageNet val and Broden: folders in their real layouts (wnid sub-folders; `index.csv` +
  `images/`) filled with photos of the public ImageNet sample in `../shared`.

Example:
    >>> with ConceptServer() as server:                              # doctest: +SKIP
    ...     env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-local"}
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

RESNET50_FILE = "resnet50-0676ba61.pth"  # the file name of ResNet50_Weights.IMAGENET1K_V1.url


def place_resnet50_checkpoint(torch_home: "str | Path", seed: int = 0) -> Path:
    """Write a seeded random ResNet-50 state dict where torchvision looks for IMAGENET1K_V1.

    torchvision checks the file's hash only when it downloads it, so a local file of the right
    name is loaded as it is, by the same `load_state_dict_from_url` a real run uses.
    """
    import torchvision

    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert url.endswith(RESNET50_FILE), url
    path = Path(torch_home) / "hub" / "checkpoints" / RESNET50_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = torchvision.models.resnet50(weights=None)
        torch.save(model.state_dict(), path)
    return path


def sample_photos(shared: Path, n: int) -> list[Path]:
    """The first `n` photos of the ImageNet sample, in wnid order (`<wnid>_<name>.JPEG`)."""
    folder = shared / "data" / "imagenet-sample-images"
    photos = sorted(folder.glob("n*.JPEG"))
    if len(photos) < n:
        raise FileNotFoundError(f"{folder} has {len(photos)} photos, {n} wanted")
    return photos[:n]


def imagenet_val_folder(root: Path, photos: list[Path]) -> Path:
    """ImageNet val's layout: one sub-folder per wnid, the photos inside."""
    for photo in photos:
        wnid = photo.name.split("_")[0]
        (root / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, root / wnid / photo.name)
    return root


def broden_folder(root: Path, photos: list[Path]) -> Path:
    """Broden's layout: `index.csv` with an `image` column of paths under `images/`."""
    (root / "images" / "sample").mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in photos:
        shutil.copyfile(photo, root / "images" / "sample" / photo.name)
        rows.append({"image": f"sample/{photo.name}", "split": "train", "ih": 224, "iw": 224})
    with open(root / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


_WORD = re.compile(r"[a-z]+")
_FILLER = {"a", "an", "the", "of", "and", "in", "on", "with", "photo", "picture", "image", "there",
           "is", "are", "to", "it", "this", "that", "for", "at", "by"}


def concept_answer(messages: list[dict]) -> str:
    """A deterministic 1-3 word answer to the last user message: its most frequent words.

    Summaries (lines starting "- ") and single captions alike give a short label made of the
    words the text repeats most, ties broken alphabetically, filler words left out.
    """
    text = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    counts: dict[str, int] = {}
    for word in _WORD.findall(str(text).lower()):
        if word not in _FILLER and len(word) > 2:
            counts[word] = counts.get(word, 0) + 1
    best = sorted(counts, key=lambda w: (-counts[w], w))[:2]
    return " ".join(best) or "textured pattern"


class ConceptServer:
    """An OpenAI-compatible `POST /v1/chat/completions` on 127.0.0.1, answering `concept_answer`.

    `requests` records every request body; use it as a context manager.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                server.requests.append(body)
                answer = concept_answer(body.get("messages", []))
                payload = json.dumps({
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                    "created": 0, "model": body.get("model", "?"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "ConceptServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def standin_env(root: Path, concept_sets: Path, server: "ConceptServer") -> dict:
    """This process's environment, pointed at the stand-ins under `root` and at `server`.

    TORCH_HOME holds the placed ResNet-50 checkpoint (:func:`place_resnet50_checkpoint` on
    `root / "torch"`); ND_DATA_DIR and OPENAI_ORG_ID are dropped so the user's own store and
    organisation never leak into a stand-in run.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("ND_DATA_DIR", "OPENAI_ORG_ID")}
    env.update({"TORCH_HOME": str(root / "torch"), "ND_CONCEPT_DIR": str(concept_sets),
                "ND_CONCEPT_CACHE": str(root / "concept-cache"),
                "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-local-stand-in",
                "NO_PROXY": "127.0.0.1,localhost"})
    return env


def paper_overrides(root: Path, shared: Path, blip: Path, sd: Path, n_images: int = 80,
                    n_broden: int = 16) -> list[str]:
    """`--set` overrides of configs/paper.yaml for the stand-ins: paths, small sizes, few neurons.

    Every model keeps the name a real user's config gives it, except CLIP (`:none`, no
    download), the captioner and diffusion folders (local `save_pretrained` copies) and the
    sizes that make the run fit a CPU test.
    """
    photos = sample_photos(shared, n_images + n_broden)
    val = imagenet_val_folder(root / "imagenet" / "val", photos[:n_images])
    broden = broden_folder(root / "broden1_224", photos[n_images:])
    val_spec = json.dumps({"name": "imagenet-val", "path": str(val)})
    return [
        f"data_dir={root / 'data'}",
        "device=cpu",
        f"probe.sets=[{val_spec}, {json.dumps({'name': 'broden', 'path': str(broden)})}]",
        "target.layers=[conv1, layer4, fc]",
        "activations.batch_size=16", "activations.chunk_size=64", "activations.num_workers=0",
        "vlm.name=open_clip:ViT-B-16:none", "vlm.batch_size=64",
        "clip_dissect.concept_set=imagenet_labels",
        f"evaluation.probe_sets=[{val_spec}]",
        "evaluation.concept_sets=[imagenet_labels]",
        f"quality.probe_sets=[{val_spec}]", "quality.cosy_images=2", "quality.bootstrap=50",
        # trust's cosy_auc would synthesise images of every distinct label of 3,112 neurons
        # (minutes of the tiny diffusion model); its synthesised path is tested on its own
        # (test_label_trust, a registered backend), heldout_r and heldout_p run here
        "trust.cosy=false", "trust.null_concepts=200",
        "dnd.neurons={layer4: 2}", "dnd.top_k=3",
        f"captioner.model={blip}", "captioner.batch_size=8",
        "llm.summaries=2",
        f"synthesis.model={sd}", "synthesis.images_per_concept=2", "synthesis.height=64",
        "synthesis.width=64", "synthesis.batch_size=2",
        f"synthesis.pool=[{val_spec}]",
    ]
