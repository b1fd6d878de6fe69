"""Pods: LLaMA-2-70B on every pod of pods.PODS fits each chip (weights and direction by hand) and
is predicted in the time step_roofline gives for its batch, chunks and mesh; the plan command."""

import math

from absl.testing import absltest, parameterized

import fixtures
from visage_jax import planner, pods

P, NEW, POINTS, PROMPTS = 256, 512, 21, 80   # the paper's 1D protocol, plan's default prompt bound
# LLaMA-2-70B: every split below divides for model axes up to 64 (V=32000, F=28672, 8 kv heads x 128).
N_70B, L, D = 68_976_648_192, 80, 8192
NORMS = 2 * L * D + D
KW = dict(prompt_len=P, max_new_tokens=NEW, n_points=POINTS, n_prompts=PROMPTS)


def plan_70b(pod: str) -> dict:
  return pods.plan_pod(planner.known_model("llama2_70b"), pods.PODS[pod], **KW)


class PodTest(parameterized.TestCase):

  def test_chips_per_slice(self):
    """v4 and v5p names count TensorCores (2 per chip), v5e names count chips."""
    self.assertEqual({k: (p.devices, p.hosts) for k, p in pods.PODS.items()},
                     {"v4-32": (16, 4), "v5p-16": (8, 2), "v5e-64": (64, 16), "8xh100": (8, 1),
                      "8xh200": (8, 1)})

  @parameterized.named_parameters(*[(k, k) for k in pods.PODS])
  def test_mesh_fits_every_chip(self, name):
    pod, r, cfg = pods.PODS[name], plan_70b(name), planner.known_model("llama2_70b")
    data, m = r["mesh"]
    self.assertTrue(r["fits"])
    self.assertEqual(data * m, pod.devices)
    weights = 2 * ((N_70B - NORMS) // m + NORMS)          # bfloat16, norms whole on every chip
    self.assertEqual((r["params_bytes"], r["directions_bytes"]), (weights, weights))
    hbm = planner.ACCELERATORS[pod.accelerator].memory_bytes
    buffer = weights if r["mode"] == "materialized" else 0
    self.assertEqual(r["fixed_bytes"], 2 * weights + buffer)
    self.assertGreater(r["slots_per_device"], 0)
    self.assertLessEqual(r["fixed_bytes"] + r["slots_per_device"] * r["slot_bytes"], hbm)
    self.assertGreaterEqual(m, planner.min_model_shards(cfg, hbm, prompt_len=P, max_new_tokens=NEW))
    self.assertFalse(planner.plan(cfg, hbm, (pod.devices, 1), prompt_len=P, max_new_tokens=NEW)["fits"],
                     "70B must not fit one chip")

  @parameterized.named_parameters(*[(k, k) for k in pods.PODS])
  def test_prediction_is_the_roofline_of_its_chunks(self, name):
    pod, r, cfg = pods.PODS[name], plan_70b(name), planner.known_model("llama2_70b")
    data, m = r["mesh"]
    batch, hbm = r["global_batch"], planner.ACCELERATORS[pod.accelerator].memory_bytes
    fused = planner.plan(cfg, hbm, (data, m), prompt_len=P, max_new_tokens=NEW)
    auto, _ = planner.choose_mode(cfg, n_prompts=PROMPTS, n_directions=1, batch=fused["global_batch"],
                                  device=pods.device(pod))
    mat = planner.plan(cfg, hbm, (data, m), prompt_len=P, max_new_tokens=NEW, mode="materialized")
    self.assertEqual(r["mode"], "continuous" if auto == "materialized" and not mat["fits"] else auto)
    self.assertEqual(batch, (mat if r["mode"] == "materialized" else fused)["global_batch"])
    if r["mode"] == "materialized":
      rows, chunks = min(batch, PROMPTS), POINTS * math.ceil(PROMPTS / min(batch, PROMPTS))
    else:
      rows, chunks = batch, math.ceil(POINTS * PROMPTS / batch)
    roof = planner.step_roofline(cfg, mode=r["mode"], batch=math.ceil(rows / data), cache_len=P + NEW // 2,
                                 device=pods.device(pod))
    flops, bw = planner.device_peaks(pods.device(pod))
    kv = roof["kv_cache_bytes"] / (m if 8 % m == 0 else 1)   # 8 kv heads split over m only if it divides
    step = max((roof["weight_bytes"] / m + kv) / bw, roof["flops_per_step"] / m / flops)
    self.assertEqual(r["chunks"], chunks)
    self.assertAlmostEqual(r["seconds_per_step"], step, delta=1e-12)
    self.assertAlmostEqual(r["seconds"], step * chunks * NEW, delta=1e-9)

  @parameterized.named_parameters(*[(k, k) for k in pods.PODS])
  def test_chosen_mesh_is_the_fastest_that_fits(self, name):
    pod, r, cfg = pods.PODS[name], plan_70b(name), planner.known_model("llama2_70b")
    options = [pods.plan_on_mesh(cfg, pod, (pod.devices // m, m), **KW) for m in (1, 2, 4, 8, 16, 32, 64)
               if m <= pod.devices]
    times = [o["seconds"] for o in options if o["fits"]]
    self.assertLessEqual(r["seconds"], min(times) / (1 - pods.SAME))
    self.assertIn(r["seconds"], times)

  def test_unknown_peaks_predict_nothing(self):
    cfg = planner.known_model("llama2_70b")
    got = pods.predict_seconds(cfg, (1, 8), 64, mode="continuous", n_points=POINTS, n_prompts=PROMPTS,
                               prompt_len=P, max_new_tokens=NEW,
                               device=pods.device(pods.Pod("x", "h100", 8, 1, "NVIDIA XYZ")))
    self.assertEqual((got["seconds"], got["bound"], got["chunks"]), (None, "unknown", 27))

  def test_plan_command_prints_every_pod(self):
    proc = fixtures.cli("plan", "--model=llama2_70b")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    for key, pod in pods.PODS.items():
      [row] = [l for l in proc.stdout.splitlines() if l.startswith(f"| LLaMA-2-70B on {pod.name} ")]
      cells = [c.strip() for c in row.strip("|").split("|")]
      r = plan_70b(key)
      self.assertEqual(cells[2:], ["x".join(map(str, r["mesh"])),
                                   f"{(r['params_bytes'] + r['directions_bytes']) / 2**30:.2f}",
                                   cells[4], str(r["slots_per_device"]), str(r["global_batch"]), r["mode"],
                                   str(r["chunks"]), f"{r['seconds_per_step'] * 1e3:.1f}",
                                   f"{r['seconds'] / 60:.1f} min ({r['bound']}-bound)"])
    self.assertIn("21 points x 80 prompts x 512 tokens", proc.stdout)


if __name__ == "__main__":
  absltest.main()
