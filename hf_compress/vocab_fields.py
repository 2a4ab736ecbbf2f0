"""Token ids in a model's config and generation config, renumbered when :mod:`hf_compress.vocab` prunes tokens."""

from __future__ import annotations

from typing import Any

# config / generation_config fields holding token ids: ids that must stay (refused if pruned), ids that may go (the
# entry goes with them), and Whisper's {name: id} maps (the entry of a pruned language/task goes)
_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
              "cls_token_id", "unk_token_id", "mask_token_id", "no_timestamps_token_id", "forced_bos_token_id",
              "forced_eos_token_id", "prev_sot_token_id", "forced_decoder_ids", "force_words_ids")
_ID_LIST_FIELDS = ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "sequence_bias")
_ID_MAP_FIELDS = ("lang_to_id", "task_to_id")
_TIMESTAMPS = 1501  # Whisper's <|0.00|> .. <|30.00|>, right after <|notimestamps|>


def _ids_in(field: str, value: Any) -> list[int]:
    """The token ids in a config field (an id, a list, nested lists; ``forced_decoder_ids``: ``[position, id]``
    pairs)."""
    if field == "forced_decoder_ids" and isinstance(value, (list, tuple)):
        return [p[1] for p in value if isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], int)]
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    return [i for v in value for i in _ids_in("", v)] if isinstance(value, (list, tuple)) else []


def _remap_field(field: str, value: Any, mapping: list[int]) -> Any:
    """``value`` of config ``field`` renumbered by ``mapping`` (old id -> new, -1 dropped; ids outside the table
    are left alone). List fields drop the entries holding a dropped id (a suppressed token, a bad-words sequence, a
    sequence bias); map fields (Whisper's ``lang_to_id``) drop the pruned names. The fields whose ids must stay
    were checked before."""
    def new(i: int) -> int:
        return mapping[i] if 0 <= i < len(mapping) else i

    def ok(v: Any) -> bool:
        return all(new(i) >= 0 for i in _ids_in("", v))

    def deep(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return type(v)(deep(x) for x in v)
        return new(v) if isinstance(v, int) and not isinstance(v, bool) else v

    if field in _ID_MAP_FIELDS and isinstance(value, dict):
        return {k: new(i) for k, i in value.items() if not isinstance(i, int) or new(i) >= 0}
    if field == "sequence_bias" and isinstance(value, dict):
        return {deep(k): b for k, b in value.items() if ok(k)}
    if field == "sequence_bias" and isinstance(value, list):  # [[ids, bias], ...]
        return [[deep(p[0]), *p[1:]] for p in value if ok(p[0])]
    if field == "forced_decoder_ids" and isinstance(value, list):  # [position, id or None] pairs
        return [type(p)([p[0], new(p[1]) if isinstance(p[1], int) else p[1]]) for p in value]
    if field in _ID_LIST_FIELDS and isinstance(value, list):
        return [deep(v) for v in value if ok(v)]
    return deep(value)
