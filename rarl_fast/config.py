"""One strict config tree for rarl-fast.

Nested ``@dataclass(kw_only=True)`` classes, a docstring per field, defaults from the method's specification
(``docs/method.md``). Each field's bounds are checked in its class's ``__post_init__`` and cross-field rules in
:class:`Config`'s, so an impossible value raises one :class:`ConfigError` naming the key. YAML files and
``key.sub=value`` overrides load into this tree through :mod:`rarl_fast.config_loader`. Code below the trainer
receives plain values, never these objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from rarl_fast.errors import UsageError

__all__ = [
    "RESUME_SAFE_KEYS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RMOConfig",
    "RewardConfig",
    "RolloutConfig",
    "SFTConfig",
    "StageConfig",
]


class ConfigError(UsageError, ValueError):
    """A config problem: ``key`` is the dotted path (empty for the file as a whole), the message says what is wrong
    and where (the file or the command-line override)."""

    def __init__(self, key: str, problem: str, source: str | None = None):
        self.key, self.problem, self.source = key, problem, source
        if key:
            where = f" ({source})" if source else ""
            super().__init__(f"config key '{key}'{where}: {problem}")
        else:
            super().__init__(f"{source or 'config'}: {problem}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix.`` put in front of its key."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.problem, self.source)


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


SEED_MAX = 2**32 - 1
"""Largest seed: numpy's legacy seeding, which SGLang applies to the run's seed, takes 32-bit seeds."""

RESUME_SAFE_KEYS = (
    "output_dir",
    "run_name",
    "cpu_threads",
    "logging",
    "checkpoint.save_every",
    "checkpoint.keep_last",
    "data.image_cache_mb",
    "rollout.eval_batch_size",
    "rollout.sglang_mem_fraction",
    "optim.micro_batch_size",
    "optim.micro_batch_tokens",
    "model.gradient_checkpointing",
    "distributed.strategy",
)
"""Keys (and sections) that ``train --resume`` may change without ``--allow-config-change``: where things are
written, what is logged and evaluated when, checkpoint cadence, and memory/speed settings that leave the
training math as it is (micro-batching splits the same step; gradient checkpointing recomputes the same
activations; FSDP2 trains like DDP, and a checkpoint of the other layout is refused when resuming). Any other
difference from the checkpoint's config would make the resumed run a different run."""


# Defaults per task (docs/method.md section 1), keyed by ``DataConfig.defaults_key()``: the synthetic benchmark's two
# tasks are ``synthetic:shapes`` and ``synthetic:bar`` (their definition is frozen in rarl_fast/data/synthetic.py).
# ``value_min``/``value_max`` are the numeric ends of ``value_range`` (the midpoint scores failed 1-image answers,
# docs/method.md section 7); ``metric`` is the task's 1-image metric.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "age": {
        "rule": "age",
        "value_range": "an integer from 0 to 116",
        "tolerance": 10.0,
        "value_min": 0.0,
        "value_max": 116.0,
        "metric": "mae",
    },
    "count": {
        "rule": "number of {category}",
        "value_range": "an integer from 0 to 50",
        "tolerance": 2.0,
        "value_min": 0.0,
        "value_max": 50.0,
        "metric": "accuracy",
    },
    "aesthetics": {
        "rule": "aesthetic score",
        "value_range": "a number from 1 to 10",
        "tolerance": 1.0,
        "value_min": 1.0,
        "value_max": 10.0,
        "metric": "srcc",
    },
    "synthetic:shapes": {
        "rule": "number of shapes",
        "value_range": "an integer from 0 to 9",
        "tolerance": 2.0,
        "value_min": 0.0,
        "value_max": 9.0,
        "metric": "accuracy",
    },
    "synthetic:bar": {
        "rule": "length of the bar",
        "value_range": "a number from 0 to 10",
        "tolerance": 1.0,
        "value_min": 0.0,
        "value_max": 10.0,
        "metric": "mae",
    },
    "jsonl": {"metric": "mae"},
}

_RANGE_RE = re.compile(r"from\s+(-?\d+(?:\.\d+)?)\s+to\s+(-?\d+(?:\.\d+)?)")
"""The numeric ends of a value-range phrase such as ``an integer from 0 to 116``."""

RMOMode = Literal["stagnant", "always"]
"""Which groups may be mutated: stagnant ones (std(R) < sigma_min), or every group."""
RMOSource = Literal["gt", "best"]
"""Where the reference comes from: the rendered ground truth, or the group's best response seen so far."""
RMOBaseline = Literal["group", "sampled"]
"""What a mutated group's sampled responses are normalized against: the whole mutated group (eq. 9), or
themselves alone (our extension)."""
ThinkStyle = Literal["fixed", "readings"]
"""How the rendered ground truth reasons: the fixed ``Reference answer.``, or each image's value in prompt order."""
Task = Literal["synthetic", "age", "count", "aesthetics", "jsonl"]
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"]
"""The GRPO-family losses of ``rarl_kernels`` (its ``LOSS_TYPES``; a test keeps the two equal, this module imports
no torch)."""
ImportanceSamplingLevel = Literal["token", "sequence"]
"""One importance ratio per token, or one per sequence from its mean token log-ratio (GSPO)."""
RolloutCompile = Literal["off", "default", "reduce-overhead"]
"""How the HF engine runs its decode step: eagerly, through ``torch.compile``, or compiled and replayed as CUDA
graphs."""
_TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")


@dataclass(kw_only=True)
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter through peft instead of all weights; the reference is the base with the adapter off."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (peft's ``lora_alpha``)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (of the language model) that receive adapters."""

    def __post_init__(self) -> None:
        _check(1 <= self.r <= 1 << 16, "r", f"must be in 1..65536, got {self.r}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """Hugging Face id or local folder of the policy; ``tiny`` builds the embedded tiny random-weight VLM."""
    local_files_only: bool = False
    """Never contact the Hub (tests and air-gapped machines)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """``auto`` picks flash_attention_2 when flash-attn imports on CUDA, else sdpa."""
    use_liger: bool = True
    """Apply Liger's Qwen2.5-VL patch (RMSNorm, SwiGLU, ...) on CUDA; ignored on CPU where its kernels can't run."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    freeze_vision: bool = False
    """Freeze the vision tower (and its merger): only the language model trains."""
    min_pixels: int = 56 * 56
    """Smallest image area after the processor's resize (docs/method.md section 1)."""
    max_pixels: int = 448 * 448
    """Largest image area after resize: 448*448 gives at most 256 visual tokens per image."""
    tiny_dir: str = "runs/tiny_vlm"
    """Where ``name_or_path: tiny`` builds (or reuses) the tiny VLM."""
    tiny_layers: int = 2
    """Decoder layers of the tiny VLM that ``name_or_path: tiny`` builds; a folder built with another count is an
    error, not silently reused (the demo uses 4 in its own ``tiny_dir``)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Optional LoRA adapter."""

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "name_or_path", "must not be empty")
        _check(self.min_pixels >= 28 * 28, "min_pixels", f"must be >= {28 * 28} (one 28x28 merged patch)")
        _check(self.max_pixels >= self.min_pixels, "max_pixels", f"must be >= min_pixels ({self.min_pixels})")
        _check(self.max_pixels <= 1 << 28, "max_pixels", f"must be <= {1 << 28}, got {self.max_pixels}")
        _check(1 <= self.tiny_layers <= 64, "tiny_layers", "must be in 1..64")


@dataclass(kw_only=True)
class DataConfig:
    task: Task = "synthetic"
    """Which data: the embedded synthetic benchmark, UTKFace (age), COCO-REM (count), AVA (aesthetics), or a JSONL
    manifest of ``{"image": path, "value": v}`` lines."""
    synthetic_task: Literal["shapes", "bar"] = "shapes"
    """Which embedded synthetic task (``task: synthetic``): ``shapes`` counts shapes (an integer 0..9), ``bar``
    measures a bar's length (0.5..10.0); both are defined in rarl_fast/data/synthetic.py."""
    synthetic_train_size: int = 2000
    """Training samples of the synthetic task (rendered on demand, nothing is written to disk)."""
    synthetic_test_size: int = 500
    """Test samples of the synthetic task (a separate random stream, never a training sample)."""
    root: str | None = None
    """Folder (or manifest file for ``jsonl``) the loader reads; nothing is ever downloaded."""
    split_file: str | None = None
    """UTKFace: CSV (coral-cnn's ``,file,age``) listing the test images by file name; the rest (or
    ``train_split_file``) is train. None splits by ``test_fraction``. AVA and COCO-REM use their own split files."""
    train_split_file: str | None = None
    """UTKFace: CSV of the same format listing the training images (coral-cnn's ``utk_train.csv``); None takes
    every image not in the test list."""
    test_fraction: float = 0.2
    """Share of samples held out as test where the data has no split of its own (UTKFace without ``split_file``,
    manifest lines without a ``split`` field), chosen by a stable hash of the seed and the sample id."""
    rule: str | None = None
    """The quantity named in the prompt; None takes the task's default (docs/method.md section 1)."""
    value_range: str | None = None
    """The value-range phrase of the prompt; None takes the task's default."""
    tolerance: float | None = None
    """Regression tolerance delta (eq. 3); None takes the task's default."""
    value_min: float | None = None
    """Lowest valid value; None takes the task's default, else the first number of ``from A to B`` in
    ``value_range``. Values outside [value_min, value_max] are skipped at load time and counted."""
    value_max: float | None = None
    """Highest valid value; None as for ``value_min``. The midpoint scores failed 1-image answers (docs/method.md 7)."""
    metric: Literal["mae", "accuracy", "srcc"] | None = None
    """The 1-image metric: MAE, counting accuracy (round(pred) == truth) or SRCC; None takes the task's default."""
    group_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Images per prompt N for which groups are built (and evaluated)."""
    num_test_groups: int = 200
    """Fixed test groups per N, built once by seed."""
    train_groups_per_n: int | None = None
    """Training groups built (once per dataset and seed) for each N >= 2; None builds ceil(train samples / N).
    N = 1 always has one group per training sample."""
    max_samples: int | None = None
    """Cap on samples per split (debugging): a seeded random subset; None reads all."""
    check_images: Literal["decode", "header", "off"] = "decode"
    """Load-time image check: ``decode`` decodes every image (JPEGs at 1/8 scale, which still reads the whole file,
    so truncated files are caught), ``header`` only opens it, ``off`` only checks that the file exists."""
    max_image_pixels: int = 1 << 26
    """Images with more pixels than this (width x height, read from the file's header) are skipped and counted as
    ``oversized_image`` instead of decoded: at load time and at training time, whatever ``check_images`` says.
    The default, 8192 x 8192, is far above the few hundred thousand pixels the processor keeps of an image."""
    image_cache_mb: int = 1024
    """Size of the decoded, resized image cache (LRU); an epoch decodes each image once if its images fit."""
    seed: int = 0
    """Seed of group building and splits: groups recur across epochs with stable keys."""

    def __post_init__(self) -> None:
        for n in self.group_sizes:
            _check(1 <= n <= 8, "group_sizes", f"each N must be in 1..8, got {n}")
        _check(len(set(self.group_sizes)) == len(self.group_sizes), "group_sizes", "has repeats")
        _check(self.tolerance is None or self.tolerance > 0, "tolerance", f"must be > 0, got {self.tolerance}")
        _check(0 <= self.num_test_groups <= 1_000_000, "num_test_groups", "must be in 0..1000000")
        _check(self.max_samples is None or self.max_samples >= 1, "max_samples", "must be >= 1 or null")
        _check(1 <= self.synthetic_train_size <= 10_000_000, "synthetic_train_size", "must be in 1..10000000")
        _check(1 <= self.synthetic_test_size <= 10_000_000, "synthetic_test_size", "must be in 1..10000000")
        _check(0 < self.test_fraction < 1, "test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _check(
            self.train_groups_per_n is None or 1 <= self.train_groups_per_n <= 10_000_000,
            "train_groups_per_n",
            "must be in 1..10000000 or null",
        )
        _check(0 <= self.image_cache_mb <= 1 << 30, "image_cache_mb", f"must be in 0..{1 << 30}")
        _check(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        _check(0 <= self.seed <= SEED_MAX, "seed", f"must be in 0..{SEED_MAX}, got {self.seed}")
        if self.task == "jsonl":
            for key in ("root", "rule", "value_range", "tolerance"):
                _check(getattr(self, key) is not None, key, "is required when task is 'jsonl'")
        elif self.task in ("age", "count", "aesthetics"):
            _check(self.root is not None, "root", f"is required for task '{self.task}' (the dataset folder)")
        lo, hi = self.resolved("value_min"), self.resolved("value_max")
        _check(
            lo is not None and hi is not None,
            "value_min",
            "the value range has no numeric ends: set value_min and value_max, or a value_range saying 'from A to B'",
        )
        _check(lo < hi, "value_max", f"must be > value_min ({lo}), got {hi}")

    def defaults_key(self) -> str:
        """The key of this task's defaults in ``TASK_DEFAULTS`` (``synthetic:<synthetic_task>`` for synthetic)."""
        return f"synthetic:{self.synthetic_task}" if self.task == "synthetic" else self.task

    def resolved(self, key: Literal["rule", "value_range", "tolerance", "value_min", "value_max", "metric"]) -> Any:
        """The field's value, or the task's default when it is None.

        ``value_min``/``value_max`` fall back to the ends of ``from A to B`` in the resolved ``value_range``.
        """
        value = getattr(self, key)
        if value is not None:
            return value
        default = TASK_DEFAULTS.get(self.defaults_key(), {}).get(key)
        if default is None and key in ("value_min", "value_max"):
            match = _RANGE_RE.search(self.resolved("value_range") or "")
            if match is not None:
                return float(match.group(1 if key == "value_min" else 2))
        return default


@dataclass(kw_only=True)
class RolloutConfig:
    backend: Literal["hf", "sglang"] = "hf"
    """Rollout engine: our HF engine (CPU and GPU) or SGLang's offline Engine (GPU only)."""
    num_generations: int = 8
    """G, responses sampled per prompt."""
    prompts_per_step: int = 8
    """Prompts (groups) per rollout batch, across all ranks."""
    temperature: float = 1.0
    """Sampling temperature T; every log-prob is taken from logits / T (docs/method.md section 4)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    top_k: int = 0
    """Top-k sampling; 0 disables."""
    max_new_tokens: int = 512
    """Completion length limit (also ``max_completion_length`` of the dr_grpo aggregation); must leave room for the
    prompt in the model's context (checked when the model is loaded)."""
    eval_batch_size: int = 32
    """Prompts per greedy ``generate`` call in evaluation (per process)."""
    sglang_mem_fraction: float = 0.5
    """SGLang's static memory fraction when colocated with training."""
    compile: RolloutCompile = "off"
    """``torch.compile`` of the HF engine's decode step (one token for every row: forward, sampling, bookkeeping,
    with static shapes): ``default`` compiles it, ``reduce-overhead`` also replays it as CUDA graphs on GPU (no
    kernel launched from Python per token), ``off`` runs it eagerly; the tokens are the same. Sampled and greedy
    calls and every batch of >= 2 prompts x >= 2 samples share one compile; one prompt, or one sample per prompt
    (evaluation), compiles once more (torch.compile specializes sizes of 1). A compiled engine keeps its decode buffers
    between calls, during the update too (the KV cache of its largest batch). Off by default: on the
    CPU the step is GEMM-bound, compiling saves about a quarter of each token's time (bench scenario) for a
    compile of about 80 s, repaid only after a few thousand decode steps. For GPUs, ``reduce-overhead`` is the
    mode to try (``bench/gpu_check.sh`` measures it). The SGLang backend ignores this (it has its own graphs)."""

    def __post_init__(self) -> None:
        _check(1 <= self.num_generations <= 1024, "num_generations", f"must be in 1..1024, got {self.num_generations}")
        _check(1 <= self.prompts_per_step <= 1 << 20, "prompts_per_step", f"must be in 1..{1 << 20}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0 <= self.top_k <= 2**31 - 1, "top_k", f"must be in 0..{2**31 - 1} (int32), got {self.top_k}")
        _check(1 <= self.max_new_tokens <= 1 << 20, "max_new_tokens", f"must be in 1..{1 << 20}")
        _check(1 <= self.eval_batch_size <= 1 << 20, "eval_batch_size", f"must be in 1..{1 << 20}")
        _check(0 < self.sglang_mem_fraction < 1, "sglang_mem_fraction", "must be in (0, 1)")


def _check_reward_weights(alpha: float, beta: float, prefix: str = "") -> None:
    _check(alpha >= 0, f"{prefix}alpha", f"must be >= 0, got {alpha}")
    _check(beta >= 0, f"{prefix}beta", f"must be >= 0, got {beta}")
    _check(alpha + beta <= 1 + 1e-12, f"{prefix}beta", f"alpha + beta must be <= 1, got {alpha} + {beta}")


@dataclass(kw_only=True)
class RewardConfig:
    lam: float = 0.2
    """Weight of the format reward in eq. 8: R = lam * R_f + (1 - lam) * R_f * (alpha * R_reg + beta * R_rank)."""
    alpha: float = 0.5
    """Weight of the regression reward (stage 2's; stage 1 overrides it, see ``stage1.alpha``)."""
    beta: float = 0.5
    """Weight of the ranking reward (stage 2's; stage 1 overrides it, see ``stage1.beta``)."""
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    """Ranking weights (w_len, w_cons, w_acc) of eq. 7."""
    tolerance: float | None = None
    """Regression tolerance delta; None takes ``data.tolerance`` or the task's default."""

    def __post_init__(self) -> None:
        _check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        _check_reward_weights(self.alpha, self.beta)
        _check(all(w >= 0 for w in self.weights), "weights", f"must all be >= 0, got {list(self.weights)}")
        _check(sum(self.weights) <= 1 + 1e-9, "weights", f"must sum to <= 1, got {sum(self.weights)}")
        _check(self.tolerance is None or self.tolerance > 0, "tolerance", f"must be > 0, got {self.tolerance}")


@dataclass(kw_only=True)
class RMOConfig:
    mode: RMOMode = "stagnant"
    """Which groups may be mutated: stagnant ones (std(R) < sigma_min) or all (docs/method.md section 5)."""
    source: RMOSource = "gt"
    """Reference answer: the rendered ground truth, or the best response seen for the group (falls back to gt)."""
    think: ThinkStyle = "fixed"
    """Reasoning of the rendered ground truth (RMO's gt and the SFT target): the method's fixed `Reference answer.`,
    or `readings`, each image's value in prompt order (`Image 1: 7. Image 2: 3.`), then the sorted answer."""
    baseline: RMOBaseline = "group"
    """What the sampled responses of a mutated group are normalized against: the whole mutated group (docs/method.md
    eq. 9), or `sampled`, the sampled responses alone, so a high-reward reference does not push them all down
    (our extension; the references keep their eq. 9 advantages)."""
    sigma_min: float = 1e-3
    """Reward-spread threshold below which a group is stagnant."""
    p_mut: float = 0.5
    """Probability that an eligible group is mutated."""
    k_mut: int = 1
    """Lowest-reward responses replaced per mutated group."""

    def __post_init__(self) -> None:
        _check(self.sigma_min >= 0, "sigma_min", f"must be >= 0, got {self.sigma_min}")
        _check(0 <= self.p_mut <= 1, "p_mut", f"must be in [0, 1], got {self.p_mut}")
        _check(self.k_mut >= 1, "k_mut", f"must be >= 1, got {self.k_mut}")


@dataclass(kw_only=True)
class LossConfig:
    beta_kl: float = 0.04
    """Weight of the k3 KL to the frozen reference (docs/method.md section 4); 0 skips the reference forward."""
    eps_low: float = 0.2
    """Lower clip range: ratio is clipped at 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip range: ratio is clipped at 1 + eps_high."""
    loss_type: LossType = "bnpo"
    """The loss (docs/method.md section 4). Clipped ratio: bnpo/dapo (token mean over the step), grpo (mean over
    rows of each row's token mean), dr_grpo (sum / (rows * max_new_tokens)), luspo (each row's sum, averaged over
    rows: long rows weigh more; meant with importance_sampling_level=sequence). cispo: the ratio capped at eps_high
    and detached, times the log-prob (token mean). sapo: a sigmoid gate on the ratio instead of the clip (row
    means). vespo: a gamma weight of the sequence's ratio, detached, times the log-prob (token mean)."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """token: one ratio per token; sequence: exp(mean log-ratio of the row) for every token of the row (GSPO),
    its gradient reaching each token. Not with cispo, sapo or vespo."""
    delta: float | None = None
    """Cap of the unclipped ratio in the clipped losses (two-sided clipping, INTELLECT-2); above 1 + eps_high when
    set. None: no cap. Ignored by cispo, sapo and vespo."""
    sapo_temperature_pos: float = 1.0
    """sapo: gate temperature for tokens with a positive advantage."""
    sapo_temperature_neg: float = 1.05
    """sapo: gate temperature for the other tokens."""
    vespo_k_pos: float = 2.0
    """vespo: power k of the gamma weight for advantages >= 0 (how hard ratios below 1 are down-weighted)."""
    vespo_lambda_pos: float = 3.0
    """vespo: decay lambda of the gamma weight for advantages >= 0 (how hard ratios above 1 are down-weighted)."""
    vespo_k_neg: float = 3.0
    """vespo: power k for negative advantages."""
    vespo_lambda_neg: float = 2.0
    """vespo: decay lambda for negative advantages."""
    bias_correction_kl: bool = False
    """Multiply the KL term by the importance ratio (with its gradient), the unbiased reverse-KL gradient of
    DeepSeek-V3.2 (TRL's use_bias_correction_kl; TRL 1.16 turns it on by default)."""
    scale_by_std: bool = True
    """Divide advantages by the group's std (GRPO); False gives Dr.GRPO's mean-centred advantages."""
    std_unbiased: bool = False
    """Bessel's correction in the group std (docs/method.md: off)."""
    impl: Literal["auto", "triton", "chunked", "torch"] = "auto"
    """Kernel implementation of the fused lm_head + GRPO loss: auto is triton on CUDA, chunked torch on CPU."""

    def __post_init__(self) -> None:
        _check(self.beta_kl >= 0, "beta_kl", f"must be >= 0, got {self.beta_kl}")
        _check(self.eps_low >= 0, "eps_low", f"must be >= 0, got {self.eps_low}")
        _check(self.eps_low < 1, "eps_low", f"must be < 1 (ratio clipped at 1 - eps_low), got {self.eps_low}")
        _check(self.eps_high >= 0, "eps_high", f"must be >= 0, got {self.eps_high}")
        _check(
            self.importance_sampling_level == "token" or self.loss_type not in _TOKEN_LEVEL_ONLY,
            "importance_sampling_level",
            f"must be 'token' with loss_type={self.loss_type!r} (sequence level is defined for the clipped losses)",
        )
        _check(self.delta is None or self.delta > 0, "delta", f"must be > 0 or null, got {self.delta}")
        _check(self.sapo_temperature_pos > 0, "sapo_temperature_pos", f"must be > 0, got {self.sapo_temperature_pos}")
        _check(self.sapo_temperature_neg > 0, "sapo_temperature_neg", f"must be > 0, got {self.sapo_temperature_neg}")


@dataclass(kw_only=True)
class OptimConfig:
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 disables."""
    warmup_ratio: float = 0.03
    """Linear warmup as a fraction of a stage's steps, then cosine decay to 0."""
    micro_batch_size: int = 8
    """At most this many sequences per forward/backward; gradients accumulate over the rollout batch."""
    micro_batch_tokens: int | None = None
    """Also at most this many padded tokens (rows x (longest prompt + longest completion)) per micro-batch;
    None: rows only. Either way rows are ordered by length and each micro-batch is cut to its own longest
    prompt and completion, so short rows do not pay for the padding of long ones."""
    update_epochs: int = 1
    """mu: policy-update epochs per rollout batch (with 1, logp_old = logp.detach())."""
    max_nonfinite_steps: int = 3
    """K: this many non-finite losses or gradients in a row stop the run (counted over the whole run: the count
    goes on across the stage change)."""
    max_skipped_fraction: float = 0.5
    """A run that skipped more than this share of its optimizer steps (non-finite loss or gradient) ends with an
    error after its last step, as does a run that took no step at all: its weights are not the trained ones."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """Autocast of forward passes: auto is bf16 on CUDA, none on CPU. Weights and AdamW state stay fp32."""
    ddp_find_unused_parameters: bool = True
    """DDP's search for parameters a step leaves without gradient (one more walk of the autograd graph per
    micro-batch); under FSDP2, zero gradients reduce-scattered for them, so that every rank runs the same
    collectives. Every prompt here carries images, so every trainable parameter gets a gradient and False is
    safe unless a model has branches some batches skip."""

    def __post_init__(self) -> None:
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas", f"each must be in [0, 1), got {list(self.betas)}")
        _check(self.adam_eps > 0, "adam_eps", "must be > 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(1 <= self.micro_batch_size <= 1 << 20, "micro_batch_size", f"must be in 1..{1 << 20}")
        _check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "micro_batch_tokens", "must be >= 1")
        _check(1 <= self.update_epochs <= 1000, "update_epochs", "must be in 1..1000")
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        _check(
            0 <= self.max_skipped_fraction <= 1,
            "max_skipped_fraction",
            f"must be in [0, 1], got {self.max_skipped_fraction}",
        )


@dataclass(kw_only=True)
class SFTConfig:
    steps: int = 200
    """Optimizer steps of supervised fine-tuning on ground-truth answers (``rarl-fast sft``, the demo's warm start)."""
    lr: float = 1e-5
    """Peak learning rate (warmup + cosine like the RL stages)."""
    group_mix: dict[int, float] = field(default_factory=lambda: {1: 0.25, 2: 0.25, 4: 0.25, 8: 0.25})
    """Sampling weight of each N in SFT batches."""
    prompts_per_step: int | None = None
    """Groups per SFT step (summed over ranks); None takes ``rollout.prompts_per_step``. One SFT group costs a
    forward/backward of one answer, an RL group G sampled answers, so SFT can afford larger batches."""
    micro_batch_size: int | None = None
    """Rows per SFT forward/backward; None takes ``optim.micro_batch_size``."""
    micro_batch_tokens: int | None = None
    """Padded-token budget of an SFT micro-batch; None takes ``optim.micro_batch_tokens``. An SFT batch holds
    one row per group, so mixed N share a micro-batch; a budget splits it by length (RL micro-batches hold G
    rows of one prompt, which are alike already)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        for key in ("prompts_per_step", "micro_batch_size"):
            value = getattr(self, key)
            _check(value is None or 1 <= value <= 1 << 20, key, f"must be in 1..{1 << 20} or null")
        _check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "micro_batch_tokens", "must be >= 1")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(bool(self.group_mix) and all(w >= 0 for w in self.group_mix.values()), "group_mix", "needs weights >= 0")
        _check(sum(self.group_mix.values()) > 0, "group_mix", "weights must not all be 0")


@dataclass(kw_only=True)
class StageConfig:
    enabled: bool = True
    """Run this stage."""
    steps: int = 500
    """Optimizer steps (one rollout batch each) in this stage."""
    lr: float = 1e-6
    """Peak learning rate of the stage."""
    group_mix: dict[int, float] = field(default_factory=lambda: {1: 1.0})
    """Sampling weight of each N (images per prompt) in this stage's batches."""
    alpha: float | None = None
    """Regression weight in this stage; None takes ``reward.alpha``."""
    beta: float | None = None
    """Ranking weight in this stage; None takes ``reward.beta``."""
    rmo: bool = False
    """Apply RMO in this stage."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(bool(self.group_mix), "group_mix", "must name at least one N")
        for n, w in self.group_mix.items():
            _check(1 <= n <= 8, "group_mix", f"N must be in 1..8, got {n}")
            _check(w >= 0, "group_mix", f"weight of N={n} must be >= 0, got {w}")
        _check(sum(self.group_mix.values()) > 0, "group_mix", "weights must not all be 0")
        if self.alpha is not None:
            _check_reward_weights(self.alpha, self.beta if self.beta is not None else 0.0)
        if self.beta is not None:
            _check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")


def _stage1() -> StageConfig:
    return StageConfig(steps=500, lr=1e-6, group_mix={1: 1.0}, alpha=1.0, beta=0.0, rmo=False)


def _stage2() -> StageConfig:
    return StageConfig(steps=1000, lr=1e-6, group_mix={1: 0.25, 2: 0.25, 4: 0.25, 8: 0.25}, rmo=True)


@dataclass(kw_only=True)
class LoggingConfig:
    log_every: int = 1
    """Log metrics every this many optimizer steps."""
    eval_every: int = 0
    """Held-out evaluation every this many optimizer steps (and once before the first), logged as
    ``eval/n<N>/<metric>`` and ``eval/n<N>/fail``; 0 disables periodic eval."""
    eval_groups: int = 32
    """Test groups per N in the periodic eval (the first ones of the fixed test set; 0: all of them)."""
    trackers: list[Literal["tensorboard", "wandb", "jsonl"]] = field(default_factory=lambda: ["jsonl"])
    """accelerate trackers (wandb only when installed) plus our JSONL metrics file."""
    wandb_project: str | None = None
    """W&B project when ``wandb`` is among the trackers."""
    progress_bar: bool = True
    """Console progress bar."""

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.eval_every >= 0, "eval_every", "must be >= 0")
        _check(self.eval_groups >= 0, "eval_groups", "must be >= 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    save_every: int = 100
    """Save every this many optimizer steps (and at each stage's end); 0 saves only at stage ends."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    save_optimizer: bool = True
    """Also save optimizer, scheduler and RNG states (needed to resume)."""

    def __post_init__(self) -> None:
        _check(self.save_every >= 0, "save_every", "must be >= 0")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1")


Strategy = Literal["auto", "ddp", "fsdp2"]


@dataclass(kw_only=True)
class DistributedConfig:
    strategy: Strategy = "auto"
    """How the processes of a launch share the training. ``ddp``: every process holds the whole model and the
    gradients are averaged (accelerate's DDP). ``fsdp2``: parameters, gradients and AdamW state are sharded
    across the processes with torch's ``fully_shard`` (each vision block and decoder layer, then the rest),
    checkpoints are sharded (``torch.distributed.checkpoint``) and the final ``model/`` is gathered on the main
    process. ``auto``: fsdp2 when launched with an accelerate FSDP config (``configs/accelerate/fsdp2.yaml``),
    else ddp. One process holds the whole model either way."""


@dataclass(kw_only=True)
class Config:
    run_name: str = "rarl"
    """Name of the run (folder under output_dir)."""
    output_dir: str = "runs"
    """Parent folder of run folders (checkpoints, logs, eval tables)."""
    seed: int = 0
    """Global seed (torch, sampling, RMO)."""
    cpu_threads: int = 0
    """torch threads per process when running on the CPU; 0 keeps torch's default. Small models run several
    times faster on 1 thread than on 2 busy cores (OpenMP synchronisation dominates their tiny matmuls)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy / reference / processor loading."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source, prompts and groups."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine and sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Ranking-aware reward (docs/method.md section 3)."""
    rmo: RMOConfig = field(default_factory=RMOConfig)
    """Response Mutation Operation (docs/method.md section 5)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """GRPO loss (docs/method.md section 4)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule, micro-batching."""
    stage1: StageConfig = field(default_factory=_stage1)
    """Stage 1: 1-image samples, regression reward only, no RMO (docs/method.md section 6)."""
    stage2: StageConfig = field(default_factory=_stage2)
    """Stage 2: mixed N, full reward, RMO."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning on ground-truth answers (baseline and warm start)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and trackers."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data parallel (DDP) or sharded (FSDP2) training across the processes of an ``accelerate launch``."""

    def __post_init__(self) -> None:
        _check(0 <= self.cpu_threads <= 1024, "cpu_threads", f"must be in 0..1024, got {self.cpu_threads}")
        _check(0 <= self.seed <= SEED_MAX, "seed", f"must be in 0..{SEED_MAX}, got {self.seed}")
        for n in self.sft.group_mix:
            _check(
                n in self.data.group_sizes, "sft.group_mix", f"N={n} is not in data.group_sizes {self.data.group_sizes}"
            )
        for name in ("stage1", "stage2"):
            stage: StageConfig = getattr(self, name)
            alpha, beta = self.stage_reward_weights(stage)
            try:
                _check_reward_weights(alpha, beta)
            except ConfigError as err:
                raise err.under(name) from None
            for n in stage.group_mix:
                _check(
                    n in self.data.group_sizes,
                    f"{name}.group_mix",
                    f"N={n} is not in data.group_sizes {self.data.group_sizes}",
                )
        _check(
            not (self.rollout.backend == "sglang" and self.model.lora.enabled),
            "rollout.backend",
            "sglang loads merged checkpoint weights and cannot take LoRA adapters: use rollout.backend=hf with LoRA",
        )
        G = self.rollout.num_generations
        _check(
            not (G == 1 and self.loss.scale_by_std),
            "rollout.num_generations",
            "a group size of 1 has std 0: std-scaled advantages are undefined (use >= 2, or loss.scale_by_std=false)",
        )
        if self.stage1.rmo or self.stage2.rmo:  # replacing a whole group would leave no spread again
            _check(self.rmo.k_mut < G, "rmo.k_mut", f"must be < rollout.num_generations ({G}), got {self.rmo.k_mut}")
        _check(
            self.data.task == "synthetic" or self.tolerance() is not None,
            "reward.tolerance",
            f"no tolerance: set reward.tolerance or data.tolerance for task '{self.data.task}'",
        )

    def stage_reward_weights(self, stage: StageConfig) -> tuple[float, float]:
        """(alpha, beta) in effect for ``stage``: its own values, else the reward section's."""
        alpha = stage.alpha if stage.alpha is not None else self.reward.alpha
        beta = stage.beta if stage.beta is not None else self.reward.beta
        return alpha, beta

    def tolerance(self) -> float | None:
        """Regression tolerance: ``reward.tolerance``, else ``data.tolerance``, else the task's default.

        The synthetic benchmark's default is its selected task's (``TASK_DEFAULTS['synthetic:<task>']``).
        """
        if self.reward.tolerance is not None:
            return self.reward.tolerance
        return self.data.resolved("tolerance")
