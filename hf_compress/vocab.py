"""Dynamic vocabulary for compressed token embeddings: add, prune or keep tokens, tokenizer and head included.

* :func:`add_tokens` adds strings to the tokenizer and compresses their vectors ``[m, d]`` into the embedding on
  arrival (new ids ``V .. V+m-1``; ids the tokenizer already reserves below ``V`` are overwritten in place).
* :func:`keep_tokens` / :func:`prune_tokens` drop rows and return ``old_to_new [V_old]`` (int64, ``-1`` = dropped).
  The remaining tokens are renumbered ``0 .. V_new-1`` in the order kept.

Both update, in the same call: the compressed embedding, a head tied to it (``TiedEmbeddingHead``: its bias; a dense
untied head: its rows), ``config.vocab_size``, the special/generation token ids of ``config`` and
``generation_config``, and ``config.compression_config["layers"]``, so ``save_pretrained`` → ``from_pretrained``
reproduces the model exactly.

Tokenizers: pruning rewrites a fast (``tokenizers``) tokenizer whose model is BPE, WordPiece or WordLevel: the vocab
is renumbered, BPE merges that produce or use a dropped token are removed (text that used it is then split into the
kept pieces), added tokens and post-processor ids are renumbered. :func:`keep_tokens` also keeps, by default, the
BPE merge parts of every kept token, so kept tokens stay reachable; :func:`prune_tokens` drops exactly what it is
given. Special tokens and, for byte-level BPE, the 256
byte-alphabet tokens cannot be pruned (text would become untokenizable), nor Whisper's timestamp tokens (a timestamp
is its id minus the first one's). Other tokenizers (Unigram, slow tokenizers) are refused with ``tokenizer=None`` as
the way out: the model is pruned and the returned remapping must then be applied to ids by the caller.

Generation settings follow the renumbering: ids that must stay (``forced_bos_token_id``, ``forced_decoder_ids``,
``force_words_ids``… and the special ids) refuse the prune; entries holding a pruned id are dropped from
``suppress_tokens``, ``bad_words_ids``, ``sequence_bias`` and Whisper's ``lang_to_id`` / ``task_to_id``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layers.tt_embedding import CompressedEmbedding, TiedEmbeddingHead
from .vocab_fields import _ID_FIELDS, _ID_LIST_FIELDS, _ID_MAP_FIELDS, _TIMESTAMPS, _ids_in, _remap_field


def _embedding(model: nn.Module) -> CompressedEmbedding:
    emb = model.get_input_embeddings()
    if not isinstance(emb, CompressedEmbedding):
        raise TypeError(f"hf_compress.vocab: the input embedding is a {type(emb).__name__}, not a compressed one; "
                        "compress it first (TTEmbeddingConfig) or use model.resize_token_embeddings for dense tables.")
    return emb


def _dense_head(model: nn.Module, emb: CompressedEmbedding) -> nn.Module | None:
    """The output head if it is an untied dense ``[V, d]`` layer sized like the embedding, else ``None``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and head.weight.shape[0] == emb.num_embeddings:
        return head
    return None


def _refresh(model: nn.Module, vocab_size: int) -> None:
    """Write the new vocabulary size and the compressed-layer specs into ``model.config``."""
    from .compress import compressed_layer_specs, forget_checkpoint

    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "decoder", None)):
        if c is not None and hasattr(c, "vocab_size"):
            c.vocab_size = vocab_size
    if getattr(cfg, "compression_config", None) is not None:
        cfg.compression_config = {**cfg.compression_config, "layers": compressed_layer_specs(model)}
    forget_checkpoint(model)  # renumbered tokens: the checkpoint it came from no longer matches it


def add_tokens(model: nn.Module, tokenizer: Any, new_tokens: Sequence[Any],
               vectors: torch.Tensor | None = None, special_tokens: bool = False) -> list[int]:
    """Add ``new_tokens`` to ``tokenizer`` (may be ``None``) and their ``vectors [m, d]`` to the compressed table.

    Without ``vectors`` new rows start at the mean embedding. A dense untied head gets the same vectors as rows (the
    tied initialization); a ``TiedEmbeddingHead`` reads them from the table (its bias gets zeros). Tokens the
    tokenizer already has are skipped, as ``tokenizer.add_tokens`` skips them (their rows are kept). Returns the
    ids of all ``new_tokens``. Everything is checked before the tokenizer or the table changes.
    """
    emb = _embedding(model)
    v_old, m = emb.num_embeddings, len(new_tokens)
    names = [str(t) for t in new_tokens]
    if len(set(names)) != m:
        dups = sorted({t for t in names if names.count(t) > 1})
        raise ValueError(f"hf_compress.vocab.add_tokens: new_tokens has duplicates {dups}; give each token once.")
    if vectors is None:
        vectors = emb.weight.detach().mean(0, keepdim=True).expand(m, -1)
    if vectors.ndim != 2 or vectors.shape != (m, emb.embedding_dim):
        raise ValueError(f"hf_compress.vocab.add_tokens: vectors must be [{m}, {emb.embedding_dim}] (one row per new "
                         f"token), got {list(vectors.shape)}.")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError("hf_compress.vocab.add_tokens: vectors hold NaN or inf; give finite rows.")
    known = tokenizer.get_vocab() if tokenizer is not None else {}
    fresh = [i for i, t in enumerate(names) if t not in known]
    first_new = len(tokenizer) if tokenizer is not None else v_old  # ids the tokenizer will give the fresh tokens
    if first_new > v_old:
        raise ValueError(f"hf_compress.vocab.add_tokens: the tokenizer has {first_new} tokens but the table "
                         f"{v_old} rows; new ids past the table must follow on from it. Prune the tokenizer's extra "
                         "tokens (or resize the dense model) first; nothing was changed.")
    grows = first_new + len(fresh) > v_old
    overwrites = bool(fresh) and first_new < v_old  # a table padded past the tokenizer: new ids land inside it
    for needed, method, what in ((grows, "add_rows", "adding"), (overwrites, "set_rows", "overwriting")):
        if needed and getattr(type(emb), method) is getattr(CompressedEmbedding, method):
            raise NotImplementedError(f"hf_compress.vocab.add_tokens: {type(emb).__name__} does not support {what} "
                                      "tokens; nothing was changed.")
    before = _tokenizer_doc(tokenizer)
    try:
        _grow(model, emb, tokenizer, new_tokens, names, fresh, vectors[fresh], special_tokens)
    except Exception:
        if before is not None:  # the tokenizer as it was: nothing was added
            _load_tokenizer_json(tokenizer, json.dumps(before))
        raise
    _refresh(model, emb.num_embeddings)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(names)] if tokenizer is not None else \
        list(range(v_old, v_old + m))


def _grow(model: nn.Module, emb: CompressedEmbedding, tokenizer: Any, new_tokens: Sequence[Any], names: list[str],
          fresh: list[int], vectors: torch.Tensor, special_tokens: bool) -> None:
    """:func:`add_tokens` once checked: the tokenizer's new ids, then the table's and head's rows."""
    v_old = emb.num_embeddings
    if tokenizer is not None:
        first_new = len(tokenizer)
        tokenizer.add_tokens([new_tokens[i] for i in fresh], special_tokens=special_tokens)
        ids = [int(tokenizer.convert_tokens_to_ids(names[i])) for i in fresh]
        if ids != list(range(first_new, first_new + len(fresh))):
            raise ValueError(f"hf_compress.vocab.add_tokens: the tokenizer gave ids {ids}, not the next free ones; "
                             "nothing was changed.")
    else:
        ids = list(range(v_old, v_old + len(fresh)))
    inside = [i for i, t in enumerate(ids) if t < v_old]
    outside = [i for i, t in enumerate(ids) if t >= v_old]
    vectors = vectors.detach().to(emb.weight.dtype)
    head = _dense_head(model, emb)
    if inside:
        emb.set_rows(torch.tensor([ids[i] for i in inside]), vectors[inside])
    if outside:
        emb.add_rows(vectors[outside])
    tied = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(tied, TiedEmbeddingHead) and outside:
        tied.add_rows(len(outside))
    partners = _bias_partners(model, tied if isinstance(tied, TiedEmbeddingHead) else head, v_old)
    for bias in partners:
        bias.data = torch.cat([bias.data, bias.data.new_zeros(len(outside))])
    if inside:  # an overwritten row starts unbiased, as a new one
        for bias in [*partners, *(getattr(h, "bias", None) for h in (tied, head) if h is not None)]:
            if bias is not None:
                bias.data[[ids[i] for i in inside]] = 0
    if head is not None:
        with torch.no_grad():
            if inside:
                head.weight[[ids[i] for i in inside]] = vectors[inside].to(head.weight.dtype)
            if outside:  # (.data: the parameters stay the same objects, with their flags and ties)
                new_rows = vectors[outside].to(head.weight.device, head.weight.dtype)
                head.weight.data = torch.cat([head.weight.data, new_rows])
                if head.bias is not None:
                    head.bias.data = torch.cat([head.bias.data, head.bias.data.new_zeros(len(outside))])
                head.out_features = head.weight.shape[0]


def prune_tokens(model: nn.Module, tokenizer: Any, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Drop exactly the tokens ``ids``; returns ``old_to_new [V_old]`` (``-1`` for dropped). See :func:`keep_tokens`
    (BPE: a kept token built through a dropped one can then no longer be produced; nothing else is dropped)."""
    emb = _embedding(model)
    drop = torch.zeros(emb.num_embeddings, dtype=torch.bool)
    drop[_token_ids(ids, emb.num_embeddings, "prune_tokens")] = True
    return keep_tokens(model, tokenizer, (~drop).nonzero().squeeze(1), merge_parts=False)


def _token_ids(ids: Sequence[int] | torch.Tensor, v: int, who: str) -> torch.Tensor:
    """``ids`` as a 1-D int64 tensor, checked: integers in ``[0, v)``."""
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids))
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"hf_compress.vocab.{who}: ids must be a flat list of integer token ids, got "
                         f"{t.dtype} of shape {list(t.shape)}.")
    if int(t.min()) < 0 or int(t.max()) >= v:
        raise ValueError(f"hf_compress.vocab.{who}: ids must lie in [0, {v}) (the table's rows), got "
                         f"{sorted({int(i) for i in t if not 0 <= int(i) < v})[:5]}.")
    return t.long()


def keep_tokens(model: nn.Module, tokenizer: Any, ids: Sequence[int] | torch.Tensor,
                merge_parts: bool = True) -> torch.Tensor:
    """Keep only the tokens ``ids`` (renumbered ``0..len(ids)-1`` in ascending order); returns ``old_to_new``.

    The tokenizer (a fast BPE/WordPiece/WordLevel one, or ``None``) is rewritten in place to the new numbering.
    ``merge_parts`` (BPE tokenizers): also keep every token merged on the way to a kept one (down to single
    characters), the special tokens and, for byte-level BPE, the byte alphabet; without the merge parts the merges
    that build a kept token are gone, so the tokenizer can never produce it, and text falls apart into whatever
    pieces remain (``<unk>`` where a character went). ``old_to_new`` shows what was kept.
    Raises ``ValueError`` before changing anything if a config/generation special id would go, or (the special
    tokens not being added: ``merge_parts=False`` or a non-BPE tokenizer) a special token would.
    """
    emb = _embedding(model)
    v_old = emb.num_embeddings
    keep = _token_ids(ids, v_old, "keep_tokens").unique()
    if keep.numel() == 0:
        raise ValueError(f"hf_compress.vocab.keep_tokens: ids must be a non-empty subset of [0, {v_old}).")
    doc = _tokenizer_doc(tokenizer)  # parsed once: read by the merge parts, rewritten by the remapping
    if merge_parts and doc is not None:
        keep = _with_merge_parts(doc, keep, v_old)
    old_to_new = torch.full((v_old,), -1, dtype=torch.long)
    old_to_new[keep] = torch.arange(keep.numel())
    configs = [c for c in (getattr(model, "config", None), getattr(model, "generation_config", None)) if c is not None]
    for cfg in configs:
        for f in _ID_FIELDS:
            for i in _ids_in(f, getattr(cfg, f, None)):
                if 0 <= i < v_old and old_to_new[i] < 0:
                    raise ValueError(f"hf_compress.vocab: cannot prune token {i}: it is in {type(cfg).__name__}.{f}. "
                                     "Keep it, or change that field first.")
    stamps = [getattr(c, "no_timestamps_token_id", None) for c in configs]
    stamps += [t["id"] for t in (doc or {}).get("added_tokens", []) if t.get("content") == "<|notimestamps|>"]
    for stamp in (s for s in stamps if isinstance(s, int) and 0 <= s < v_old):
        # Whisper's 1501 timestamps <|0.00|> .. <|30.00|> follow <|notimestamps|>; tokens added after them may go
        if bool((old_to_new[stamp + 1:stamp + 1 + _TIMESTAMPS] < 0).any()):
            raise ValueError(f"hf_compress.vocab: cannot prune Whisper's timestamp tokens (ids {stamp + 1} .. "
                             f"{stamp + _TIMESTAMPS}): a timestamp is read as its id minus the first timestamp id, so "
                             "every later one would shift. Keep them.")
    mapping = old_to_new.tolist()  # the config fields' new values, computed before anything changes
    fields = [(cfg, f, _remap_field(f, getattr(cfg, f), mapping)) for cfg in configs
              for f in _ID_FIELDS + _ID_LIST_FIELDS + _ID_MAP_FIELDS if getattr(cfg, f, None) is not None]
    new_json = _remap_tokenizer_json(tokenizer, doc, old_to_new) if tokenizer is not None else None
    emb.keep_rows(keep)
    if emb.padding_idx is not None:  # the padding row moves with the renumbering (gone: no padding row)
        pad = int(old_to_new[emb.padding_idx % v_old])
        emb.padding_idx = pad if pad >= 0 else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for bias in _bias_partners(model, head, v_old):
        bias.data = bias.data[keep.to(bias.device)].contiguous()
    if isinstance(head, TiedEmbeddingHead):
        head.keep_rows(keep)
    elif isinstance(head, nn.Linear) and head.weight.shape[0] == v_old:
        rows = keep.to(head.weight.device)
        head.weight.data = head.weight.data[rows].contiguous()  # same parameter objects (flags, ties)
        if head.bias is not None:
            head.bias.data = head.bias.data[rows].contiguous()
        head.out_features = keep.numel()
    for cfg, f, value in fields:
        setattr(cfg, f, value)
    _refresh(model, emb.num_embeddings)
    if new_json is not None:
        _load_tokenizer_json(tokenizer, new_json)
    return old_to_new


def _bias_partners(model: nn.Module, head: nn.Module | None, v_old: int) -> list[nn.Parameter]:
    """Parameters ``[v_old]`` the model class ties to ``head``'s bias but that are other objects now (BERT's
    ``cls.predictions.bias``, kept apart once the model is untied): resized with the head so a reload fits."""
    bias = getattr(head, "bias", None)
    name = next((n for n, m in model.named_modules() if m is head), None) if bias is not None else None
    found: list[nn.Parameter] = []
    for key, source in (getattr(type(model), "_tied_weights_keys", None) or {}).items():
        for a, b in ((key, source), (source, key)):
            if name is not None and a == f"{name}.bias":
                try:
                    p = model.get_parameter(b)
                except AttributeError:
                    continue
                if p is not bias and tuple(p.shape) == (v_old,) and all(p is not q for q in found):
                    found.append(p)
    return found


def _tokenizer_doc(tokenizer: Any) -> dict[str, Any] | None:
    """The parsed ``tokenizer.json`` of a fast tokenizer, ``None`` for ``None`` or a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _merge_pair(merge: Any) -> tuple[str, str]:
    """A BPE merge as ``(a, b)``: ``tokenizer.json`` stores ``"a b"`` or ``["a", "b"]``."""
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    return a, b


def _byte_level(doc: dict[str, Any]) -> bool:
    """Whether the tokenizer pre-tokenizes to bytes (its single-character tokens are the byte alphabet)."""
    return "ByteLevel" in json.dumps(doc.get("pre_tokenizer"))


def _with_merge_parts(doc: dict[str, Any], keep: torch.Tensor, v_old: int) -> torch.Tensor:
    """``keep`` plus, for a BPE ``tokenizer.json`` ``doc``, every token merged on the way to a kept token, the
    special tokens and a byte-level alphabet (sorted, unique)."""
    bpe = doc["model"]
    if bpe.get("type") != "BPE":
        return keep
    parts: dict[str, list[str]] = {}
    for mg in bpe.get("merges", []):
        a, b = _merge_pair(mg)
        parts.setdefault(_merged(a, b, bpe), []).extend([a, b])
    vocab = bpe["vocab"]
    token_of = {i: t for t, i in vocab.items()}
    todo = [token_of[i] for i in keep.tolist() if i in token_of]
    seen: set[str] = set()
    while todo:
        token = todo.pop()
        if token not in seen:
            seen.add(token)
            todo.extend(parts.get(token, []))
    if _byte_level(doc):  # the byte alphabet: any text must stay tokenizable
        seen |= {t for t in vocab if len(t) == 1}
    extra = [vocab[t] for t in seen if t in vocab]
    extra += [t["id"] for t in doc.get("added_tokens", []) if t.get("special")]
    extra = [i for i in extra if 0 <= i < v_old]
    return torch.cat([keep, torch.tensor(extra, dtype=torch.long)]).unique()


def _merged(a: str, b: str, bpe: dict[str, Any]) -> str:
    """The token a BPE merge ``(a, b)`` produces (``b`` loses a ``continuing_subword_prefix`` such as ``##``)."""
    prefix = bpe.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def _remap_tokenizer_json(tokenizer: Any, doc: dict[str, Any] | None, old_to_new: torch.Tensor) -> str:
    """The renumbered ``tokenizer.json`` text (``doc``, the tokenizer's parsed one, is rewritten); raises before
    anything is changed if it cannot be remapped."""
    if doc is None:
        raise ValueError(f"hf_compress.vocab: {type(tokenizer).__name__} is not a fast tokenizer; pass tokenizer=None "
                         "and apply the returned old_to_new remapping to token ids yourself.")
    model = doc["model"]
    if model.get("type") not in ("BPE", "WordPiece", "WordLevel"):
        raise ValueError(f"hf_compress.vocab: cannot prune a {model.get('type')} tokenizer; pass tokenizer=None and "
                         "apply the returned old_to_new remapping to token ids yourself.")
    mapping = old_to_new.tolist()

    def new_id(i: int) -> int:
        return mapping[i] if 0 <= i < len(mapping) else -1

    specials = {t["content"] for t in doc.get("added_tokens", []) if t.get("special")}
    specials |= {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    byte_level = _byte_level(doc)
    for token, i in model["vocab"].items():
        if new_id(i) < 0 and (token in specials or (byte_level and len(token) == 1)):
            raise ValueError(f"hf_compress.vocab: cannot prune token {i} ({token!r}): it is a special token or part "
                             "of the byte-level alphabet, without which text cannot be tokenized.")
    for t in doc.get("added_tokens", []):
        if t.get("special") and new_id(t["id"]) < 0:
            raise ValueError(f"hf_compress.vocab: cannot prune special token {t['id']} ({t['content']!r}).")
    model["vocab"] = {tok: new_id(i) for tok, i in model["vocab"].items() if new_id(i) >= 0}
    if "merges" in model:
        kept = model["vocab"]
        merges = []
        for mg in model["merges"]:
            a, b = _merge_pair(mg)
            if a in kept and b in kept and _merged(a, b, model) in kept:
                merges.append(mg)
        model["merges"] = merges
    doc["added_tokens"] = [{**t, "id": new_id(t["id"])} for t in doc.get("added_tokens", []) if new_id(t["id"]) >= 0]
    doc["post_processor"] = _remap_ids(doc.get("post_processor"), new_id)
    return json.dumps(doc)


def _remap_ids(node: Any, new_id: Any) -> Any:
    """Renumber ids in a post-processor JSON (TemplateProcessing ``ids``, Bert/Roberta ``[token, id]`` pairs)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                out[key] = [new_id(i) for i in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                out[key] = [value[0], new_id(value[1])]
            else:
                out[key] = _remap_ids(value, new_id)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, new_id) for v in node]
    return node


def _load_tokenizer_json(tokenizer: Any, text: str) -> None:
    """Swap ``tokenizer``'s backend for the rewritten one (``added_tokens_decoder`` and saving follow it)."""
    from tokenizers import Tokenizer

    tokenizer._tokenizer = Tokenizer.from_str(text)
