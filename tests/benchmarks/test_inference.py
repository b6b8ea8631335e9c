"""``benchmarks/throughput.py --mode inference``: backbone forward images/s for ViTs and ResNets in
one run, beside the DINO paper's V100 figures (RN50 1,237 im/s, ViT-S/16 1,007: a ratio of 1.23),
in the precision the device computes natively, and written to JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import throughput
from benchmarks.end_to_end import inference
from dino_fast.models import build_backbone


def test_tiny_run_times_a_vit_and_a_resnet_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    payload = throughput.main(["--mode", "inference", "--device", "cpu", "--steps", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = [(r["arch"], r["impl"], r["status"]) for r in payload["rows"]]
    # A ViT as the paper's code builds it and as dino_fast does; a ResNet as torchvision does.
    assert rows == [
        ("vit_tiny", "official", "ok"),
        ("vit_tiny", "dino_fast", "ok"),
        ("resnet18", "torchvision", "ok"),
    ]
    for row in payload["rows"]:
        assert row["images_per_s"] == pytest.approx(4 / (row["ms_per_batch"] / 1e3)) and row["iters"] == 2
    assert payload["config"]["image_size"] == 32 and payload["config"]["batch_size_per_gpu"] == 4
    assert payload["precision"] in ("bf16", "fp32") and payload["precision_reason"]
    assert [r["denominator"] for r in payload["ratios"]] == [
        "vit_tiny/16 (official)",
        "vit_tiny/16 (dino_fast)",
    ]
    assert payload["paper_v100_images_per_s"] == {"resnet50": 1237, "vit_small/16": 1007}
    assert payload["complete"] and payload["all_ok"]


def test_table_sets_rn50_over_vit_s_beside_the_papers_1_23() -> None:
    def row(arch: str, impl: str, ips: float) -> dict:
        paper = inference.PAPER_V100_IMAGES_PER_S.get(inference.paper_key(arch, 16))
        return {
            "arch": arch,
            "impl": impl,
            "patch_size": 16,
            "status": "ok",
            "images_per_s": ips,
            "ms_per_batch": 128 / ips * 1e3,
            "paper_v100_images_per_s": paper,
            "vs_paper": ips / paper,
        }

    rows = [row("vit_small", "official", 2000.0), row("vit_small", "dino_fast", 4000.0)]
    rows.append(row("resnet50", "torchvision", 5000.0))
    ratios = inference.ratios(rows, patch_size=16)
    assert [(q["denominator"], q["measured"]) for q in ratios] == [
        ("vit_small/16 (official)", 2.5),
        ("vit_small/16 (dino_fast)", 1.25),
    ]
    assert all(q["paper_v100"] == pytest.approx(1237 / 1007) for q in ratios)
    table = inference.format_table(rows, ratios, "H200")
    assert "1,237" in table and "1,007" in table and "4.04x" in table  # 5000 / 1237
    assert "resnet50 / vit_small/16 (official): 2.50 (paper, V100: 1.23)" in table
    # The paper measured ViT-S/16: a ViT-S/8 row has no paper figure to set beside it.
    assert inference.paper_key("vit_small", 8) not in inference.PAPER_V100_IMAGES_PER_S


@pytest.mark.parametrize(
    ("native_bf16", "requested", "precision", "why"),
    [
        (True, "auto", "bf16", "natively"),
        (False, "auto", "fp32", "no bf16 instructions"),
        (False, "bf16", "bf16", "emulated"),
        (True, "fp32", "fp32", "--precision fp32"),
    ],
)
def test_cpu_precision_is_bf16_only_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, requested: str, precision: str, why: str
) -> None:
    monkeypatch.setattr(inference, "_cpu_computes_bf16", lambda: native_bf16)
    chosen, reason = inference.choose_precision(torch.device("cpu"), requested)
    assert chosen == precision and why in reason


def test_a_resnet_without_torchvision_is_skipped_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails
    args = argparse.Namespace(
        device="cpu", batch_size_per_gpu=2, image_size=32, seed=0, warmup=0, steps=1, patch_size=16
    )
    row = inference.run_row("resnet18", "torchvision", lambda: build_backbone("resnet18"), args, "fp32")
    assert row["status"] == "skipped" and "pip install torchvision" in row["reason"]
