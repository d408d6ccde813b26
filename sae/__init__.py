"""sae: sparse autoencoders for language-model activations.

    import sae
    model = sae.load(RUN)
    store = sae.ActivationStore(STORE)
    with sae.splice(hf_model, model, site="resid_post", layer=6): ...
    with sae.steer(hf_model, model, site="resid_post", layer=6, features={123: 8.0}): ...
"""
__version__ = "0.1.0"

__all__ = ["load", "from_pretrained", "ActivationStore", "splice", "steer", "ablate", "UserError", "__version__"]


def __getattr__(name):
    # lazy, so that `sae --help` does not import torch
    if name == "load":
        from sae.runs import load
        return load
    if name == "from_pretrained":
        from sae.runs import from_pretrained
        return from_pretrained
    if name == "ActivationStore":
        from sae.store import ActivationStore
        return ActivationStore
    if name == "splice":
        from sae.evaluate.splice import splice
        return splice
    if name in ("steer", "ablate"):   # features set to chosen values / removed (sae.evaluate.steer)
        from sae.evaluate import steer
        return getattr(steer, name)
    if name == "UserError":
        from sae.errors import UserError
        return UserError
    if name in ("io", "runs"):   # `import sae; sae.io.from_pretrained(...)`
        import importlib
        return importlib.import_module(f"sae.{name}")
    raise AttributeError(name)
