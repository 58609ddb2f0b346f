"""A recording stand-in for ``sglang`` 0.5.23, built from its recorded API (tests/data/sglang_api.json).

Every ``Engine`` method, ``Engine(**server_args)``, each request's ``sampling_params`` and the tokenizer
manager's ``check_weights`` bind their arguments to the signatures recorded from SGLang's source (a call that
does not fit raises TypeError, as the real one would), and each call is appended to ``FakeEngine.calls``. The
behaviour our backend relies on follows 0.5.23:

- ``update_weights_from_tensor`` outside ``begin/end_weight_update`` fails with ``(False, message)``;
- the model's ``load_weights`` fuses q/k/v and gate/up with the recorded stacked mapping and skips unknown
  names without an error (``drop`` names further checkpoint names it "does not know");
- ``release_memory_occupation`` of the weights without ``enable_weights_cpu_backup`` loses their values;
- ``check_weights(action="checksum")`` hashes every parameter's bytes (``tensor_hash``: SHA-256 of the bytes,
  SGLang's CPU path);
- the reported prompt length is that of the checkpoint's own processor (SGLang re-processes the images);
- sampling under deterministic inference is a function of (``sampling_seed``, prompt, position): requests
  that share a seed sample the same tokens.

The SGLang-side parameter table is written out from Qwen2.5-VL's module tree (fused ``qkv_proj`` /
``gate_up_proj``, vision ``attn.qkv_proj``), not derived from the backend's own name mapping.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.machinery
import inspect
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

RECORD: dict[str, Any] = json.loads((Path(__file__).resolve().parents[1] / "data" / "sglang_api.json").read_text())
_KINDS = {
    "positional_only": inspect.Parameter.POSITIONAL_ONLY,
    "positional_or_keyword": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "var_positional": inspect.Parameter.VAR_POSITIONAL,
    "keyword_only": inspect.Parameter.KEYWORD_ONLY,
    "var_keyword": inspect.Parameter.VAR_KEYWORD,
}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def recorded_signature(params: list[list[Any]]) -> inspect.Signature:
    """An ``inspect.Signature`` from recorded ``[name, kind, default source or None]`` triples."""
    return inspect.Signature(
        [
            inspect.Parameter(name, _KINDS[kind], default=inspect.Parameter.empty if default is None else default)
            for name, kind, default in params
        ]
    )


def tensor_hash(tensor_list: Any) -> int:
    """SGLang's ``tensor_hash`` on CPU tensors: the first 8 bytes of the SHA-256 of the bytes."""
    t = tensor_list.detach().cpu().contiguous()
    return int.from_bytes(hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).digest()[:8], "big")


@dataclass
class CheckWeightsReqInput:
    """``sglang.srt.managers.io_struct.CheckWeightsReqInput`` (fields checked against the record)."""

    action: str = "checksum"
    allow_quant_error: bool = False
    skip_tensor_list: list[str] | None = None
    selector: str = "all"

    def __post_init__(self) -> None:
        assert set(self.__dataclass_fields__) == set(RECORD["check_weights"]["request"])


def sglang_params(ckpt: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """SGLang's Qwen2.5-VL parameters (names and shapes at tensor-parallel size 1), zero-filled; ``ckpt``, the
    checkpoint's tensors by saved name, gives the sizes."""
    out: dict[str, Tensor] = {}

    def add(name: str, *sources: str) -> None:
        shapes = [ckpt[s].shape for s in sources or (name,)]
        out[name] = torch.zeros((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtype)

    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "visual.patch_embed.proj.weight",
                 "visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.0.bias",
                 "visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"):  # fmt: skip
        if name in ckpt:
            add(name)
    for i in sorted({int(k.split(".")[2]) for k in ckpt if k.startswith("model.layers.")}):
        pre = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{pre}self_attn.q_proj.{kind}" in ckpt:
                add(f"{pre}self_attn.qkv_proj.{kind}", *(f"{pre}self_attn.{p}_proj.{kind}" for p in "qkv"))
        add(f"{pre}mlp.gate_up_proj.weight", f"{pre}mlp.gate_proj.weight", f"{pre}mlp.up_proj.weight")
        for plain in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                      "post_attention_layernorm.weight"):  # fmt: skip
            add(pre + plain)
    for i in sorted({int(k.split(".")[2]) for k in ckpt if k.startswith("visual.blocks.")}):
        pre = f"visual.blocks.{i}."
        for kind in ("weight", "bias"):
            add(f"{pre}attn.qkv_proj.{kind}", f"{pre}attn.qkv.{kind}")
            add(f"{pre}mlp.gate_up_proj.{kind}", f"{pre}mlp.gate_proj.{kind}", f"{pre}mlp.up_proj.{kind}")
            add(f"{pre}attn.proj.{kind}")
            add(f"{pre}mlp.down_proj.{kind}")
        add(f"{pre}norm1.weight")
        add(f"{pre}norm2.weight")
    return out


class FakeModel:
    """SGLang's Qwen2.5-VL on the CPU: its parameters and a port of 0.5.23's ``load_weights`` rules."""

    def __init__(self, params: dict[str, Tensor], drop: set[str]):
        self.params = params
        self.drop = drop  # checkpoint names this "model" does not know (skipped like any unknown name)
        self.loaded: list[str] = []

    def _shard(self, param: str, shard: Any, t: Tensor) -> None:
        p = self.params[param]
        if shard in (0, 1):
            half = p.shape[0] // 2
            p[shard * half : (shard + 1) * half].copy_(t)
            return
        # q, k, v: q is the larger block when there are fewer KV heads; k and v are equal
        kv = (p.shape[0] - t.shape[0]) // 2 if shard == "q" else t.shape[0]
        q = p.shape[0] - 2 * kv
        start = {"q": 0, "k": q, "v": q + kv}[shard]
        p[start : start + t.shape[0]].copy_(t)

    def load_weights(self, weights: list[tuple[str, Tensor]]) -> None:
        for name, t in weights:
            if name in self.drop:
                continue
            for param, weight, shard in RECORD["qwen2_5_vl"]["stacked_params_mapping"]:
                if weight not in name:
                    continue
                if "visual" in name and "up_proj" not in name and "gate_proj" not in name:
                    continue
                target = name.replace(weight, param)
                if target in self.params:
                    self._shard(target, shard, t)
                    self.loaded.append(name)
                break
            else:
                target = name.replace("attn.qkv.", "attn.qkv_proj.") if "visual" in name else name
                if target in self.params:  # unknown names are skipped without an error, as in SGLang
                    self.params[target].copy_(t)
                    self.loaded.append(name)


class FakeTokenizerManager:
    def __init__(self, engine: FakeEngine):
        self.engine = engine

    async def check_weights(self, *args: Any, **kwargs: Any) -> tuple[bool, str, list[dict], str]:
        bound = recorded_signature(RECORD["check_weights"]["method"]).bind(*args, **kwargs)
        obj = bound.arguments["obj"]
        self.engine.calls.append(("check_weights", dict(bound.arguments)))
        assert isinstance(obj, CheckWeightsReqInput) and obj.action == "checksum"
        sums = {name: f"{tensor_hash(p):016x}" for name, p in self.engine.model.params.items()}
        return True, "Success.", [{"checksums": sums}], "digest"


class FakeEngine:
    """``sglang.Engine`` with the recorded signatures, logging its calls (see the module docstring)."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []  # every call of every fake engine, in order
    drop: ClassVar[set[str]] = set()  # checkpoint names the next engine's model skips
    extra_params: ClassVar[dict[str, Tensor]] = {}  # SGLang parameters no checkpoint name reaches
    prompt_tokens: ClassVar[Any] = None  # (text, images) -> prompt length; None: the checkpoint's processor's

    def __init__(self, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(RECORD["server_args"]))
        if unknown:
            raise TypeError(f"ServerArgs has no field(s) {unknown}")
        self.calls.append(("__init__", dict(kwargs)))
        self.server_args = dict(kwargs)
        ckpt = load_checkpoint(kwargs["model_path"])
        self.model = FakeModel(sglang_params(ckpt, _DTYPES[kwargs["dtype"]]), set(self.drop))
        self.model.params.update({k: v.clone() for k, v in self.extra_params.items()})
        self.model.load_weights(list(ckpt.items()))  # as SGLang loads model_path: the saved names
        from rarl_fast.model import load_processor

        self.processor = load_processor(kwargs["model_path"], local_files_only=True)  # the checkpoint's bounds
        self.released: set[str] = set()
        self.session = False
        self.loop = asyncio.new_event_loop()
        self.tokenizer_manager = FakeTokenizerManager(self)

    def _bind(self, method: str, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = recorded_signature(RECORD["engine_methods"][method]).bind(*args, **kwargs)
        self.calls.append((method, dict(bound.arguments)))
        return dict(bound.arguments)

    def generate(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        a = self._bind("generate", args, kwargs)
        assert not self.released, f"generate with released memory {sorted(self.released)}"
        prompts, images = a["prompt"], a["image_data"]
        sampling = a["sampling_params"]
        per_request = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        assert len(per_request) == len(prompts) == len(images)
        outputs = []
        for text, imgs, sp in zip(prompts, images, per_request):
            unknown = sorted(set(sp) - set(RECORD["sampling_params"]))
            if unknown:
                raise TypeError(f"SamplingParams has no field(s) {unknown}")
            outputs.append(self._sample(text, imgs, sp, bool(a.get("return_logprob"))))
        return outputs

    def _sample(self, text: str, imgs: list[Any], sp: dict[str, Any], logprob: bool) -> dict[str, Any]:
        n = int(sp.get("max_new_tokens", 16))
        key = hashlib.blake2b(f"{sp.get('sampling_seed', 42)}|{text}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        ids = torch.randint(10, 600, (n,), generator=gen).tolist()
        lps = (-torch.rand(n, generator=gen) * 3).tolist()
        meta: dict[str, Any] = {"finish_reason": {"type": "length"}}
        if logprob:
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(lps, ids)]
        count = type(self).prompt_tokens  # a plain function (not bound to the engine)
        if count is not None:
            meta["prompt_tokens"] = count(text, imgs)
        else:  # SGLang expands the placeholders with its own (the checkpoint's) image processor
            enc = self.processor(text=[text], images=[imgs] if imgs else None, return_tensors="pt")
            meta["prompt_tokens"] = int(enc["input_ids"].shape[1])
        return {"text": "", "output_ids": ids, "meta_info": meta}

    def begin_weight_update(self, *args: Any, **kwargs: Any) -> tuple[bool, str]:
        self._bind("begin_weight_update", args, kwargs)
        if self.session:
            return False, "a weight-update session is already open"
        self.session = True
        return True, "Success"

    def end_weight_update(self, *args: Any, **kwargs: Any) -> tuple[bool, str]:
        self._bind("end_weight_update", args, kwargs)
        if not self.session:
            return False, "no weight-update session is open"
        self.session = False
        return True, "Success"

    def update_weights_from_tensor(self, *args: Any, **kwargs: Any) -> tuple[bool, str]:
        a = self._bind("update_weights_from_tensor", args, kwargs)
        assert "weights" not in self.released, "update into released weight memory"
        if not self.session:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        assert a["named_tensors"], "empty bucket"
        self.model.load_weights(a["named_tensors"])
        return True, "Success"

    def release_memory_occupation(self, *args: Any, **kwargs: Any) -> None:
        a = self._bind("release_memory_occupation", args, kwargs)
        tags = a.get("tags") or RECORD["memory_tags"]
        assert set(tags) <= set(RECORD["memory_tags"]), tags
        self.released |= set(tags)
        if "weights" in tags and not self.server_args.get("enable_weights_cpu_backup"):
            for p in self.model.params.values():
                p.fill_(float("nan"))  # paused without a backup: the values are gone

    def resume_memory_occupation(self, *args: Any, **kwargs: Any) -> None:
        a = self._bind("resume_memory_occupation", args, kwargs)
        tags = a.get("tags") or RECORD["memory_tags"]
        assert set(tags) <= self.released, f"resume of {tags} that were not released"
        self.released -= set(tags)

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        self._bind("shutdown", args, kwargs)
        self.loop.close()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the fake engine does not model Engine.{name}")


def load_checkpoint(model_path: str) -> dict[str, Tensor]:
    """The tensors of a ``save_pretrained`` folder, by the names they are saved under."""
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def install(monkeypatch: Any) -> type[FakeEngine]:
    """Put the fake ``sglang`` modules in ``sys.modules`` (reset its call log) and return the engine class."""
    FakeEngine.calls = []
    FakeEngine.drop = set()
    FakeEngine.extra_params = {}
    FakeEngine.prompt_tokens = None
    mods = {
        "sglang": {"Engine": FakeEngine, "__version__": RECORD["sglang"]},
        "sglang.srt": {},
        "sglang.srt.managers": {},
        "sglang.srt.managers.io_struct": {"CheckWeightsReqInput": CheckWeightsReqInput},
        "sglang.srt.managers.mm_utils": {"tensor_hash": tensor_hash},
    }
    for name, attrs in mods.items():
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for k, v in attrs.items():
            setattr(mod, k, v)
        monkeypatch.setitem(sys.modules, name, mod)
    return FakeEngine
