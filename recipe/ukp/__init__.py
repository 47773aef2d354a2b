"""Recipes under the names and signatures of the paper authors' own Sisyphus recipes (UKP Lab), so configs
written against them run here: `ukp.huggingface.{training,search,task_arithmetic}`."""
