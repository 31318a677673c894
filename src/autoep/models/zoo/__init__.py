"""A zoo of tiny random models, one per Mixture-of-Experts model type of the installed transformers.

It lets tests cover every MoE family transformers ships, including ones added
after this file was written:

* :func:`moe_model_types` discovers the types from transformers' own source
  (no hand-written list) in about a second, reading files instead of
  importing ~500 modeling modules. Composite types (vision-language, omni,
  speech) are listed once under their top-level type; their sub-model types
  (``qwen3_vl_moe_text``, ``qwen3_omni_moe_thinker``, ``llama4_text``...) are
  folded into it.
* :func:`tiny_config` shrinks a type's default config by attribute name
  (hidden 64, 4 layers with at least two MoE layers, 4 heads of 16, 8 experts,
  top-2, vocabulary 256...); :data:`TINY_OVERRIDES` holds the few values no
  name can tell.
* :func:`build_tiny` builds the model with deterministic random weights and
  random routers; :func:`check_tiny` / :func:`build_error` run one forward and
  backward and say, in one line, why a type cannot be built or run on CPU.
"""

from autoep.models.zoo.build import (
    ZooResult,
    build_error,
    build_tiny,
    check_tiny,
    expert_flags,
    experts_of,
    model_auto_class,
    moe_blocks,
    randomize_routers_,
    tiny_input_ids,
    tiny_loss,
)
from autoep.models.zoo.common import ZooBuildError
from autoep.models.zoo.discovery import moe_model_types, moe_type_evidence
from autoep.models.zoo.shrink import (
    EXPERTS,
    TINY_OVERRIDES,
    special_token_ids,
    text_config_of,
    tiny_config,
    vocab_size_of,
)

__all__ = [
    "EXPERTS",
    "TINY_OVERRIDES",
    "ZooBuildError",
    "ZooResult",
    "build_error",
    "build_tiny",
    "check_tiny",
    "expert_flags",
    "experts_of",
    "model_auto_class",
    "moe_blocks",
    "moe_model_types",
    "moe_type_evidence",
    "randomize_routers_",
    "special_token_ids",
    "text_config_of",
    "tiny_config",
    "tiny_input_ids",
    "tiny_loss",
    "vocab_size_of",
]
