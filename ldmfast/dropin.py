"""``ldmfast.accelerate(pipe)``: ldmfast's U-Net and VAE decoder inside a diffusers pipeline.

    pipe = StableDiffusionPipeline.from_pretrained(...).to("cuda", torch.float16)
    ldmfast.accelerate(pipe)                 # same API, same outputs, ldmfast kernels
    ldmfast.accelerate(pipe, restore=True)   # back to diffusers' own modules

The diffusers modules stay where they are (``pipe.unet``, ``pipe.vae``, their ``.config``,
``.dtype``, hooks, ``.to()``); their ``forward`` (U-Net) and ``decode`` (VAE) are replaced, on the
instance, by thin adapters that take diffusers' arguments and return diffusers' output types,
computed by an ldmfast module built over THE SAME TENSORS: each ldmfast parameter is the diffusers
``nn.Parameter`` object itself (found through the diffusers->CompVis key map of
``ldmfast.models.convert``), or, where the layouts differ only by a reshape (the VAE attention's
linear layers, 1x1 convolutions in CompVis), a view of it. Nothing is copied, so in-place updates
(``param.data.add_()``, LoRA fusing) and ``.to()`` on the diffusers module are seen by the ldmfast
one; a parameter object that was replaced is noticed at the next call (its identity is checked)
and the ldmfast module is rebuilt over the new tensors.

What the adapters cannot honour they hand to the original diffusers code (logged once per
module), never computing something else: U-Net calls with ``timestep_cond``, attention masks,
``cross_attention_kwargs`` (LoRA scale, IP-Adapter), ``added_cond_kwargs``, ControlNet/T2I
residuals, latent sizes the U-Net does not divide evenly, modules with PEFT adapters loaded,
attention processors other than diffusers' plain ones (``AttnProcessor``, ``AttnProcessor2_0``,
``XFormersAttnProcessor``, ``SlicedAttnProcessor``) or fused QKV projections; VAE decodes with
slicing or tiling enabled. Configurations the CompVis architecture cannot express at all (SDXL's
added embeddings, class-embedding types...) are refused by ``accelerate`` itself with the
converter's message. ``vae.encode`` is always diffusers' own.

``accelerate(pipe, cuda_graph=True)`` also replays the calls it computes from CUDA graphs
(``ldmfast.graphs.GraphCache``, one memory pool for the pipeline's U-Net and decoder), one graph
per input shapes and dtypes, inference mode and global setting (``graph_settings``): an eager
step pays the host's cost of each of its launches, a replay pays it once. Parameters updated in
place are read by the next replay; when any moves (``.to()``) or is replaced, all of that
module's graphs are dropped and captured again as calls come. Calls with autograd recording,
under autocast, inside someone else's capture or on CPU run eagerly (a warning once per reason).
Graph memory is held until ``restore=True`` or ``cuda_graph=False``. A LoRA merged into the
weights in place is seen by the graphs as by the eager path; LoRA layers kept loaded through
PEFT send every call to diffusers' own code, as said above.
"""
from __future__ import annotations

import itertools
import logging
import weakref

import torch
import torch.nn as nn

log = logging.getLogger("ldmfast")

__all__ = ["accelerate", "fast_module", "is_accelerated"]

_MARK = "_ldmfast_accelerated"
_TAGS = itertools.count()
# diffusers attention processors that compute plain softmax(QK^T/sqrt(d))V on to_q/k/v/out
_PLAIN_PROCESSORS = frozenset(("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor",
                               "SlicedAttnProcessor"))


# ------------------------------------------------------------------------- shared-weight build

def _entries(src: nn.Module):
    """state-dict name -> (owning module, attribute name, tensor) for src's parameters and
    persistent buffers, the tensors being the module's own objects."""
    out = {}
    for mname, mod in src.named_modules():
        prefix = mname + "." if mname else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out[prefix + name] = (mod, name, p)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[prefix + name] = (mod, name, b)
    return out


def _config(src) -> dict:
    cfg = src.config
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


class _Shared:
    """An ldmfast module whose tensors are a diffusers module's, and the checks that keep it so."""

    def __init__(self, src: nn.Module, part: str):
        self.src, self.part = src, part
        self.cls = type(src).__name__
        self.attention = [m for m in src.modules() if type(m).__name__ == "Attention"]
        self.generation = 0  # counts builds: graphs captured against an older one are stale
        self._build()

    def _build(self):
        from .models import build_first_stage, build_unet
        from .models import convert

        entries = _entries(self.src)
        sd = {k: t for k, (_, _, t) in entries.items()}
        with torch.no_grad():  # the VAE attention reshapes become plain views
            if self.part == "unet":
                mapped, cfg = convert.unet_from_diffusers(sd, _config(self.src), self.cls)
                builder = build_unet
            else:
                mapped, cfg = convert.first_stage_from_diffusers(sd, _config(self.src), self.cls)
                builder = build_first_stage
        owner = {id(t): (mod, name) for mod, name, t in entries.values()}
        with torch.device("meta"):
            fast = builder(cfg)
        same, views = [], []
        for name, t in mapped.items():
            mod_name, _, attr = name.rpartition(".")
            dst = fast.get_submodule(mod_name) if mod_name else fast
            slot = dst._parameters if attr in dst._parameters else dst._buffers
            if attr not in slot:
                raise ValueError(f"ldmfast.accelerate({self.cls}): {name} has no place in the "
                                 "ldmfast module")
            expected = slot[attr].shape
            if id(t) in owner:
                if tuple(t.shape) != tuple(expected):
                    raise ValueError(f"ldmfast.accelerate({self.cls}): {name} is "
                                     f"{tuple(t.shape)}, the ldmfast module expects {tuple(expected)}")
                slot[attr] = t  # the diffusers object itself
                same.append((*owner[id(t)], t))
            else:
                base = t._base
                if base is None or id(base) not in owner or t.data_ptr() != base.data_ptr():
                    raise ValueError(f"ldmfast.accelerate({self.cls}): {name} would be a copy, "
                                     "not the diffusers tensor; sharing is impossible")
                view = t.view(expected)
                slot[attr] = nn.Parameter(view, requires_grad=False) if slot is dst._parameters \
                    else view
                views.append((base, slot[attr]))
        left = [n for n, t in list(fast.named_parameters()) + list(fast.named_buffers())
                if t.is_meta]
        if left:
            raise ValueError(f"ldmfast.accelerate({self.cls}): no diffusers tensor for "
                             f"{', '.join(left[:8])}")
        self.fast = fast.train(self.src.training)
        self.config = cfg
        self._same, self._views = same, views
        self.tensors = tuple(fast.parameters()) + tuple(fast.buffers())
        self.generation += 1

    def module(self) -> nn.Module:
        """The ldmfast module, rebuilt first if a diffusers tensor object was replaced or moved
        (an identity check per tensor: tens of microseconds for SD's U-Net)."""
        stale = any(mod._parameters.get(name, mod._buffers.get(name)) is not t
                    for mod, name, t in self._same)
        stale = stale or any(v.data_ptr() != b.data_ptr() or v.dtype != b.dtype
                             or v.device != b.device for b, v in self._views)
        if stale:
            log.info("ldmfast.accelerate: %s tensors were replaced; sharing them again", self.cls)
            self._build()
        return self.fast

    def processors_ok(self):
        for m in self.attention:
            if getattr(m, "fused_projections", False):
                return "fused QKV projections"
            name = type(getattr(m, "processor", None)).__name__
            if name not in _PLAIN_PROCESSORS:
                return f"attention processor {name}"
        return None


class _Adapter:
    """Shared bookkeeping of the two adapters: the original callable and one-time logging."""

    def __init__(self, src, shared, attr):
        self.src, self.shared, self.attr = src, shared, attr
        self.own = src.__dict__.get(attr)  # an instance-level override we replace, if any
        self._said = set()
        self.graphs = None  # a GraphCache when accelerate(..., cuda_graph=...) asked for graphs
        # Tags this adapter's keys in a GraphCache that others may share (an id() could be reused)
        self._tag = ("ldmfast.accelerate", next(_TAGS))
        self._graphed_generation = None  # the module build the graphs were captured on
        self._finalizer = None

    def original(self):
        return self.own if self.own is not None else getattr(type(self.src), self.attr).__get__(
            self.src)

    def say_once(self, what):
        if what not in self._said:
            self._said.add(what)
            log.warning("ldmfast.accelerate: %s: %s", self.shared.cls, what)

    def passthrough(self, reason):
        self.say_once(f"{reason}; using diffusers' own {self.attr} for such calls")

    def set_graphs(self, cache):
        if cache is self.graphs:
            return
        self.drop_graphs()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.graphs, self._graphed_generation = cache, None
        if cache is not None:
            # an adapter dropped without restore=True (its module deleted) leaves no graphs behind
            self._finalizer = weakref.finalize(self, _discard_tagged, cache, self._tag)

    def drop_graphs(self):
        if self.graphs is not None:
            _discard_tagged(self.graphs, self._tag)

    def eager_reason(self, device):
        """Why this call cannot replay a graph (None: it can)."""
        if self.graphs.requires_cuda:
            if device.type != "cuda":
                return f"the call is on {device.type}, CUDA graphs need CUDA tensors"
            if torch.cuda.is_current_stream_capturing():
                return "a CUDA graph capture is in progress (the call is recorded into it)"
        if torch.is_grad_enabled():
            return "autograd is recording (graphs replay under torch.no_grad() only)"
        if torch.is_autocast_enabled(device.type):
            return "autocast is on"
        return None

    def compute(self, part, fn, inputs, device):
        """fn(**inputs), from a CUDA graph when graphs are on and the call allows one."""
        reason = "no graphs" if self.graphs is None else self.eager_reason(device)
        if reason is not None:
            if self.graphs is not None:
                self.say_once(f"cuda_graph: {reason}; such calls run eagerly")
            return fn(**inputs)
        from .graphs import tensor_spec
        from .models.ops import graph_settings

        shared = self.shared
        if shared.generation != self._graphed_generation:
            # Rebuilt over new tensor objects: the graphs read the old ones. (Tensors moved by
            # .to() are the cache's watch: it drops every graph captured on the old addresses.)
            self.drop_graphs()
            self._graphed_generation = shared.generation
        key = self._tag + (part, graph_settings(), torch.is_inference_mode_enabled(),
                           tensor_spec(inputs))
        return self.graphs.run(key, fn, inputs, watch=shared.tensors)

    def common_reason(self):
        if getattr(self.src, "_hf_peft_config_loaded", False) or getattr(self.src, "peft_config",
                                                                          None):
            return "PEFT adapters are loaded"
        return self.shared.processors_ok()


def _discard_tagged(cache, tag):
    cache.discard(lambda key: isinstance(key, tuple) and key[:2] == tag)


def _output_type(module_path, name):
    try:
        mod = __import__(module_path, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError):
        return None


class _UNetForward(_Adapter):
    """diffusers ``UNet2DConditionModel.forward`` computed by ldmfast's U-Net."""

    def __init__(self, src, shared):
        super().__init__(src, shared, "forward")
        self.factor = 2 ** (len(src.config.block_out_channels) - 1)
        self.output = _output_type("diffusers.models.unets.unet_2d_condition",
                                   "UNet2DConditionOutput")

    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None,
                 timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                 added_cond_kwargs=None, down_block_additional_residuals=None,
                 mid_block_additional_residual=None, down_intrablock_additional_residuals=None,
                 encoder_attention_mask=None, return_dict=True):
        reason = self.common_reason()
        named = {"timestep_cond": timestep_cond, "attention_mask": attention_mask,
                 "encoder_attention_mask": encoder_attention_mask,
                 "down_block_additional_residuals": down_block_additional_residuals,
                 "mid_block_additional_residual": mid_block_additional_residual,
                 "down_intrablock_additional_residuals": down_intrablock_additional_residuals}
        for k, v in named.items():
            if reason is None and v is not None:
                reason = f"{k} is given"
        if reason is None and cross_attention_kwargs:
            reason = f"cross_attention_kwargs {sorted(cross_attention_kwargs)}"
        if reason is None and added_cond_kwargs:
            reason = f"added_cond_kwargs {sorted(added_cond_kwargs)}"
        if reason is None and (sample.shape[-2] % self.factor or sample.shape[-1] % self.factor):
            reason = (f"the latent size {tuple(sample.shape[-2:])} is not a multiple of "
                      f"{self.factor}")
        fast = None if reason else self.shared.module()
        if reason is None and class_labels is not None and fast.num_classes is None:
            reason = "class_labels given to a U-Net without class embedding"
        if reason is None and encoder_hidden_states is None and self.shared.config.get(
                "context_dim") is not None:
            reason = "no encoder_hidden_states"
        if reason is not None:
            self.passthrough(reason)
            return self.original()(
                sample, timestep, encoder_hidden_states, class_labels=class_labels,
                timestep_cond=timestep_cond, attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=added_cond_kwargs,
                down_block_additional_residuals=down_block_additional_residuals,
                mid_block_additional_residual=mid_block_additional_residual,
                down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                encoder_attention_mask=encoder_attention_mask, return_dict=return_dict)
        t = timestep
        if not torch.is_tensor(t):
            # as diffusers: a Python number becomes a one-element tensor (a host-to-device copy)
            t = torch.tensor([t], dtype=torch.float32 if isinstance(t, float) else torch.int64,
                             device=sample.device)
        elif t.dim() == 0:
            t = t[None]
        t = t.to(sample.device).expand(sample.shape[0])

        def unet(sample, t, context, y):
            return fast(sample, t, context=context, y=y)
        out = self.compute("unet", unet, {
            "sample": sample, "t": t, "context": encoder_hidden_states,
            "y": class_labels if fast.num_classes is not None else None}, sample.device)
        if not return_dict:
            return (out,)
        return self.output(sample=out) if self.output is not None else (out,)


class _VAEDecode(_Adapter):
    """diffusers ``AutoencoderKL.decode`` computed by ldmfast's decoder."""

    def __init__(self, src, shared):
        super().__init__(src, shared, "decode")
        self.output = _output_type("diffusers.models.autoencoders.vae", "DecoderOutput")

    def __call__(self, z, return_dict=True, generator=None):
        reason = self.common_reason()
        if reason is None and (getattr(self.src, "use_slicing", False)
                               or getattr(self.src, "use_tiling", False)):
            reason = "slicing or tiling is enabled"
        if reason is not None:
            self.passthrough(reason)
            return self.original()(z, return_dict=return_dict, generator=generator)
        fast = self.shared.module()
        out = self.compute("decode", lambda z: fast.decode(z), {"z": z}, z.device)
        if not return_dict:
            return (out,)
        return self.output(sample=out) if self.output is not None else (out,)


# --------------------------------------------------------------------------------- the entry

_KINDS = {"UNet2DConditionModel": ("unet", "forward", _UNetForward),
          "AutoencoderKL": ("first_stage", "decode", _VAEDecode)}


def is_accelerated(module) -> bool:
    return isinstance(getattr(module, "__dict__", {}).get(_MARK), _Adapter)


def fast_module(module) -> nn.Module:
    """The ldmfast module behind an accelerated diffusers module (its tensors are the
    module's)."""
    if not is_accelerated(module):
        raise ValueError(f"{type(module).__name__} is not accelerated by ldmfast")
    return module.__dict__[_MARK].shared.module()


def _restore(module):
    current = module.__dict__.get(_MARK)
    if current is None:
        return
    current.set_graphs(None)
    if current.own is not None:
        module.__dict__[current.attr] = current.own
    else:
        module.__dict__.pop(current.attr, None)
    del module.__dict__[_MARK]


def _adapter(module):
    """The module's adapter, made and installed now if it has none."""
    current = module.__dict__.get(_MARK)
    if current is None:
        if getattr(module, "_hf_hook", None) is not None:
            raise ValueError(f"ldmfast.accelerate: this {type(module).__name__} has accelerate "
                             "hooks (model CPU offload, device maps); call ldmfast.accelerate "
                             "before enabling them")
        part, attr, adapter_cls = _KINDS[type(module).__name__]
        current = adapter_cls(module, _Shared(module, part))
        module.__dict__[attr] = current
        module.__dict__[_MARK] = current
    return current


def _modules(obj, restore):
    """The diffusers modules accelerate acts on: obj itself, or a pipeline's .unet and .vae."""
    if isinstance(obj, nn.Module):
        mods = [obj]
    else:
        unet, vae = getattr(obj, "unet", None), getattr(obj, "vae", None)
        if unet is None and vae is None:
            raise ValueError(f"ldmfast.accelerate: {type(obj).__name__} is neither a diffusers "
                             "pipeline with .unet/.vae nor a UNet2DConditionModel/AutoencoderKL")
        mods = [unet] if unet is not None else []
        if vae is not None:
            if type(vae).__name__ in _KINDS:
                mods.append(vae)
            elif not restore:
                log.info("ldmfast.accelerate: %s is left to diffusers", type(vae).__name__)
    for m in mods:
        if type(m).__name__ not in _KINDS:
            raise ValueError(f"ldmfast.accelerate: {type(m).__name__} is not supported "
                             "(UNet2DConditionModel, AutoencoderKL, or a pipeline holding them as "
                             ".unet / .vae)")
    return mods


def accelerate(obj, restore: bool = False, cuda_graph=None):
    """Puts ldmfast's U-Net and VAE decoder into a diffusers pipeline (``.unet``, and ``.vae``
    when it is an ``AutoencoderKL``) or into a bare ``UNet2DConditionModel`` / ``AutoencoderKL``,
    sharing their weight tensors; ``restore=True`` undoes it. Returns ``obj``.

    cuda_graph: True replays the calls from CUDA graphs, all modules of ``obj`` sharing one
    ``ldmfast.graphs.GraphCache`` (one memory pool; the one they already have, if any, so
    calling again keeps the captured graphs); a ``GraphCache`` uses that one (e.g. one with
    ``eager_capture``, the same path without capturing); False turns graphs off; None (the
    default) leaves the setting as it is (off for a module accelerated now)."""
    from .graphs import GraphCache

    if cuda_graph is not None and not isinstance(cuda_graph, (bool, GraphCache)):
        raise TypeError(f"ldmfast.accelerate: cuda_graph must be True, False, None or a "
                        f"ldmfast.graphs.GraphCache, got {type(cuda_graph).__name__}")
    # (a GraphCache is falsy while empty: it has a length, so no truth tests on it here)
    if restore and cuda_graph is not None and cuda_graph is not False:
        raise ValueError("ldmfast.accelerate: cuda_graph has no meaning with restore=True")
    mods = _modules(obj, restore)
    if restore:
        for m in mods:
            _restore(m)
        return obj
    graphs = None
    if cuda_graph is True:
        current = [m.__dict__.get(_MARK) for m in mods]
        existing = [a.graphs for a in current if a is not None and a.graphs is not None]
        graphs = existing[0] if existing else GraphCache()
    elif isinstance(cuda_graph, GraphCache):
        graphs = cuda_graph
    if graphs is not None and graphs.requires_cuda and not torch.cuda.is_available():
        raise ValueError("ldmfast.accelerate: cuda_graph needs CUDA, and torch sees no CUDA "
                         "device here (pass cuda_graph=False)")
    # Every adapter first; a refusal undoes the ones this call made and changes nothing else.
    new = [m for m in mods if m.__dict__.get(_MARK) is None]
    try:
        adapters = [_adapter(m) for m in mods]
    except Exception:
        for m in new:
            _restore(m)
        raise
    if cuda_graph is not None:
        for a in adapters:
            a.set_graphs(graphs)
    return obj
