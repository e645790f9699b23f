"""MetaTuner: prompt and parameter co-optimization (ICLR 2026).

    metatuner train method=metatuner_j                 # joint objective (default)
    metatuner train method=metatuner_i                 # alternate the two terms (train.alternate_steps)
    metatuner train method=metatuner_gumbel            # Gumbel-softmax prompt path instead of regularization
    ablations: train.param_decoder=false (w/o F), train.prompt_rewrite=false (w/o P),
               generator.share_encoder=false (w/o S), generator.share_ratio=k/K

Read in this order:
- `system.py`   G split at depth k (generator.py), F (hypernet.py), the actor with per-query LoRA
                (lora.py), and the two losses of a step;
- `rollouts.py` prompts from phi_p' / phi_p and D2 (each query's best prompt by the actor);
- `gumbel.py`   the Gumbel-softmax task loss (metatuner_gumbel);
- `warmup.py`   actor warm-up (LoRA SFT with p~, cached by its settings) and generator warm-up;
- `loop.py`     the joint phase on accelerate, one optimizer step at a time, checkpoints, exact resume;
- `recipe.py`   prepare -> joint phase -> final/ -> test evaluation (`run`);
- `inference.py` load a finished run, answer queries, export a query's LoRA as a PEFT adapter.

Budget: train.max_steps counts every optimizer step on the actor side: warmup.max_steps actor
warm-up steps, then train.max_steps - warmup.max_steps joint steps.
"""

from .gumbel import gumbel_task_loss
from .inference import answer, evaluate_system, export_query_adapter, load_system
from .loop import JointLoop, Runner
from .recipe import METHODS, prepare, run, train, write_final
from .rollouts import d2_rollout, sample_prompts, score_candidates, test_prompts
from .system import MetaTunerSystem

__all__ = ["METHODS", "JointLoop", "MetaTunerSystem", "Runner", "answer", "d2_rollout", "evaluate_system",
           "export_query_adapter", "gumbel_task_loss", "load_system", "prepare", "run", "sample_prompts",
           "score_candidates", "test_prompts", "train", "write_final"]
