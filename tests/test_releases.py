"""Published SAEs by release name (sae/interop/releases.py, registry releases.json) and Gemma Scope's
params.npz layout (sae/interop/gemma_scope.py). The Hub is never reached: huggingface_hub.snapshot_download
is replaced by a copy of a local fixture, as in test_interop.py."""
from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import sae
from sae.errors import UserError
from sae.interop import releases
from sae.store import ActivationStore

D_IN, D_SAE = 12, 48
SCOPE_ID = "layer_1/width_48/average_l0_9"


def raw_inputs(n=200, seed=3):
    torch.manual_seed(seed)
    return torch.randn(n, D_IN) * 2.0 + 0.5


def scope_params(seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.3, "b_enc": torch.randn(D_SAE, generator=gen) * 0.2,
            "threshold": torch.rand(D_SAE, generator=gen) * 0.5 + 0.05,
            "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.3, "b_dec": torch.randn(D_IN, generator=gen) * 0.5}


def write_scope(folder: Path, params: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in params.items()})
    return folder


def scope_reference(p: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma Scope's JumpReLU, as published: (codes, x_hat)."""
    pre = x @ p["W_enc"] + p["b_enc"]
    codes = pre * (pre > p["threshold"])
    return codes, codes @ p["W_dec"] + p["b_dec"]


def assert_matches(model, codes, x_hat, x):
    with torch.no_grad():
        assert (codes != 0).float().mean() > 0.05           # the fixture fires: the comparison means something
        torch.testing.assert_close(model.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(codes), x_hat, rtol=1e-5, atol=1e-5)


# ---- the shipped registry -------------------------------------------------------------------------
def test_registry_is_packaged_and_names_gemma_scope():
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "interop/releases.json" in pyproject["tool"]["setuptools"]["package-data"]["sae"]
    info = releases.resolve("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
    assert info == {"release": "gemma-scope-2b-pt-res", "sae_id": "layer_12/width_16k/average_l0_82",
                    "repo": "google/gemma-scope-2b-pt-res", "path": "layer_12/width_16k/average_l0_82/params.npz",
                    "folder": "layer_12/width_16k/average_l0_82", "format": "gemma_scope",
                    "model": "google/gemma-2-2b", "site": "resid_post", "layer": 12, "d_in": 2304, "d_model": 2304}
    canonical = releases.resolve("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
    assert canonical["folder"].startswith("layer_12/width_16k/average_l0_")
    assert releases.resolve("gemma-scope-9b-pt-att", releases.sae_ids("gemma-scope-9b-pt-att")[0])["site"] == "attn_z"


def test_unknown_release_or_sae_id_lists_close_matches_without_downloading(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("nothing may download for a name the registry does not hold")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(UserError, match=r"unknown SAE release 'gemma-scope-2b-pt-rez'; closest: gemma-scope-2b-pt-res"):
        sae.load("gemma-scope-2b-pt-rez", "layer_12/width_16k/average_l0_82")
    with pytest.raises(UserError, match=r"has no SAE 'layer_12/width_16k/average_l0_83'; closest: .*average_l0_82"):
        sae.load("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_83")
    with pytest.raises(UserError, match="name one, e.g. gemma-scope-2b-pt-res:layer_"):
        sae.load("gemma-scope-2b-pt-res")
    store = ActivationStore.from_tensors(tmp_path / "s", torch.randn(400, D_IN), model="m", site="resid_post")
    from sae.cli import main
    for command in (["eval", "--run", "gemma-scope-2b-pt-rez:layer_12/width_16k/average_l0_82"],
                    ["analyze", "--run", "gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_8"]):
        with pytest.raises(SystemExit) as done:
            main([*command, "--activations", str(store.path), "--no-model"])
        err = capsys.readouterr().err
        assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and "closest:" in err, err


# ---- Gemma Scope folders --------------------------------------------------------------------------
def test_gemma_scope_folder_encodes_as_the_published_formula(tmp_path):
    p = scope_params()
    folder = write_scope(tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_48" / "average_l0_9", p)
    model = sae.load(folder)
    assert model.name == "jumprelu" and (model.d_in, model.d_sae) == (D_IN, D_SAE)
    assert (model.run_config["layer"], model.run_config["site"]) == (1, "resid_post")
    x = raw_inputs()
    assert_matches(model, *scope_reference(p, x), x)
    assert sae.interop.detect_format(folder) == "gemma_scope"
    # an object array is a pickle: refused, never unpickled
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "params.npz", **{k: v.numpy() for k, v in p.items() if k != "W_enc"},
             W_enc=np.array([object()] * 3, dtype=object))
    with pytest.raises(UserError):
        sae.load(bad)
    short = write_scope(tmp_path / "short", {k: v for k, v in p.items() if k != "threshold"})
    with pytest.raises(UserError, match="has no threshold"):
        sae.load(short)


def test_gemma_scope_folder_goes_through_analyze_and_the_dashboard_reader(tmp_path):
    from dashboard.runs import runs_from
    from sae.analyze import AnalyzeOptions, analyze
    p = scope_params(1)
    folder = write_scope(tmp_path / "scope", p)
    x = raw_inputs(3000, seed=5)
    store = ActivationStore.from_tensors(tmp_path / "store", x, doc_id=torch.arange(3000) // 30)
    meta = analyze(folder, store, options=AnalyzeOptions(with_model=False, n_top=4), log=None)
    assert meta["n_features"] == D_SAE and meta["variant"] == "jumprelu"
    codes, x_hat = scope_reference(p, x)
    import pandas as pd
    features = pd.read_parquet(folder / "analysis" / "features.parquet").set_index("feature")
    np.testing.assert_allclose(features["max_activation"].to_numpy(), codes.max(dim=0).values.numpy(), rtol=1e-5)
    runs = runs_from([folder])
    assert len(runs) == 1 and runs[0].problem is None, runs[0].problem
    assert runs[0].config["variant"] == "jumprelu" and (runs[0].analysis / "features.parquet").is_file()
    assert_matches(sae.load(folder), codes, x_hat, x)      # the run files added beside it compute the same


# ---- releases by name, every format, the Hub replaced by a local copy ------------------------------
def _saelens_fixture(folder: Path) -> tuple[dict, callable]:
    from safetensors.torch import save_file
    p = scope_params(2)
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"model_name": "tiny-llama", "hook_name": "blocks.1.hook_resid_post"}}
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in p.items()}, str(folder / "sae_weights.safetensors"))

    def reference(x):
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        codes = torch.relu(pre) * (pre > p["threshold"])
        return codes, codes @ p["W_dec"] + p["b_dec"]
    return p, reference


def _sparsify_fixture(folder: Path) -> tuple[dict, callable]:
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(4)
    w = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=gen) * 0.3,
         "encoder.bias": torch.randn(D_SAE, generator=gen) * 0.1,
         "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.3, "b_dec": torch.randn(D_IN, generator=gen) * 0.5}
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                 "num_latents": 0, "k": 6, "multi_topk": False,
                                                 "skip_connection": False, "transcode": False, "d_in": D_IN}))
    save_file(w, str(folder / "sae.safetensors"))

    def reference(x):
        pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
        top = pre.topk(6, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        return codes, codes @ w["W_dec"] + w["b_dec"]
    return w, reference


@pytest.fixture
def tiny_hub(tmp_path, monkeypatch):
    """A registry of three tiny releases (one per format) and a fake Hub holding them."""
    import huggingface_hub
    hub = tmp_path / "hub"
    references = {}
    p = scope_params(0)
    write_scope(hub / "google" / "tiny-scope-res" / SCOPE_ID, p)
    references["tiny-scope-res"] = (SCOPE_ID, lambda x: scope_reference(p, x))
    _, references["tiny-saelens-res"] = "blocks.1.hook_resid_post", _saelens_fixture(
        hub / "someone" / "tiny-saelens" / "blocks.1.hook_resid_post")[1]
    _, references["tiny-sparsify"] = "layers.1", _sparsify_fixture(hub / "someone" / "tiny-sparsify" / "layers.1")[1]
    references["tiny-saelens-res"] = ("blocks.1.hook_resid_post", references["tiny-saelens-res"])
    references["tiny-sparsify"] = ("layers.1", references["tiny-sparsify"])
    common = {"model": "tiny-llama", "site": "resid_post", "d_in": D_IN, "d_model": D_IN, "n_layers": 4}
    registry = {"releases": {
        "tiny-scope-res": {"repo": "google/tiny-scope-res", "format": "gemma_scope", "path": "{path}/params.npz",
                           "sae_ids": [SCOPE_ID, "layer_1/width_48/average_l0_20"], **common},
        "tiny-saelens-res": {"repo": "someone/tiny-saelens", "format": "saelens", "path": "{path}",
                             "sae_ids": ["blocks.1.hook_resid_post"], **common},
        "tiny-sparsify": {"repo": "someone/tiny-sparsify", "format": "sparsify", "path": "{path}",
                          "sae_ids": ["layers.1"], **common}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setattr(releases, "REGISTRY", tmp_path / "registry.json")
    releases.registry.cache_clear()
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, revision=None, **kwargs):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns})
        if not (hub / repo_id).is_dir():
            raise OSError(f"404 Client Error: repository {repo_id} not found\n(more)")
        snapshot = tmp_path / "hf_cache" / repo_id.replace("/", "--")
        for pattern in allow_patterns:
            source = hub / repo_id / pattern.rstrip("/*")
            shutil.copytree(source, snapshot / pattern.rstrip("/*"), dirs_exist_ok=True)
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    import sae.files
    monkeypatch.setattr(sae.files, "cache_dir", lambda: tmp_path / "sae_cache")
    yield references, calls
    releases.registry.cache_clear()


@pytest.mark.parametrize("release", ["tiny-scope-res", "tiny-saelens-res", "tiny-sparsify"])
def test_each_format_by_release_name_equals_its_reference(tiny_hub, release):
    references, calls = tiny_hub
    sae_id, reference = references[release]
    x = raw_inputs()
    model = sae.load(release, sae_id)
    assert calls[-1] == {"repo_id": releases.registry()[release]["repo"], "allow_patterns": [f"{sae_id}/*"]}
    assert_matches(model, *reference(x), x)
    assert (model.run_config["model"], model.run_config["site"], model.run_config["layer"]) == \
        ("tiny-llama", "resid_post", 1)
    assert model.run_config["source"]["release"] == release
    assert_matches(sae.load(f"{release}:{sae_id}"), *reference(x), x)      # the command line's spelling


def test_offline_error_names_the_repo_in_one_line(tiny_hub, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as error:
        sae.load("tiny-scope-res", SCOPE_ID)
    message = str(error.value)
    assert "google/tiny-scope-res" in message and SCOPE_ID in message and "\n" not in message


def test_registry_width_that_disagrees_is_refused(tiny_hub, monkeypatch):
    entry = releases.registry()["tiny-scope-res"]
    monkeypatch.setitem(entry, "d_in", 2304)
    with pytest.raises(UserError, match="has d_in=12, the registry says 2304"):
        sae.load("tiny-scope-res", SCOPE_ID)


def test_release_on_the_command_line_analyze_eval_dashboard(tiny_hub, tmp_path, capsys):
    from dashboard.runs import runs_from
    from sae.cli import main
    from sae.runs import resolve_run
    x = raw_inputs(3000, seed=7)
    store = ActivationStore.from_tensors(tmp_path / "store", x, doc_id=torch.arange(3000) // 30,
                                         model="/models/tiny-llama", site="resid_post", layer=1)
    spec = f"tiny-scope-res:{SCOPE_ID}"

    def sae_main(*args):
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in args])
        return done.value.code, capsys.readouterr()
    status, out = sae_main("analyze", "--run", spec, "--activations", store.path, "--no-model")
    assert status == 0, out.err
    folder = Path(resolve_run(spec))
    assert folder == tmp_path / "sae_cache" / "releases" / "tiny-scope-res" / SCOPE_ID
    assert (folder / "analysis" / "features.parquet").is_file()
    status, out = sae_main("eval", "--run", spec, "--activations", store.path, "--no-model", "--json")
    assert status == 0, out.err
    references_eval = tiny_hub[0]["tiny-scope-res"][1](x)
    assert json.loads((folder / "eval.json").read_text())["fvu"] == pytest.approx(json.loads(out.out)["fvu"])
    runs = runs_from([folder])
    assert runs[0].problem is None and runs[0].config["source"]["release"] == "tiny-scope-res"
    assert_matches(sae.load(folder), *references_eval, x)
    # a store of another model, or of another width: one line each
    other = ActivationStore.from_tensors(tmp_path / "other", x, model="gpt2", site="resid_post", layer=1)
    narrow = ActivationStore.from_tensors(tmp_path / "narrow", x[:, :10], model="tiny-llama", site="resid_post",
                                          layer=1)
    for bad, message in ((other, "was trained on tiny-llama, but the store holds activations of gpt2"),
                         (narrow, "reads d_in=12 (tiny-llama, resid_post) but the store's rows have d_model=10")):
        for command in ("eval", "analyze"):
            extra = ["--force"] if command == "analyze" else []
            status, out = sae_main(command, "--run", spec, "--activations", bad.path, "--no-model", *extra)
            assert status == 2 and message in out.err and len(out.err.strip().splitlines()) == 1, out.err
