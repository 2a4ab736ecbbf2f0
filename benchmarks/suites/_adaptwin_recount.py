"""``python -m benchmarks suite adaptwin --recount-adapters FILE ...``: give the LoRA rows of an AdaPTwin results file
recorded before adapters were counted their adapter's parameters (``size.adapter_params``)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import hf_compress
from hf_compress.adapters import encoder_targets, lora_config

from .. import data, zoo
from .adaptwin import adapter_size, encoder_params, plan_for, with_adapter


def recount_adapters(path: str) -> None:
    """Give the LoRA rows of a results file recorded before adapters were counted their adapter's parameters:
    rebuilt from each row's model, setting and LoRA rank (random whitening batches: sizes do not depend on them)."""
    from hf_compress.evaluation import random_batches
    doc, dense_of, changed = json.loads(Path(path).read_text()), {}, False
    for rec in doc["records"]:
        s = rec.get("setting") or {}
        if "lora" not in rec["method"] or "adapter_params" in rec["size"] or s.get("objective") != "distill":
            continue
        dense = dense_of[rec["model"]] = dense_of.get(rec["model"]) or zoo.load(rec["model"])[0]  # loaded once
        model = copy.deepcopy(dense)
        hf_compress.compress(model, plan_for(s["setting"], dense)[0], calibration=random_batches(model, 2),
                             progress=False)
        if encoder_params(model) != rec["size"]["encoder_params"]:
            raise ValueError(f"adaptwin --recount-adapters: {path}: {rec['method']} {s['setting']} rebuilds to "
                             f"{encoder_params(model)} encoder parameters, not the recorded ones")
        r = s["budget"]["lora_r"]
        adapter = adapter_size(model, lora_config(r=r, alpha=2 * r, target_modules=encoder_targets(model)))
        old = rec["size"]
        rec["size"] = with_adapter(old, adapter, encoder_params(dense))
        for k in ("params", "encoder_params"):
            rec["ratios"][k] *= rec["size"][k] / old[k]
        print(f"[adaptwin] {path}: {rec['model']} {rec['method']} {s['setting']}: +{adapter}", flush=True)
        changed = True
    if not changed:  # (a second run leaves the file as it is)
        return
    doc["description"] += (" LoRA rows: size counts one speaker adapter (size.adapter_params; recounted "
                           f"{time.strftime('%Y-%m-%d')} by --recount-adapters from each row's setting).")
    data._write_atomic(Path(path), (json.dumps(doc, indent=2) + "\n").encode())
