"""`sae push RUN REPO`: upload a run folder to the Hugging Face Hub, with a model card.

    from sae.push import push, model_card
    push("runs/topk", "me/smollm2-l6-topk")      # RUN/README.md written, the folder uploaded

The card (RUN/README.md, written first, atomically) says what the SAE is (variant, widths, knobs, the
model, site and layer it reads), what it was trained on (dataset, store, tokens), its figures from
eval.json (or the training summary's held-out scores), and how to load it: with this package
(`sae.load` on a snapshot of the repo) and with SAELens (the repo's saelens/ folder, an export in
SAELens's layout, uploaded beside the run when the variant has one). Checkpoints, TensorBoard files and
hidden temporaries stay behind. No credentials (HF_TOKEN or `hf auth login`) is refused in one line.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from sae.errors import UserError

# fnmatch patterns on paths inside RUN ("*" also matches "/"): a live run's layer_L/checkpoints too
IGNORED = ["checkpoints/*", "*/checkpoints/*", "tensorboard/*", "*/tensorboard/*", ".*", "*/.*", "*.lock"]
FIGURES = (("fvu", "FVU (fraction of variance unexplained)"), ("explained_variance", "explained variance"),
           ("mse", "MSE"), ("l0", "L0 (mean active latents per token)"), ("dead_fraction", "dead latents"),
           ("ce_loss_clean", "CE loss, clean"), ("ce_loss_spliced", "CE loss, SAE spliced in"),
           ("ce_loss_recovered", "CE loss recovered"), ("kl_div_spliced", "KL divergence, spliced"),
           ("kl_div_score", "KL divergence score"))


def _runs(run_dir: Path) -> list[Path]:
    """The run itself, or each layer_L/ run of a multi-layer live run."""
    if (run_dir / "config.json").is_file():
        return [run_dir]
    runs = sorted(p.parent for p in run_dir.glob("layer_*/config.json"))
    if not runs:
        raise UserError(f"{run_dir} is not a run folder (no config.json, no layer_*/config.json)")
    return runs


def _figures(run: Path) -> tuple[str, dict]:
    from sae.files import read_json
    evaluation = read_json(run / "eval.json", "eval.json", missing_ok=True)
    if evaluation:
        return "eval.json (`sae eval`, held-out tokens)", evaluation
    summary = read_json(run / "train_summary.json", "train_summary.json", missing_ok=True) or {}
    return "the training summary's held-out scores", summary.get("held_out") or {}


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _section(run: Path, root: Path) -> list[str]:
    from sae.files import read_json
    config = read_json(run / "config.json", "the run's config")
    training = config.get("training") or {}
    where = "" if run == root else f" (`{run.relative_to(root)}/`)"
    knobs = ", ".join(f"{k}={_number(v)}" for k, v in sorted((config.get("knobs") or {}).items())) or "none"
    lines = [f"## {config.get('variant')} SAE, layer {config.get('layer')}{where}", "",
             f"- **What it is:** a `{config.get('variant')}` sparse autoencoder with {config.get('d_sae')} latents "
             f"over the {config.get('d_in')}-dimensional `{config.get('site')}` activations of layer "
             f"{config.get('layer')} of `{config.get('model')}`; knobs: {knobs}."
             + (" It is a transcoder: it reads the MLP input and predicts the MLP output." if config.get("transcoder")
                else ""),
             f"- **Training data:** dataset `{config.get('dataset') or 'not recorded'}`"
             + (f", activation store `{Path(str(config['store'])).name}` (digest {config.get('store_digest')})"
                if config.get("store") else ", activations straight from the model (live)")
             + (f"; {training.get('tokens_seen', training.get('tokens')):,} tokens" if training.get("tokens") else "")
             + (f", batch {training.get('batch_size')}, learning rate {_number(training.get('lr'))}, seed "
                f"{training.get('seed')}" if training else "") + ".",
             f"- **Package:** sae {config.get('version')} (commit {str(config.get('git_commit') or '')[:12]})", ""]
    source, figures = _figures(run)
    shown = [(label, figures[key]) for key, label in FIGURES if figures.get(key) is not None]
    probing = figures.get("sparse_probing")
    if shown:
        lines += [f"Figures from {source}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {_number(value)} |" for label, value in shown]
        if isinstance(probing, dict):
            lines += [f"| sparse probing, {k} latent(s) | {_number(v)} |" for k, v in probing.items() if k != "full"]
        lines.append("")
    else:
        lines += ["No evaluation yet (run `sae eval`).", ""]
    return lines


def model_card(run_dir, repo_id: str, saelens: str | None = "") -> str:
    """The README.md model card of a run folder (one section per layer for a multi-layer live run).
    saelens: the SAELens folder to load inside the repo's saelens/ ("" itself; None: no SAELens layout)."""
    from sae.files import read_json
    run_dir = Path(run_dir)
    runs = _runs(run_dir)
    first = read_json(runs[0] / "config.json", "the run's config")
    lines = ["---", "library_name: sae", "tags:", "- sparse-autoencoder", "- interpretability",
             f"- {first.get('variant')}", f"base_model: {first.get('model')}" if "/" in str(first.get("model"))
             else f"# model: {first.get('model')}", "---", "",
             f"# {repo_id}", "",
             f"Sparse autoencoder(s) trained with the `sae` toolkit on `{first.get('model')}`.", ""]
    for run in runs:
        lines += _section(run, run_dir)
    layer = "" if runs[0] == run_dir else str(runs[0].relative_to(run_dir))   # a multi-layer run: its first layer
    inside = f' + "/{layer}"' if layer else ""
    lines += ["## How to load it", "", "With this package (`pip install sae-toolkit`):", "", "```python",
              "import sae", "from huggingface_hub import snapshot_download",
              f'folder = snapshot_download("{repo_id}")',
              f"model = sae.load(folder{inside})   # model.encode(x), model.decode(codes): raw activation units",
              "```", ""]
    if saelens is not None:
        lines += ["With SAELens (its layout is in the `saelens/` folder of this repo):", "", "```python",
                  "from huggingface_hub import snapshot_download", "from sae_lens import SAE",
                  f'folder = snapshot_download("{repo_id}", allow_patterns=["saelens/*"])',
                  f'sae_model = SAE.load_from_disk(folder + "/saelens{"/" + saelens if saelens else ""}")',
                  "```", ""]
    else:
        lines += ["This variant has no SAELens equivalent; `sae export RUN --format saelens` says why.", ""]
    lines += ["Files: `config.json` (variant, knobs, widths, layer, site, training options), `sae.safetensors` "
              "(weights; `encode`/`decode` take raw activations, the input scale is inside), `metrics.jsonl` "
              "(training curve), `eval.json` (evaluation).", ""]
    return "\n".join(lines)


def token_or_refuse(token: str | None = None) -> str:
    from huggingface_hub import get_token
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face credentials: run `hf auth login` or set HF_TOKEN (a write token)")
    return token


def push(run_dir, repo_id: str, token: str | None = None, private: bool = False, endpoint: str | None = None,
         revision: str | None = None, with_saelens: bool = True) -> str:
    """Write RUN/README.md and upload the run folder (and its SAELens export under saelens/); returns the URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from sae.files import write_atomic_bytes
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{repo_id!r} is not a Hub repo id: give OWNER/NAME")
    runs = _runs(run_dir)
    for run in runs:
        if not (run / "sae.safetensors").is_file():
            raise UserError(f"{run} has no sae.safetensors: the run is not finished")
    token = token_or_refuse(token)
    from huggingface_hub import constants
    if constants.is_offline_mode():
        raise UserError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    with tempfile.TemporaryDirectory(prefix="sae-push-") as tmp:
        saelens_dir = _saelens_export(run_dir, Path(tmp) / "saelens") if with_saelens else None
        inner = None if saelens_dir is None else next((p.name for p in sorted(saelens_dir.iterdir()) if p.is_dir()), "")
        write_atomic_bytes(run_dir / "README.md", model_card(run_dir, repo_id, inner).encode())
        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), revision=revision, ignore_patterns=IGNORED,
                              commit_message=f"sae push {run_dir.name}")
            if saelens_dir is not None:
                api.upload_folder(repo_id=repo_id, folder_path=str(saelens_dir), path_in_repo="saelens",
                                  revision=revision, commit_message="SAELens layout (sae export --format saelens)")
        except (HfHubHTTPError, OSError) as error:      # OSError: the Hub cannot be reached
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"the Hub refused the upload to {repo_id}: {first}") from None
    return f"{api.endpoint}/{repo_id}"


def _saelens_export(run_dir: Path, out: Path) -> Path | None:
    """The run in SAELens's layout (sae.export), or None when the variant has no SAELens equivalent."""
    from sae.export import export
    try:
        return export(run_dir, out, "saelens")
    except (UserError, OSError):
        return None
