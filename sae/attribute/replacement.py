"""The local replacement model of one prompt: the language model with its norm scales and attention patterns
frozen (frozen.py) and each MLP's output replaced by its transcoder's prediction plus an error term held fixed,
so that it reproduces the clean logits exactly and is affine in its sources:

    sources = active features (every layer, in layer order) | error nodes (layer-major, one per layer and
              position) | token embeddings (one per position)

A layer with a transcoder writes  Σ_f a_f · dec_f + b_dec + skip(mlp_in) + error  (the features' activations
a_f are frozen at their clean values; the skip term is linear in the residual stream and stays a path); a layer
with an SAE at mlp_out writes  Σ_f a_f · dec_f + b_dec + error  (the MLP itself is cut: its features have
outgoing edges only); a layer with neither writes its clean MLP output as one error node per position.
`forward(scales)` runs copies of the prompt with each source multiplied by its scale (0 removes it);
`probes=True` adds a zero tensor at every place sources are written, whose gradients give direct effects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sae.attribute.frozen import Freezer, _wide
from sae.errors import UserError
from sae.lm import StopForward, site_point

CHECK_TOLERANCE = 1e-3     # relative: the frozen replacement must reproduce the clean logits this closely


@dataclass
class Part:
    """What replaces one layer's MLP. Filled in by ReplacementModel.prepare() from the clean pass."""
    layer: int
    kind: str                                # "transcoder", "sae" (at mlp_out) or "missing"
    module: nn.Module | None = None
    run: str | None = None
    positions: torch.Tensor | None = None    # [n_active] position of each active feature
    features: torch.Tensor | None = None     # [n_active] its index in the dictionary
    activations: torch.Tensor | None = None  # [n_active] its activation (code value) on the clean pass
    decoder: torch.Tensor | None = None      # [n_active, d_model] the direction it writes per unit activation
    encoder: torch.Tensor | None = None      # [n_active, d_model] d activation / d mlp_in (transcoders)
    bias: torch.Tensor | None = None         # [d_model] decoder bias (zeros for a missing layer)
    error: torch.Tensor | None = None        # [n_pos, d_model] clean MLP output minus the prediction


@dataclass
class FrozenPass:
    """One frozen forward over a batch of copies of the prompt."""
    final: torch.Tensor                      # [batch, n_pos, d_model] the LM head's input
    mlp_in: dict = field(default_factory=dict)   # layer -> [batch, n_pos, d_model]
    probes: dict = field(default_factory=dict)   # "embed" and layer -> [batch, n_pos, d_model] zero leaves


class _StandIn(nn.Module):
    """Put in place of an MLP module during frozen passes."""

    def __init__(self, owner: "ReplacementModel", layer: int):
        super().__init__()
        self.owner, self.layer = [owner], layer      # a list: not registered as a submodule

    def forward(self, hidden_states, *args, **kwargs):
        return self.owner[0]._mlp_output(self.layer, hidden_states)


class ReplacementModel:
    def __init__(self, loaded, parts: dict[int, Part]):
        self.loaded = loaded
        self.hf = loaded.model
        self.parts = {layer: parts.get(layer, Part(layer, "missing")) for layer in range(loaded.n_layers)}
        self.mlp_paths = {}
        for layer in range(loaded.n_layers):
            point_in, point_out = site_point(self.hf, "mlp_in", layer), site_point(self.hf, "mlp_out", layer)
            if point_in.module is not point_out.module:
                raise UserError(f"{loaded.name} ({loaded.family}): the MLP's input and output are not one module "
                                f"at layer {layer} ({point_in.path} vs {point_out.path}); attribution supports "
                                "Llama-, Mistral-, Qwen-, GPT-2- and GPT-NeoX-style blocks")
            self.mlp_paths[layer] = point_out.path
        self.head = self.hf.get_output_embeddings()
        if self.head is None or not getattr(loaded, "is_causal", True):
            raise UserError(f"{loaded.name} is not a causal language model with an LM head: nothing to attribute to")
        self._pass: FrozenPass | None = None
        self._constants: dict = {}

    # ---- the clean pass ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Record the clean pass of input_ids [1, n_pos]; fill every Part; return the clean logits [n_pos, vocab].
        Refuses a model whose frozen replacement does not reproduce its own logits."""
        self.input_ids = input_ids
        clean = _wide(self.hf(input_ids=input_ids).logits[0])                    # [n_pos, vocab]
        mlp_in, mlp_out, handles = {}, {}, []
        embed_module = self.hf.get_input_embeddings()
        store = {}
        handles.append(embed_module.register_forward_hook(lambda m, a, out: store.__setitem__("embed", out)))
        for layer, path in self.mlp_paths.items():
            module = self.hf.get_submodule(path)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, layer=layer: mlp_in.__setitem__(layer, _first_arg(args, kwargs)),
                with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, args, out, layer=layer: mlp_out.__setitem__(layer, out[0] if isinstance(out, tuple) else out)))
        self.freezer = Freezer(self.hf)
        try:
            with self.freezer:
                self.freezer.mode = "record"
                recorded = _wide(self.hf(input_ids=input_ids).logits[0])
        finally:
            for handle in handles:
                handle.remove()
        _check_close(recorded, clean, f"{self.loaded.name}: freezing its norms and attention")
        self.embed = store["embed"][0].detach()                                   # [n_pos, d_model]
        self.clean_mlp_in = {layer: value[0].detach() for layer, value in mlp_in.items()}   # [n_pos, d_model] each
        for layer, part in self.parts.items():
            self._fill(part, mlp_in[layer][0].detach(), mlp_out[layer][0].detach())
        self.clean_logits = clean
        self.n_pos = int(input_ids.shape[1])
        return clean

    def _fill(self, part: Part, x_in: torch.Tensor, y_out: torch.Tensor) -> None:
        dtype, device, d_model = y_out.dtype, y_out.device, y_out.shape[-1]
        if part.kind == "missing":
            part.positions = part.features = torch.zeros(0, dtype=torch.long, device=device)
            part.activations = torch.zeros(0, dtype=dtype, device=device)
            part.decoder = part.encoder = torch.zeros(0, d_model, dtype=dtype, device=device)
            part.bias = torch.zeros(d_model, dtype=dtype, device=device)
            part.error = y_out.clone()
            return
        module = part.module
        work = module.input_scale.dtype                                           # the dictionary's own dtype
        x_site = (x_in if part.kind == "transcoder" else y_out).to(work)
        codes = module.encode(x_site)                                             # [n_pos, d_sae]
        live = codes != 0
        positions, features = live.nonzero(as_tuple=True)                          # [n_active] each
        part.positions, part.features = positions, features
        part.activations = codes[positions, features].to(dtype)
        bias = module.decode(torch.zeros(1, module.d_sae, device=codes.device, dtype=work))[0]  # [d_model]
        part.decoder = _decoder_rows(module, features, bias).to(dtype)             # [n_active, d_model]
        part.bias = bias.to(dtype)
        prediction = module.decode(codes) if part.kind == "sae" else module.predict(x_site)
        part.error = (y_out.to(work) - prediction).to(dtype)                       # [n_pos, d_model]
        part.encoder = _encoder_rows(module, x_site, positions, features).to(dtype) \
            if part.kind == "transcoder" else None

    # ---- source layout ----------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return sum(len(part.features) for part in self.parts.values())

    @property
    def n_sources(self) -> int:
        return self.n_features + (len(self.parts) + 1) * self.n_pos

    def feature_offsets(self) -> dict[int, int]:
        """layer -> index of its first active feature among the sources."""
        offsets, start = {}, 0
        for layer, part in self.parts.items():
            offsets[layer] = start
            start += len(part.features)
        return offsets

    def error_index(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.n_pos + position

    def embed_index(self, position: int) -> int:
        return self.n_features + len(self.parts) * self.n_pos + position

    # ---- frozen passes ----------------------------------------------------------------------------
    def forward(self, scales: torch.Tensor | None = None, batch: int = 1, probes: bool = False) -> FrozenPass:
        """The frozen replacement over `batch` copies of the prompt (scales: [batch, n_sources], None = all ones)."""
        device, dtype = self.embed.device, self.embed.dtype
        if scales is not None:
            batch = scales.shape[0]
            scales = scales.to(device=device, dtype=dtype)
        frozen = FrozenPass(final=None)
        if probes:
            frozen.probes = {key: torch.zeros(batch, self.n_pos, self.embed.shape[-1], device=device, dtype=dtype,
                                              requires_grad=True) for key in ["embed", *self.parts]}
        self._pass, self._scales = frozen, scales
        offsets = self.feature_offsets()
        self._constants = {layer: self._constant(part, offsets[layer], scales, batch) for layer, part in self.parts.items()}
        ids = self.input_ids.expand(batch, -1)
        frozen_weights = [p for p in self._parameters() if p.requires_grad]   # gradients flow to the probes only
        for param in frozen_weights:
            param.requires_grad_(False)
        saved = {layer: self._swap(layer, _StandIn(self, layer)) for layer in self.parts}
        embed_module = self.hf.get_input_embeddings()
        handles = [embed_module.register_forward_hook(self._embed_hook),
                   self.head.register_forward_pre_hook(self._head_hook)]
        try:
            with self.freezer:
                self.freezer.mode = "frozen"
                try:
                    self.hf(input_ids=ids)
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            for layer, module in saved.items():
                self._swap(layer, module)
            for param in frozen_weights:
                param.requires_grad_(True)
            self._pass, self._constants = None, {}
        return frozen

    def logits(self, frozen: FrozenPass, tokens, position: int = -1) -> torch.Tensor:
        """[batch, len(tokens)] logits of `tokens` at `position`, from a frozen pass."""
        weight = self.head.weight[tokens]                                          # [t, d_model]
        logits = frozen.final[:, position] @ weight.t().to(frozen.final.dtype)
        bias = getattr(self.head, "bias", None)
        return logits + bias[tokens] if bias is not None else logits

    def preactivations(self, frozen: FrozenPass, layer: int, index: torch.Tensor) -> torch.Tensor:
        """[batch, len(index)] the linearised pre-activations of active features `index` (into the layer's
        active list) in a frozen pass: clean activation + encoder · (mlp_in − clean mlp_in)."""
        part = self.parts[layer]
        x = frozen.mlp_in[layer][:, part.positions[index]]                         # [batch, k, d_model]
        clean = self.clean_mlp_in[layer][part.positions[index]]                       # [k, d_model]
        return part.activations[index] + ((x - clean) * part.encoder[index]).sum(-1)

    # ---- internals --------------------------------------------------------------------------------
    def _parameters(self):
        yield from self.hf.parameters()
        for part in self.parts.values():
            if part.module is not None:
                yield from part.module.parameters()

    def _constant(self, part: Part, offset: int, scales, batch: int) -> torch.Tensor:
        """[batch or 1, n_pos, d_model] what the layer writes that is held fixed (features, bias, error)."""
        n_act = len(part.features)
        acts = part.activations[None] if scales is None else part.activations * scales[:, offset:offset + n_act]
        written = torch.zeros(acts.shape[0], self.n_pos, part.bias.shape[0], device=part.bias.device,
                              dtype=part.bias.dtype)
        if n_act:
            written.index_add_(1, part.positions, acts[..., None] * part.decoder[None])
        error = part.error[None]
        if scales is not None:
            start = self.error_index(part.layer, 0)
            error = error * scales[:, start:start + self.n_pos, None]
        return written + part.bias + error

    def _mlp_output(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        part, frozen = self.parts[layer], self._pass
        frozen.mlp_in[layer] = x
        out = self._constants[layer]
        if part.kind == "transcoder" and getattr(part.module, "skip", False):
            out = out + part.module.skip_term(x.reshape(-1, x.shape[-1])).reshape(x.shape).to(x.dtype)
        if frozen.probes:
            out = out + frozen.probes[layer]
        return out.expand(x.shape).to(x.dtype) if out.shape != x.shape else out

    def _embed_hook(self, module, args, output):
        scales = self._scales
        if scales is not None:
            start = self.embed_index(0)
            output = output * scales[:, start:start + self.n_pos, None]
        if self._pass.probes:
            output = output + self._pass.probes["embed"]
        return output

    def _head_hook(self, module, args):
        self._pass.final = args[0]
        raise StopForward

    def _swap(self, layer: int, module: nn.Module) -> nn.Module:
        parent_path, _, name = self.mlp_paths[layer].rpartition(".")
        parent = self.hf.get_submodule(parent_path)
        old = getattr(parent, name)
        setattr(parent, name, module)
        return old


def _first_arg(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _decoder_rows(module, features: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[n_active, d_out]: what each active feature writes per unit activation (decode is affine in codes)."""
    if getattr(module, "is_transcoder", False):
        return module.decoder_directions_raw()[features]
    unique, inverse = torch.unique(features, return_inverse=True)
    rows = []
    for lo in range(0, len(unique), 1024):
        chunk = unique[lo:lo + 1024]
        onehot = torch.zeros(len(chunk), module.d_sae, device=bias.device, dtype=bias.dtype)
        onehot[torch.arange(len(chunk)), chunk] = 1.0
        rows.append(module.decode(onehot) - bias)
    directions = torch.cat(rows) if rows else torch.zeros(0, bias.shape[0], device=bias.device, dtype=bias.dtype)
    return directions[inverse]


def _encoder_rows(module, x: torch.Tensor, positions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[n_active, d_in]: d code[p, f] / d x[p] for each active (p, f), by autograd through the variant's own
    encoder, in rounds that take at most one feature per position (encoders act row by row). Where the first
    round shows the derivative is input_scale · W_enc[:, f] (ReLU / TopK / JumpReLU encoders), the rest is
    read off W_enc instead of k more rounds."""
    rows = torch.zeros(len(features), x.shape[-1], device=x.device, dtype=x.dtype)
    weight = getattr(module, "W_enc", None)
    linear = None
    if isinstance(weight, torch.Tensor) and weight.shape == (x.shape[-1], module.d_sae):
        linear = (weight * module.input_scale).to(x.dtype)                 # [d_in, d_sae]
    order = torch.argsort(positions, stable=True)
    sorted_pos = positions[order]
    starts = torch.searchsorted(sorted_pos, sorted_pos)                  # first index of each position's run
    rank = torch.arange(len(order), device=x.device) - starts            # 0, 1, 2 ... within a position
    with torch.enable_grad():
        for r in range(int(rank.max()) + 1 if len(rank) else 0):
            pick = order[rank == r]                                       # at most one per position
            x_leaf = x.detach().clone().requires_grad_(True)
            codes = module.encode(x_leaf)                                 # [n_pos, d_sae]
            total = codes[positions[pick], features[pick]].sum()
            (grad,) = torch.autograd.grad(total, x_leaf)
            rows[pick] = grad[positions[pick]]
            if r == 0 and linear is not None:
                if torch.allclose(rows[pick], linear[:, features[pick]].t(), rtol=1e-4, atol=1e-6):
                    return linear[:, features].t().contiguous()
                linear = None
    return rows


def _check_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Refuse a model family whose frozen replacement does not reproduce its clean logits (an unknown norm or
    attention variant, a final logit soft-cap ...), rather than attribute a different model."""
    scale = float(want.abs().max()) or 1.0
    gap = float((got - want).abs().max()) / scale
    if not gap <= CHECK_TOLERANCE:
        raise UserError(f"{what} changes its logits (by {gap:.2g} relative): attribution does not support this "
                        "model family yet")
