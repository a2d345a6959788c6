"""benchmarks/profile_summary.py: GPU kernels sorted into categories and summed per step (kernel names
as an H200 trace of the SD UNet step gave them, benchmarks/results/gpu.md)."""
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import profile_summary  # noqa: E402

Event = collections.namedtuple("Event", "name start_ns duration_ns")

F32_CONV = "sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize128x128x32_warpgroupsize1x1x1"
BF16_WGRAD = "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64"
ATTENTION = "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1"
MATMUL = "nvjet_sm90_tss_128x160_64x5_2x1_v_bz_NTT"


def test_categories_of_real_kernel_names():
  assert profile_summary.kernel_category(F32_CONV) == "conv f32/tf32"
  assert profile_summary.kernel_category(BF16_WGRAD) == "conv bf16"
  assert profile_summary.kernel_category(ATTENTION) == "attention"
  assert profile_summary.kernel_category("void cudnn::fusion::compute_dot_do_o<__nv_bfloat16>(...)") == "attention"
  assert profile_summary.kernel_category(MATMUL) == "other"
  assert profile_summary.kernel_category("loop_transpose_fusion_67") == "other"
  assert profile_summary.kernel_name("void cutlass::Kernel2<cutlass_80_tensorop>(Params)") == "void cutlass::Kernel2"


def test_sums_per_step_busy_and_span():
  ms = 1_000_000
  events = [Event(F32_CONV, 0, 4 * ms), Event(F32_CONV, 5 * ms, 2 * ms), Event(ATTENTION, 8 * ms, 1 * ms),
            Event(MATMUL, 10 * ms, 1 * ms)]  # two steps; a 1 ms gap and a 2 ms gap
  by_category, by_kernel, busy, span = profile_summary.summarise(events, steps=2)
  assert by_category == {"conv f32/tf32": 3.0, "attention": 0.5, "other": 0.5}
  assert by_kernel[F32_CONV] == 3.0
  assert busy == 4.0 and span == 5.5  # (4 + 2 + 1 + 1) / 2; (11 - 0) / 2


def test_torch_device_time_from_its_op_table():
  table = "...\nSelf CPU time total: 288.746ms\nSelf CUDA time total: 199.484ms\n"
  assert profile_summary.torch_device_ms(table) == 199.484
  assert profile_summary.torch_device_ms("Self Device time total: 1.5s") == 1500.0
  assert profile_summary.torch_device_ms("Self CPU time total: 288.746ms") is None  # a CPU-only run
