r"""JLCM: jointly learnable codebooks and mappings (Yvinec et al., "Network Memory Footprint Compression Through
Jointly Learnable Codebooks and Mappings", ICLR 2024), stored as real packed bits (:class:`CodebookLinear`).

Per linear layer ``W [out, in]`` (``d`` weights per index, ``K = codebook_size`` codewords, ``G`` row groups):

1. **Neuron grouping.** Each output row is summarized by quantiles of its weights (its distribution); a
   balanced k-means on these features (capacity-constrained assignment) gives ``G`` groups of similar rows,
   which are reordered to be contiguous (the permutation is stored bit-packed). Each group gets its own codebook,
   or (``shared_codebook=True``) one codebook is shared and each group gets a scale (the group's RMS).
   **Blocks** (``block_size=B``, finer grouping like "g128"): every (row, block of ``B`` input columns) also
   gets an fp16 affine map, offset = block min and scale = max − min, and the codebooks quantize the normalized
   values in ``[0, 1]``; ``Ŵ = s·C[I] + o``. Costs ``32/B`` bits per weight and removes the per-block range
   differences (outliers only stretch their own block).
2. **Initialization** (``method="kmeans"`` stops here): per codebook, Lloyd k-means of the weight vectors,
   started at the uniform grid and weighting each vector by its block scale² (so it minimizes the weight-space
   squared error and can never end above round-to-nearest's). ``method="rtn"`` is that uniform grid (min..max of
   the group per coordinate, a product grid for ``d>1``) with round-to-nearest mapping: with blocks, exactly
   asymmetric RTN with groups of ``B``. Same storage, so all three methods cost exactly the same bytes.
3. **Joint optimization** (``method="jlcm"``, ``steps`` iterations). The loss is the layer's output
   reconstruction error on calibration activations ``X`` (dense model inputs, collected once by the ``prepare``
   hook with :func:`hf_compress.calibration.input_covariances`, so layers are independent; with
   ``sequential=True`` each block's ``X`` comes from the model whose earlier blocks are already compressed, as in
   GPTQ, one truncated calibration pass per block):

   .. math:: L(C, I) = \|X\hat W^\top - XW^\top\|_F^2 = \mathrm{tr}(E\,\Sigma\,E^\top),\quad E = \hat W - W,
             \ \Sigma = X^\top X / n\ (+\ \text{damping}\cdot\overline{\mathrm{diag}}\,I),
             \ \hat W_{r,j} = s_{g(r)}\,C_{b(r)}[I_{r,j}]

   with gradient ``∂L/∂Ŵ = 2 E Σ``. Each step does

   * **codebook update**: the gradient w.r.t. each codeword (scatter-sum of ``s·∂L/∂Ŵ`` over the weights mapped
     to it), preconditioned by the diagonal curvature ``Σ 2 s² Σ_jj`` of those weights, followed by an exact line
     search (the loss is quadratic in ``C``);
   * **proximal mapping update**: every weight vector moves to
     ``I ← argmin_k  s⟨∂L/∂Ŵ, C_k − c⟩ + s² Σ_c h_c (C_k − c)_c²`` (``c`` its current codeword, ``h = diag Σ``),
     i.e. the nearest codeword (``h``-weighted) to the proximal gradient step ``c − ∂L/∂Ŵ / (2 s h)``. The
     quadratic proximity term makes the score of a codeword *grow* with its distance from the current one (with
     ``vector_dim = 1`` it is the exact change of ``L`` when that weight alone moves; with vectors it leaves out
     ``Σ``'s terms between a vector's coordinates), whereas the straight-through gradient of the
     one-hot mapping, ``s⟨∂L/∂Ŵ, C_k⟩`` (``mapping_update="ste"``, kept for ablation), is linear in the codeword
     and always favours the farthest codeword along the gradient. Moves interact through ``Σ``, so only the
     fraction ``f`` with the best predicted change is applied (a trust region): a step that lowers ``L`` is
     accepted and doubles ``f`` (max 1), a rejected one divides it by 4;
   * **affine step** (blocks only, between the two): per (row, block), the ``diag Σ``-weighted least-squares
     scale and offset for the current codeword values, kept only if ``L`` drops.

   Initialization for JLCM is the better (on ``L``) of plain k-means and k-means weighted by ``diag Σ``. Then
   (``error_feedback`` rounds, beyond the paper) the mapping is redone by GPTQ-style error feedback onto the
   current codebooks (:mod:`hf_compress.methods.gptq`; with blocks it also refits the affine maps), kept if it
   lowers ``L``, and the joint steps run again. It halves ``L`` at 3 bits but its effect on model quality is mixed
   (benchmarks/results/jlcm*.json: Whisper tiny.en WER 2.17 -> 1.41, SmolLM2 perplexity 56.7 -> 79.1), so it is
   off by default (``error_feedback=0``, the paper's method). All steps never increase ``L``, so JLCM never ends
   worse than its initialization.
   ``method="gptq"`` is the matching baseline: error feedback onto the uniform (RTN) grid, no codebook learning.
4. **Storage**: codes packed into ``bits`` bits, codebooks, scales (and offsets) fp16 (:class:`CodebookLinear`).

Bits per weight: ``bits / d`` for the indices, plus codebooks (``books·K·d·16``), scales (``G·16``, or
``out·in/B·16`` and as many offsets with blocks) and the permutation (``out·ceil(log2 out)``) per layer:
:func:`layer_bits` gives the exact count. A target ``bits_per_weight`` picks the smallest ``d`` in (1, 2, 4, 8)
with ``bits_per_weight·d`` an integer. The default group size is the smallest that keeps the codebooks within
``max_overhead`` of the index bits.

Token embeddings (``nn.Embedding`` targets) become a :class:`CodebookEmbedding` with the same layout; a tied output
head reads that table. Their ``Σ`` is ``I`` (a lookup's error is its row's own error; no calibration needed), plus,
with calibration and a tied head, the head's input second moments scaled to the same trace
(:func:`hf_compress.methods.tied.table_sigma`).

Fine-tuning: :func:`mark_codebooks_trainable` leaves only codebooks (and optionally scales, norms, biases)
trainable (fp32 master copies), indices stay fixed; train with ``transformers.Trainer`` as usual (or distill from the
dense model with :func:`hf_compress.healing.distill_logits`), then :func:`freeze_codebooks` returns them to fp16.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration import input_covariances
from ..compress import CompressionContext
from ..config import CalibrationRequiredError, MethodConfig, check_field_types
from ..layers.codebook import CodebookLinear, group_sizes, perm_bits
from ..layers.common import linear_weight_and_bias
from ..registry import register_method
from .codebook_fit import group_rows, kmeans_codebooks, memoized, nearest, rtn_codebooks
from .gptq import gptq_codes
from .jlcm_optim import joint_optimize, output_loss
from .tied import tied_head_name

METHODS = ("jlcm", "kmeans", "rtn", "gptq")
CALIBRATED = ("jlcm", "gptq")
UPDATES = ("proximal", "ste")


@dataclass
class CodebookConfig(MethodConfig):
    """Codebook quantization of ``nn.Linear``/``Conv1D`` weights (JLCM and its RTN / k-means baselines)."""

    registry_name = "jlcm"

    bits: int | None = field(default=None, metadata={"help": "index bits per codeword index, 1..16 (default 3)"})
    bits_per_weight: float | None = field(default=None, metadata={"help": "target index bits per weight; derives "
                                                                          "bits and vector_dim"})
    vector_dim: int = field(default=1, metadata={"help": "weights per codeword (granularity along the input dim)"})
    codebook_size: int | None = field(default=None, metadata={"help": "codewords K <= 2**bits (default 2**bits)"})
    group_size: int | None = field(default=None, metadata={"help": "rows per group (default: from max_overhead)"})
    n_groups: int | None = field(default=None, metadata={"help": "row groups per layer (overrides group_size)"})
    shared_codebook: bool = field(default=False, metadata={"help": "one codebook per layer, a scale per group"})
    block_size: int | None = field(default=None, metadata={"help": "input columns per block (e.g. 128): each "
                                                                    "(row, block) gets an fp16 scale and offset"})
    max_overhead: float = field(default=0.05, metadata={"help": "codebook bits / index bits, for the default groups"})
    method: str = field(default="jlcm", metadata={"help": f"one of {METHODS}"})
    steps: int = field(default=30, metadata={"help": "joint optimization steps (jlcm)"})
    kmeans_iters: int = field(default=20, metadata={"help": "Lloyd iterations of the k-means init"})
    mapping_update: str = field(default="proximal", metadata={"help": f"one of {UPDATES}"})
    damping: float = field(default=0.01, metadata={"help": "added to diag(XᵀX/n), relative to its mean"})
    error_feedback: int = field(default=0, metadata={"help": "jlcm: rounds of GPTQ-style error-feedback mapping "
                                                            "(each followed by the joint steps); 0: off"})
    sequential: bool = field(default=False, metadata={"help": "jlcm/gptq: calibrate each block on the outputs of the "
                                                              "blocks compressed before it (one partial pass per "
                                                              "block) instead of on the dense model"})
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.bits_per_weight is not None:
            bpw = float(self.bits_per_weight)
            dims = [d for d in (1, 2, 4, 8) if abs(bpw * d - round(bpw * d)) < 1e-6 and 1 <= round(bpw * d) <= 16]
            if bpw <= 0 or not dims:
                raise ValueError(f"hf_compress: CodebookConfig.bits_per_weight {self.bits_per_weight!r} must be "
                                 "b/d for an index width b in 1..16 and d in (1, 2, 4, 8), e.g. 2, 2.5 or 3.")
            derived = (round(bpw * dims[0]), dims[0])
            if self.bits is None and self.vector_dim in dims:
                derived = (round(bpw * self.vector_dim), self.vector_dim)
            if self.bits is not None and (self.bits, self.vector_dim) != derived:
                if abs(self.bits / self.vector_dim - bpw) > 1e-6:
                    raise ValueError(f"hf_compress: CodebookConfig: bits={self.bits}, vector_dim={self.vector_dim} "
                                     f"contradict bits_per_weight={bpw}; give one or the other.")
            else:
                self.bits, self.vector_dim = derived
        if self.bits is None:
            self.bits = 3
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 16:
            raise ValueError(f"hf_compress: CodebookConfig.bits must be an int in 1..16, got {self.bits!r}.")
        if not isinstance(self.vector_dim, int) or not 1 <= self.vector_dim <= 16:
            raise ValueError(f"hf_compress: CodebookConfig.vector_dim must be an int in 1..16, "
                             f"got {self.vector_dim!r}.")
        if self.codebook_size is not None and not 2 <= self.codebook_size <= 1 << self.bits:
            raise ValueError(f"hf_compress: CodebookConfig.codebook_size must be in [2, 2**bits = {1 << self.bits}], "
                             f"got {self.codebook_size!r}.")
        for name in ("group_size", "n_groups", "block_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"hf_compress: CodebookConfig.{name} must be a positive int, got {value!r}.")
        if self.block_size is not None and self.block_size % self.vector_dim:
            raise ValueError(f"hf_compress: CodebookConfig.block_size {self.block_size} must be a multiple of "
                             f"vector_dim {self.vector_dim}.")
        if self.method not in METHODS:
            raise ValueError(f"hf_compress: CodebookConfig.method must be one of {METHODS}, got {self.method!r}.")
        if self.mapping_update not in UPDATES:
            raise ValueError(f"hf_compress: CodebookConfig.mapping_update must be one of {UPDATES}, "
                             f"got {self.mapping_update!r}.")
        if min(self.steps, self.kmeans_iters, self.damping, self.error_feedback) < 0 or self.max_overhead <= 0:
            raise ValueError("hf_compress: CodebookConfig: steps, kmeans_iters, damping and error_feedback must be "
                             ">= 0 and max_overhead > 0.")

    @property
    def k(self) -> int:
        return self.codebook_size or 1 << self.bits

    def layout(self, out_features: int, in_features: int) -> dict[str, Any]:
        """The :class:`CodebookLinear` layout (keyword arguments) this config gives a ``[out, in]`` weight."""
        d, k = self.vector_dim, self.k
        if self.n_groups is not None:
            groups = min(self.n_groups, out_features)
        elif self.group_size is not None:
            groups = max(1, round(out_features / self.group_size))
        elif self.shared_codebook:
            groups = 1 if self.block_size else max(1, out_features // 8)
        else:
            rows = math.ceil(k * d * 16 / (self.max_overhead * self.bits * in_features / d))
            groups = max(1, out_features // rows)
        return {"bits": self.bits, "vector_dim": d, "codebook_size": k, "n_groups": groups,
                "shared_codebook": self.shared_codebook, "block_size": self.block_size or 0}


def layer_bits(layer: CodebookLinear) -> dict[str, int]:
    """Exact stored bits of a layer at fp16 codebooks/scales: indices, permutation, codebooks, scales (+ offsets)."""
    n_codes = layer.out_features * layer.in_features // layer.vector_dim
    out = {"indices": n_codes * layer.bits, "perm": layer.out_features * perm_bits(layer.out_features),
           "codebooks": layer.codebooks.numel() * 16, "scales": layer.scales.numel() * 16}
    if layer.offsets is not None:
        out["offsets"] = layer.offsets.numel() * 16
    return out


def codebook_from_dense(weight: torch.Tensor, bias: torch.Tensor | None, config: CodebookConfig,
                        sigma: torch.Tensor | None = None, who: str = "layer") -> tuple[CodebookLinear, dict]:
    """Quantize ``weight [out, in]`` following ``config`` (``sigma [in, in]`` = ``XᵀX/n`` for ``method="jlcm"``).
    Runs on ``weight``'s device (every tensor it creates, and the returned layer, are put there)."""
    with torch.device(weight.device):
        if sigma is not None:
            sigma = sigma.to(weight.device)
        return _codebook_from_dense(weight, bias, config, sigma, who)


def _codebook_from_dense(weight: torch.Tensor, bias: torch.Tensor | None, config: CodebookConfig,
                         sigma: torch.Tensor | None, who: str) -> tuple[CodebookLinear, dict]:
    out, inn = weight.shape
    lay = config.layout(out, inn)
    CodebookLinear(inn, out, **lay, bias=False, device="meta")  # validates the layout with clear errors
    w = weight.detach().float()
    d, k, groups = lay["vector_dim"], lay["codebook_size"], lay["n_groups"]
    perm = group_rows(w, groups)
    w_s = w[perm]
    row_group = torch.repeat_interleave(torch.arange(groups), group_sizes(out, groups))
    books = 1 if lay["shared_codebook"] else groups
    row_book = torch.zeros_like(row_group) if books == 1 else row_group
    block, n_vec = lay["block_size"], inn // d
    offsets = None
    if block:  # (row, block) affine map onto [0, 1]: offset = min, scale = max - min (fp16)
        wb = w_s.view(out, inn // block, block)
        offsets = wb.amin(-1).half().float()
        scales = (wb.amax(-1) - offsets).clamp_min(1e-6).half().float()
        s_map, o_map = scales.repeat_interleave(block // d, 1), offsets.repeat_interleave(block // d, 1)
    else:
        if lay["shared_codebook"]:
            rms = torch.zeros(groups).index_add_(0, row_group, w_s.pow(2).mean(1)) / group_sizes(out, groups)
            scales = rms.sqrt().clamp_min(1e-8).half().float()
        else:
            scales = torch.ones(groups)
        s_map, o_map = scales[row_group][:, None].expand(out, n_vec), torch.zeros(out, n_vec)
    points = ((w_s.view(out, n_vec, d) - o_map[:, :, None]) / s_map[:, :, None])
    # k-means weights each vector by its scale², so its error is the weight-space squared error
    pw = s_map[:, :, None].square() if block else None
    if config.method in CALIBRATED and sigma is None:
        raise CalibrationRequiredError(f"hf_compress: {who}: method={config.method!r} needs calibration batches "
                         "(compress(..., calibration=...)); or use method='kmeans' / 'rtn'.")
    if config.method in ("rtn", "gptq"):
        centers = rtn_codebooks(points, row_book, books, k)
    else:
        centers = memoized(("kmeans", books, k, config.kmeans_iters, block), (points, row_book, s_map),
                          lambda: kmeans_codebooks(points, row_book, books, k, config.kmeans_iters, config.seed, pw))
    centers = centers.half().float()
    codes = nearest(points, centers[row_book])
    stats: dict[str, Any] = {}
    if config.method in CALIBRATED:
        sig = sigma.float()
        sig = sig + config.damping * torch.diagonal(sig).mean().clamp_min(1e-12) * torch.eye(inn)
    if config.method == "gptq":  # baseline: error feedback onto the uniform grid, no codebook learning
        codes, s_map, o_map = gptq_codes(w_s, sig, centers[row_book], s_map, o_map, block, who)
    elif config.method == "jlcm":
        # second init: k-means weighted by the input second moments diag(Σ); start from the better of the two
        hdiag = torch.diagonal(sig).reshape(1, inn // d, d)
        hw = hdiag if pw is None else hdiag * pw
        alt = kmeans_codebooks(points, row_book, books, k, config.kmeans_iters, config.seed, hw).half().float()
        alt_codes = nearest(points, alt[row_book], hw)
        if output_loss(w_s, sig, alt, alt_codes, s_map, o_map, row_book) < output_loss(
                w_s, sig, centers, codes, s_map, o_map, row_book):
            centers, codes = alt, alt_codes
        stats = {"rounds": 0}
        for r in range(1 + config.error_feedback):
            if r:  # error feedback onto the current codebooks (GPTQ-style), kept only if it lowers the loss
                fb_codes, fb_s, fb_o = gptq_codes(w_s, sig, centers[row_book], s_map, o_map, block, who)
                if output_loss(w_s, sig, centers, fb_codes, fb_s, fb_o, row_book) >= output_loss(
                        w_s, sig, centers, codes, s_map, o_map, row_book):
                    break
                codes, s_map, o_map, stats["rounds"] = fb_codes, fb_s, fb_o, r
            centers, codes, s_map, o_map, fit = joint_optimize(w_s, sig, centers, codes, s_map, o_map, row_book,
                                                               config.steps, config.mapping_update, block)
            stats = {**fit, "loss_init": stats.get("loss_init", fit["loss_init"]), "rounds": stats["rounds"]}
        centers = centers.half().float()
    if block and config.method in CALIBRATED:
        scales, offsets = s_map[:, ::block // d].contiguous(), o_map[:, ::block // d].contiguous()
    layer = CodebookLinear.from_codes(codes, perm, centers, scales, None if bias is None else bias.detach(),
                                      lay["bits"], offsets=offsets, n_groups=groups)
    layer.compute_dtype_anchor = torch.empty(0, dtype=weight.dtype)  # the replaced weight's (a bf16/fp16 model)
    return layer, stats


_PRECOMPUTED: dict[str, torch.Tensor] = {}


@contextmanager
def reuse_covariances(covariances: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, ``prepare`` takes each target's ``XᵀX/n [in, in]`` from ``covariances`` (module name → tensor,
    e.g. from :func:`hf_compress.calibration.input_covariances` on the dense model) instead of a calibration pass:
    sweeps over bit widths then calibrate once."""
    _PRECOMPUTED.update(covariances)
    try:
        yield
    finally:
        _PRECOMPUTED.clear()


def prepare_jlcm(model: nn.Module, targets: dict[str, CodebookConfig], calibration: Any) -> dict[str, Any]:
    """One calibration pass of the dense model: ``XᵀX/n`` (float32 ``[in, in]``) of every JLCM target's input; for a
    token table with a tied output head, that head's input (the final hidden states), when calibration is given."""
    calibrated = [n for n, c in targets.items() if c.method in CALIBRATED]
    tables = {n: tied_head_name(model, model.get_submodule(n)) for n in calibrated
              if isinstance(model.get_submodule(n), nn.Embedding)}
    names = [n for n in calibrated if n not in tables]
    heads = [h for h in tables.values() if h is not None] if calibration else []
    reuse = {} if any(c.sequential for c in targets.values()) else _PRECOMPUTED  # dense statistics would be stale
    todo = [n for n in [*names, *heads] if n not in reuse]
    if todo and not calibration:  # heads are only asked for with calibration
        raise CalibrationRequiredError("hf_compress: CodebookConfig(method='jlcm' or 'gptq') needs calibration "
                                       "batches: compress(model, config, calibration=[...]); or use method='kmeans' "
                                       "/ 'rtn'.")
    found = {**reuse, **(input_covariances(model, todo, calibration) if todo else {})}
    state = {n: found[n].float() for n in names}
    state.update({t: found[h].float() for t, h in tables.items() if h in heads})
    return state


def compress_jlcm(module: nn.Module, config: CodebookConfig, ctx: CompressionContext) -> nn.Module:
    if isinstance(module, nn.Embedding):
        from .jlcm_embedding import compress_codebook_embedding

        return compress_codebook_embedding(module, config, ctx)
    weight, bias = linear_weight_and_bias(module, ctx.name)
    layer, stats = codebook_from_dense(weight, bias, config, ctx.state, who=ctx.name)
    if bias is not None:
        layer.bias.data = bias.detach().clone()
    layer.fit_stats = stats
    return layer


def mark_codebooks_trainable(model: nn.Module, scales: bool = True, norms: bool = True,
                             biases: bool = True, master_dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Freeze everything but codebooks (+ scales/offsets, LayerNorm/RMSNorm weights, biases); indices are buffers
    and stay fixed. On a ``PeftModel`` (call it after ``get_peft_model``, which freezes the base model), PEFT's
    adapter weights and ``modules_to_save`` copies keep their ``requires_grad``, so codebooks and adapters train
    together. The fp16 codebooks/scales/offsets are cast to ``master_dtype`` (fp32 master weights: Adam on fp16
    parameters underflows its second moment and turns them into NaN); call :func:`freeze_codebooks` after training
    to return them to fp16 storage. Returns the trainable parameter names (adapters not included)."""
    names = []
    peft_owned = _peft_owned_parameters(model)
    for name, p in model.named_parameters():
        if id(p) in peft_owned:
            continue  # an adapter, or a modules_to_save copy or original: left as PEFT set it
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        keep = leaf == "codebooks" or (scales and leaf in ("scales", "offsets") and isinstance(owner, CodebookLinear))
        keep |= norms and "norm" in type(owner).__name__.lower()
        keep |= biases and leaf == "bias"
        p.requires_grad_(keep)
        if keep:
            names.append(name)
            if master_dtype is not None and leaf in CodebookLinear.STORAGE and isinstance(owner, CodebookLinear):
                p.data = p.data.to(master_dtype)
    return names


def _peft_owned_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter PEFT manages in ``model``: its tuner layers' adapter weights (``lora_A`` ...) and
    its ``modules_to_save`` wrappers' copies and originals (the modules PEFT names in ``adapter_layer_names``)."""
    owned: set[int] = set()
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", None)
        if isinstance(names, tuple) and (hasattr(module, "get_base_layer") or hasattr(module, "original_module")):
            for attr in (*names, "original_module"):
                sub = getattr(module, attr, None)
                if isinstance(sub, nn.Module):
                    owned.update(id(p) for p in sub.parameters())
    return owned


def freeze_codebooks(model: nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """After fine-tuning: every CodebookLinear's codebooks/scales/offsets back to ``dtype`` storage (fp16, what
    :func:`layer_bits` counts), ``requires_grad`` off, their gradients and the decode caches dropped. Returns the
    layers touched."""
    n = 0
    for m in model.modules():
        if isinstance(m, CodebookLinear):
            for p in m.storage():
                p.data = p.data.to(dtype)
                p.requires_grad_(False)
                p.grad = None  # (an fp32 grad on fp16 storage made a later model.to(dtype) fail)
            m.storage_dtype = dtype
            m.clear_cache()
            n += 1
    return n


register_method("jlcm", CodebookConfig, compress_jlcm, prepare=prepare_jlcm)
