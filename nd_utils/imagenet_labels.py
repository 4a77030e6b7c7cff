"""The paper's `imagenet_labels` lines (the final-layer ground truth): local copy, timm, download."""
from __future__ import annotations

import hashlib

from .concept_text import _decode, _split_numbered
from .errors import NdUtilsError
from .paper_concept_files import PAPER_SETS, _fetch_paper_file


# --- Ground truth of the final-layer evaluation: the paper's `imagenet_labels` lines -------------
# CLIP-Dissect's evaluation takes line k of imagenet_labels.txt (class k's name with its synonyms,
# e.g. "tench, Tinca tinca") as the ground truth of neuron k. Offline, the same 1,000 lines come
# from timm's ImageNet-1k metadata (installed with open-clip-torch): its WordNet lemmas equal the
# paper file's lines except the two "crane" classes, which the paper file disambiguates. After
# those two replacements the text must hash to the paper file's pinned sha256, or it is refused.
IMAGENET_LABELS_TIMM_FIXES = {134: ("crane", "crane, bird"), 517: ("crane", "crane, machine")}


def imagenet_labels_from_timm() -> tuple[list[str], str]:
    """The paper's 1,000 `imagenet_labels` lines rebuilt from timm, byte-identical to the file.

    Raises NdUtilsError when timm is missing or its list differs from the pinned file.
    """
    try:
        import timm
        from timm.data import ImageNetInfo
    except ImportError:
        raise NdUtilsError("rebuilding imagenet_labels offline needs the 'timm' package "
                           "(a dependency of open-clip-torch): pip install timm") from None
    info = ImageNetInfo("imagenet-1k")
    lines = [str(info.index_to_description(i)).strip() for i in range(1000)]
    for k, (old, new) in IMAGENET_LABELS_TIMM_FIXES.items():
        if lines[k] == old:
            lines[k] = new
    pin = PAPER_SETS["imagenet_labels"][0]
    got = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    if got != pin:
        raise NdUtilsError(f"timm {timm.__version__}'s ImageNet-1k descriptions hash to {got}, not "
                           f"to the paper's imagenet_labels file ({pin}): not used as its copy")
    return lines, (f"timm {timm.__version__} ImageNetInfo('imagenet-1k') descriptions, lines "
                   f"135/518 'crane' -> 'crane, bird'/'crane, machine'; sha256 = the paper file's")


def imagenet_label_lines(*, allow_download: bool = True, cache_dir=None,
                         local_dir=None) -> tuple[list[str], str]:
    """The 1,000 lines of the paper's `imagenet_labels` (line k = class k) and their source.

    Every copy is the pinned file's exact text. Tried in order: a local copy (`local_dir`,
    $ND_CONCEPT_DIR, the concept cache), the offline rebuild from timm
    (`imagenet_labels_from_timm`), then the download (when `allow_download`). Raises NdUtilsError
    naming every attempt and why it failed.

    Example:
        >>> lines, source = imagenet_label_lines(allow_download=False)     # doctest: +SKIP
        >>> lines[0]                                                       # doctest: +SKIP
        'tench, Tinca tinca'
    """
    tried = []
    attempts = [("local copy", lambda: _paper_lines(cache_dir, local_dir, False)),
                ("timm", imagenet_labels_from_timm)]
    if allow_download:
        attempts.append(("download", lambda: _paper_lines(cache_dir, local_dir, True)))
    for what, attempt in attempts:
        try:
            lines, source = attempt()
        except NdUtilsError as exc:
            tried.append(f"{what}: {exc}")
            continue
        if len(lines) == 1000:
            return lines, source
        tried.append(f"{what}: {len(lines)} lines, not 1,000")
    raise NdUtilsError("the paper's imagenet_labels lines are unavailable; tried "
                       + " | ".join(tried))


def _paper_lines(cache_dir, local_dir, allow_download: bool) -> tuple[list[str], str]:
    data, source = _fetch_paper_file("imagenet_labels", cache_dir, local_dir, allow_download)
    return _split_numbered(_decode(data, source))[0], source
