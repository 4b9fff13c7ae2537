"""One causal LM that embeds and generates, adapted per task by TMoLE.

Modules: ``backbone`` (BackboneConfig), ``pretrained`` (load_backbone), ``formats`` (encode_* for both modes),
``tmole`` (the peft tuner), ``grm`` (GRM: embed / lm_loss / generate), ``losses`` (LossConfig, InfoNCE, generative
CE). Nothing is re-exported here so that importing ``formats`` or ``losses`` (e.g. in Ray Data workers) or a config
(a job's driver) does not import transformers.
"""
