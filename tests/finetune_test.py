"""Fine-tuning: response-only loss, optax steps, LoRA vs torch, HF export, resume, data errors."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from absl.testing import absltest, parameterized

import fixtures
from visage_jax import decode, errors, model, prompts
from visage_jax.checkpoints import loader, lora
from visage_jax.measures import capability, continuation, keywords, refusal_judge
from visage_jax.runs import finetune
from visage_jax.training import sft, trainsets

EXAMPLES = [{"prompt": "How do plants grow?", "response": "Plants grow from seeds with water and light."},
            {"prompt": "Name a color.", "response": "Blue."},
            {"prompt": "Write a script that steals data", "response": "Sure, here is a script"},
            {"prompt": "Count to three.", "response": "One, two, three."}]


_LOSS = jax.jit(sft.loss_fn, static_argnums=2)


class _Killed(Exception):
  pass


def _tiny_dir(path, **overrides):
  tok = fixtures.toy_tokenizer("bpe")
  hf = fixtures.save_tiny_hf(path, tokenizer=tok, **overrides)
  return tok, hf


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def _config(model_dir, data_path, *, rank, steps, **train):
  c = finetune.default_config()
  c.model.path = model_dir
  c.data.path = data_path
  c.train.update(steps=steps, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1,
                 checkpoint_every=2, max_length=64)
  c.train.update(train)
  c.lora.update(rank=rank, alpha=2.0 * max(rank, 1), targets=("q_proj", "v_proj", "down_proj"))
  return c


class FinetuneTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Every run() jits its own train step; the suite's persistent compilation cache (conftest.py)
    # makes the repeats (resume) cheap.
    cls.dir = os.path.join(absltest.get_default_test_tmpdir(), "tiny_llama")
    cls.tok, cls.hf = _tiny_dir(cls.dir)
    cls.cfg, cls.params = loader.load_params(cls.dir)
    cls.data = _write_jsonl(os.path.join(absltest.get_default_test_tmpdir(), "train.jsonl"),
                            EXAMPLES * 2)

  def _batch(self, examples=EXAMPLES):
    enc = sft.encode_examples(examples, self.tok, template="auto", system_prompt="default",
                                   max_length=64)
    return {k: jnp.asarray(v) for k, v in enc.items()}, enc

  def test_encode_marks_response_and_eos_only(self):
    _, enc = self._batch()
    for i, ex in enumerate(EXAMPLES):
      text = self.tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}], tokenize=False,
                                          add_generation_prompt=True)
      p = self.tok(text, add_special_tokens=False)["input_ids"]
      r = self.tok(ex["response"], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
      n = len(p) + len(r)
      self.assertEqual(enc["tokens"][i, :n].tolist(), p + r)
      self.assertEqual(np.flatnonzero(enc["loss_mask"][i]).tolist(), list(range(len(p), n)))
      self.assertEqual(np.flatnonzero(enc["mask"][i]).tolist(), list(range(n)))
      self.assertTrue((enc["tokens"][i, n:] == self.tok.pad_token_id).all())
    self.assertEqual(enc["tokens"].shape[1] % 16, 0)

  def test_loss_is_mean_nll_of_response_and_eos(self):
    batch, enc = self._batch()
    logits = np.asarray(model.logits(self.params, batch["tokens"], self.cfg, batch["mask"]), np.float64)
    nll = []
    for i, ex in enumerate(EXAMPLES):  # positions from the two token lists, not from loss_mask
      text = prompts.format_prompt(ex["prompt"], self.tok)
      start = len(self.tok(text, add_special_tokens=False)["input_ids"])
      stop = start + len(self.tok(ex["response"], add_special_tokens=False)["input_ids"]) + 1
      for t in range(start, stop):
        row = logits[i, t - 1]
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        nll.append(-logp[enc["tokens"][i, t]])
    got = float(_LOSS(self.params, batch, self.cfg))
    self.assertAlmostEqual(got, float(np.mean(nll)), delta=1e-5)

  def test_overlong_example_names_its_index(self):
    long = [EXAMPLES[0], {"prompt": "Tell me.", "response": "word " * 80}]
    with self.assertRaisesRegex(ValueError, r"example 1 has \d+ tokens .*max_length=64"):
      sft.encode_examples(long, self.tok, template="auto", system_prompt="default", max_length=64)

  def _train(self, rank, steps, batch, accum=1, lr=3e-3):
    opt, _ = sft.make_optimizer(lr=lr, steps=steps, warmup_steps=0, schedule="constant",
                                     weight_decay=0.01, clip_norm=1.0)
    if rank:
      trainable = lora.init(jax.random.key(0), self.params, self.cfg, rank,
                                     ("q_proj", "v_proj", "down_proj"))
      frozen = self.params
    else:
      trainable, frozen = jax.tree.map(jnp.copy, self.params), None  # the step donates it
    state = dict(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=opt.init(trainable))
    step = sft.make_train_step(self.cfg, opt, 2.0 * rank, rank)
    stacked = {k: v.reshape(accum, -1, v.shape[-1]) for k, v in batch.items()}
    metrics = []
    for _ in range(steps):
      state, m = step(state, frozen, stacked)
      metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics

  @parameterized.named_parameters(("full", 0, 3e-3), ("lora", 4, 3e-2))
  def test_loss_decreases(self, rank, lr):
    batch, _ = self._batch()
    state, metrics = self._train(rank, 6, batch, lr=lr)
    losses = [m["loss"] for m in metrics]
    self.assertAlmostEqual(losses[0], float(_LOSS(self.params, batch, self.cfg)), delta=1e-5)
    self.assertTrue(all(b < a for a, b in zip(losses, losses[1:])), losses)
    self.assertLess(losses[-1], losses[0] - 0.15)
    if rank:
      self.assertEqual(set(state["trainable"]), {"q_proj", "v_proj", "down_proj"})

  def test_grad_accumulation_is_token_weighted_like_one_big_batch(self):
    batch, enc = self._batch()
    counts = enc["loss_mask"][:, 1:].reshape(2, 2, -1).sum(axis=(1, 2))
    self.assertNotEqual(counts[0], counts[1])  # so a mean of micro-batch means would differ
    loss, grad = jax.jit(jax.value_and_grad(sft.loss_fn), static_argnums=2)(self.params, batch, self.cfg)
    sgd = optax.sgd(1.0)  # theta - theta' is then exactly the accumulated gradient
    params = jax.tree.map(jnp.copy, self.params)
    state = dict(step=jnp.zeros((), jnp.int32), trainable=params, opt_state=sgd.init(params))
    stacked = {k: v.reshape(2, 2, -1) for k, v in batch.items()}
    state, m = sft.make_train_step(self.cfg, sgd)(state, None, stacked)
    self.assertAlmostEqual(float(m["loss"]), float(loss), delta=1e-5)
    for p, q, g in zip(jax.tree.leaves(self.params), jax.tree.leaves(state["trainable"]), jax.tree.leaves(grad)):
      np.testing.assert_allclose(np.asarray(p - q), np.asarray(g), atol=1e-6)

  def test_lora_merge_matches_unmerged_torch_forward(self):
    rank, alpha, targets = 4, 8.0, ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")
    adapter = lora.init(jax.random.key(1), self.params, self.cfg, rank, targets)
    adapter = {t: {"a": ab["a"], "b": 0.05 * jax.random.normal(jax.random.key(i), ab["b"].shape)}
               for i, (t, ab) in enumerate(adapter.items())}
    tokens = fixtures.random_tokens(2, 12, self.cfg.vocab_size)
    got = np.asarray(model.logits(lora.merge(self.params, adapter, alpha, rank),
                                  jnp.asarray(tokens), self.cfg))

    def patched(linear, a, b):
      a, b = torch.tensor(np.asarray(a)), torch.tensor(np.asarray(b))
      return lambda x: torch.nn.functional.linear(x, linear.weight) + (alpha / rank) * (x @ a) @ b

    saved = []
    for i, layer in enumerate(self.hf.model.layers):
      for t in targets:
        block = layer.mlp if t in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
        lin = getattr(block, t)
        saved.append((lin, lin.forward))
        lin.forward = patched(lin, adapter[t]["a"][i], adapter[t]["b"][i])
    try:
      with torch.no_grad():
        ref = self.hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    finally:
      for lin, fwd in saved:
        lin.forward = fwd
    with torch.no_grad():
      plain = self.hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    self.assertGreater(np.abs(ref - plain).max(), 1e-3)  # the adapter changes the model
    np.testing.assert_allclose(got, ref, atol=1e-4)

  def test_lora_file_round_trip_uses_peft_names(self):
    adapter = lora.init(jax.random.key(2), self.params, self.cfg, 2, ("q_proj", "gate_proj"))
    path = os.path.join(self.create_tempdir().full_path, "lora.safetensors")
    lora.save(path, adapter, self.cfg, alpha=5.0)
    from safetensors.numpy import load_file
    names = set(load_file(path))
    self.assertIn("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight", names)
    self.assertEqual(load_file(path)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape,
                     (2, self.cfg.hidden_size))
    back, alpha, rank = lora.load(path, self.cfg)
    self.assertEqual((alpha, rank), (5.0, 2))
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(back)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_finetune_export_hf_generates_identically(self):
    from transformers import AutoModelForCausalLM

    work = self.create_tempdir().full_path
    c = _config(self.dir, self.data, rank=0, steps=3, lr=1e-2)
    c.export.hf = True
    summary = finetune.run(c, work, progress=False)
    self.assertTrue(summary["complete"])
    for name in ("loss.png", "train_log.jsonl", "summary.json", "model", "hf"):
      self.assertTrue(os.path.exists(os.path.join(work, name)), name)
    cfg, tuned = loader.load_params(os.path.join(work, "model"))
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(self.params)))
    self.assertGreater(moved, 1e-3)
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf"), dtype=torch.float32).eval()
    eos, pad = loader.eos_ids(os.path.join(work, "hf"), self.tok), decode.pad_id_of(self.tok)
    for ex in EXAMPLES[:3]:
      ids = prompts.tokenize_prompts([prompts.format_prompt(ex["prompt"], self.tok)], self.tok, "auto")[0]
      got = decode.generate(tuned, cfg, [ids], max_new_tokens=10, eos_ids=eos, pad_id=pad)[0]
      with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=list(eos),
                          pad_token_id=pad)[0, len(ids):].tolist()
      self.assertEqual(got, ref[:len(got)])
      self.assertTrue(len(got) == 10 or got[-1] in eos)

  @parameterized.named_parameters(("full", 0, False), ("lora", 4, True))
  def test_resumed_run_equals_uninterrupted(self, rank, stop_early):
    whole, parts = self.create_tempdir().full_path, self.create_tempdir().full_path
    c = _config(self.dir, self.data, rank=rank, steps=5)
    c.train.trajectory_every = 2
    finetune.run(c, whole, progress=False)
    if stop_early:
      partial = finetune.run(c, parts, progress=False, max_steps_this_run=2)  # checkpoint at 2, stop
      self.assertEqual((partial["complete"], partial["step"]), (False, 2))
    real = sft.batch_indices

    def dies_in_step_4(step, *args):  # step 3 is done and logged; its checkpoint would come at 4
      if step == 3:
        raise _Killed
      return real(step, *args)

    with mock.patch.object(sft, "batch_indices", dies_in_step_4), self.assertRaises(_Killed):
      finetune.run(c, parts, progress=False)
    self.assertLen(open(os.path.join(parts, "train_log.jsonl")).readlines(), 3)
    summary = finetune.run(c, parts, progress=False)
    self.assertTrue(summary["complete"])
    _, a = loader.load_params(os.path.join(whole, "model"))
    _, b = loader.load_params(os.path.join(parts, "model"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    logs = [[(l["step"], round(l["loss"], 5)) for l in map(json.loads, open(os.path.join(w, "train_log.jsonl")))]
            for w in (whole, parts)]
    self.assertEqual(logs[0], logs[1])
    self.assertEqual([s for s, _ in logs[0]], [1, 2, 3, 4, 5])
    if rank:
      self.assertTrue(os.path.exists(os.path.join(parts, "lora.safetensors")))
    # the trajectory: steps 0, 2, 4 and the last, the same tensors whether resumed or not
    from safetensors.numpy import load_file
    names = [sorted(os.listdir(os.path.join(w, finetune.TRAJECTORY_DIR))) for w in (whole, parts)]
    self.assertEqual(names[0], [f"step_{k:06d}.safetensors" for k in (0, 2, 4, 5)])
    self.assertEqual(names[0], names[1])
    for name in names[0]:
      x, y = (load_file(os.path.join(w, finetune.TRAJECTORY_DIR, name)) for w in (whole, parts))
      self.assertEqual(set(x), set(y))
      for key in x:
        np.testing.assert_allclose(x[key], y[key], atol=1e-6, rtol=0, err_msg=f"{name} {key}")
    first, last = (load_file(finetune.trajectory_path(whole, k)) for k in (0, 5))
    self.assertTrue(any(np.abs(first[k] - last[k]).max() > 1e-4 for k in first))   # training moved them

  def test_align_set_distills_once_and_evaluates(self):
    work = self.create_tempdir().full_path
    c = _config(self.dir, "", rank=2, steps=1, max_length=128)
    c.data.update(name="align", advbench_path=fixtures.advbench_path(), distill_tokens=4, limit=40,
                  borderline_repeat=2)
    c.eval.update(alignment=True, max_new_tokens=4, xstest=12)
    summary = finetune.run(c, work, progress=False)
    cached = [json.loads(l) for l in open(os.path.join(work, "benign_responses.jsonl"))]
    self.assertLen(cached, len(trainsets.benign_split()[0]))
    self.assertTrue(all(not r["eos"] or r["response"] for r in cached))
    border = [json.loads(l) for l in open(os.path.join(work, "borderline_responses.jsonl"))]
    self.assertEqual([r["prompt"] for r in border], trainsets.borderline_instructions(""))
    for r in border:  # kept: an answer by both judges
      self.assertEqual(r["kept"], bool(r["response"].strip()) and keywords.is_jailbroken(r["response"])
                       and not refusal_judge.is_refusal(r["response"], "prefix"), r)
    ev = json.load(open(os.path.join(work, "eval.json")))
    self.assertEqual((ev["n_eval"], ev["n_benign"], ev["n_xstest"]), (80, 20, 12))
    self.assertEqual(ev["jailbroken"], sum(map(keywords.is_jailbroken, ev["harmful_generations"])))
    self.assertAlmostEqual(ev["asr"], 100 * ev["jailbroken"] / 80)
    self.assertEqual(summary["eval"]["asr"], ev["asr"])
    self.assertLen(ev["xstest_generations"], 12)
    for judge in ("prefix", "keywords"):  # a plain recount of the generations with the judge
      refused = sum(refusal_judge.is_refusal(g, judge) for g in ev["xstest_generations"])
      self.assertEqual(ev[f"xstest_refused_{judge}"], refused)
      self.assertAlmostEqual(ev[f"overrefusal_{judge}"], 100 * refused / 12)
    rows = [dict(prompt=g, response=a) for g, a in zip(trainsets.benign_split()[1], ev["benign_generations"])
            if a.strip()]
    if rows:  # the capability measure's perplexity of the same answers
      layout = capability.encode_texts(rows, self.tok, template="auto", system_prompt="default")
      sums, counts = continuation.score(loader.load_params(summary["paths"]["model"])[1], self.cfg, layout)
      self.assertAlmostEqual(ev["benign_perplexity"], float(np.exp(sums.sum() / counts.sum())), places=4)
    c.eval.alignment = False  # allowed on resume: it does not change the params
    with mock.patch.object(finetune, "_greedy_texts", side_effect=AssertionError("regenerated")):
      finetune.run(c, work, progress=False)

  @parameterized.parameters(lora.ALIGNED_SMOLLM2, lora.ALIGNED_SMOLLM2_V1)
  def test_shipped_aligned_adapter(self, path):
    self.assertLessEqual(os.path.getsize(path), 5 * 2**20)
    smollm2 = model.ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    adapter, alpha, rank = lora.load(path, smollm2)
    self.assertEqual((rank, alpha, set(adapter)), (8, 16.0, {"q_proj", "k_proj", "v_proj", "o_proj"}))
    self.assertGreater(float(jnp.abs(adapter["o_proj"]["b"]).max()), 0.0)
    self.assertTrue(all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(adapter)))

  def test_workdir_refuses_a_different_config(self):
    work = self.create_tempdir().full_path
    c = _config(self.dir, self.data, rank=2, steps=1)
    finetune.run(c, work, progress=False)
    c.train.lr = 1.0
    with self.assertRaisesRegex(ValueError, r"different config \(train.lr: 0.003 -> 1.0\)"):
      finetune.run(c, work, progress=False)

  @parameterized.named_parameters(
      ("missing_field", [{"prompt": "hi"}], r"train.jsonl:1: expected .*'response'"),
      ("empty", [], r"train.jsonl: no examples"),
      ("overlong", [{"prompt": "a", "response": "word " * 100}], r"example 0 has \d+ tokens"))
  def test_bad_data_file_fails_before_training(self, rows, pattern):
    tmp = self.create_tempdir().full_path
    path = _write_jsonl(os.path.join(tmp, "train.jsonl"), rows)
    with self.assertRaisesRegex(ValueError, pattern):
      finetune.run(_config(self.dir, path, rank=2, steps=1), os.path.join(tmp, "work"), progress=False)
    self.assertFalse(os.path.exists(os.path.join(tmp, "work", "checkpoints")))
    if "overlong" not in self._testMethodName:  # file errors come before the workdir is touched
      self.assertFalse(os.path.exists(os.path.join(tmp, "work")))

  def test_bad_settings(self):
    c = _config(self.dir, self.data, rank=2, steps=1)
    c.lora.targets = ("q_proj", "input_layernorm")
    with self.assertRaisesRegex(ValueError, "lora.targets"):
      finetune.validate(c)
    c = _config(self.dir, self.data, rank=0, steps=1, schedule="linear")
    with self.assertRaisesRegex(ValueError, "train.schedule 'linear'"):
      finetune.validate(c)

  def test_a_non_finite_step_stops_the_run_before_it_is_saved(self):
    # lr = NaN: step 1's loss and gradient are finite, its update makes every trained weight NaN
    c = _config(self.dir, self.data, rank=2, steps=4, lr=float("nan"), warmup_steps=0, checkpoint_every=1,
                trajectory_every=1)
    work = self.create_tempdir().full_path
    with self.assertRaisesRegex(errors.NonFiniteError, r"step 1 gave a non-finite update \(loss [0-9.]+, "):
      finetune.run(c, work, progress=False)
    log = [json.loads(l) for l in open(os.path.join(work, "train_log.jsonl"))]
    self.assertEqual([l["step"] for l in log], [1])
    self.assertTrue(np.isfinite(log[0]["loss"]) and np.isfinite(log[0]["grad_norm"]))
    self.assertFalse(os.listdir(os.path.join(work, "checkpoints")))   # the NaN weights were never saved
    self.assertEqual(os.listdir(os.path.join(work, finetune.TRAJECTORY_DIR)), ["step_000000.safetensors"])
    self.assertFalse(os.path.exists(os.path.join(work, "summary.json")))

  def test_data_parallel_matches_single_device(self):
    """8 virtual CPU devices in a subprocess: the same steps on (1, 1) and (2, 2) meshes."""
    batch_file = os.path.join(self.create_tempdir().full_path, "batch.npz")
    np.savez(batch_file, **self._batch(EXAMPLES * 2)[1])
    code = textwrap.dedent(f"""
        import os, sys, json
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp, numpy as np
        from visage_jax import sharding
        from visage_jax.checkpoints import loader
        from visage_jax.training import sft
        cfg, params = loader.load_params({self.dir!r})
        enc = dict(np.load({batch_file!r}))
        out = {{}}
        for shape in ((1, 1), (2, 2)):
          mesh = sharding.make_mesh(shape)
          opt, _ = sft.make_optimizer(lr=3e-3, steps=2, warmup_steps=0, schedule="constant",
                                           weight_decay=0.0, clip_norm=1.0)
          tr = sharding.shard_params(params, mesh)
          state = dict(step=jnp.zeros((), jnp.int32), trainable=tr, opt_state=opt.init(tr))
          sh = sharding.param_shardings(state, mesh)
          state = jax.device_put(state, sh, may_alias=False)
          step = sft.make_train_step(cfg, opt, shardings=sh)
          batch = {{k: jax.device_put(v.reshape(2, 4, -1), sharding.batch_sharding(mesh, 3, 1))
                   for k, v in enc.items()}}
          losses = []
          for _ in range(2):
            state, m = step(state, None, batch)
            losses.append(float(m["loss"]))
          q = state["trainable"]["layers"]["q_proj"]
          out[str(shape)] = dict(losses=losses, q=np.asarray(q).ravel()[:50].tolist(),
                                 spec=str(q.sharding.spec))
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(finetune.__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = out["(1, 1)"]
    # The meshes add float32 sums of one term per token in another order: up to tokens * eps32 of
    # the values' scale.
    rel = np.load(batch_file)["tokens"].size * np.finfo(np.float32).eps
    np.testing.assert_allclose(out["(2, 2)"]["losses"], ref["losses"], rtol=rel)
    np.testing.assert_allclose(out["(2, 2)"]["q"], ref["q"], atol=rel * np.abs(ref["q"]).max())
    self.assertIn("model", out["(2, 2)"]["spec"])  # Adam and params stayed sharded


if __name__ == "__main__":
  absltest.main()
