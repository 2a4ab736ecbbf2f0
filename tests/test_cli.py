"""The ``hf-compress`` command line, run as a user would (subprocess), failures included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from conftest import ARCHS, tiny_model

from hf_compress import cli
from hf_compress.planning import model_bytes

LLAMA = ARCHS[0]


def _run(*args: str, without_benchmarks: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process; ``without_benchmarks``: as installed from PyPI (the repository's ``benchmarks``
    package cannot be imported; this tree's ``hf_compress`` still is)."""
    hide = "import sys; sys.modules['benchmarks'] = None; " if without_benchmarks else "import sys; "
    code = hide + "from hf_compress.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dense")
    tiny_model(LLAMA).save_pretrained(path)
    return path


def test_help_lists_commands_and_examples() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for word in ("compress", "eval", "card", "push", "examples:"):
        assert word in proc.stdout


def test_compress_with_method_flags_then_card(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run("compress", str(dense), "--method", "low_rank", "--rank-ratio", "0.5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "saved CompressedLlamaForCausalLM" in proc.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.config.compression_config["layers"]) == 8
    (out / "README.md").unlink()
    proc = _run("card", str(out), "--repo-id", "me/tiny")
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text()
    assert "me/tiny" in card and "low_rank" in card and "trust_remote_code=True" in card


def test_compress_with_config_file(dense: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "modules": {"mlp.down_proj": {"type": "low_rank", "rank": 4}}}))
    proc = _run("compress", str(dense), "--config", str(plan), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert set(model.config.compression_config["layers"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "low_rank", "--rank", "0"], "LowRankConfig.rank must be a positive int"),
        (["--method", "nope", "--rank", "2"], "unknown compression method 'nope'"),
        (["--config", "/does/not/exist.json"], "does not exist"),
        ([], "give a plan"),
        (["--method", "low_rank", "--rank", "2", "--budget", "0.5"], "give one plan, not --method and --budget"),
        (["--method", "low_rank", "--rank", "2", "--pattern", "nomatch"], "the plan compressed no module"),
        (["--method", "low_rank", "--rank", "2", "--param", "method=\"whitened\""],
         "With the CLI: pass --calib-text FILE"),
    ],
)
def test_compress_failures_exit_nonzero_with_message(dense: Path, tmp_path: Path, args: list[str],
                                                     message: str) -> None:
    proc = _run("compress", str(dense), "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "hf-compress: error:" in proc.stderr


def test_window_counts_must_be_positive(dense: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args in (["compress", str(dense), "--budget", "0.5", "--seq-len", "0", "--out", str(tmp_path)],
                 ["sweep", str(dense), "--patterns", "q_proj", "--ratios", "0.5", "--budget", "0.9", "--n-batches",
                  "0", "--out", str(tmp_path / "p.json")]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        assert exit_info.value.code == 2 and "must be a positive integer, got 0" in capsys.readouterr().err


def test_compress_reads_the_plan_of_a_plan_out_file(dense: Path, tmp_path: Path) -> None:
    """``--budget --plan-out`` and ``sweep --table`` files hold the plan under "config", beside the table."""
    plan = {"version": 1, "modules": {"mlp.down_proj": {"type": "low_rank", "rank": 4}}}
    (tmp_path / "plan_out.json").write_text(json.dumps({"budget": {"size": 0.5}, "table": [], "config": plan}))
    assert cli.main(["compress", str(dense), "--config", str(tmp_path / "plan_out.json"), "--out",
                     str(tmp_path / "o")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert set(model.config.compression_config["layers"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}


def test_sweep_refuses_a_quality_ratio_on_output_error_and_an_unreachable_budget(dense: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "plan.json")
    assert cli.main(["sweep", str(dense), "--patterns", "q_proj", "--ratios", "0.5", "--quality-budget", "1.5",
                     "--out", out]) == 2
    assert "dense model's output error is 0" in capsys.readouterr().err
    assert cli.main(["sweep", str(dense), "--patterns", "q_proj", "--ratios", "0.5", "--budget", "0.2",
                     "--out", out]) == 2
    assert "out of reach" in capsys.readouterr().err and not Path(out).exists()


def test_card_and_push_reject_non_compressed_folders(dense: Path, tmp_path: Path) -> None:
    proc = _run("card", str(dense))
    assert proc.returncode == 2 and "not an hf_compress checkpoint" in proc.stderr
    proc = _run("push", str(tmp_path), "me/x")
    assert proc.returncode == 2 and "no config.json" in proc.stderr


def test_push_uploads_folder(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(["compress", str(dense), "--method", "low_rank", "--rank", "4", "--out", str(out)]) == 0
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="url") as upload:
        assert cli.main(["push", str(out), "me/tiny"]) == 0
    assert upload.call_args.kwargs["folder_path"] == str(out)
    assert upload.call_args.kwargs["repo_id"] == "me/tiny"
    card = (out / "README.md").read_text()  # the generated card, rewritten for the repo pushed to
    assert 'from_pretrained("me/tiny"' in card and "path/to/this/model" not in card
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/tiny")) as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", return_value="url"):
        assert cli.main(["push", str(out), "me/tiny"]) == 0
        assert cli.main(["push", str(out), "me/tiny", "--private"]) == 0
    # private=False would override an organisation's private-by-default setting: leave it to the Hub
    assert [c.kwargs["private"] for c in create.call_args_list] == [None, True]


def test_eval_perplexity_on_a_text_file(dense: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 25)  # 50 tokens: one window (the window is clamped to the 64 positions)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)} | {"hello": 5, "world": 6}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(dense)
    proc = _run("eval", str(dense), "--metric", "ppl", "--text", str(text), without_benchmarks=True)
    assert proc.returncode == 0, proc.stderr
    ppl = float(next(line for line in proc.stdout.splitlines() if line.startswith("ppl:")).split()[1])
    ids = PreTrainedTokenizerFast.from_pretrained(dense)(text.read_text(), return_tensors="pt").input_ids
    with torch.no_grad():  # one window: exp of the model's own mean next-token loss
        reference = float(torch.exp(transformers.AutoModelForCausalLM.from_pretrained(dense)(ids, labels=ids).loss))
    assert ppl == pytest.approx(reference, rel=1e-3)
    text.write_text("hello world " * 50)  # 100 tokens > 64 positions: two windows, no position error
    proc = _run("eval", str(dense), "--metric", "ppl", "--text", str(text), without_benchmarks=True)
    assert proc.returncode == 0 and "window: 64" in proc.stdout, proc.stderr
    proc = _run("eval", str(dense), "--metric", "ppl", without_benchmarks=True)  # the benchmark text: a clone
    assert proc.returncode == 2 and "or pass --metric ppl --text FILE" in proc.stderr


def test_compress_with_budget_low_rank_only(dense: Path, tmp_path: Path) -> None:
    proc = _run("compress", str(dense), "--budget", "0.8", "--methods", "low_rank", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model_bytes(again) <= 0.8 * model_bytes(tiny_model(LLAMA))
    plan = json.loads((tmp_path / "out" / "config.json").read_text())["compression_config"]
    assert {m["method"] for m in plan["modules"].values()} == {"whitened"}
    assert "<==" in proc.stdout and "dense:" in proc.stdout  # the explained table


def test_compress_with_budget_mixes_methods_when_one_cannot_reach_it(dense: Path, tmp_path: Path) -> None:
    # on this tiny model low-rank alone (linears) and TT alone (embedding) keep > 0.5 of the bytes: 0.5 needs both
    out, table = tmp_path / "out", tmp_path / "plan.json"
    proc = _run("compress", str(dense), "--budget", "0.5", "--methods", "low_rank", "tt_embedding", "--out", str(out),
                "--plan-out", str(table))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model_bytes(again) <= 0.5 * model_bytes(tiny_model(LLAMA))
    plan = json.loads((out / "config.json").read_text())["compression_config"]
    assert {m["type"] for m in plan["modules"].values()} == {"low_rank", "tt_embedding"}
    doc = json.loads(table.read_text())
    assert doc["methods"] == ["low_rank", "tt_embedding"] and doc["result"]["bytes_ratio"] <= 0.5
    assert "tt_embedding:adaptive" in proc.stdout and "low_rank:whitened:0.5" in proc.stdout
    inputs = LLAMA.inputs()
    with torch.no_grad():
        assert torch.isfinite(again(**inputs).logits).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "0.02", "--methods", "low_rank"], "out of reach"),
        (["--budget", "0.5", "--methods", "nope"], "unknown method(s) ['nope']"),
        (["--budget", "0.5", "--calib-text", "/does/not/exist.txt"], "does not exist"),
    ],
)
def test_compress_with_budget_failures(dense: Path, tmp_path: Path, args: list[str], message: str) -> None:
    proc = _run("compress", str(dense), "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "hf-compress: error:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_compress_with_budget_out_of_range_fails(dense: Path, tmp_path: Path) -> None:
    proc = _run("compress", str(dense), "--budget", "1.5", "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "--budget must be a fraction" in proc.stderr


def test_compress_keeps_a_half_precision_checkpoint_half(tmp_path: Path) -> None:
    """By default compression runs in fp32 and the output is saved in the checkpoint's dtype: a bf16 model saved
    as fp32 was larger than its dense input. An explicit --dtype is used throughout."""
    tiny_model(LLAMA).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    args = ["compress", str(tmp_path / "bf16"), "--method", "low_rank", "--pattern", r"self_attn\.(q|o)_proj$",
            "--rank-ratio", "0.5"]
    assert cli.main([*args, "--out", str(tmp_path / "default")]) == 0
    assert cli.main([*args, "--dtype", "float32", "--out", str(tmp_path / "fp32")]) == 0
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("bf16", "default", "fp32")}
    assert size["default"] < size["bf16"] < size["fp32"]
    default = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "default")
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    assert default.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    a, b = default.state_dict(), fp32.state_dict()  # the same fp32 factors, rounded once to bf16
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def _word_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def test_inputs_the_command_cannot_use_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder without tokenizer files (transformers 5 builds an empty tokenizer from it: 'the text has 0 tokens'),
    windows longer than the position table (IndexError), options the chosen plan ignores, perplexity of a model
    without an LM head (AttributeError)."""
    m, out, text = tmp_path / "m", tmp_path / "out", tmp_path / "t.txt"
    tiny_model(LLAMA).save_pretrained(m)
    text.write_text("w1 w2 w3 " * 200)
    low_rank = ["compress", str(m), "--method", "low_rank", "--rank-ratio", "0.5"]
    failures = [
        ([*low_rank, "--param", "method=whitened", "--calib-text", str(text), "--out", str(out)],
         r"--calib-text needs a tokenizer in .*m, which has no tokenizer files"),
        (["compress", str(m), "--config", str(text), "--rank", "2", "--out", str(out)],
         r"--rank set\(s\) the --method plan; with --config it would be ignored"),
        ([*low_rank, "--plan-out", str(tmp_path / "p.json"), "--out", str(out)],
         r"--plan-out only work\(s\) with --budget"),
    ]
    for args, message in failures:
        assert cli.main(args) == 2
        assert re.search(message, capsys.readouterr().err)
    assert cli.main([*low_rank, "--out", str(out)]) == 0
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()  # none to copy
    _word_tokenizer(m)  # Llama (rotary) runs windows past max_position_embeddings: allowed
    args = [*low_rank, "--param", "method=whitened", "--calib-text", str(text), "--seq-len", "128", "--out", str(out)]
    assert cli.main(args) == 0 and (out / "tokenizer.json").exists()
    gpt2 = tmp_path / "gpt2"  # a learned position table (64 rows) is not: each command's windows are checked
    tiny_model(next(a for a in ARCHS if a.name == "gpt2")).save_pretrained(gpt2)
    _word_tokenizer(gpt2)
    for cmd in (["compress", str(gpt2), "--method", "low_rank", "--pattern", r"attn\.c_proj$", "--rank-ratio", "0.5",
                 "--param", "method=whitened", "--calib-text", str(text), "--out", str(out)],
                ["compress", str(gpt2), "--budget", "0.8", "--n-batches", "2", "--out", str(out)],
                ["sweep", str(gpt2), "--patterns", r"attn\.c_proj$", "--ratios", "0.5", "--budget", "0.95",
                 "--n-batches", "2", "--out", str(tmp_path / "plan.json")]):
        assert cli.main([*cmd, "--seq-len", "128"]) == 2, cmd
        err = capsys.readouterr().err
        assert "--seq-len 128 is longer than CompressedGPT2LMHeadModel's 64 learned positions" in err
    bert = tmp_path / "bert"
    tiny_model(next(a for a in ARCHS if a.name == "bert")).save_pretrained(bert)
    assert cli.main(["eval", str(bert), "--metric", "ppl", "--text", str(text)]) == 2
    assert "--metric ppl scores a causal language model" in capsys.readouterr().err
