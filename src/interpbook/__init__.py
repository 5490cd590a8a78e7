"""interpbook: helpers for the executable textbook *Interpretability of Large Language Models*.

The chapters call a small, tested API::

    import interpbook as ib
    model = ib.load_model()                      # SmolLM2-135M-Instruct, offline
    run = model.run("The Eiffel Tower is in the city of", cache="resid_post")
    run.cache["resid_post", 12]                  # [batch, pos, d_model]
"""

from .anatomy import SITES, Anatomy, anatomy_for
from . import patching
from .lenses import answer_rank, direct_logit_attribution, final_norm_scale, logit_lens, top_tokens
from .lm import Model, Run
from .models import describe_models, load_model
from .records import record
from .tracing import ActivationCache, Edit, StopForward, Trace, ablate, edit, patch, steer

__all__ = [
    "SITES", "Anatomy", "anatomy_for", "logit_lens", "answer_rank", "top_tokens", "direct_logit_attribution",
    "final_norm_scale", "patching", "Model", "Run",
    "describe_models", "load_model", "record", "ActivationCache", "Edit", "StopForward", "Trace",
    "ablate", "edit", "patch", "steer",
]
__version__ = "0.1.0"
