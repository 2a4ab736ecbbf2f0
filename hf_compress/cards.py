"""Model cards for compressed checkpoints, built with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

_PIPELINE = {"causal-lm": "text-generation", "speech-seq2seq": "automatic-speech-recognition",
             "masked-lm": "fill-mask", "sequence-classification": "text-classification", "base": "feature-extraction"}

GENERATED = "<!-- hf_compress: generated card, rewritten by each save; delete this line to keep your edits -->"
TEMPLATE = """---
{{ card_data }}
---

""" + GENERATED + """

# {{ title }}

A compressed version of {{ base_model_link }} made with [hf_compress](https://pypi.org/project/hf-compress/).
It is an ordinary 🤗 transformers checkpoint (safetensors): the compressed layers are rebuilt from
`compression_config` in `config.json`.

## Compression

| pattern | method | settings |
|---|---|---|
{{ plan_rows }}

Compressed layers: {{ layer_summary }}.
Parameters: {{ n_params }}.
{{ figures }}

## How to load

With the plugin installed and imported:

```python
import hf_compress  # registers the compressed classes
from transformers import {{ auto_class }}
model = {{ auto_class }}.from_pretrained("{{ repo_id }}")
```

Without importing it (it must still be installed: `pip install hf_compress`):

```python
from transformers import {{ auto_class }}
model = {{ auto_class }}.from_pretrained("{{ repo_id }}", trust_remote_code=True)
```
"""


def _cell(text: str) -> str:
    """``text`` for a markdown table cell: ``|`` (e.g. in a pattern ``(q|k)_proj``) would split the cell."""
    return text.replace("|", r"\|")


def _settings(method: dict[str, Any]) -> str:
    """A method config's fields that are set (not None), ``k=v, ...``, for a table cell."""
    return _cell(", ".join(f"{k}={v}" for k, v in method.items() if k != "type" and v is not None))


def _task_of(model: Any) -> tuple[str, str]:
    from .modeling import TASKS

    for cls in type(model).__mro__:  # the transformers class under the Compressed* subclass and its mixins
        for task, (auto_name, mapping) in TASKS.items():
            if cls.__name__ in mapping.values() and task != "base":
                return task, auto_name
    return "base", "AutoModel"


def portable_base_model(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """What a compressed model records as its base (``compression_config["base_model"]``, saved and pushed with
    it): a Hub id as given; a local folder only by its name, or by its repo id when it is a ``huggingface_hub``
    cache snapshot (``models--org--name/snapshots/<sha>``); never a local absolute path."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    path = Path(text)
    if not (path.exists() or path.is_absolute() or text.startswith((".", "~"))):
        return text  # a Hub id
    parts = path.expanduser().resolve().parts
    for part in reversed(parts):
        if part.startswith("models--") and len(part) > len("models--"):  # repo ids cannot contain "--"
            return part[len("models--"):].replace("--", "/")
    return parts[-1] if len(parts) > 1 else None


def model_card(model: Any, repo_id: str | None = None, figures: dict[str, Any] | None = None) -> ModelCard:
    """A card for a compressed model: metadata (library, base model, relation, tags, pipeline), the plan,
    optional benchmark ``figures`` (name -> value) and load instructions."""
    cc = getattr(model.config, "compression_config", None) or {}
    layers = cc.get("layers") or {}
    task, auto_class = _task_of(model)
    methods = sorted({m.get("type", "?") for m in (cc.get("modules") or {}).values()})
    base_model = cc.get("base_model")
    base_is_hub = (isinstance(base_model, str) and base_model.count("/") == 1
                   and not base_model.startswith((".", "/")) and not Path(base_model).exists())  # not a local folder
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model if base_is_hub else None,
        base_model_relation="quantized" if base_is_hub and methods == ["jlcm"] else None,  # Hub: codebooks only
        tags=["hf_compress", "compressed", *methods],
        pipeline_tag=_PIPELINE.get(task),
    )
    rows = "\n".join(
        f"| `{_cell(p)}` | {m.get('type')} | {_settings(m)} |" for p, m in (cc.get("modules") or {}).items()
    ) or "| — | — | — |"
    counts = Counter(spec.get("type") for spec in layers.values())
    shown = (base_model if base_is_hub else (Path(str(base_model)).name or Path(str(base_model)).resolve().name)
             if base_model else None)  # a local folder: its name, no absolute path
    fig_text = "".join(f"\n- {k}: {v}" for k, v in (figures or {}).items())
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=f"{repo_id or shown or type(model).__name__} (compressed with hf_compress)",
        base_model_link=(f"[{base_model}](https://huggingface.co/{base_model})" if base_is_hub  # a local folder:
                         else f"a local checkpoint (`{shown}`)" if shown else "a model"),
        plan_rows=rows,
        layer_summary=", ".join(f"{n} × {t}" for t, n in counts.items()) or "none",
        n_params=f"{sum(p.numel() for p in model.parameters()):,}",
        figures=("\n## Measured" + fig_text) if fig_text else "",
        auto_class=auto_class,
        repo_id=repo_id or "path/to/this/model",
    )
