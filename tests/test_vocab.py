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


@pytest.mark.parametrize("head", ["compressed", "dense"])
def test_bert_masked_lm_add_and_prune_then_reload(head: str, tmp_path: Path) -> None:
    """BERT's MLM head has a second bias (``cls.predictions.bias``, tied to the decoder's in the class): it is
    resized with the head, so the checkpoint reloads (it failed with a size mismatch) and reproduces the logits."""
    bert = next(a for a in ARCHS if a.name == "bert")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(bert.make_config()).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    plan = CompressionConfig(modules={"word_embeddings": TTEmbeddingConfig(format="svd", compression=1.5,
                                                                           tied_head=head)})
    hf_compress.compress(model, plan, progress=False)
    v = model.config.vocab_size
    add_tokens(model, None, ["<a>", "<b>"], torch.randn(2, model.config.hidden_size))
    prune_tokens(model, None, [5, 6, 7])
    assert model.config.vocab_size == v - 1 and model.cls.predictions.bias.shape == (v - 1,)
    ids = torch.randint(0, v - 1, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert want.shape[-1] == v - 1
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)
    assert again.name_or_path == str(tmp_path)
    prune_tokens(again, None, [8])  # renumbered: the folder no longer holds this model (PEFT's adapter base)
    assert again.name_or_path == ""


def _whisper_with_prompt_ids() -> torch.nn.Module:
    """A tiny Whisper whose generation config names languages, tasks, timestamps and forced ids (ids 100..106)."""
    cfg = next(a for a in ARCHS if a.name == "whisper").make_config()
    cfg.vocab_size, cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 120, 100, 99, 99
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    gc = model.generation_config
    gc.lang_to_id, gc.task_to_id = {"<|en|>": 101, "<|de|>": 102}, {"translate": 104, "transcribe": 105}
    gc.no_timestamps_token_id, gc.prev_sot_token_id, gc.is_multilingual = 106, 103, True
    gc.forced_decoder_ids, gc.suppress_tokens = [[1, 101], [2, 105]], [3, 6, 50]
    plan = CompressionConfig(modules={r"decoder\.embed_tokens": TTEmbeddingConfig(format="svd", compression=1.5)})
    return hf_compress.compress(model, plan, progress=False)


def test_pruning_renumbers_whisper_prompt_ids_and_keeps_timestamps() -> None:
    model = _whisper_with_prompt_ids()
    old_to_new = prune_tokens(model, None, [5, 6, 7, 102])  # three plain tokens and a language nobody needs
    gc, new = model.generation_config, old_to_new.tolist()
    assert gc.lang_to_id == {"<|en|>": new[101]} and gc.task_to_id == {"translate": new[104], "transcribe": new[105]}
    assert (gc.no_timestamps_token_id, gc.prev_sot_token_id) == (new[106], new[103])
    assert gc.forced_decoder_ids == [[1, new[101]], [2, new[105]]] and gc.suppress_tokens == [new[3], new[50]]
    prompt: list[torch.Tensor] = []
    hook = model.get_decoder().embed_tokens.register_forward_hook(lambda m, args, out: prompt.append(args[0]))
    model.generate(torch.randn(1, model.config.num_mel_bins, 32), language="en", task="transcribe", max_new_tokens=1)
    hook.remove()
    assert prompt[0][0].tolist() == [new[100], new[101], new[105], new[106]]
    with pytest.raises(ValueError, match=r"cannot prune Whisper's timestamp tokens \(ids 103 \.\. 1603\)"):
        prune_tokens(model, None, [110])
    with pytest.raises(ValueError, match=rf"cannot prune token {new[105]}: it is in .*forced_decoder_ids"):
        prune_tokens(model, None, [new[105]])
    gc.forced_decoder_ids = [[1, None], [2, new[105]]]  # multilingual checkpoints leave the language open
    again = prune_tokens(model, None, [4]).tolist()
    assert gc.forced_decoder_ids == [[1, None], [2, again[new[105]]]]


def test_pruning_renumbers_forced_and_banned_generation_ids() -> None:
    model = _compress_svd(LLAMA)
    gc = model.generation_config
    gc.forced_bos_token_id, gc.bad_words_ids, gc.sequence_bias = 80, [[70], [6, 71]], {(60,): -5.0, (6,): 1.0}
    new = prune_tokens(model, None, [5, 6, 7]).tolist()
    assert gc.forced_bos_token_id == new[80] == 77
    assert gc.bad_words_ids == [[new[70]]] and gc.sequence_bias == {(new[60],): -5.0}
    out = model.generate(torch.tensor([[1]]), max_new_tokens=1, do_sample=False, pad_token_id=0)  # forced at step 1
    assert out[0, -1].item() == 77
    with pytest.raises(ValueError, match=r"cannot prune token 77: it is in GenerationConfig\.forced_bos_token_id"):
        prune_tokens(model, None, [77])


@pytest.mark.parametrize(("ids", "message"), [([-1], r"ids must lie in \[0, 96\).*\[-1\]"),
                                              ([96], r"ids must lie in \[0, 96\).*\[96\]"),
                                              ([1.5], "flat list of integer token ids"),
                                              ([[1, 2]], "flat list of integer token ids")])
def test_bad_prune_ids_are_refused_before_anything_changes(ids: list, message: str) -> None:
    model = _compress_svd(LLAMA)
    with pytest.raises(ValueError, match=message):
        prune_tokens(model, None, ids)
    assert model.get_input_embeddings().num_embeddings == 96
    assert prune_tokens(model, None, []).tolist() == list(range(96))  # pruning nothing changes nothing


def test_a_failed_add_leaves_the_tokenizer_and_the_flags_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    tok, model = _bpe(), _compress_svd(LLAMA)
    model.requires_grad_(False)
    n = len(tok)
    with pytest.raises(ValueError, match="vectors hold NaN"):
        add_tokens(model, tok, ["<nan>"], torch.full((1, model.config.hidden_size), float("nan")))
    emb = model.get_input_embeddings()

    def broken(*args: object) -> None:
        raise RuntimeError("compression failed")

    monkeypatch.setattr(emb, "set_rows", broken)
    with pytest.raises(RuntimeError, match="compression failed"):
        add_tokens(model, tok, ["<zz>"])
    assert len(tok) == n and "<zz>" not in tok.get_vocab() and tok("the cat")["input_ids"] == _bpe()("the cat")[
        "input_ids"]
    monkeypatch.undo()
    add_tokens(model, tok, ["<zz>"])
    prune_tokens(model, tok, [5])
    assert not [n for n, p in model.named_parameters() if p.requires_grad]  # frozen stays frozen
