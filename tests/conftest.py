"""Shared fixtures. The real embedded model is loaded once per test run; tokenizers never download."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (dequantised, cached) as a sae.models.LoadedModel."""
    from sae.lm import load_model
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from sae.lm import load_tokenizer
    return load_tokenizer("smollm2")


# ---- tiny language models for collection/model tests (engineer A) ------------------------------

TINY_FAMILIES = ("llama", "gpt2", "gpt_neox", "bert")


def _char_tokenizer():
    """A character-level fast tokenizer with <s>, </s>, <pad>, <unk>; built locally, never downloaded."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    chars = list(string.ascii_letters + string.digits + " .,;:'\"!?-\n()")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_tiny_lm(family: str, n_layers: int = 4, hidden: int = 32, seed: int = 0, tokenizer=None):
    """A random-weight transformers model of one family (vocab 96, hidden 32) as a sae.models.LoadedModel."""
    import transformers as tf

    from sae.lm import wrap
    torch.manual_seed(seed)
    common = dict(vocab_size=96)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        model = tf.LlamaForCausalLM(config)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_inner=2 * hidden, n_layer=n_layers, n_head=4, n_positions=256,
                                bos_token_id=1, eos_token_id=2, **common)
        model = tf.GPT2LMHeadModel(config)
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                                  num_attention_heads=4, max_position_embeddings=256, **common)
        model = tf.GPTNeoXForCausalLM(config)
    elif family == "bert":
        config = tf.BertConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                               num_attention_heads=4, max_position_embeddings=256, **common)
        model = tf.BertForMaskedLM(config)
    else:
        raise ValueError(family)
    return wrap(model.eval(), tokenizer or _char_tokenizer(), name=f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _char_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    """Factory: tiny_lm(family, n_layers=4, hidden=32, seed=0) -> LoadedModel (families: TINY_FAMILIES)."""
    return build_tiny_lm


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama saved with its tokenizer in a folder, for `--model DIR` in subprocess tests."""
    loaded = build_tiny_lm("llama")
    folder = tmp_path_factory.mktemp("tiny_llama")
    loaded.model.save_pretrained(str(folder))
    loaded.tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory, smollm2):
    """A few thousand real SmolLM2 layer-6 resid_post activations on BBC, collected once per test run."""
    from sae.collect import CollectOptions, collect
    out = tmp_path_factory.mktemp("real") / "store"
    collect(CollectOptions(model="smollm2", dataset="bbc", layers=[6], site="resid_post", out=out, tokens=12_288,
                           context_size=128, batch_size=8, progress=False), loaded=smollm2)
    from sae.store import ActivationStore
    return ActivationStore(out)


def write_labelled_corpus(path, words, n_docs: int, lengths=(4, 16), seed: int = 1):
    """A .jsonl corpus of n_docs documents of random `words` (lengths[0] to lengths[1] - 1 words each),
    labelled red/green/blue in turn; returns its path."""
    import json
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n_docs):
        n = int(torch.randint(lengths[0], lengths[1], (1,), generator=gen))
        text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=gen)) + "."
        lines.append(json.dumps({"text": text, "label": ["red", "green", "blue"][i % 3]}))
    path.write_text("\n".join(lines) + "\n")
    return path
