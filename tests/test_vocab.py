"""Dynamic vocabulary (``hf_compress.vocab``): tokenizer rewriting, BPE merge parts, the padding row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHS, Arch

import hf_compress
from hf_compress import CompressionConfig
from hf_compress.methods.tt_embedding import TTEmbeddingConfig
from hf_compress.vocab import add_tokens, keep_tokens, prune_tokens

LLAMA = next(a for a in ARCHS if a.name == "llama")


def _compress_svd(arch: Arch, pad: int | None = None) -> torch.nn.Module:
    cfg = arch.make_config()
    if pad is not None:
        cfg.pad_token_id = pad
    torch.manual_seed(0)
    model = arch.model_class(cfg).eval()
    plan = CompressionConfig(modules={"embed_tokens": TTEmbeddingConfig(format="svd", compression=1.5)})
    return hf_compress.compress(model, plan, progress=False)


def _bpe(vocab_size: int = 60, prefix: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A small fast BPE tokenizer trained on three sentences (``prefix``: merges continue words with it, e.g.
    ``##``, so merge ``##a ##t`` makes ``##at``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    with_prefix = {} if prefix is None else {"continuing_subword_prefix": prefix}
    raw = Tokenizer(models.BPE(unk_token="<unk>", **with_prefix))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the cat sat on the mat", "the dog ate the hat", "a cat and a dog"] * 20
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "</s>"],
                                                      **with_prefix))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")


def test_tokenizer_pruned_and_extended_consistently(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = _bpe()
    arch = LLAMA
    model = _compress_svd(arch)
    keep = torch.arange(len(tok))
    model_v = model.get_input_embeddings().num_embeddings
    drop = tok.convert_tokens_to_ids(["cat"])[0]
    before = tok("the dog sat")["input_ids"]
    model.config.bos_token_id = model.config.eos_token_id = 2
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = 2
    old_to_new = keep_tokens(model, tok, torch.cat([keep[keep != drop], torch.arange(len(tok), model_v)]))
    assert tok("the dog sat")["input_ids"] == old_to_new[before].tolist()
    assert tok.decode(tok("a cat")["input_ids"]).replace(" ", "") == "acat"  # re-split into kept pieces
    assert drop not in tok("a cat")["input_ids"] or old_to_new[drop] == -1
    ids = add_tokens(model, tok, ["<new>"])
    assert ids == [len(tok) - 1] and tok.convert_ids_to_tokens(ids) == ["<new>"]
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("the dog sat <new>")["input_ids"][-1] == ids[0]
    with pytest.raises(ValueError, match="special token"):
        prune_tokens(model, tok, [tok.convert_tokens_to_ids("<unk>")])


def test_keep_tokens_keeps_the_merge_parts_a_kept_bpe_token_needs() -> None:
    sentence = "the cat sat on the mat"
    for merge_parts in (True, False):
        tok = _bpe()
        before = tok(sentence)["input_ids"]
        model = _compress_svd(LLAMA)
        model.config.bos_token_id = model.config.eos_token_id = model.generation_config.eos_token_id = 2
        model.generation_config.bos_token_id = 2
        old_to_new = keep_tokens(model, tok, sorted({*before, 0, 1, 2}), merge_parts=merge_parts)
        after = tok(sentence)["input_ids"]
        if merge_parts:  # the sentence tokenizes as before, renumbered; the parts were kept too
            assert after == old_to_new[before].tolist()
            assert model.get_input_embeddings().num_embeddings > len({*before, 0, 1, 2})
        else:  # exactly the ids asked for: the merges that build them are gone, the sentence falls apart
            assert model.get_input_embeddings().num_embeddings == len({*before, 0, 1, 2})
            assert after != old_to_new[before].tolist() and tok.unk_token_id in after


def test_keep_and_prune_move_the_padding_row_with_the_renumbering() -> None:
    model = _compress_svd(LLAMA, pad=90)
    model.config.bos_token_id = model.config.eos_token_id = 1
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = 1
    old_to_new = prune_tokens(model, None, [3, 4, 5])
    emb = model.get_input_embeddings()
    assert emb.padding_idx == int(old_to_new[90]) == 87 == model.config.pad_token_id
    for p in emb.parameters():
        p.requires_grad_(True)
    emb(torch.tensor([87])).sum().backward()  # the padding row gives no gradient, wherever it went
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in emb.parameters())
    model.config.pad_token_id = model.generation_config.pad_token_id = None
    keep_tokens(model, None, [0, 1, 2])  # the padding token dropped: no padding row left
    assert model.get_input_embeddings().padding_idx is None


def test_merge_parts_follow_a_continuing_subword_prefix() -> None:
    tok = _bpe(vocab_size=70, prefix="##")
    assert json.loads(tok.backend_tokenizer.to_str())["model"]["continuing_subword_prefix"] == "##"
    sentence = "the cat sat on the mat"
    before = tok(sentence)["input_ids"]
    model = _compress_svd(LLAMA)
    model.config.bos_token_id = model.config.eos_token_id = model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 2
    old_to_new = keep_tokens(model, tok, sorted(set(before)))
    assert tok(sentence)["input_ids"] == old_to_new[before].tolist()
