"""Every shipped config loads with each of its documented arguments and passes validation."""

import glob
import importlib.util
import os

from absl.testing import absltest, parameterized

from visage_jax import landscape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANDSCAPE_CONFIGS = {"demo": (None, "tiny", "unaligned"), "llama2_7b_chat": (None, "2d", "interpolation"),
                     "llama3_8b_instruct": (None, "2d", "interpolation"),
                     "mistral_7b_instruct": (None, "2d", "interpolation"),
                     "vicuna_7b": (None, "2d", "interpolation")}


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


class ConfigsTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(f"{n}_{a}", n, a) for n, args in LANDSCAPE_CONFIGS.items() for a in args])
  def test_landscape_configs_validate(self, name, arg):
    c = _load(name).get_config(arg)
    if "interpolation" in c.landscape.vis_type:
      c.landscape.target_path = "/some/chat/model"
    landscape.validate(c)
    self.assertTrue(os.path.exists(c.prompts.path), c.prompts.path)
    if c.model.lora_path:
      self.assertTrue(os.path.exists(c.model.lora_path), c.model.lora_path)

  def test_paper_protocol(self):
    c = _load("llama2_7b_chat").get_config()
    self.assertEqual((c.prompts.limit, c.landscape.steps, c.landscape.multiplier, c.decode.max_new_tokens),
                     (80, 20, 1.0, 512))
    with self.assertRaisesRegex(ValueError, "unknown config argument '3d'"):
      _load("vicuna_7b").get_config("3d")

  def test_every_config_file_is_covered_or_loads(self):
    for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
      name = os.path.basename(path)[:-3]
      self.assertIsNotNone(_load(name).get_config(), name)


if __name__ == "__main__":
  absltest.main()
