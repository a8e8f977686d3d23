"""Hugging Face model folders in and out (pure PyTorch + safetensors; never imports transformers or ray).

Supported families: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM,
DeepseekV3ForCausalLM.

- ``is_hf_folder(path)``: a folder with an HF ``config.json`` (and no raymoe manifest).
- ``config_from_folder(folder)`` / ``gpt_config_from_hf(dict)``: the raymoe :class:`GPTConfig`;
  ``hf_config_from_gpt(cfg)``: the other way (``family_for(cfg)`` says which family, or why none).
- ``load_weights(model, folder)``: fill a whole model or an expert-parallel shard, tensor by tensor (a shard
  reads only its experts); ``load_hf_model(folder, device, dtype)``: build + fill.
- ``export_model(model, out)`` / ``export_checkpoint(ckpt, out)``: config.json, (sharded) safetensors,
  generation_config.json and the tokenizer files.

Bad input raises :class:`HFFormatError` (a ValueError) naming the file, the tensor or the field and what is
supported. Code shipped in a folder (``auto_map``) is never executed.
"""

from .config import (ARCHITECTURES, HFFormatError, family_for, family_of, gpt_config_from_hf, hf_config_from_gpt,
                     read_hf_config)
from .export import export_checkpoint, export_model
from .load import config_from_folder, is_hf_folder, load_hf_model, load_weights
from .names import TensorMap, weight_maps
from .safetensors_io import SafetensorsFolder

__all__ = ["ARCHITECTURES", "HFFormatError", "SafetensorsFolder", "TensorMap", "config_from_folder",
           "export_checkpoint", "export_model", "family_for", "family_of", "gpt_config_from_hf",
           "hf_config_from_gpt", "is_hf_folder", "load_hf_model", "load_weights", "read_hf_config", "weight_maps"]
