"""Sequential calibration (``sequential=True``, JLCM and activation-aware low rank): each block is calibrated on
the partly compressed model, in block order, with calibration passes cut short after the block; table-driven over
the architectures and methods."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ARCHS, Arch, calibration_batches, tiny_model
from conftest import model_output as _out

import hf_compress
from hf_compress import CompressionConfig
from hf_compress.calibration import input_covariances, truncated_passes
from hf_compress.compress import find_targets, stage_of
from hf_compress.layers.codebook import CodebookLinear
from hf_compress.layers.lowrank import LowRankLinear
from hf_compress.methods.jlcm import CodebookConfig
from hf_compress.methods.lowrank import LowRankConfig
from hf_compress.methods.tied import tied_head_name

METHODS = {  # sequential-capable method configs, by name
    "jlcm": lambda seq: CodebookConfig(bits=3, method="jlcm", steps=2, kmeans_iters=3, sequential=seq),
    "whitened": lambda seq: LowRankConfig(method="whitened", rank_ratio=0.5, sequential=seq),
    "asvd": lambda seq: LowRankConfig(method="asvd", rank_ratio=0.5, sequential=seq),
}


def _plan(arch: Arch, sequential: bool, names: list[str] | None = None, method: str = "jlcm") -> CompressionConfig:
    pattern = "|".join(re.escape(n) for n in names) if names else f"{arch.attn_pattern}|{arch.mlp_pattern}"
    return CompressionConfig(modules={pattern: METHODS[method](sequential)})


def _codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per compressed layer (CodebookLinear / LowRankLinear): its stored tensors in one float64 vector."""
    return {n: torch.cat([t.double().flatten() for t in m.state_dict().values()])
            for n, m in model.named_modules() if isinstance(m, CodebookLinear | LowRankLinear)}


@pytest.mark.parametrize(("name", "stage"), [
    ("model.layers.3.self_attn.q_proj", "model.layers.3"),
    ("model.encoder.layers.0.fc1", "model.encoder.layers.0"),
    ("transformer.h.11.attn.c_attn", "transformer.h.11"),
    ("lm_head", "lm_head"),
])
def test_stage_is_the_numbered_block(name: str, stage: str) -> None:
    assert stage_of(name) == stage


CASES = [(a, m) for a in ARCHS for m in ("jlcm", "whitened")] + [(ARCHS[0], "asvd")]


@pytest.mark.parametrize(("arch", "method"), CASES, ids=[f"{a.name}-{m}" for a, m in CASES])
def test_sequential_equals_compressing_block_by_block(arch: Arch, method: str) -> None:
    calib = calibration_batches(arch)
    model = tiny_model(arch)
    hf_compress.compress(model, _plan(arch, True, method=method), calibration=calib, progress=False)

    by_hand = tiny_model(arch)  # each block compressed (non-sequentially) on the model compressed so far
    stages: dict[str, list[str]] = {}
    for name in find_targets(by_hand, _plan(arch, False, method=method)):
        stages.setdefault(stage_of(name), []).append(name)
    assert len(stages) > 1
    for names in stages.values():
        hf_compress.compress(by_hand, _plan(arch, False, names, method), calibration=calib, progress=False)

    at_once = tiny_model(arch)
    hf_compress.compress(at_once, _plan(arch, False, method=method), calibration=calib, progress=False)
    seq, hand, once = _codes(model), _codes(by_hand), _codes(at_once)
    assert seq.keys() == hand.keys() == once.keys()
    assert all(torch.equal(seq[n], hand[n]) for n in seq)
    assert not all(torch.equal(seq[n], once[n]) for n in seq)  # later blocks saw compressed inputs
    inputs = arch.inputs()
    assert torch.equal(_out(model, inputs), _out(by_hand, inputs))
    assert not torch.equal(_out(model, inputs), _out(at_once, inputs))


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_truncated_passes_skip_the_rest_of_the_model_and_keep_statistics(arch: Arch) -> None:
    model = tiny_model(arch)
    calib = calibration_batches(arch)
    names = list(find_targets(model, _plan(arch, sequential=False)))
    first = [n for n in names if stage_of(n) == stage_of(names[0])]
    last = names[-1]
    calls: list[str] = []
    hook = model.get_submodule(last).register_forward_hook(lambda *_a: calls.append(last))
    full = input_covariances(model, first, calib)
    assert len(calls) == len(calib)
    with truncated_passes():
        cut = input_covariances(model, first, calib)
    hook.remove()
    assert len(calls) == len(calib)  # the last target never ran during the cut passes
    assert cut.keys() == full.keys() and all(torch.equal(cut[n], full[n]) for n in full)
    assert torch.isfinite(_out(model, arch.inputs())).all()  # hooks removed: a plain forward runs whole


def test_sequential_tied_embedding_gets_its_head_statistics() -> None:
    """A token table's prepare also reads the tied head's input, outside the table's stage: the truncated pass
    must run until the head too, so the first stage matches dense calibration exactly."""
    arch = next(a for a in ARCHS if a.name == "llama")
    calib = calibration_batches(arch)
    tables = []
    for sequential in (True, False):
        model = tiny_model(arch)
        assert tied_head_name(model, model.get_input_embeddings()) == "lm_head"
        cfg = CodebookConfig(bits=3, method="jlcm", steps=2, kmeans_iters=3, sequential=sequential)
        hf_compress.compress(model, CompressionConfig(modules={"embed_tokens": cfg}), calibration=calib,
                             progress=False)
        tables.append({k: v.clone() for k, v in model.model.embed_tokens.state_dict().items()})
    seq, dense = tables
    assert seq.keys() == dense.keys() and all(torch.equal(seq[k], dense[k]) for k in seq)


@pytest.mark.parametrize("method", list(METHODS))
def test_sequential_round_trips_through_the_plan(method: str) -> None:
    again = CompressionConfig.from_dict(CompressionConfig(modules={"q_proj": METHODS[method](True)}).to_dict())
    assert again.modules["q_proj"].sequential is True
