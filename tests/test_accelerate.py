"""accelerate: device_map / offload / init_empty_weights on compressed checkpoints, and low-memory compress-on-load."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHS, EMBED, model_output, tiny_model

import hf_compress
from hf_compress import (
    CodebookConfig,
    CompressionConfig,
    LowRankConfig,
    ProductTwinConfig,
    SubspaceEmbeddingConfig,
    TTEmbeddingConfig,
)
from hf_compress.modeling import compressed_layer_class_names
from hf_compress.registry import _LAYERS

LLAMA = next(a for a in ARCHS if a.name == "llama")
WHISPER = next(a for a in ARCHS if a.name == "whisper")
LLAMA_PLANS = {  # every compressed layer type, on a tied-embedding model
    "tt-twin-lowrank-codebook": {
        "embed_tokens": TTEmbeddingConfig(compression=2.0),
        r"layers\.0\.self_attn$": ProductTwinConfig(rank_ratio=0.5),
        r"layers\.1\.self_attn\.(q|k|v|o)_proj$": LowRankConfig(rank_ratio=0.5),
        r"mlp\.(gate|up|down)_proj$": CodebookConfig(bits=3, method="rtn"),
    },
    "subspace-tucker": {
        "embed_tokens": SubspaceEmbeddingConfig(num_subspaces=2),
        r"self_attn\.(q|k|v|o)_proj$": LowRankConfig(rank_ratio=0.5, method="tucker"),
    },
    "tt-per-token": {"embed_tokens": TTEmbeddingConfig(format="per_token", compression=2.0)},
}


def _saved(arch, modules: dict, path: Path) -> Path:
    model = tiny_model(arch)
    hf_compress.compress(model, CompressionConfig(modules=modules), progress=False)
    model.save_pretrained(path)
    return path


@pytest.fixture(params=sorted(LLAMA_PLANS), scope="module")
def llama_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(LLAMA, LLAMA_PLANS[request.param], tmp_path_factory.mktemp(request.param))


def _reference(arch, path: Path) -> torch.Tensor:
    return model_output(arch.auto_class.from_pretrained(path), arch.inputs())


@pytest.mark.parametrize("device_map", ["auto", "cpu-dict"])
@pytest.mark.parametrize("loader", ["transformers-auto", "compressed-class"])
def test_device_map_load_matches_regular_load(llama_ckpt: Path, device_map: str, loader: str) -> None:
    ref = _reference(LLAMA, llama_ckpt)
    cls = transformers.AutoModelForCausalLM if loader == "transformers-auto" else type(
        transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt))
    model = cls.from_pretrained(llama_ckpt, device_map="auto" if device_map == "auto" else {"": "cpu"})
    assert type(model).__name__ == "CompressedLlamaForCausalLM"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(model_output(model, LLAMA.inputs()), ref)


@pytest.mark.parametrize("offloaded", ["model.embed_tokens", "model.layers.0", "model.layers.1", "all"])
def test_mixed_cpu_disk_offload_matches(llama_ckpt: Path, offloaded: str, tmp_path: Path) -> None:
    """Compressed layers offloaded to disk (factors in ParameterLists, a tied head reading an offloaded table)."""
    ref = _reference(LLAMA, llama_ckpt)
    names = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    device_map = {n: ("disk" if offloaded in (n, "all") else "cpu") for n in names}
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_ckpt, device_map=device_map,
                                                              offload_folder=tmp_path / "offload")
    assert set(model.hf_device_map.values()) == set(device_map.values())
    assert torch.equal(model_output(model, LLAMA.inputs()), ref)
    assert torch.equal(model_output(model, LLAMA.inputs()), ref)  # offloaded weights come back on every call


def test_compress_on_load_refuses_offloaded_targets(tmp_path: Path) -> None:
    """A device_map that offloads dense target layers to disk leaves meta placeholders in memory: compressing
    them would silently give a wrong model, so the load names the layer and the fix instead."""
    dense = tmp_path / "dense"
    tiny_model(LLAMA).save_pretrained(dense)
    names = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    device_map = {n: "disk" if n == "model.layers.1" else "cpu" for n in names}
    plan = CompressionConfig(modules={LLAMA.attn_pattern: LowRankConfig(rank=8)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj: its weights \['weight'\] are not "
                                         r"loaded.*without device_map"):
        hf_compress.AutoCompressedModelForCausalLM.from_pretrained(dense, compression_config=plan,
                                                                   device_map=device_map,
                                                                   offload_folder=tmp_path / "offload")


def test_whisper_device_map_and_offload(tmp_path: Path) -> None:
    ckpt = _saved(WHISPER, {EMBED["whisper"]: TTEmbeddingConfig(compression=2.0),
                            r"encoder\.layers\.\d+\.self_attn$": ProductTwinConfig(rank_ratio=0.5),
                            WHISPER.mlp_pattern: LowRankConfig(rank_ratio=0.5)}, tmp_path / "ck")
    ref = _reference(WHISPER, ckpt)
    auto = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(ckpt, device_map="auto")
    assert torch.equal(model_output(auto, WHISPER.inputs()), ref)
    device_map = {"model.encoder": "disk", "model.decoder": "cpu", "proj_out": "cpu"}
    off = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(ckpt, device_map=device_map,
                                                                 offload_folder=tmp_path / "offload")
    assert torch.equal(model_output(off, WHISPER.inputs()), ref)


def test_init_empty_weights_then_dispatch(llama_ckpt: Path) -> None:
    """The accelerate big-model recipe: build the compressed model empty, then load and dispatch the checkpoint."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    ref = _reference(LLAMA, llama_ckpt)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(llama_ckpt))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert any(isinstance(m, tuple(_LAYERS.values())) for m in model.modules())
    model = load_checkpoint_and_dispatch(model, str(llama_ckpt / "model.safetensors"), device_map="auto",
                                         no_split_module_classes=model._no_split_modules,
                                         preload_module_classes=compressed_layer_class_names())
    assert torch.equal(model_output(model.eval(), LLAMA.inputs()), ref)


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_no_split_modules_are_the_family_ones(arch, tmp_path: Path) -> None:
    ckpt = _saved(arch, {arch.attn_pattern: LowRankConfig(rank_ratio=0.5)}, tmp_path / "ck")
    model = arch.auto_class.from_pretrained(ckpt)
    assert type(model) is not arch.model_class and isinstance(model, arch.model_class)
    assert model._no_split_modules and set(model._no_split_modules) == set(arch.model_class._no_split_modules)
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    # budgets that leave part of the model for "disk": blocks must be placed whole
    total = compute_module_sizes(model)[""]
    blocks = {n for n, m in model.named_modules() if type(m).__name__ in model._no_split_modules}
    assert blocks
    devices = set()
    for frac in (0.6, 0.8, 0.95):
        device_map = infer_auto_device_map(model, max_memory={"cpu": int(frac * total), "disk": 10**9},
                                           no_split_module_classes=model._no_split_modules)
        devices |= set(device_map.values())
        for name in device_map:  # no entry is strictly inside a no-split block
            assert not any(name.startswith(b + ".") for b in blocks), (frac, name)
    assert devices == {"cpu", "disk"}


# ------------------------------------------------------------------------------------------------------------------
# compress-on-load without materializing the dense model
# ------------------------------------------------------------------------------------------------------------------
def _plan(arch) -> CompressionConfig:
    return CompressionConfig(modules={EMBED[arch.name]: TTEmbeddingConfig(compression=2.0),
                                      arch.attn_pattern: LowRankConfig(rank_ratio=0.5),
                                      arch.mlp_pattern: CodebookConfig(bits=3, method="kmeans", kmeans_iters=3)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_low_memory_compress_on_load_matches_regular(arch, dtype: torch.dtype, tmp_path: Path) -> None:
    tiny_model(arch).to(dtype).save_pretrained(tmp_path / "dense")
    regular = arch.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=_plan(arch),
                                                   low_memory=False)
    low = arch.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=_plan(arch), low_memory=True)
    assert type(low) is type(regular) and low.dtype == regular.dtype == dtype and not low.training
    a, b = regular.state_dict(), low.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert low.config.compression_config == regular.config.compression_config
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in arch.inputs().items()}
    assert torch.equal(model_output(low, x), model_output(regular, x))
    low.save_pretrained(tmp_path / "out")
    assert torch.equal(model_output(arch.auto_class.from_pretrained(tmp_path / "out"), x), model_output(low, x))


def test_low_memory_refuses_a_truncated_checkpoint(tmp_path: Path) -> None:
    """The streamed reader checks the file against its header, as safe_open does (missing bytes read as zeros)."""
    tiny_model(LLAMA).save_pretrained(tmp_path / "dense")
    weights = tmp_path / "dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    plan = CompressionConfig(modules={LLAMA.attn_pattern: LowRankConfig(rank_ratio=0.5)})
    with pytest.raises(ValueError, match=r"model\.safetensors holds \d+ bytes, its header describes \d+ \(truncated"):
        LLAMA.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=plan, low_memory=True)


def test_low_memory_base_model_from_head_checkpoint(tmp_path: Path) -> None:
    """``AutoCompressedModel`` on a ``*ForCausalLM`` checkpoint: names carry the ``model.`` prefix."""
    tiny_model(LLAMA).save_pretrained(tmp_path / "dense")
    plan = CompressionConfig(modules={LLAMA.attn_pattern: LowRankConfig(rank_ratio=0.5)})
    low = hf_compress.AutoCompressedModel.from_pretrained(tmp_path / "dense", compression_config=plan,
                                                          low_memory=True)  # raises instead of falling back
    regular = hf_compress.AutoCompressedModel.from_pretrained(tmp_path / "dense", compression_config=plan,
                                                              low_memory=False)
    assert torch.equal(model_output(low, LLAMA.inputs()), model_output(regular, LLAMA.inputs()))


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("llama", "whisper", "gpt2")], ids=lambda a: a.name)
def test_low_memory_reads_each_tensor_once(arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tied embedding and head that stay dense are read once: a second read of the table (discarded, as its
    partner was already filled) made the peak one table larger than the loaded model (Whisper tiny.en: 1.54x)."""
    from hf_compress import streaming

    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "dense")
    reads: list[str] = []
    real = streaming.SafetensorsReader.get
    monkeypatch.setattr(streaming.SafetensorsReader, "get", lambda self, key: reads.append(key) or real(self, key))
    plan = CompressionConfig(modules={arch.attn_pattern: LowRankConfig(rank_ratio=0.25)})
    low = arch.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=plan, low_memory=True)
    assert reads and len(reads) == len(set(reads)), sorted(k for k in reads if reads.count(k) > 1)
    head, table = low.get_output_embeddings(), low.get_input_embeddings()
    if head is not None and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        assert head.weight is table.weight
    regular = arch.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=plan, low_memory=False)
    assert torch.equal(model_output(low, arch.inputs()), model_output(regular, arch.inputs()))


def test_low_memory_never_holds_the_dense_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While each target is compressed, the only dense tensors in memory are that target's (and those of modules
    already filled that stay dense: none here, every linear layer and the embedding are targets)."""
    tiny_model(LLAMA).save_pretrained(tmp_path / "dense")
    plan = CompressionConfig(modules={"embed_tokens": TTEmbeddingConfig(compression=2.0),
                                      r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$":
                                      LowRankConfig(rank_ratio=0.5)})
    seen: list[tuple[str, int, int]] = []
    from hf_compress import registry

    real_get = registry.get_method

    def spy_get(name: str):  # wrap each method's compress to look at the model when it runs
        method = real_get(name)

        def compress(module, cfg, ctx):
            layers = tuple(_LAYERS.values())
            inside = {id(p) for m in ctx.model.modules() if isinstance(m, layers) for p in m.parameters()}
            dense = sum(p.numel() for p in ctx.model.parameters() if not p.is_meta and id(p) not in inside)
            seen.append((ctx.name, dense, sum(p.numel() for p in module.parameters())))
            return method.compress(module, cfg, ctx)

        return dataclasses.replace(method, compress=compress)

    monkeypatch.setattr(sys.modules["hf_compress.compress"], "get_method", spy_get)  # the name compress() calls
    model = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(tmp_path / "dense", compression_config=plan)
    total = sum(p.numel() for p in tiny_model(LLAMA).parameters())
    assert len(seen) == 1 + 2 * 7
    for name, dense, own in seen:
        assert dense == own < total / 4, (name, dense, own)
    assert not any(p.is_meta for p in model.parameters())


_RSS_SCRIPT = """
import json, sys, threading, time, torch, hf_compress
from hf_compress import CompressionConfig, LowRankConfig
torch.set_num_threads(1)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
plan = CompressionConfig(modules={
    r"(self_attn\\.(q|k|v|o)_proj|mlp\\.(gate|up|down)_proj)$": LowRankConfig(rank_ratio=0.25)})
import accelerate, transformers, hf_compress.streaming, hf_compress.methods.lowrank  # noqa: lazy imports first
torch.linalg.svd(torch.randn(64, 32, dtype=torch.float64))
transformers.AutoConfig.from_pretrained(sys.argv[1])
before = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
m = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(sys.argv[1], compression_config=plan,
                                                               low_memory=sys.argv[2] == "1")
done.set()
thread.join()
print(json.dumps({"peak_bytes": max(peak[0], rss()) - before, "params": sum(p.numel() for p in m.parameters())}))
"""


@pytest.mark.slow  # two subprocesses, each importing torch and compressing 84 layers
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux) to sample the RSS")
def test_low_memory_peak_rss_stays_below_the_dense_model(tmp_path: Path) -> None:
    """A ~44 MB fp32 dense checkpoint, every linear layer to rank 1/4: while loading, the regular path's resident
    memory grows by more than the dense model, the low-memory path's stays well below it (RSS sampled every 2 ms;
    what the low-memory peak holds is the compressed model plus one layer's float64 SVD workspace)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    # large blocks are mmap'ed and returned to the OS on free, so RSS follows live tensors rather than malloc's heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak(low: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "dense"), low], capture_output=True,
                              text=True, timeout=300, check=False, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    regular, low = peak("0"), peak("1")
    assert regular["params"] == low["params"] < dense / 4 / 2
    assert regular["peak_bytes"] > 0.9 * dense, (regular, dense)  # the regular path holds the dense model
    assert low["peak_bytes"] < 0.8 * dense, (low, dense)  # measured ~0.66: compressed model + one layer's SVD


def test_low_memory_refusals(tmp_path: Path) -> None:
    tiny_model(LLAMA).save_pretrained(tmp_path / "dense")
    plan = CompressionConfig(modules={LLAMA.attn_pattern: LowRankConfig(rank_ratio=0.5)})
    with pytest.raises(ValueError, match="calibration activations need a forward pass"):
        hf_compress.AutoCompressedModelForCausalLM.from_pretrained(
            tmp_path / "dense", compression_config=plan, calibration=[torch.zeros(1, 4, dtype=torch.long)],
            low_memory=True)
    with pytest.raises(ValueError, match=r"loading kwargs \['device_map'\]"):
        hf_compress.AutoCompressedModelForCausalLM.from_pretrained(tmp_path / "dense", compression_config=plan,
                                                                   device_map="cpu", low_memory=True)
    # device_map with compress-on-load still works (regular path)
    model = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(tmp_path / "dense", compression_config=plan,
                                                                       device_map="auto")
    low = hf_compress.AutoCompressedModelForCausalLM.from_pretrained(tmp_path / "dense", compression_config=plan)
    assert torch.equal(model_output(model, LLAMA.inputs()), model_output(low, LLAMA.inputs()))


def test_compress_on_load_honours_a_per_module_dtype_dict(tmp_path: Path) -> None:
    """``dtype={"": torch.bfloat16}`` (transformers' per-module form) was ignored by the streamed load (fp32 model);
    it now takes transformers' loader, and ``low_memory=True`` says why it cannot stream."""
    tiny_model(LLAMA).save_pretrained(tmp_path / "dense")
    plan = CompressionConfig(modules={LLAMA.attn_pattern: LowRankConfig(rank_ratio=0.5)})
    model = LLAMA.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=plan,
                                                  dtype={"": torch.bfloat16})
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ValueError, match=r"low_memory=True is not possible here: .*dtype \(per-module dict\)"):
        LLAMA.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=plan, low_memory=True,
                                              dtype={"": torch.bfloat16})


def test_dispatch_with_a_dtype_cast_of_codebook_storage_is_refused(tmp_path: Path) -> None:
    """accelerate's ``load_checkpoint_and_dispatch(..., dtype=bf16)`` casts the fp16 codebooks to bf16 (rounding
    them; a later save wrote the rounded values): the forward now says so. The documented way (dispatch without
    dtype, then ``model.to(dtype)``) keeps the storage and matches ``from_pretrained`` then ``.to(dtype)``."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    ckpt = _saved(LLAMA, {"embed_tokens": CodebookConfig(bits=4, method="rtn"),
                          LLAMA.mlp_pattern: CodebookConfig(bits=3, method="rtn")}, tmp_path / "ck")

    def dispatched(**kwargs):
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(ckpt))
        model.tie_weights()
        return load_checkpoint_and_dispatch(model, str(ckpt), device_map={"": "cpu"},
                                            preload_module_classes=compressed_layer_class_names(), **kwargs).eval()

    with pytest.raises(ValueError, match=r"float16 codebooks were cast to torch\.bfloat16 .*model\.to\(dtype\)"):
        model_output(dispatched(dtype=torch.bfloat16), LLAMA.inputs())
    model = dispatched().to(torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).to(torch.bfloat16)  # (dtype= gives another inv_freq)
    assert torch.equal(model_output(model, LLAMA.inputs()), model_output(ref, LLAMA.inputs()))
    assert {p.dtype for n, p in model.named_parameters() if n.endswith(".codebooks")} == {torch.float16}


def test_fp32_speech_calibration_features_feed_a_bf16_model(tmp_path: Path) -> None:
    """A processor's fp32 input_features calibrate a Whisper loaded in bf16 (its first conv refused them)."""
    from conftest import calibration_batches

    whisper = next(a for a in ARCHS if a.name == "whisper")
    tiny_model(whisper).save_pretrained(tmp_path / "dense")
    batches = calibration_batches(whisper)
    assert batches[0]["input_features"].dtype == torch.float32
    plan = CompressionConfig(modules={whisper.attn_pattern: LowRankConfig(method="whitened", rank_ratio=0.5)})
    model = whisper.compressed_auto.from_pretrained(tmp_path / "dense", compression_config=plan,
                                                    calibration=batches, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.compression_config["layers"]
