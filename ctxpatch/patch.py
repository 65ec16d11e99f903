"""`apply` and the `Patch` handle: install a plan on a model instance, and take it off again.

What a patch changes, all on the instance and all undone by `remove()`:
  * the model's attention implementation becomes "ctxpatch" (transformers' `AttentionInterface`);
  * a forward hook makes the rotary embedding return the identity rotation, so q and k reach
    ctxpatch un-rotated and the KV cache holds un-rotated keys; ctxpatch rotates them inside
    attention at the positions each method asks for;
  * pre-hooks pass the KV cache to the attention function and, when no position ids are given,
    derive them from the attention mask (left padding ignored);
  * per-layer method tensors (KERPLE's r1, r2) are added as a submodule `ctxpatch` of each
    attention module, so they train and save with the model;
  * the instance's `save_pretrained` also writes `ctxpatch.json` (what `ctxpatch.load` re-applies) and warns
    that plain transformers loads the folder unpatched.

Applying a second patch to a patched model is an `AlreadyPatchedError`: remove the first
(`patch.remove()` or `ctxpatch.remove(model)`) or pass `replace=True`.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ._compat import transformers as hf
from .adapters import find_adapter
from .backends import get_backend
from .compose import build_plan
from .errors import AlreadyPatchedError, CtxpatchError, UserInputError
from .kinds import CachePolicy
from .plan import AttentionCall, ForwardShare, LayerPlan, LayerRuntime, make_runtime
from .record import record_on_save
from .registry import Method
from .rotary import Rotary
from .spec import parse_spec, spec_from_dict  # noqa: F401  (spec_from_dict: public here too)

RUNTIME = "_ctxpatch_runtime"  # attribute of a patched attention module
PATCH = "_ctxpatch_patch"  # attribute of a patched model


class KeyRecord:
    """Position and padding flag of every key in a KV cache, per cache and layer, kept beside it.

    The cache holds un-rotated keys; to rotate them at attention time ctxpatch needs their
    positions, which are the position ids they were written with (not their index: left padding,
    position ids that skip ahead, sliding caches and cache policies all make the two differ).
    A layer's record mirrors the keys the layer holds, with the count of keys written to it so far
    (`_compat.transformers.cache_written`), which tells how many were cropped from its end since.
    """

    def __init__(self) -> None:
        self._records: weakref.WeakKeyDictionary[Any, dict[int, _Held]] = weakref.WeakKeyDictionary()

    def keys_for(self, cache: Any, layer_idx: int, q_pos: Tensor, q_real: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
        """(positions, real flags) of all `num_keys` keys after the cache took the new ones."""
        new = q_pos.shape[1]
        if cache is None:
            if num_keys != new:
                raise CtxpatchError(f"attention got {num_keys} keys for {new} queries and no cache")
            return q_pos, q_real
        if hf.is_static_cache(cache):
            raise CtxpatchError(
                "a static (compileable) KV cache is not supported under a ctxpatch patch; "
                "use the default dynamic cache (do not pass cache_implementation='static')"
            )
        record = self._records.setdefault(cache, {}).get(layer_idx)
        held, written = hf.cache_length(cache, layer_idx), hf.cache_written(cache, layer_idx)
        old = max(num_keys - new, held - new)  # keys held before this update (a recording sliding layer returns fewer)
        positions, real = q_pos, q_real
        if old:
            past_pos, past_real = _before_update(record, old, written - new)
            positions = torch.cat([past_pos.expand(q_pos.shape[0], -1), q_pos], dim=1)  # (B, old + new)
            real = torch.cat([past_real.expand(q_pos.shape[0], -1), q_real], dim=1)
        self._records[cache][layer_idx] = _Held(positions[:, old + new - held :], real[:, old + new - held :], written)
        return positions[:, old + new - num_keys :], real[:, old + new - num_keys :]

    def keep(self, cache: Any, layer_idx: int, keep: Tensor) -> None:
        """Apply a cache policy: each row keeps the keys at indices `keep` (B, K), in the cache and the record."""
        hf.keep_cached(cache, layer_idx, keep)
        record = self._records[cache][layer_idx]
        self._records[cache][layer_idx] = _Held(
            record.positions.gather(1, keep), record.real.gather(1, keep), hf.cache_written(cache, layer_idx), True
        )

    def apply_policy(self, cache: Any, layer_idx: int, policy: CachePolicy) -> None:
        """Let a cache policy choose among the keys a layer's cache holds (a sliding layer holds only the last of
        its window, so the model's window wins over the policy)."""
        record = self._records[cache][layer_idx]
        keep = policy.keep(record.positions, record.real)  # (B, K) indices among the held keys; None: all
        if keep is not None:
            self.keep(cache, layer_idx, keep)

    def next_positions(self, cache: Any, length: int) -> Tensor | None:
        """Positions of `length` new tokens after what layer 0 of the cache holds (None: unknown)."""
        record = self._records.get(cache, {}).get(0) if cache is not None else None
        if record is None:
            return None
        kept = record.positions.shape[1] - (record.written - hf.cache_written(cache, 0))  # less what was cropped
        if kept <= 0:
            return None
        return record.positions[:, kept - 1 : kept] + 1 + torch.arange(length, device=record.positions.device)


@dataclass
class _Held:
    """The keys a cache layer held after a call: positions and real flags (B, held), and how many keys had been
    written to the layer by then."""

    positions: Tensor
    real: Tensor
    written: int
    evicted: bool = False  # a cache policy dropped keys after the last write


def _before_update(record: _Held | None, old: int, written: int) -> tuple[Tensor, Tensor]:
    """(positions, real flags) (B, old) of the `old` keys a layer held before an update, when `written` keys had
    been written to it. Fewer were written than the record says when the cache was cropped from its end since
    (speculative decoding); a sliding layer drops its first keys as it goes, so the `old` are the record's last."""
    cropped = -1 if record is None else record.written - written
    first = -1 if record is None else record.positions.shape[1] - cropped - old
    if cropped > 0 and record.evicted:
        raise UserInputError(
            "a cache policy (sinks) dropped keys that the tokens speculative decoding then rejected had pushed out of "
            "its window, so the cache cannot be rolled back: generate without assistant_model (or prompt_lookup)"
        )
    if cropped < 0 or first < 0:
        raise CtxpatchError(
            "the KV cache holds keys written before this patch was applied (or by another "
            "model); ctxpatch needs to see every key written. Start from a fresh cache."
        )
    return record.positions[:, first : first + old], record.real[:, first : first + old]


@dataclass
class InstalledLayer:
    """What a patched attention module carries: its runtime, the backend that runs it, and the
    key record shared by every layer of the model."""

    runtime: LayerRuntime
    backend: Callable[..., Tensor]
    key_record: KeyRecord
    share: ForwardShare


def ctxpatch_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    """The function registered with transformers' AttentionInterface under "ctxpatch"."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise CtxpatchError("ctxpatch builds its own masks: pass a 2D attention_mask (batch, keys) or none")
    installed: InstalledLayer | None = getattr(module, RUNTIME, None)
    if installed is None:  # a model sharing its config with a patched one: transformers' own attention
        return hf.plain_attention(
            module, query, key, value, attention_mask, scaling, dropout if module.training else 0.0, kwargs
        )
    runtime, record = installed.runtime, installed.key_record
    layer_idx = hf.layer_index(module)
    batch, _, tq, _ = query.shape
    tk = key.shape[2]
    q_pos = hf.attention_position_ids(kwargs)
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk, device=query.device)[None]
    q_pos = q_pos.to(query.device).expand(batch, tq)
    q_real = torch.ones_like(q_pos, dtype=torch.bool) if attention_mask is None else attention_mask[:, -tq:]
    cache = kwargs.get(hf.CACHE_KWARG)
    k_pos, k_real = record.keys_for(cache, layer_idx, q_pos, q_real, tk)
    call = AttentionCall(
        q_pos=q_pos,
        k_pos=k_pos,
        key_padding=None if bool(k_real.all()) else k_real,
        scaling=hf.attention_scaling(module, scaling),
        dropout=dropout if module.training else 0.0,
        native_window=hf.native_sliding_window(kwargs),
        softcap=hf.attention_softcap(kwargs),
        share=installed.share,
    )
    out = installed.backend(query, key, value, call, runtime).contiguous()
    if runtime.plan.cache is not None and cache is not None:
        record.apply_policy(cache, layer_idx, runtime.plan.cache)
    return out, None


class Patch:
    """A patch installed on a model; `remove()` (or leaving a `with` block) takes it off."""

    def __init__(
        self, model: nn.Module, methods: list[Method], plans: list[LayerPlan], backend: str, target_len: int | None = None
    ):
        self.model = model
        self.methods = methods
        self.plans = plans
        self.backend = backend
        self.target_len = target_len
        self.active = False
        self._undo: list[Any] = []
        self._rotaries: list[Rotary] = []  # the rotary maps the patch built for its position rules

    # ---- install / remove --------------------------------------------------------------------

    def _install(self, adapter) -> None:
        model, keyword = self.model, hf.cache_keyword(adapter.attentions[0])
        backend, key_record = get_backend(self.backend), KeyRecord()
        share = ForwardShare(final_layer=max(plan.index for plan in self.plans))
        rotaries: dict[tuple, Rotary] = {}
        for attention, plan in zip(adapter.attentions, self.plans):
            device = next(attention.parameters()).device
            runtime = make_runtime(plan, adapter.rotary_of(plan.index), model.config, adapter.info, device, rotaries)
            setattr(attention, RUNTIME, InstalledLayer(runtime, backend, key_record, share))
            self._undo.append(lambda a=attention: delattr(a, RUNTIME))
            if runtime.tensors is not None:
                attention.add_module("ctxpatch", runtime.tensors)
                self._undo.append(lambda a=attention: delattr(a, "ctxpatch"))
            hook = attention.register_forward_pre_hook(_pass_cache(keyword), with_kwargs=True)
            self._undo.append(hook.remove)
        positions = _default_positions(key_record, hf.cache_keyword(adapter.base))  # GPT-NeoX: not its layers' name
        hook = adapter.base.register_forward_pre_hook(positions, with_kwargs=True)
        self._undo.append(hook.remove)
        hook = adapter.rotary.module.register_forward_hook(_identity_rotation)
        self._undo.append(hook.remove)
        previous = hf.attn_implementation(model)
        hf.register(ctxpatch_attention)
        hf.set_attn_implementation(model, hf.IMPLEMENTATION)
        self._undo.append(lambda: hf.set_attn_implementation(model, previous))
        self._undo.append(record_on_save(model, self, adapter.info.train_len))
        setattr(model, PATCH, self)
        self._undo.append(lambda: delattr(model, PATCH))
        self._rotaries = list(rotaries.values())
        self.active = True

    def rotates_by_forward_length(self) -> bool:
        """Whether a rotary map the patch built recomputes its frequencies from the length of each forward
        (`dynamic`, `longrope`): a prompt fed in pieces through the cache then differs from one forward over it."""
        return any(hf.length_dependent_rope(rotary.module) for rotary in self._rotaries)

    def remove(self) -> None:
        """Take the patch off: the model computes exactly what it did before `apply`."""
        while self._undo:
            self._undo.pop()()
        self.active = False

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ---- what it is --------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """The patch's own trainable parameters (KERPLE's r1, r2), across layers."""
        out = []
        for attention in self._attentions():
            holder = getattr(attention, "ctxpatch", None)
            if holder is not None:
                out.extend(holder.parameters())
        return out

    def _attentions(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if getattr(m, RUNTIME, None) is not None]

    @property
    def spec(self) -> str:
        return "+".join(m.name for m in self.methods) or "none"

    def to_dict(self) -> dict[str, Any]:
        """The spec with resolved parameters and layers (what `ctxpatch.json` records)."""
        return {
            "spec": self.spec,
            "backend": self.backend,
            "target_len": self.target_len,
            "methods": [
                {"name": m.name, "params": dict(m.values), "layers": m.layers, "from_target_len": list(m.derived)}
                for m in self.methods
            ],
        }

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        target = "" if self.target_len is None else f", target_len={self.target_len}"
        lines = [f"Patch({self.spec!r}, backend={self.backend!r}{target}, {state})"]
        for m in self.methods:
            layers = "all layers" if m.layers is None else f"layers {_ranges(m.layers)}"
            derived = f"; {', '.join(m.derived)} from target_len" if m.derived else ""
            lines.append(f"  {m.describe()}  [{m.kind}; {layers}{derived}]")
        return "\n".join(lines)


def _ranges(indices: Sequence[int]) -> str:
    out, start = [], None
    for n, index in enumerate(indices):
        if start is None:
            start = index
        if n + 1 == len(indices) or indices[n + 1] != index + 1:
            out.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(out) or "none"


def _pass_cache(keyword: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs[hf.CACHE_KWARG] = kwargs.get(keyword)
        return args, kwargs

    return hook


def _default_positions(record: KeyRecord, cache_keyword: str):
    """When no position ids are given: from a padded attention mask (left padding ignored), else
    after the positions the cache has seen (a cache policy may have dropped keys, so its length
    is not the position). Otherwise transformers' own default (arange after the cache) stands."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("position_ids") is not None:
            return None
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.all()):
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past + T)
            kwargs["position_ids"] = positions[:, -tokens.shape[1] :]
            return args, kwargs
        following = record.next_positions(kwargs.get(cache_keyword), tokens.shape[1])
        if following is None:
            return None
        kwargs["position_ids"] = following
        return args, kwargs

    return hook


def _identity_rotation(module: nn.Module, args: tuple, output: Any) -> Any:
    return hf.identity_rotary_output(output)


def apply(
    model: nn.Module,
    spec: str | Method | Sequence[str | Method] | dict[str, Any],
    *,
    backend: str = "blockwise",
    replace: bool = False,
    target_len: int | None = None,
    fine_tuned: bool = False,
    **params: Any,
) -> Patch:
    """Patch `model` in place with the methods of `spec` and return the `Patch` handle.

    `spec` is any form `ctxpatch.parse_spec` reads: "a+b", "yarn[factor=4]" (a bracket sets
    its own method's parameters), "none" (a Patch that changes nothing), a .json spec file, a
    `Patch.to_dict()`, or a list of names / method objects (`ctxpatch.method(...)`). Keyword
    parameters go to every method of the spec that takes them (`layers=` to all). Everything is
    checked before the model is touched: after an error the model is exactly as before.

    `target_len` (tokens): every parameter not given is chosen by its method's own rule so that what
    RoPE sees at that length stays inside the trained length (`repr(patch)` shows which).

    `fine_tuned=True`: the model was (or is about to be) fine-tuned under this spec. Without it, a method
    that is not training-free (`ctxpatch.methods()`) warns once per process; `ctxpatch.load(run)` and
    `ctxpatch finetune` pass it, as a run folder's ctxpatch.json names the patch it was trained under.
    """
    parsed = parse_spec(spec)
    get_backend(backend)
    adapter = find_adapter(model)
    target_len = parsed.target_len if target_len is None else target_len  # a .json spec may carry one
    methods, plans = build_plan(parsed.methods, params, adapter.info, target_len)
    if not fine_tuned:
        warn_untrained(methods)
    existing = getattr(model, PATCH, None)
    if existing is not None:
        if not replace:
            raise AlreadyPatchedError(
                f"this model already carries {existing.spec!r}; call patch.remove() (or "
                "ctxpatch.remove(model)) first, or pass replace=True"
            )
        existing.remove()
    patch = Patch(model, methods, plans, backend, target_len)
    if not methods:  # "none": nothing to install, the model computes what it did
        return patch
    try:
        patch._install(adapter)
    except BaseException:
        patch.remove()
        raise
    return patch


_WARNED_UNTRAINED: set[str] = set()  # methods `warn_untrained` has warned about in this process


def warn_untrained(methods: Sequence[Method]) -> None:
    """Warn once per process and method when a method that needs training is applied to an untrained model."""
    for name in dict.fromkeys(m.name for m in methods if not m.training_free):
        if name not in _WARNED_UNTRAINED:
            _WARNED_UNTRAINED.add(name)
            warnings.warn(
                f"{name} is not training-free: a pretrained model degrades under it until it is fine-tuned under "
                f"it (`ctxpatch finetune RECIPE patch={name}`, then `ctxpatch.load(RUN)`); pass fine_tuned=True "
                "if this model was trained under it",
                UserWarning,
                stacklevel=3,
            )


def remove(model: nn.Module) -> bool:
    """Remove the patch a model carries, if any; True when one was removed."""
    patch = getattr(model, PATCH, None)
    if patch is None:
        return False
    patch.remove()
    return True


def current_patch(model: nn.Module) -> Patch | None:
    return getattr(model, PATCH, None)
