"""benchmarks/gpu/profile_step.py: kernel names sorted into families, and one real profiled step of a
tiny model on the CPU (the GPU run is in docs/journal/gpu-sessions.md)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from paths import REPO

spec = importlib.util.spec_from_file_location("profile_step", REPO / "benchmarks" / "gpu" / "profile_step.py")
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


@pytest.mark.parametrize("name, family", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
    ("triton_tem_fused_mm_3", "GEMM"),
    ("aten::addmm", "GEMM"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm/elementwise"),
    ("_rms_norm_forward_kernel", "norm/elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "norm/elementwise"),
    ("void at::native::cunn_SoftMaxForward<4, float, float, float, at::native::LogSoftMaxForwardEpilogue>",
     "cross-entropy/softmax"),
    ("triton_per_fused__log_softmax_backward_data_nll_loss_backward_0", "cross-entropy/softmax"),
    ("aten::logsumexp", "cross-entropy/softmax"),
    ("void at::native::_fused_adamw_kernel_cuda_impl<float>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "memcpy"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_families(name, family):
    assert profile_step.kernel_family(name) == family


def test_family_table_sums_and_ranks():
    rows = [("aten::mm", 3000.0, 4), ("aten::mul", 1000.0, 10), ("mystery", 500.0, 1), ("aten::mm_2", 0.0, 0)]
    table = profile_step.family_table(rows, top=2)
    assert "| GEMM | 3.00 | 66.7% | 4 |" in table
    assert "| norm/elementwise | 1.00 | 22.2% | 10 |" in table
    assert "| other | 0.50 | 11.1% | 1 |" in table and "| total | 4.50 | 100.0% | 15 |" in table
    top = table.split("Top 2 by time:")[1]
    assert top.index("aten::mm") < top.index("aten::mul") and "mystery" not in top


def test_profiles_one_step_of_a_tiny_model_on_the_cpu(tmp_path):
    for part in ("config", "models/tiny_llama"):
        shutil.copytree(REPO / part, tmp_path / part)
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(REPO / "benchmarks" / "gpu" / "profile_step.py"), "config/config.yaml",
            "--micro-batch", "2", "--warmup", "1", "--device", "cpu", "--top", "5",
            "--set", "models=[tiny_llama]", "--set", "batch={micro_batch: 2, global_batch: 2, seq_length: 32, "
            "steps: 3, warmup_steps: 1, learning_rate: 1.0e-3}", "--set", "embedded.fused_ce=chunked",
            "--set", "tracks.model_parallel={enabled: false}", "--set", "tracks.data_parallel.gpus=[1]"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert "run embedded_gpus1_mbs2_gbs2_seq32" in out and "fused_ce=chunked" in out
    assert "step 1:" in out and "step 2:" in out
    for family in profile_step.FAMILY_ORDER:
        assert f"| {family} |" in out
    gemm = next(line for line in out.splitlines() if line.startswith("| GEMM |"))
    assert float(gemm.split("|")[2].replace(",", "")) > 0  # the matrix products were seen
    assert "Top 5 by time:" in out
