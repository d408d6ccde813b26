"""`sae attribute`: runs + prompt + target -> GRAPH.json (replacement model, direct effects, pruning)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.errors import UserError


@dataclass
class AttributeOptions:
    runs: list
    prompt: str
    target: str | None = None                # one token; None: the model's top prediction at the last position
    out: str | Path | None = None
    model: str | None = None                 # default: the model the runs name
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_feature_nodes: int | None = 256      # rows computed (None: every active feature)
    batch_size: int = 64                     # targets per backward pass
    allow_missing: bool = False
    device: str = "cpu"
    model_dtype: str = "auto"
    progress: bool = True


def check_options(opts: AttributeOptions) -> None:
    if not opts.prompt or not opts.prompt.strip():
        raise UserError("--prompt is empty: give the text to attribute")
    for name in ("node_threshold", "edge_threshold"):
        value = getattr(opts, name)
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
    if opts.max_feature_nodes is not None and opts.max_feature_nodes < 0:
        raise UserError(f"--max-feature-nodes must be at least 0, got {opts.max_feature_nodes}")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.out is not None:
        out = Path(opts.out)
        if out.is_dir():
            raise UserError(f"--out {out} is a folder: give a file name such as {out}/graph.json")
        if not out.parent.exists():
            raise UserError(f"--out: the folder {out.parent} does not exist")


def target_token(tokenizer, text: str | None, logits: torch.Tensor) -> int:
    """The target's token id: `text` tokenised must be one token; None: the top prediction (logits [vocab])."""
    if text is None:
        return int(torch.argmax(logits))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise UserError(f"--target {text!r} is {len(ids)} tokens ({pieces}), not one: give a single token "
                        "(mind a leading space, e.g. ' Paris')")
    return int(ids[0])


def prompt_ids(loaded, prompt: str, device) -> torch.Tensor:
    ids = loaded.tokenizer(prompt)["input_ids"]                                  # BOS as the model adds it
    if not ids:
        raise UserError("--prompt tokenises to nothing: give some text")
    config = getattr(loaded.model, "config", None)
    limit = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(config, key, None), int)), None)
    if limit is not None and len(ids) > limit:
        raise UserError(f"--prompt is {len(ids)} tokens, more than {loaded.name} takes ({limit} positions)")
    return torch.tensor([ids], dtype=torch.long, device=device)                  # [1, n_pos]


def attribute(opts: AttributeOptions, loaded=None) -> dict:
    """Build the graph (and write it to opts.out when given); returns the GRAPH.json object.
    `loaded`: an already loaded sae.lm.LoadedModel (tests pass tiny ones)."""
    from sae.attribute.effects import direct_effect_rows
    from sae.attribute.graph import SCHEMA, build_graph
    from sae.attribute.replacement import ReplacementModel
    from sae.attribute.sources import load_parts, model_of
    check_options(opts)
    model_name = opts.model or (loaded.name if loaded is not None else model_of(opts.runs))
    if loaded is None:
        from sae.lm import load_model
        loaded = load_model(model_name, device=opts.device, dtype=opts.model_dtype)
    device = next(loaded.model.parameters()).device
    parts, missing = load_parts(opts.runs, loaded, model_name, opts.allow_missing, device=device)
    if missing:
        print(f"warning: layers {missing} have no transcoder: their MLPs are kept whole as error nodes",
              file=sys.stderr)
    input_ids = prompt_ids(loaded, opts.prompt, device)
    rm = ReplacementModel(loaded, parts)
    with torch.no_grad():
        clean = rm.prepare(input_ids)
    token = target_token(loaded.tokenizer, opts.target, clean[-1])
    rows = direct_effect_rows(rm, token, opts.max_feature_nodes, opts.batch_size, opts.progress)
    completeness = check_completeness(rm, rows.logit, token)
    tokens = [loaded.tokenizer.decode([i]) for i in input_ids[0].tolist()]
    token_text = loaded.tokenizer.decode([token])
    graph = build_graph(rm, rows, token, token_text, opts.node_threshold, opts.edge_threshold)
    result = {
        "schema": SCHEMA,
        "model": model_name,
        "n_layers": loaded.n_layers,
        "prompt": opts.prompt,
        "prompt_tokens": tokens,
        "prompt_token_ids": input_ids[0].tolist(),
        "target": {"token": token_text, "token_id": token, "position": rm.n_pos - 1,
                   "logit": float(clean[-1, token]), "probability": float(torch.softmax(clean[-1], -1)[token])},
        "runs": {str(layer): part.run for layer, part in rm.parts.items() if part.run},
        "missing_layers": missing,
        "settings": {"node_threshold": opts.node_threshold, "edge_threshold": opts.edge_threshold,
                     "max_feature_nodes": opts.max_feature_nodes},
        "completeness": completeness,
        **graph,
    }
    if opts.out is not None:
        from sae.files import write_json
        write_json(Path(opts.out), result)
    return result


def check_completeness(rm, logit_row: torch.Tensor, token: int) -> dict:
    """The target logit against the sum of its direct effects plus its bias terms (its value in the frozen
    model with every source removed): equal up to rounding when the attribution is exact."""
    with torch.no_grad():
        zeros = torch.zeros(1, rm.n_sources, device=rm.embed.device)
        bias = float(rm.logits(rm.forward(zeros), [token])[0, 0])
    logit = float(rm.clean_logits[-1, token])
    direct = float(logit_row.double().sum())
    error = abs(direct + bias - logit) / max(abs(logit), 1e-12)
    return {"logit": logit, "direct_sum": direct, "bias": bias, "relative_error": error,
            "direct_abs_sum": float(logit_row.double().abs().sum())}
