"""Adam, in place with foreach ops: the same update as torch.optim.Adam, without the few seconds that
importing torch.optim's compiler machinery adds to every `sae train`, and with a state that is plain
tensors (checkpointed as safetensors). The step count is a Python int, so no host sync on GPU."""
from __future__ import annotations

import math

import torch

from sae.kernels import native

_FUSED = hasattr(torch, "_fused_adam_")


class Adam:
    """unit_rows: 2-D parameters whose rows are renormalised to unit length after every update (a unit-norm
    decoder). On the CPU the compiled update (sae.native) does that in its own pass over the rows and sets
    `renormalised`; elsewhere `renormalised` stays False and the caller renormalises."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 unit_rows=()):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.unit_rows = {id(p) for p in unit_rows}
        self.renormalised = False
        self.steps = 0
        self.state = {p: {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                          "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                      for p in self.params}

    def _step_tensor(self, p) -> torch.Tensor:
        state = self.state[p]
        if "step" not in state or state["step"].device != p.device:
            state["step"] = torch.tensor(float(self.steps - 1), device=p.device)
        return state["step"]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [p for p in self.params if p.grad is not None]
        if not live:
            return
        originals = list(live)
        self.steps += 1
        beta1, beta2 = self.betas
        grads = [p.grad for p in live]
        exp_avg = [self.state[p]["exp_avg"] for p in live]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in live]
        # a parameter stored transposed (e.g. a latent-major encoder) is updated through its contiguous
        # transpose: Adam is elementwise, and the fused kernel would otherwise copy it in and out
        live, grads, exp_avg, exp_avg_sq = ([_contiguous_view(t) for t in group]
                                            for group in (live, grads, exp_avg, exp_avg_sq))
        self.renormalised = False
        if all(p.device.type == "cpu" for p in live) and native.available():
            # one compiled pass per parameter, unit rows renormalised in it; what it cannot take goes below
            rest = []
            renormalised = 0
            for group in zip(live, grads, exp_avg, exp_avg_sq, originals):
                # rows of the parameter itself: one updated through its transpose is left to the caller
                unit = id(group[4]) in self.unit_rows and group[0] is group[4]
                if native.adam_step_(*group[:4], lr=self.lr, beta1=beta1, beta2=beta2, eps=self.eps,
                                     step=self.steps, unit_rows=unit):
                    self.state[group[4]].pop("step", None)    # the fused path's counter, rebuilt from self.steps
                    renormalised += unit
                else:
                    rest.append(group)
            self.renormalised = bool(self.unit_rows) and renormalised == len(self.unit_rows) and not rest
            if not rest:
                return
            live, grads, exp_avg, exp_avg_sq, originals = (list(group) for group in zip(*rest))
        if _FUSED and all(p.dtype == torch.float32 for p in live):
            # one pass over each tensor; the step counts live on the parameters' devices (no host sync)
            steps = [self._step_tensor(p) for p in originals]
            torch._foreach_add_(steps, 1.0)
            torch._fused_adam_(live, grads, exp_avg, exp_avg_sq, [], steps, lr=self.lr, beta1=beta1, beta2=beta2,
                               weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
            return
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        bias1 = 1 - beta1 ** self.steps
        bias2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(live, exp_avg, denom, -self.lr / bias1)

    # ---- checkpoints: tensors + JSON ---------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for index, p in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"optim.{index}.{key}"] = self.state[p][key]
        return out

    def state_meta(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "shapes": [list(p.shape) for p in self.params]}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["shapes"] != [list(p.shape) for p in self.params]:
            raise ValueError("optimizer state does not match the model's parameters")
        self.steps = int(meta["steps"])
        for index, p in enumerate(self.params):
            self.state[p].pop("step", None)
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[p][key].copy_(tensors[f"optim.{index}.{key}"])


def _contiguous_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or its transpose when that is contiguous and the tensor is not (same storage)."""
    if tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous():
        return tensor.t()
    return tensor
