"""Engine: fused x.W + c x.D equals materialized theta + c d; vmap over directions; chunking."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import decode, engine, model, planner, prompts
from visage_jax.directions import vectors


def _setup(tied=False, seed=0, layers=2):
  cfg = model.ModelConfig.tiny(tie_word_embeddings=tied, num_layers=layers)
  params = model.init(jax.random.key(seed), cfg)
  d1 = vectors.random_direction(1, params, cfg, blacklist=())  # norms perturbed too
  d2 = vectors.random_direction(2, params, cfg)
  return cfg, params, d1, d2


class FusedMatchesMaterializedTest(parameterized.TestCase):

  @parameterized.named_parameters(("untied", False), ("tied", True))
  def test_logits(self, tied):
    cfg, params, d1, d2 = _setup(tied)
    comps = vectors.stack([d1, d2])                       # C = 2
    coef = jnp.array([[0.0, 0.0], [0.3, -0.2], [-0.5, 0.5]])  # one grid point per row
    tokens = jnp.asarray(fixtures.random_tokens(3, 7, cfg.vocab_size))
    fused = model.logits(params, tokens, cfg, dirs=comps, coef=coef)
    for b in range(3):
      theta = jax.tree.map(lambda p, a, c: p + coef[b, 0] * a + coef[b, 1] * c, params, d1, d2)
      ref = model.logits(theta, tokens[b:b + 1], cfg)
      np.testing.assert_allclose(fused[b:b + 1], ref, atol=2e-5, rtol=1e-5)

  def test_greedy_tokens_agree_between_modes(self):
    cfg, params, d1, d2 = _setup(layers=2)
    dirs = vectors.stack([vectors.stack([d1]), vectors.stack([d2])])   # R = 2, C = 1
    coefs = np.linspace(-0.5, 0.5, 5)[:, None]
    tokens = fixtures.random_tokens(3, 6, cfg.vocab_size, seed=4)
    mask = np.ones_like(tokens, bool)
    spec = decode.DecodeSpec(max_new_tokens=12, eos_ids=(-1,), pad_id=0, stop_at_refusal=False)
    got = {}
    for mode in planner.MODES:
      out = np.zeros((2, 5, 3, 12), np.int32)
      work = engine.Workload(params, cfg, dirs, coefs, tokens, mask, None, spec, points=list(range(5)))
      for ch in engine.evaluate(work, mode=mode, max_batch=4):
        for ri, r in enumerate(ch.directions):
          out[r, ch.points, ch.prompts] = ch.tokens[ri]
      got[mode] = out
    agree = np.mean(got["fused"] == got["materialized"])
    self.assertGreaterEqual(agree, 0.99)
    # And both equal a plain decode of the explicitly perturbed model.
    theta = jax.tree.map(lambda p, d: p + 0.25 * d, params, d2)
    ref = decode.generate(theta, cfg, [list(t) for t in tokens], max_new_tokens=12, eos_ids=(-1,), pad_id=0,
                          batch_bucket=False)
    np.testing.assert_array_equal(got["materialized"][1, 3], np.array(ref))

  def test_shared_prefix_gives_the_same_tokens_in_every_mode(self):
    cfg, params, d1, _ = _setup(layers=2)
    dirs = vectors.stack([vectors.stack([d1])])
    coefs = np.linspace(-0.5, 0.5, 3)[:, None]
    head = [int(t) for t in fixtures.random_tokens(1, 10, cfg.vocab_size, seed=7)[0]]
    rows = [head + [5, 6], head + [8], head + [1, 2, 3, 4]]
    packed, pmask, shared = prompts.pack(rows, pad_id=0)
    plain, mask = prompts.left_pad(rows, 16, 0)
    spec = decode.DecodeSpec(max_new_tokens=10, eos_ids=(-1,), pad_id=0)

    def run(mode, tokens, m, spec):
      out = np.zeros((3, 3, 10), np.int32)
      work = engine.Workload(params, cfg, dirs, coefs, tokens, m, None, spec, points=[0, 1, 2])
      for ch in engine.evaluate(work, mode=mode, max_batch=4):
        out[ch.points, ch.prompts] = ch.tokens[0]
      return out

    shared_spec = dataclasses.replace(spec, shared_prefix=shared)
    for mode in planner.MODES:  # materialized shares the prefill; fused and continuous only the layout
      np.testing.assert_array_equal(run(mode, packed, pmask, shared_spec), run(mode, plain, mask, spec),
                                    err_msg=mode)

  def test_materialized_batches_hold_one_points_prompts_without_padding(self):
    cfg, params, d1, _ = _setup(layers=1)
    dirs = vectors.stack([vectors.stack([d1])])
    tokens = fixtures.random_tokens(3, 5, cfg.vocab_size, seed=2)
    spec = decode.DecodeSpec(max_new_tokens=3, eos_ids=(-1,), pad_id=0)
    rows = []
    real = decode.greedy
    def spy(buffer, tok, *a, **k):
      rows.append(tok.shape[0])
      return real(buffer, tok, *a, **k)
    with absltest.mock.patch.object(decode, "greedy", spy):
      work = engine.Workload(params, cfg, dirs, np.zeros((2, 1)), tokens, np.ones_like(tokens, bool), None,
                             spec, points=[0, 1])
      chunks = list(engine.evaluate(work, mode="materialized", max_batch=64))
    self.assertEqual(rows, [3, 3])  # max_batch 64, but a batch never exceeds one point's 3 prompts
    self.assertEqual([len(c.prompts) for c in chunks], [3, 3])

  def test_continuous_batching_matches_static_batches(self):
    """Rows end at different times (EOS); refilled slots must give each row its static-batch tokens."""
    cfg, params, d1, _ = _setup(layers=1)
    dirs = vectors.stack([vectors.stack([d1])])
    coefs = np.linspace(-0.5, 0.5, 4)[:, None]
    tokens = fixtures.random_tokens(5, 6, cfg.vocab_size, seed=8)
    mask = np.ones_like(tokens, bool)
    probe = decode.DecodeSpec(max_new_tokens=10, eos_ids=(-1,), pad_id=0)
    probe_work = engine.Workload(params, cfg, dirs, coefs, tokens, mask, None, probe, points=[0])
    [free] = list(engine.evaluate(probe_work, max_batch=8))
    eos = int(free.tokens[0, 0, 2])  # ends some rows early, others run to the budget
    spec = decode.DecodeSpec(max_new_tokens=10, eos_ids=(eos,), pad_id=0)
    got = {}
    for mode in ("fused", "continuous"):
      out = {}
      work = engine.Workload(params, cfg, dirs, coefs, tokens, mask, None, spec, points=[0, 1, 2, 3])
      for ch in engine.evaluate(work, mode=mode, max_batch=4, refill_every=3):
        for b in range(len(ch.points)):
          key = (int(ch.points[b]), int(ch.prompts[b]))
          self.assertNotIn(key, out)
          out[key] = ch.tokens[0, b, :ch.length[0, b]].tolist()
      got[mode] = out
    self.assertLen(got["continuous"], 20)
    self.assertEqual(got["continuous"], got["fused"])
    self.assertGreater(len({len(v) for v in got["fused"].values()}), 1)

  def test_every_row_is_delivered_once(self):
    cfg, params, d1, _ = _setup(layers=1)
    dirs = vectors.stack([vectors.stack([d1])])
    tokens = fixtures.random_tokens(5, 4, cfg.vocab_size)
    spec = decode.DecodeSpec(max_new_tokens=2, eos_ids=(-1,), pad_id=0)
    seen = []
    work = engine.Workload(params, cfg, dirs, np.zeros((4, 1)), tokens, np.ones_like(tokens, bool), None,
                           spec, points=[1, 3])
    for ch in engine.evaluate(work, max_batch=3):
      seen += list(zip(ch.points.tolist(), ch.prompts.tolist()))
    self.assertCountEqual(seen, [(p, q) for p in (1, 3) for q in range(5)])

  def test_unknown_mode(self):
    cfg, params, d1, _ = _setup(layers=1)
    with self.assertRaisesRegex(ValueError, "engine.mode 'lazy'"):
      next(engine.evaluate(engine.Workload(params, cfg, vectors.stack([vectors.stack([d1])]),
                                           np.zeros((1, 1)), np.ones((1, 2), np.int32), np.ones((1, 2), bool),
                                           None, decode.DecodeSpec(2, (-1,), 0), points=[0]), mode="lazy"))

  def test_nonfinite_logits_are_flagged_not_fatal(self):
    cfg, params, d1, _ = _setup(layers=1)
    dirs = vectors.stack([vectors.stack([d1])])
    coefs = np.array([[0.0], [1e39]])  # overflows float32: inf weights
    tokens = fixtures.random_tokens(2, 4, cfg.vocab_size)
    spec = decode.DecodeSpec(max_new_tokens=3, eos_ids=(-1,), pad_id=0)
    work = engine.Workload(params, cfg, dirs, coefs, tokens, np.ones_like(tokens, bool), None, spec,
                           points=[0, 1])
    [ch] = list(engine.evaluate(work, max_batch=4))
    np.testing.assert_array_equal(ch.nonfinite[0], ch.points == 1)


if __name__ == "__main__":
  absltest.main()
