"""`bayeslora plan`: counts from the Qwen2.5-7B config on the meta device, against numbers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.plan import GB, Device, plan_suite
from benchmarks.suite import load_suite

QWEN_SUITE = Path(__file__).resolve().parents[1] / "configs" / "suites" / "commonsense-qwen2.5-7b.yaml"
H, KV, LAYERS = 3584, 512, 28  # Qwen2.5-7B: hidden 3584, 4 KV heads x 128, 28 layers


@pytest.fixture(scope="module")
def qwen_plan():
    methods = "methods=[map, laplace_lora, {name: ensemble, config: {members: 3}}, zero_shot]"
    suite = load_suite(QWEN_SUITE, ["datasets=[arc_easy]", methods, "path=null"])
    return plan_suite(suite, Device(gpu_memory_gb=80.0, cpu_memory_gb=64.0)).set_index("method")


def test_qwen_7b_parameter_counts_match_the_model_and_hand_counted_lora(qwen_plan):
    assert set(qwen_plan["base_params"]) == {7_615_616_512}  # Qwen2.5-7B's published total, 7.62B
    r = 8
    lora_qv = LAYERS * (r * (H + H) + r * (H + KV)) + r * (H + 5)  # q_proj: H -> H, v_proj: H -> 512, lm_head: K = 5
    assert qwen_plan.loc["map", "lora_params"] == lora_qv == 2_523_136 + 28_712
    assert qwen_plan.loc["map", "trainable"] == lora_qv
    assert qwen_plan.loc["ensemble", "stored"] == 2 * lora_qv  # 3 members: one training, two held
    assert qwen_plan.loc["ensemble", "predict_passes_per_example"] == 3
    assert qwen_plan.loc["zero_shot", "trainable"] == 0 and qwen_plan.loc["zero_shot", "train_gb"] == 0


def test_laplace_kfac_factors_counted_by_hand(qwen_plan):
    r = 8
    kron = lambda rows, cols: 2 * (rows**2 + cols**2)  # factors, kept twice (precision + eigendecomposition)
    per_layer = kron(r, H) + kron(H, r) + kron(r, H) + kron(KV, r)  # q: A, B; v: A, B
    stored = LAYERS * per_layer + kron(r, H) + kron(5, r)  # and the lm_head LoRA's A and B_K (K = 5, ARC-Easy)
    assert qwen_plan.loc["laplace_lora", "stored"] == stored
    # the curvature fit holds the weights, the adapter, the factors plus one more copy while summing a
    # batch's into them, and K = 5 (ARC-Easy) times the graph of one 512-token prompt through 28 layers
    # in bf16, 8 H + 4 I values per token and layer (I = 18944)
    weights, lora, graph = 7_615_616_512 * 2, 2_523_136 + 28_712, 2 * 512 * (8 * H + 4 * 18944) * LAYERS
    assert qwen_plan.loc["laplace_lora", "train_gb"] == pytest.approx(
        (weights + 4 * (lora + stored + stored // 2) + 5 * graph) / GB)
    assert qwen_plan.loc["laplace_lora", "predict_gb"] == pytest.approx(
        (weights + 4 * (lora + stored) + 5 * graph) / GB)


def test_weights_dominate_and_a_small_gpu_is_flagged(qwen_plan):
    weights_gb = 7_615_616_512 * 2 / GB  # bf16
    assert weights_gb < qwen_plan.loc["map", "train_gb"] < weights_gb + 3
    assert qwen_plan["fits"].all()
    suite = load_suite(QWEN_SUITE, ["datasets=[arc_easy]", "methods=[map]", "seeds=[0]", "path=null"])
    small = plan_suite(suite, Device(gpu_memory_gb=12.0, cpu_memory_gb=64.0))
    assert not small["fits"].any()
    four_bit = plan_suite(load_suite(QWEN_SUITE, ["datasets=[arc_easy]", "methods=[map]", "seeds=[0]",
                                                  "path=null", "model.load_in_bits=4"]), Device(12.0, 64.0))
    assert four_bit["fits"].all() and four_bit["train_gb"].iloc[0] < 7


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", str(QWEN_SUITE), "--set", "datasets=[boolq]", "--set", "methods=[polar_vbll]",
                 "--set", "path=null", "--gpu-memory", "16"]) == 2
    out = capsys.readouterr()
    assert "cannot adapt lm_head" in out.err  # the suite's LoRA adapts lm_head; PoLAR-VBLL's head is its VBLL
    assert main(["plan", str(QWEN_SUITE), "--set", "datasets=[boolq]", "--set",
                 "methods=[{name: polar_vbll, lora: {target_modules: [q_proj, v_proj]}}]",
                 "--set", "path=null", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr()
    assert "7,615,616,512" in out.out and "polar_vbll" in out.out and "NO (> 16 GB gpu)" in out.out
    assert "will not fit" in out.err
    assert main(["plan", str(QWEN_SUITE), "--set", "datasets=[boolq]", "--set", "methods=[map]",
                 "--set", "path=null"]) == 0
    assert "q_proj,v_proj,lm_head" in capsys.readouterr().out  # the published targets


def test_meta_backbone_reads_a_local_config_folder_like_the_shipped_one(tmp_path):
    from bayeslora.meta import meta_backbone, packaged_config

    (tmp_path / "config.json").write_text(packaged_config("Qwen/Qwen2.5-7B").read_text())
    local = meta_backbone(str(tmp_path))
    assert sum(p.numel() for p in local.lm.parameters()) == 7_615_616_512
    assert next(local.lm.parameters()).device.type == "meta"


def test_random_init_models_are_planned_from_their_spec():
    from bayeslora.meta import meta_backbone

    suite = load_suite(QWEN_SUITE.parent / "throughput-cpu.yaml")
    qwen = next(run.model for run in suite.runs if run.model.random_init is not None)
    backbone = meta_backbone(qwen)
    assert sum(p.numel() for p in backbone.lm.parameters()) == 494_032_768  # Qwen2.5-0.5B's published total
