"""Slow, explicit, loop-per-image oracle of StyleAligned on diffusion transformers (FLUX.1, SD3 / SD3.5).

Per attention layer and guidance group, image 0 is the reference and attends to its own tokens exactly as the
stock model does. A target's image-token queries / keys / values are AdaIN-normalised to the reference's image
tokens (after the q/k norms, before RoPE); with sharing on, every target query also attends to the reference's
image tokens: its un-normalised keys, rotated at the reference positions and scaled, with the shift added to
those logits, and its values (text queries too, unless `text_sees_reference` is off: then they see their own
keys only). The reference's text tokens are never shared. No code is shared with the package.
"""

import inspect
from collections.abc import Callable
import math
from dataclasses import dataclass

import torch
from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from tests.oracle import family_config, paper_config

EPS = 1e-5


def adain(x, ref):
    """(x - mean(x)) / std(x) * std(ref) + mean(ref), statistics over tokens (dim -2)."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + EPS).sqrt()
    ref_mean, ref_std = ref.mean(-2, keepdim=True), (ref.var(-2, keepdim=True) + EPS).sqrt()
    return (x - mean) / std * ref_std + ref_mean


def softmax_attention(q, k, v, shift_from=None, shift=0.0, mask=None):
    """softmax(q k^T / sqrt(d) + shift on keys from `shift_from` on) v, logits built explicitly.

    `mask` (queries, own keys) covers the first keys: boolean (False: masked out) or added to the logits, as SDPA
    takes a float mask.
    """
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        own = logits[..., : mask.shape[-1]]
        logits[..., : mask.shape[-1]] = own + mask if mask.is_floating_point() else own.masked_fill(~mask, -math.inf)
    if shift_from is not None:
        logits[..., shift_from:] += shift
    return logits.softmax(-1) @ v


def rope(x, rotary):
    """diffusers' FLUX RoPE on one image's (heads, tokens, dim) tensor; identity when `rotary` is None."""
    return x if rotary is None else apply_rotary_emb(x[None], rotary, sequence_dim=2)[0]


def adain_image(x, ref, image):
    """`x` (heads, tokens, dim) with its image tokens `x[:, image]` AdaIN-normalised to `ref[:, image]`."""
    x = x.clone()
    x[:, image] = adain(x[:, image], ref[:, image])
    return x


def adain_image_to_mixture(x, refs, weights, image):
    """`x` with its image tokens AdaIN-normalised to the weighted mixture of the references' image tokens: the
    mixture mean, and its second moment minus the squared mean (each reference's variance unbiased + EPS)."""
    x, tokens = x.clone(), [ref[:, image] for ref in refs]
    mean = sum(w * t.mean(-2, keepdim=True) for w, t in zip(weights, tokens))
    second = sum(w * (t.var(-2, keepdim=True) + EPS + t.mean(-2, keepdim=True) ** 2) for w, t in zip(weights, tokens))
    own = x[:, image]
    x[:, image] = (own - own.mean(-2, keepdim=True)) / (own.var(-2, keepdim=True) + EPS).sqrt() * (
        second - mean ** 2).sqrt() + mean
    return x


def attend_several(q, k, v, image, config, weights, rotary, reference_rotary, masks):
    """One guidance group whose first len(weights) images are references: each attends to itself alone; targets,
    AdaIN-ed to the references' mixture, attend to their own tokens and to every reference's image tokens (raw
    keys rotated at the reference positions, scaled), the logits toward reference j shifted by shift + log w_j."""
    count, weights = len(weights), [w / sum(weights) for w in weights]
    out = [softmax_attention(rope(q[j], rotary), rope(k[j], rotary), v[j], mask=masks[j]) for j in range(count)]
    for i in range(count, q.shape[0]):
        qi = adain_image_to_mixture(q[i], q[:count], weights, image) if config.adain_queries else q[i]
        ki = adain_image_to_mixture(k[i], k[:count], weights, image) if config.adain_keys else k[i]
        vi = adain_image_to_mixture(v[i], v[:count], weights, image) if config.adain_values else v[i]
        qi, ki = rope(qi, rotary), rope(ki, rotary)
        if not config.share_attention:
            out.append(softmax_attention(qi, ki, vi, mask=masks[i]))
            continue
        shared = [config.shared_score_scale * rope(k[j][:, image], reference_rotary) for j in range(count)]
        keys, values = torch.cat([ki] + shared, dim=-2), torch.cat([vi] + [v[j][:, image] for j in range(count)], -2)
        logits = qi @ keys.transpose(-1, -2) / math.sqrt(qi.shape[-1])
        if masks[i] is not None:
            own = logits[..., : masks[i].shape[-1]]
            logits[..., : masks[i].shape[-1]] = own + masks[i] if masks[i].is_floating_point() else own.masked_fill(
                ~masks[i], -math.inf)
        start, width = q.shape[-2], shared[0].shape[-2]
        for j, w in enumerate(weights):
            logits[..., start + j * width:start + (j + 1) * width] += config.shared_score_shift + (
                math.log(w) if w > 0 else -math.inf)
        out.append(text_on_own_keys(logits.softmax(-1) @ values, qi, ki, vi, image, config, masks[i]))
    return torch.stack(out)


def text_on_own_keys(shared, q, k, v, image, config, mask):
    """A target's attention output `shared`, except that with `text_sees_reference` off its queries outside the
    image tokens take their attention over the target's own keys only."""
    if config.text_sees_reference:
        return shared
    text = torch.ones(q.shape[-2], dtype=torch.bool)
    text[image] = False
    shared[:, text] = softmax_attention(q, k, v, mask=mask)[:, text]
    return shared


def attend_group(q, k, v, image, config, rotary=None, reference_rotary=None, masks=None, weights=(1.0,)):
    """Attention of one guidance group: q, k, v (images, heads, tokens, dim) before RoPE, image 0 the reference
    (the first len(weights) images with several references, `attend_several`).

    `image` slices the image tokens; `rotary` is (cos, sin) for all tokens (None: no RoPE); `reference_rotary`
    is (cos, sin) for the shared reference keys (None: the image rows of `rotary`); `masks` (images, 1, tokens,
    tokens), the model's own attention mask (Chroma's), covers each image's own keys only.
    """
    config = paper_config(config)
    masks = [None] * q.shape[0] if masks is None else masks
    if rotary is not None and reference_rotary is None:
        reference_rotary = tuple(t[image] for t in rotary)
    if len(weights) > 1:
        return attend_several(q, k, v, image, config, weights, rotary, reference_rotary, masks)
    out = [softmax_attention(rope(q[0], rotary), rope(k[0], rotary), v[0], mask=masks[0])]
    for i in range(1, q.shape[0]):
        qi = adain_image(q[i], q[0], image) if config.adain_queries else q[i]
        ki = adain_image(k[i], k[0], image) if config.adain_keys else k[i]
        vi = adain_image(v[i], v[0], image) if config.adain_values else v[i]
        qi, ki = rope(qi, rotary), rope(ki, rotary)
        if not config.share_attention:
            out.append(softmax_attention(qi, ki, vi, mask=masks[i]))
            continue
        shared_keys = config.shared_score_scale * rope(k[0][:, image], reference_rotary)
        keys, values = torch.cat([ki, shared_keys], dim=-2), torch.cat([vi, v[0][:, image]], dim=-2)
        shared = softmax_attention(qi, keys, values, shift_from=q.shape[-2], shift=config.shared_score_shift,
                                   mask=masks[i])
        out.append(text_on_own_keys(shared, qi, ki, vi, image, config, masks[i]))
    return torch.stack(out)


def flux_attention(q, k, v, text_tokens, config, rotary, reference_rotary=None, masks=None, weights=(1.0,)):
    """FLUX double- and single-stream blocks: tokens [text, image], RoPE on all of them."""
    return attend_group(q, k, v, slice(text_tokens, None), config, rotary, reference_rotary, masks, weights)


def sd3_joint_attention(q, k, v, image_tokens, config, weights=(1.0,)):
    """SD3 joint blocks (`attn`): tokens [image, text], no RoPE."""
    return attend_group(q, k, v, slice(0, image_tokens), config, weights=weights)


def sd3_dual_attention(q, k, v, config, weights=(1.0,)):
    """SD3.5 dual attention (`attn2`): image tokens only, no RoPE."""
    return attend_group(q, k, v, slice(None), config, weights=weights)


def by_group(attend, q, k, v, groups, *args):
    """Run `attend(q, k, v, *args)` on each of the `groups` equal batch slices of (batch, heads, tokens, dim)."""
    assert q.shape[0] % groups == 0, "the batch must split into equal guidance groups"
    return torch.cat([attend(*qkv, *args) for qkv in zip(q.chunk(groups), k.chunk(groups), v.chunk(groups))])


@dataclass
class Context:
    """What the transformer pre-hook learns at each call, read by the processors."""

    groups: int = 1
    text_tokens: int | None = None
    reference_rotary: tuple | None = None
    weights: tuple = (1.0,)  # one per reference at the start of each group


class FluxOracleProcessor:
    """Oracle processor for `FluxAttention` (double-stream with encoder_hidden_states, single-stream without)."""

    def __init__(self, config, context):
        self.config, self.context = config, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), q], dim=1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), k], dim=1)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], dim=1)
        else:
            text_tokens = self.context.text_tokens
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        assert self.context.groups == 1, "a FLUX transformer call is one guidance group"
        out = flux_attention(q, k, v, text_tokens, self.config, image_rotary_emb, self.context.reference_rotary,
                             attention_mask, self.context.weights)
        out = out.transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :text_tokens], out[:, text_tokens:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


class SD3OracleProcessor:
    """Oracle processor for SD3's joint `attn` (with encoder_hidden_states) and SD3.5's `attn2` (without)."""

    def __init__(self, config, context):
        self.config, self.context = config, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        assert attention_mask is None, "the oracle does not support attention masks"
        batch, image_tokens, _ = hidden_states.shape
        head_dim = attn.to_k.out_features // attn.heads

        def heads(t):
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        def norm(module, t):
            return t if module is None else module(t)

        q = norm(attn.norm_q, heads(attn.to_q(hidden_states)))
        k = norm(attn.norm_k, heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is None:
            out = by_group(sd3_dual_attention, q, k, v, self.context.groups, self.config, self.context.weights)
        else:
            q = torch.cat([q, norm(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))], dim=2)
            k = torch.cat([k, norm(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))], dim=2)
            v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
            out = by_group(sd3_joint_attention, q, k, v, self.context.groups, image_tokens, self.config,
                           self.context.weights)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


def flux_reference_rotary(transformer, img_ids, reference_positions):
    """(cos, sin) for the shared reference keys: "shifted" moves img_ids' column axis by the latent width."""
    if reference_positions == "same":
        return None  # the image rows of the call's image_rotary_emb
    assert reference_positions == "shifted", reference_positions
    shifted = img_ids.clone()
    shifted[:, 2] += int(img_ids[:, 2].max()) + 1
    return transformer.pos_embed(shifted)


def installed(transformer, processors: dict, read_call, config, noise_level: Callable[[dict], float]
              ) -> Callable[[], None]:
    """Put `processors` (layer name -> oracle processor) on `transformer`'s attention modules, and call
    `read_call(arguments)` with each forward call's arguments by name before it runs; a call whose noise level
    (`noise_level(arguments)`: 1 = pure noise) lies below `config.share_until` runs the modules' own processors
    instead (nothing shared), and so does, under `share_unconditional=False`, the second of two calls at one noise
    level: true CFG's negative prompt, which the pipelines run after the prompt. Returns `undo()`."""
    modules = {name: transformer.get_submodule(name) for name in processors}
    originals = {name: module.processor for name, module in modules.items()}
    signature = inspect.signature(transformer.forward)
    previous = {"level": None, "calls": 0}  # the last call's noise level, and the calls in a row at it

    def before(module, args, kwargs):
        call = signature.bind(*args, **kwargs).arguments
        level = noise_level(call)
        previous["calls"] = previous["calls"] + 1 if level == previous["level"] else 1
        previous["level"] = level
        sharing = level >= config.share_until and (config.share_unconditional or previous["calls"] == 1)
        for name, module in modules.items():
            module.set_processor(processors[name] if sharing else originals[name])
        read_call(call)

    for name, module in modules.items():
        module.set_processor(processors[name])
    handle = transformer.register_forward_pre_hook(before, with_kwargs=True)

    def undo():
        handle.remove()
        for name, module in modules.items():
            module.set_processor(originals[name])

    return undo


def install(pipe, config, layer_names, weights=(1.0,)):
    """Put oracle processors on the named attention modules of `pipe.transformer` (len(weights) references per
    group); returns `undo()`."""
    config = family_config(pipe, config, gates=True)
    transformer, context = pipe.transformer, Context(weights=tuple(weights))
    flux = isinstance(transformer, (FluxTransformer2DModel, ChromaTransformer2DModel))

    def processor(name):
        kind = FluxOracleProcessor if isinstance(transformer.get_submodule(name), FluxAttention) else \
            SD3OracleProcessor
        return kind(config, context)

    def read_call(call):
        if not flux:
            context.groups = 2 if pipe.do_classifier_free_guidance else 1
            return
        txt_ids, img_ids = (ids[0] if ids.ndim == 3 else ids for ids in (call["txt_ids"], call["img_ids"]))
        context.groups, context.text_tokens = 1, txt_ids.shape[0]
        context.reference_rotary = flux_reference_rotary(transformer, img_ids, config.reference_positions)

    scale = 1.0 if flux else 1000.0  # FLUX.1 and Chroma are passed sigma, SD3 sigma x 1000
    return installed(transformer, {name: processor(name) for name in layer_names}, read_call, config,
                     lambda call: float(call["timestep"].max()) / scale)
