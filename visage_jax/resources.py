"""Data shipped inside the package (visage_jax/data/), found through importlib.resources so a
clone, an editable install and a wheel all run without any file outside the package.

AdvBench (Zou et al. 2023, MIT) is the paper's prompt set; XSTest (Röttger et al. 2024, CC-BY-4.0)
measures over-refusal; the benign and borderline instructions and the aligned SmolLM2 LoRA were
made for this project (MIT). Licences and citations: visage_jax/data/LICENSE.md.
"""

import importlib.resources

ADVBENCH = "advbench_harmful_behaviors.csv"   # 520 rows, columns goal,target
XSTEST = "xstest_prompts.csv"                 # 450 rows (250 safe), columns id,prompt,type,label,focus,note
BENIGN_INSTRUCTIONS = "benign_instructions.jsonl"
BORDERLINE_INSTRUCTIONS = "borderline_instructions.jsonl"   # safe but sounds unsafe; fields prompt,type
ALIGNED_SMOLLM2_LORA = "aligned_smollm2_lora.safetensors"
ALIGNED_SMOLLM2_LORA_V1 = "aligned_smollm2_lora_v1.safetensors"   # configs/align_smollm2.py:v1 (skittish)
FILES = (ADVBENCH, XSTEST, BENIGN_INSTRUCTIONS, BORDERLINE_INSTRUCTIONS, ALIGNED_SMOLLM2_LORA,
         ALIGNED_SMOLLM2_LORA_V1, "LICENSE.md")


def path(name: str) -> str:
  """Filesystem path of a packaged data file (packages install unzipped, so it is a real file)."""
  return str(importlib.resources.files("visage_jax").joinpath("data", name))


def or_packaged(given: str, name: str) -> str:
  """`given`, or the packaged file when it is empty: configs leave data paths empty by default so
  a run's identity does not depend on where the package is installed."""
  return given or path(name)
