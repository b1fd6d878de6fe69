"""Planner: LLaMA-2-7B on an H100 against a hand computation; choose_batch uses the same model; the
cost model (choose_mode, step_roofline) against the roofline by hand; the CLI."""

import types

import jax
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import decode, engine, model, planner
from visage_jax.checkpoints import loader

P, NEW = 256, 512   # padded prompt, max_new_tokens (the paper's 512)

# LLaMA-2-7B by hand: V=32000, D=4096, F=11008, L=32, 32 heads of 128, no GQA, untied head.
V, D, F, L, N, H = 32000, 4096, 11008, 32, 32, 128
N_PARAMS = 2 * V * D + L * (4 * D * D + 3 * D * F + 2 * D) + D
NORMS = 2 * L * D + D   # the only leaves PARAM_RULES leave whole
CPU = types.SimpleNamespace(platform="cpu", device_kind="cpu")
H100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
H100_FLOPS, H100_BW = 9.89e14, 3.35e12


def llama2_7b_by_hand(model_shards: int) -> dict:
  """bfloat16, fused, one direction; every split divides for model_shards in (1, 8)."""
  m = model_shards
  params = 2 * ((N_PARAMS - NORMS) // m + NORMS)
  kv = 2 * L * (P + NEW) * N * H * 2 // m
  act = P * 4 * D * 4 + P * 2 * F * 4 // m + V * 8 // m + N * P * (P + NEW) * 4 // m
  free = 80 * 10**9 - 2 * params          # params + one direction
  return dict(params_bytes=params, directions_bytes=params, kv_bytes_per_slot=kv,
              activation_bytes_per_slot=act, slot_bytes=kv + act,
              slots_per_device=int(0.7 * free) // (kv + act))


def run_cli(*args, check=True):
  proc = fixtures.cli(*args)
  if check and proc.returncode != 0:
    raise AssertionError(f"visage-jax {args} failed:\n{proc.stderr[-3000:]}")
  return proc


class PlannerTest(parameterized.TestCase):

  def test_published_parameter_counts(self):
    self.assertEqual(N_PARAMS, 6_738_415_616)
    published = {"llama2_7b": 6_738_415_616, "vicuna_7b": 6_738_415_616, "llama2_13b": 13_015_864_320,
                 "llama2_70b": 68_976_648_192, "llama3_8b": 8_030_261_248, "mistral_7b": 7_241_732_096}
    for name, n in published.items():
      self.assertEqual(planner.param_count(planner.known_model(name)), n, name)

  @parameterized.named_parameters(("1x1", (1, 1), 79), ("1x8", (1, 8), 733), ("2x8", (2, 8), 733))
  def test_llama2_7b_on_h100_matches_hand_computation(self, mesh, slots):
    got = planner.plan(planner.known_model("llama2_7b", "bfloat16"), planner.ACCELERATORS["h100"].memory_bytes,
                       mesh, prompt_len=P, max_new_tokens=NEW)
    want = llama2_7b_by_hand(mesh[1])
    self.assertEqual({k: got[k] for k in want}, want)
    self.assertEqual(got["slots_per_device"], slots)   # the hand computation's value, written out
    self.assertEqual(got["global_batch"], slots * mesh[0])
    if mesh == (1, 1):
      self.assertEqual(got["params_bytes"], 13_476_831_232)           # 6.74e9 params x 2 bytes
      self.assertEqual(got["kv_bytes_per_slot"], 2 * 32 * (P + 512) * 32 * 128 * 2)

  def test_modes_and_directions(self):
    cfg, mem = planner.known_model("llama2_7b"), 80 * 10**9
    one = planner.plan(cfg, mem, prompt_len=P, max_new_tokens=NEW)
    fused = planner.plan(cfg, mem, prompt_len=P, max_new_tokens=NEW, n_directions=3, n_components=2)
    self.assertEqual(fused["directions_bytes"], 6 * one["params_bytes"])
    self.assertEqual(fused["slot_bytes"], 3 * one["slot_bytes"])        # R KV caches per fused row
    self.assertFalse(fused["fits"])                                      # 7 copies of 13.5 GB
    mat = planner.plan(cfg, mem, prompt_len=P, max_new_tokens=NEW, n_directions=3, mode="materialized")
    self.assertEqual(mat["buffer_bytes"], one["params_bytes"])
    self.assertEqual(mat["fixed_bytes"], 5 * one["params_bytes"])
    self.assertEqual(mat["slot_bytes"], one["slot_bytes"])

  def test_splits_follow_the_sharding_rules(self):
    big = planner.known_model("llama2_70b")   # 8 kv heads: split over 8, not over 16
    self.assertEqual(planner.kv_bytes_per_slot(big, 100, 8), planner.kv_bytes_per_slot(big, 100, 1) // 8)
    self.assertEqual(planner.kv_bytes_per_slot(big, 100, 16), planner.kv_bytes_per_slot(big, 100, 1))
    tiny = model.ModelConfig.tiny()   # V=128, D=64, F=128, 4x16 heads, 2x16 kv heads, 2 layers
    self.assertEqual(planner.params_per_device(tiny, 3), planner.param_count(tiny))  # nothing divides
    norms = 2 * 2 * 64 + 64
    self.assertEqual(planner.params_per_device(tiny, 2), (planner.param_count(tiny) - norms) // 2 + norms)
    self.assertIsNone(planner.min_model_shards(big, 16 * 2**30, prompt_len=P, max_new_tokens=NEW, max_shards=4))
    self.assertEqual(planner.min_model_shards(big, 80 * 10**9, prompt_len=P, max_new_tokens=NEW), 4)

  def test_choose_batch_is_the_planner(self):
    """engine.choose_batch on a device with 80 GB, theta and one direction in use: the plan's batch."""
    cfg = planner.known_model("llama2_7b")
    want = llama2_7b_by_hand(1)

    class Device:
      def memory_stats(self):
        return dict(bytes_limit=80 * 10**9, bytes_in_use=2 * want["params_bytes"])

    spec = decode.DecodeSpec(max_new_tokens=NEW, eos_ids=(2,), pad_id=0)
    mesh = jax.sharding.AbstractMesh((2, 1), ("data", "model"))
    got = engine.choose_batch(cfg, 10_000, P, spec, n_directions=1, mode="fused", mesh=mesh, device=Device())
    self.assertEqual(got, 2 * want["slots_per_device"])
    self.assertEqual(engine.choose_batch(cfg, 9, P, spec, n_directions=1, mode="fused", mesh=mesh,
                                         device=Device()), 8)   # whole rows per data shard
    cpu = engine.choose_batch(cfg, 10_000, P, spec, n_directions=1, mode="fused",
                              mesh=jax.sharding.AbstractMesh((1, 1), ("data", "model")), device=object())
    self.assertEqual(cpu, min(64, planner.CPU_BUDGET // want["slot_bytes"]))

  def test_auto_mode_keeps_room_for_the_materialized_buffer(self):
    """engine.choose_mode on an H100 holding theta and one direction, 80 prompts and a fused batch
    of 64 (past the crossover: the cost model picks materialized): on 80 GB, materialized with the
    rows that fit beside its theta + alpha*d buffer; with room for fused rows but not for the
    buffer, continuous and the batch kept; on CPU (no memory stats) the fused batch kept."""
    cfg, want = planner.known_model("llama2_7b"), llama2_7b_by_hand(1)
    params, slot = want["params_bytes"], want["slot_bytes"]

    def h100(limit):
      return types.SimpleNamespace(platform="gpu", device_kind=H100.device_kind,
                                   memory_stats=lambda: dict(bytes_limit=limit, bytes_in_use=2 * params))

    spec = decode.DecodeSpec(max_new_tokens=NEW, eos_ids=(2,), pad_id=0)
    mesh = jax.sharding.AbstractMesh((1, 1), ("data", "model"))
    choose = lambda device: engine.choose_mode(cfg, n_prompts=80, n_directions=1, batch=64, prompt_len=P,
                                               spec=spec, mesh=mesh, device=device)
    mode, why, batch = choose(h100(80 * 10**9))
    beside = int(0.7 * (80 * 10**9 - 3 * params)) // slot
    self.assertEqual((mode, batch), ("materialized", beside))
    self.assertLess(beside, 64, "the buffer must cost rows for this case to bite")
    self.assertStartsWith(why, "compute-bound")
    tight = h100(3 * params + slot // 2)   # free: the buffer and half a slot
    self.assertGreater(engine.choose_batch(cfg, 64, P, spec, n_directions=1, mode="fused", mesh=mesh,
                                           device=tight), 1, "fused rows fit")
    mode, why, batch = choose(tight)
    self.assertEqual((mode, batch), ("continuous", 64))
    self.assertEqual(why, planner.choose_mode(cfg, n_prompts=80, n_directions=1, batch=64, device=H100)[1]
                     + "; but materialized's theta + alpha*d buffer does not fit")
    f32 = planner.known_model("llama2_7b", "float32")
    for n_directions in (1, 2):   # the CPU budget: fused rows hold R caches, so its batch fits materialized
      fused = engine.choose_batch(f32, 10_000, P, spec, n_directions=n_directions, mode="fused", mesh=mesh,
                                  device=CPU)
      cpu = engine.choose_mode(f32, n_prompts=32, n_directions=n_directions, batch=fused, prompt_len=P,
                               spec=spec, mesh=mesh, device=CPU)
      self.assertEqual(cpu[2], fused)

  def test_local_checkpoint_shape_without_weights(self):
    d = self.create_tempdir().full_path
    fixtures.save_tiny_hf(d, "mistral", sliding_window=4)
    cfg, _ = loader.load_params(d, "bfloat16")
    self.assertEqual(loader.load_config(d, "bfloat16"), cfg)
    smol = loader.load_config(loader.default_model_path())   # GGUF metadata: SmolLM2-135M
    self.assertEqual((smol.num_layers, smol.hidden_size, smol.num_heads, smol.num_kv_heads, smol.vocab_size,
                      smol.tie_word_embeddings), (30, 576, 9, 3, 49152, True))


class CostModelTest(parameterized.TestCase):
  """choose_mode by hand: a decode step takes max(bytes / bandwidth, FLOPs / peak) over its rows."""

  def test_compute_bound_on_cpu_chooses_materialized(self):
    cfg = planner.known_model("llama2_7b", "float32")   # CPU: 100 GFLOP/s, 20 GB/s
    mode, why = planner.choose_mode(cfg, n_prompts=32, n_directions=1, batch=64, device=CPU)
    # 32 rows do 2N*32 FLOPs (4.3 s a step), longer than one read of the 4N weight bytes (1.3 s):
    # compute-bound, so a token costs its FLOPs, 2N materialized and 4N fused.
    self.assertEqual(mode, "materialized")
    self.assertEqual(why, f"compute-bound: {2 * N_PARAMS / 1e11 * 1e3:.3f} ms/token materialized (batch 32) "
                          f"<= {4 * N_PARAMS / 1e11 * 1e3:.3f} ms/token fused (batch 64)")

  def test_memory_bound_on_h100_chooses_continuous(self):
    cfg = planner.known_model("llama2_7b", "bfloat16")
    mode, why = planner.choose_mode(cfg, n_prompts=80, n_directions=1, batch=256, device=H100)
    t_mat = 2 * N_PARAMS / H100_BW / 80          # one weight read shared by one point's 80 prompts
    t_fus = 2 * 2 * N_PARAMS / H100_BW / 256     # weights + direction shared by 256 rows
    self.assertEqual(mode, "continuous")
    self.assertEqual(why, f"memory-bound: {t_fus * 1e3:.3f} ms/token fused (batch 256) < "
                          f"{t_mat * 1e3:.3f} ms/token materialized (batch 80)")

  @parameterized.named_parameters(("one_direction", 1, 32), ("three_directions", 3, 48))
  def test_crossover_when_memory_bound(self, n_directions, crossover):
    """Weights (1 + R copies fused) over the rows sharing them: materialized wins from
    n_prompts = batch * R / (1 + R) on; at the crossover both cost the same and it wins the tie."""
    self.assertEqual(crossover, 64 * n_directions // (1 + n_directions))
    cfg = planner.known_model("llama2_7b", "bfloat16")
    choose = lambda p: planner.choose_mode(cfg, n_prompts=p, n_directions=n_directions, batch=64,
                                           device=H100)[0]
    self.assertEqual(choose(crossover - 1), "continuous")
    self.assertEqual(choose(crossover), "materialized")
    self.assertEqual(choose(crossover + 1), "materialized")

  def test_materialized_that_does_not_fit_is_continuous(self):
    """The cost model's materialized pick becomes continuous when its buffer does not fit; a
    continuous pick stays as it is."""
    cfg = planner.known_model("llama2_7b", "float32")
    kw = dict(n_prompts=32, n_directions=1, batch=64, device=CPU)
    _, why = planner.choose_mode(cfg, **kw)
    self.assertEqual(planner.choose_mode(cfg, **kw, materialized_fits=False),
                     ("continuous", why + "; but materialized's theta + alpha*d buffer does not fit"))
    bf16 = planner.known_model("llama2_7b", "bfloat16")
    kw = dict(n_prompts=80, n_directions=1, batch=256, device=H100)
    self.assertEqual(planner.choose_mode(bf16, **kw, materialized_fits=False), planner.choose_mode(bf16, **kw))
    self.assertEqual(planner.choose_mode(bf16, **kw)[0], "continuous")

  def test_unknown_accelerator_is_named_not_guessed(self):
    cfg = planner.known_model("llama2_7b", "bfloat16")
    xyz = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA XYZ")
    self.assertIsNone(planner.device_peaks(xyz))
    mode, why = planner.choose_mode(cfg, n_prompts=80, n_directions=1, batch=256, device=xyz)
    self.assertEqual(mode, "continuous")   # what the model picks on every listed accelerator
    self.assertIn("unknown accelerator 'NVIDIA XYZ': no peak figures", why)
    self.assertIn("chose continuous by default", why)
    roof = planner.step_roofline(cfg, mode="materialized", batch=1, cache_len=0, device=xyz)
    self.assertEqual((roof["weight_bytes"], roof["floor_seconds_per_step"], roof["bound"]),
                     (2 * N_PARAMS, None, "unknown"))

  def test_step_roofline_by_hand(self):
    cfg = planner.known_model("llama2_7b", "bfloat16")
    roof = planner.step_roofline(cfg, mode="fused", batch=4, cache_len=100, device=H100)
    kv = 4 * 2 * L * 100 * N * H * 2
    flops = 4 * (4 * N_PARAMS + 4 * L * 100 * N * H)
    self.assertEqual((roof["weight_bytes"], roof["kv_cache_bytes"], roof["flops_per_step"]),
                     (2 * 2 * N_PARAMS, kv, flops))
    self.assertEqual(roof["bound"], "memory")
    self.assertAlmostEqual(roof["floor_seconds_per_step"], (4 * N_PARAMS + kv) / H100_BW)


class PlanCommandTest(absltest.TestCase):

  def test_paper_config_on_h100(self):
    out = run_cli("plan", "--config=configs/llama2_7b_chat.py", "--mesh=1,8", "--accelerator=h100").stdout
    [row] = [l for l in out.splitlines() if "LLaMA-2-7B" in l]
    cells = [c.strip() for c in row.strip("|").split("|")]
    want = llama2_7b_by_hand(8)
    self.assertEqual(cells[:5], ["LLaMA-2-7B", "H100 80 GB", "1x8", f"{want['params_bytes'] / 2**30:.2f}",
                                 f"{want['directions_bytes'] / 2**30:.2f}"])
    self.assertEqual(cells[5], f"{want['kv_bytes_per_slot'] / 2**30:.3f}")
    self.assertEqual(cells[7:9], [str(want["slots_per_device"]), str(want["slots_per_device"])])
    self.assertIn("bfloat16, fused", out)

  def test_all_models_and_errors(self):
    out = run_cli("plan", "--accelerator=tpu_v5e,h200").stdout
    for label, _ in planner.MODELS.values():
      self.assertEqual(sum(label in l for l in out.splitlines()), 2, label)
    self.assertIn("does not fit", out)   # 70B on one v5e
    bad = run_cli("plan", "--accelerator=tpu_v9", check=False)
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("accelerator 'tpu_v9' is not known", bad.stderr)


if __name__ == "__main__":
  absltest.main()
