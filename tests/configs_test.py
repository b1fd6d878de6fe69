"""Every shipped config loads with each of its documented arguments and passes validation."""

import glob
import importlib.util
import os

from absl.testing import absltest, parameterized

from visage_jax import resources
from visage_jax.checkpoints import hub
from visage_jax.experiments import findings
from visage_jax.runs import config_checks, finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's models as hub ids: (chat model, its base model for interpolation).
PAPER_MODELS = {"llama2_7b_chat": ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"),
                "llama2_13b_chat": ("meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-13b-hf"),
                "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B"),
                "mistral_7b_instruct": ("mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-v0.1"),
                "vicuna_7b": ("lmsys/vicuna-7b-v1.5", "meta-llama/Llama-2-7b-hf")}
LANDSCAPE_CONFIGS = {"demo": (None, "tiny", "unaligned"),
                     "directions": ("census", "census_overrefusal", "gradient", "refusal", "alignment"),
                     "trajectory": (None, "tiny"),
                     **{name: (None, "2d", "interpolation") for name in PAPER_MODELS}}


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


class ConfigsTest(parameterized.TestCase):

  def test_refusal_grid_has_the_ablation_and_its_opposite(self):
    """F5 reads the generations at alpha = 1 (the refusal direction projected out) and -1."""
    from visage_jax.directions import grid
    l = _load("directions").get_config("refusal").landscape
    xs, _ = grid.grid_coords(l.vis_type, l.steps, l.multiplier)
    self.assertTrue(any(abs(x - 1.0) < 1e-9 for x in xs) and any(abs(x + 1.0) < 1e-9 for x in xs), xs)

  @parameterized.named_parameters(*[(f"{n}_{a}", n, a) for n, args in LANDSCAPE_CONFIGS.items() for a in args])
  def test_landscape_configs_validate(self, name, arg):
    c = _load(name).get_config(arg)
    if "interpolation" in c.landscape.vis_type and not c.landscape.target_path:
      c.landscape.target_path = "/some/chat/model"
    config_checks.validate(c)
    prompts_path = resources.or_packaged(c.prompts.path, resources.ADVBENCH)   # "": the packaged AdvBench
    self.assertTrue(os.path.exists(prompts_path), prompts_path)
    if c.model.lora_path:
      self.assertTrue(os.path.exists(c.model.lora_path), c.model.lora_path)

  def test_paper_protocol(self):
    c = _load("llama2_7b_chat").get_config()
    self.assertEqual((c.prompts.limit, c.landscape.steps, c.landscape.multiplier, c.decode.max_new_tokens),
                     (80, 20, 1.0, 512))
    with self.assertRaisesRegex(ValueError, "unknown config argument '3d'"):
      _load("vicuna_7b").get_config("3d")

  @parameterized.named_parameters(*[(name, name, *ids) for name, ids in PAPER_MODELS.items()])
  def test_paper_configs_default_to_the_paper_models_on_the_hub(self, name, chat, base):
    mod = _load(name)
    self.assertEqual([mod.get_config(a).model.path for a in (None, "2d")], [chat, chat])
    interp = mod.get_config("interpolation")
    self.assertEqual((interp.model.path, interp.landscape.target_path), (base, chat))
    self.assertTrue(hub.looks_like_hub_id(chat) and hub.looks_like_hub_id(base))
    self.assertIn(f"--config=configs/{name}.py --workdir=", mod.__doc__)

  @parameterized.parameters(None, "tiny", "v1")
  def test_align_config_validates(self, arg):
    c = _load("align_smollm2").get_config(arg)
    finetune.validate(c)
    self.assertEqual(c.data.name, "align")
    # v1: the first recipe, no borderline instructions (aligned_smollm2_lora_v1.safetensors).
    self.assertEqual(c.data.borderline_repeat, 0 if arg == "v1" else 2)
    if arg != "tiny":
      self.assertEqual((c.train.steps, c.train.lr, c.data.distill_tokens, c.data.benign_repeat),
                       (100, 1e-3, 32, 1))
      self.assertEqual(c.eval.xstest, 250)
    with self.assertRaisesRegex(ValueError, "unknown arg 'v2'"):
      _load("align_smollm2").get_config("v2")

  @parameterized.named_parameters(("full", "finetune", 64), ("tiny", "finetune_tiny", 5))
  def test_trajectory_finetune_configs(self, arg, n_checkpoints):
    from visage_jax.runs import finetune
    c = _load("trajectory").get_config(arg)
    finetune.validate(c)
    t = c.train
    saved = {0, t.steps} | set(range(t.trajectory_every, t.steps, t.trajectory_every))
    self.assertLen(saved, n_checkpoints)
    self.assertEqual(c.model.lora_path, _load("demo").get_config().model.lora_path)   # the aligned demo model
    if arg == "finetune":   # the trajectory draws saved steps before the last: 0-7, then every 7th
      drawn = _load("trajectory").get_config().trajectory.steps
      self.assertEqual(drawn, tuple(range(8)) + (14, 21, 28, 35, 42, 49, 56))
      self.assertTrue(set(drawn) < saved and max(drawn) < t.steps)

  def test_every_config_file_is_covered_or_loads(self):
    for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
      name = os.path.basename(path)[:-3]
      self.assertIsNotNone(_load(name).get_config(), name)

  @parameterized.product(name=findings.NAMES, arg=(None, "tiny"))
  def test_experiment_configs_agree_with_all_on_what_they_share(self, name, arg):
    # Shared jobs (WORKDIR/jobs/) resume across experiments only if their numbers agree.
    c, full = _load(f"experiments/{name}").get_config(arg), _load("experiments/all").get_config(arg)
    findings.validate(c)
    self.assertEqual(c.experiment, name)
    for section in c.keys():
      if section != "experiment":
        self.assertEqual(c[section].to_dict() if hasattr(c[section], "to_dict") else c[section],
                         full[section].to_dict() if hasattr(full[section], "to_dict") else full[section],
                         section)
    self.assertIn(f"--config=configs/experiments/{name}.py --workdir=", _load(f"experiments/{name}").__doc__)

  def test_experiment_config_without_its_numbers_is_named(self):
    c = _load("experiments/f2_finetune").get_config()
    del c.f2_finetune
    with self.assertRaisesRegex(ValueError, "no f2_finetune.shots"):
      findings.validate(c)
    c = _load("experiments/f1_basin").get_config()
    c.protocol.steps = 9
    with self.assertRaisesRegex(ValueError, "protocol.steps = 9: expected an even number"):
      findings.validate(c)


if __name__ == "__main__":
  absltest.main()
