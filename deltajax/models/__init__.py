"""Language models built from deltajax.layers: LMConfig, DeltaLM, generate, params and FLOPs."""
from deltajax.models.config import MIXERS
from deltajax.models.config import LMConfig
from deltajax.models.flops import flops_per_token
from deltajax.models.flops import num_params
from deltajax.models.generate import generate
from deltajax.models.generate import sample
from deltajax.models.lm import Block
from deltajax.models.lm import DeltaLM
from deltajax.models.lm import make_mixer

__all__ = ["MIXERS", "LMConfig", "DeltaLM", "Block", "make_mixer", "generate", "sample",
           "num_params", "flops_per_token"]
