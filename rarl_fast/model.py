"""Load the policy, the frozen reference and the processor; build the embedded tiny VLM.

Real checkpoints (a Hugging Face id or a local folder) and the tiny model go through the same loader.
Without torchvision (the CPU machines here) transformers cannot build Qwen2.5-VL's video processor, so
:func:`load_processor` falls back to an image-only processor made from the same folder's tokenizer,
image processor and chat template; prompts and pixel values are identical to the full processor's.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rarl_fast.errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

    from rarl_fast.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "TINY_SPECIAL_TOKENS",
    "ModelLoadError",
    "apply_lora",
    "choose_attn_implementation",
    "choose_dtype",
    "load_model",
    "load_policy",
    "load_processor",
    "load_reference",
    "make_tiny_vlm",
    "resolve_model_path",
]

# Qwen2.5-VL's special tokens, in the order the tiny tokenizer adds them.
TINY_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's chat layout, written for the tiny tokenizer: a default system turn when none is given,
# `<|vision_start|><|image_pad|><|vision_end|>` per image, `<|im_start|>assistant\n` as generation prompt.
TINY_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelLoadError(UsageError, ValueError):
    """A model or processor cannot be loaded from the given folder or Hub id; the message names it and says why."""


def _cannot_load(what: str, name_or_path: str | Path, err: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot load the {what} from {name_or_path}: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------------------------------------
# Device, dtype, attention
# ----------------------------------------------------------------------------------------------------------


def choose_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def choose_attn_implementation(requested: str, device: torch.device | str) -> str:
    """``auto`` -> flash_attention_2 when flash-attn imports and the device is CUDA, else sdpa.

    An explicit ``flash_attention_2`` without flash-attn or without CUDA raises a clear error.
    """
    device = torch.device(device)
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if (device.type == "cuda" and has_flash) else "sdpa"
    if requested == "flash_attention_2" and not (device.type == "cuda" and has_flash):
        missing = "flash-attn is not installed (pip install 'rarl-fast[gpu]')" if not has_flash else "no CUDA device"
        raise RuntimeError(f"model.attn_implementation=flash_attention_2 but {missing}; use sdpa or auto")
    return requested


def _apply_liger(device: torch.device) -> bool:
    """Patch transformers' Qwen2.5-VL classes with Liger's RMSNorm/SwiGLU (CUDA only); True when applied.

    Departs from Liger's default: no fused linear cross-entropy, since our loss runs on hidden states through
    ``rarl_kernels``; no rope patch, which does nothing on transformers 5.x.
    """
    if device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl
    except ImportError as err:  # liger-kernel missing, or transformers outside its range
        log.warning("Liger's Qwen2.5-VL patch is unavailable (%s); running without it", err)
        return False
    apply_liger_kernel_to_qwen2_5_vl(rope=False, cross_entropy=False, fused_linear_cross_entropy=False)
    return True


# ----------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------


def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without a video processor (which needs torchvision).

        Saves as ``Qwen2_5_VLProcessor`` so that a checkpoint written here loads as a standard one elsewhere.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def save_pretrained(self, save_directory, *args, **kwargs):
            out = super().save_pretrained(save_directory, *args, **kwargs)
            for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
                path = Path(save_directory) / name
                if not path.is_file():
                    continue
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("processor_class") == type(self).__name__:
                    data["processor_class"] = "Qwen2_5_VLProcessor"
                    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            return out

    return ImageOnlyQwen2_5_VLProcessor


def load_processor(
    name_or_path: str | Path,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    local_files_only: bool = False,
) -> ProcessorMixin:
    """The checkpoint's processor with left padding and the configured pixel bounds.

    Tries ``AutoProcessor``; where that cannot build the video processor (no torchvision) it assembles the
    image-only processor from the same checkpoint's tokenizer, image processor and chat template.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": local_files_only}
    try:
        processor = AutoProcessor.from_pretrained(str(name_or_path), **kw)
        if not hasattr(processor, "image_processor"):  # AutoProcessor fell back to a bare tokenizer
            raise TypeError(f"{type(processor).__name__} has no image processor")
    except (ImportError, OSError, TypeError, ValueError, AttributeError) as err:
        log.info("AutoProcessor failed for %s (%s); using the image-only Qwen2.5-VL processor", name_or_path, err)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kw)
            image_processor = AutoImageProcessor.from_pretrained(str(name_or_path), **kw)
        except Exception as again:  # transformers and the Hub client raise many types
            raise _cannot_load("processor", name_or_path, again) from again
        processor = _image_only_processor_class()(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
        )
    processor.tokenizer.padding_side = "left"
    ip = processor.image_processor
    if min_pixels is not None or max_pixels is not None:
        size = dict(getattr(ip, "size", None) or {})
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        ip.size = size
    return processor


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str, tiny_dir: str | Path = "runs/tiny_vlm", tiny_layers: int = 2) -> str:
    """``tiny`` -> the embedded tiny VLM folder with ``tiny_layers`` decoder layers (built on first use); anything
    else unchanged. A folder already holding a tiny VLM of another depth raises instead of being reused, and a
    path that can only be a local folder (it starts with ``/``, ``.`` or ``~``, or has more than one ``/``, unlike
    a Hub id ``org/name``) must be a folder holding a model (``config.json``)."""
    if name_or_path != "tiny":
        folder = Path(name_or_path).expanduser()
        local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
        if local and not folder.is_dir():
            raise ModelLoadError(f"no model folder at {name_or_path} (model.name_or_path or --model)")
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path} holds no model (no config.json): is it a save_pretrained folder?")
        return name_or_path
    tiny_dir = Path(tiny_dir)
    config = tiny_dir / "config.json"
    if not config.is_file():
        make_tiny_vlm(tiny_dir, num_layers=tiny_layers)
    else:
        found = json.loads(config.read_text()).get("text_config", {}).get("num_hidden_layers")
        if found != tiny_layers:
            raise ModelLoadError(
                f"{tiny_dir} holds a tiny VLM with {found} decoder layers, the config asks for {tiny_layers} "
                "(model.tiny_layers): point model.tiny_dir at another folder or delete this one"
            )
    return str(tiny_dir)


def load_model(
    name_or_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    use_liger: bool = True,
    gradient_checkpointing: bool = False,
    freeze_vision: bool = False,
    trainable: bool = True,
    local_files_only: bool = False,
) -> PreTrainedModel:
    """A Qwen2.5-VL (any image-text-to-text model) on ``device``, ready for training or as a frozen reference."""
    from transformers import AutoModelForImageTextToText

    device = torch.device(device)
    if use_liger:
        _apply_liger(device)
    kw = {
        "dtype": choose_dtype(dtype, device),
        "attn_implementation": choose_attn_implementation(attn_implementation, device),
        "local_files_only": local_files_only,
    }
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), **kw)
    except Exception as err:  # an empty or cut-off folder, a bad Hub id: many exception types
        raise _cannot_load("model", name_or_path, err) from err
    model = model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    model.train()
    if freeze_vision:
        for p in _vision_parameters(model):
            p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _vision_parameters(model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    visual = getattr(getattr(model, "model", model), "visual", None) or getattr(model, "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no vision tower to freeze")
    return visual.parameters()


def _model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "attn_implementation": cfg.attn_implementation,
        "use_liger": cfg.use_liger,
        "local_files_only": cfg.local_files_only,
    }


def load_policy(cfg: ModelConfig, device: torch.device | str = "cpu", *, train: bool = True) -> PreTrainedModel:
    """The policy as ``cfg`` says. For training its weights are fp32 (the master weights; autocast gives bf16
    compute on CUDA) with ``cfg``'s gradient checkpointing and frozen vision tower; for evaluation, ``cfg.dtype``."""
    path = resolve_model_path(cfg.name_or_path, cfg.tiny_dir, cfg.tiny_layers)
    return load_model(
        path,
        device=device,
        dtype="float32" if train else cfg.dtype,
        gradient_checkpointing=cfg.gradient_checkpointing and train,
        freeze_vision=cfg.freeze_vision,
        **_model_kwargs(cfg),
    )


def load_reference(cfg: ModelConfig, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The frozen reference: the same weights as the initial policy, in ``cfg.dtype``, eval mode, no gradients."""
    path = resolve_model_path(cfg.name_or_path, cfg.tiny_dir, cfg.tiny_layers)
    return load_model(path, device=device, dtype=cfg.dtype, trainable=False, **_model_kwargs(cfg))


def apply_lora(cfg: LoraConfig, model: PreTrainedModel) -> Any:
    """``model`` wrapped by peft with LoRA adapters on ``cfg.target_modules`` (the peft model; its base model
    shares the weights). The reference is then the base model with the adapters off."""
    try:
        import peft
    except ImportError as err:
        raise RuntimeError("model.lora.enabled=true needs peft: pip install 'rarl-fast[peft]'") from err
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules))  # fmt: skip
    return peft.get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------------
# The tiny VLM
# ----------------------------------------------------------------------------------------------------------


def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: our prompts and answers, so that they tokenize compactly."""
    system = (
        "The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning "
        "process in the mind and then provides the user with the answer. The reasoning process and answer are "
        "enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
        "process here </think> <answer> answer here </answer>."
    )
    rules = ["age", "aesthetic score", "number of cats", "number of shapes", "length of the bar", "brightness"]
    lines = [system, "You are a helpful assistant.", "system user assistant Reference answer."]
    for rule in rules:
        lines.append(
            f"Image 1: Image 2: Analyze each image to determine the {rule}, and if there are multiple images, sort "
            f"them in ascending order of {rule}. Output the results as a JSON list of dictionaries in this format: "
            f"[{{'image_id': number, 'value': value}}, ...], where value is the {rule} (an integer from 0 to 116, a "
            "number from 1 to 10). Ensure the list is sorted correctly with strictly followed syntax."
        )
    for i in range(0, 120):
        item = f'{{"image_id": {i % 8 + 1}, "value": {i}}}'
        lines.append(f"<think>The image shows {i}.</think> <answer>[{item}]</answer>")
        lines.append(f'{{"image_id": {i % 8 + 1}, "value": {i / 10}}}, ')
    return lines


def _tiny_tokenizer():
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(TINY_SPECIAL_TOKENS[1:]),
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def make_tiny_vlm(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vocab_size: int | None = None,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    weights: bool = True,
) -> Path:
    """Build and save a tiny random-weight Qwen2.5-VL with an offline tokenizer, chat template and processor.

    The folder is a standard ``save_pretrained`` checkpoint (config, safetensors, tokenizer, processor
    configs), loadable by :func:`load_model` / :func:`load_processor` like a real one. About 0.7 M
    parameters; images of 56..112 px give 4..16 visual tokens each. Deterministic for a given seed.
    The size arguments (and ``text_overrides`` / ``vision_overrides``, merged into the sub-configs) build
    larger random-init models of the same family for benchmarks; ``vocab_size`` defaults to the tokenizer's
    size rounded up to a multiple of 64. ``weights=False`` saves config and processor only (a benchmark then
    instantiates the model on its device with ``from_config``).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer()
    ids = dict(zip(TINY_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS))))
    vocab_size = vocab_size or -(-len(tok) // 64) * 64  # padded to a multiple of 64, as real checkpoints are
    if vocab_size < len(tok):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    special = {"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None}
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        **special,
    )
    text.update(text_overrides or {})
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # mrope_section sums to head_dim / 2
    t_part = half // 4  # t, h, w) = (1/4, 3/8, 3/8) of it, as Qwen2.5-VL's (16, 24, 24
    mrope = [t_part, (half - t_part) // 2, half - t_part - (half - t_part) // 2]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=max(2, vision_hidden_size // 64),
        out_hidden_size=text["hidden_size"],
        window_size=56,
        fullatt_block_indexes=[vision_depth - 1],
    )
    vision.update(vision_overrides or {})
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text["tie_word_embeddings"],
        **special,
    )
    if weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        model.generation_config.bos_token_id = None
        model.save_pretrained(out)
    else:
        config.save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = _image_only_processor_class()(
        image_processor=image_processor, tokenizer=tok, chat_template=TINY_CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    return out
