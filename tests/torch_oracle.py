"""A compact PyTorch mPLUG-Owl written from the model's description in docs/design.md, in the
released state-dict layout, independently of owl_jax's modules.

The released code needs transformers <= 4.46 and is not part of the project; this oracle follows its
semantics (per-head interleaved fused QKV, abstractor residual from the normalised queries, FFN
LayerNorm, vit_eos, splicing by placeholder runs) with a plain Python loop over samples, so the
vectorised Flax splice is checked against an independent implementation. The LLM is transformers'
own LlamaForCausalLM.

Splicing follows owl_jax's rule, not the release's, where they differ: every P placeholders take the
sample's next image, so adjacent `<image><image>` tags (one run of 2P) get two images; the release
would read that run as one image (see owl_jax.models.owl.splice_images and
test_owl.py::test_adjacent_image_tags_each_get_their_own_image).

The video model (a checkpoint with `temporal_query_tokens`) follows the release's
mplug_owl_video modules: a local temporal module ahead of each vision layer for clips of more than
one frame (which doubles the class token, as the release's does), temporal queries beside the
queries, and the abstractor FFN width rule. Each clip is encoded alone, at its own frame count (the
release takes one count a batch); a clip of one frame is encoded as an image (the release's 5-D
path fails there). The k-th run of -2 placeholders of a sample takes its k-th clip (the release's
`forward` never splices clips and its `generate` reuses a sample's first one).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def _ln(x, mod):
    return nn.functional.layer_norm(
        x.float(), mod.normalized_shape, mod.weight.float(), mod.bias.float(), mod.eps
    ).type_as(x)


class VisionAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        qkv = self.query_key_value(x).reshape(b, s, self.heads, 3, d // self.heads).permute(3, 0, 2, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        return self.dense((probs @ v).permute(0, 2, 1, 3).reshape(b, s, d))


class VisionMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class VisionLocalTemporal(nn.Module):
    """The release's MplugOwlVisionLocalTemporal: x [b, t, s, c] -> the same, CLS passed through."""

    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.grid = c["image_size"] // c["patch_size"]
        self.ln = nn.LayerNorm(d)  # torch's eps 1e-5, as the release
        self.down_proj = nn.Conv3d(d, d // 2, kernel_size=1)
        self.conv = nn.Conv3d(d // 2, d // 2, kernel_size=(3, 1, 1), padding=(1, 0, 0), groups=d // 2)
        self.up_proj = nn.Conv3d(d // 2, d, kernel_size=1)

    def forward(self, x):
        cls, x = x[:, :, :1], x[:, :, 1:]
        b, t, p, c = x.shape
        x = _ln(x, self.ln).permute(0, 3, 1, 2).reshape(b, c, t, self.grid, self.grid)  # b c t h w
        x = self.up_proj(quick_gelu(self.conv(self.down_proj(x))))
        return torch.cat([cls, x.reshape(b, c, t, p).permute(0, 2, 3, 1)], dim=2)


class VisionLayer(nn.Module):
    def __init__(self, c, video=False):
        super().__init__()
        d = c["hidden_size"]
        if video:
            self.temporal = VisionLocalTemporal(c)
        self.input_layernorm = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.self_attn = VisionAttention(d, c["num_attention_heads"])
        self.post_attention_layernorm = nn.LayerNorm(d, eps=c["layer_norm_eps"])
        self.mlp = VisionMLP(d, c["intermediate_size"])

    def forward(self, x):
        x = x + self.self_attn(_ln(x, self.input_layernorm))
        return x + self.mlp(_ln(x, self.post_attention_layernorm))


class VisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, p = c["hidden_size"], c["patch_size"]
        n = (c["image_size"] // p) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embed = nn.Conv2d(3, d, p, p, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, n, d))
        self.pre_layernorm = nn.LayerNorm(d, eps=c["layer_norm_eps"])

    def forward(self, pixels_nchw):
        x = self.patch_embed(pixels_nchw).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1) + self.position_embedding
        return _ln(x, self.pre_layernorm)


class VisionEncoder(nn.Module):
    def __init__(self, c, video=False):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(c, video) for _ in range(c["num_hidden_layers"])])


class VisionModel(nn.Module):
    def __init__(self, c, video=False):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.encoder = VisionEncoder(c, video)
        self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, pixels_nchw):
        x = self.embeddings(pixels_nchw)
        for layer in self.encoder.layers:
            x = layer(x)
        return _ln(x, self.post_layernorm)

    def forward_clip(self, pixels_nctchw):
        """[B, 3, T, H, W] (T > 1, the release's video layout) -> [B, T, S, D]."""
        b, c, t, h, w = pixels_nctchw.shape
        x = self.embeddings(pixels_nctchw.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = x.reshape(b, t, *x.shape[1:])
        for layer in self.encoder.layers:
            x = x + layer.temporal(x)
            x = layer(x.reshape(b * t, *x.shape[2:])).reshape(b, t, *x.shape[2:])
        return _ln(x, self.post_layernorm)


class AbstractorAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, q, kv):
        b, d = q.shape[0], q.shape[-1]
        split = lambda x: x.view(b, -1, self.heads, d // self.heads).permute(0, 2, 1, 3)
        qh, kh, vh = split(self.query(q)), split(self.key(kv)), split(self.value(kv))
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return (probs @ vh).permute(0, 2, 1, 3).reshape(b, -1, d)


class AbstractorMLP(nn.Module):
    def __init__(self, d, f, eps):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, f), nn.Linear(f, d), nn.Linear(d, f)
        self.ffn_ln = nn.LayerNorm(f, eps=eps)

    def forward(self, x):
        return self.w2(_ln(nn.functional.silu(self.w1(x)) * self.w3(x), self.ffn_ln))


class AbstractorOutput(nn.Module):
    def __init__(self, d, f, eps):
        super().__init__()
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = AbstractorMLP(d, f, eps)

    def forward(self, attn, q):
        h = q + self.out_proj(attn)
        return h + self.mlp(_ln(h, self.norm2))


class CrossAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.norm1, self.normk = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.attention = AbstractorAttention(d, c["num_attention_heads"])
        self.output = AbstractorOutput(d, c["intermediate_size"], c["layer_norm_eps"])

    def forward(self, h, img):
        q = _ln(h, self.norm1)
        kv = torch.cat([q, _ln(img, self.normk)], dim=1)
        return self.output(self.attention(q, kv), q)


class AbstractorLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.crossattention = CrossAttention(c)


class AbstractorEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList([AbstractorLayer(c) for _ in range(c["num_hidden_layers"])])


class Abstractor(nn.Module):
    def __init__(self, c, llm_width, video=False):
        super().__init__()
        if video:  # the release's video model derives its FFN width from intermediate_size
            i = c["intermediate_size"]
            c = {**c, "intermediate_size": i if i == 2816 else 256 * ((int(2 * i / 3) + 255) // 256)}
            self.temporal_visual_fc = nn.Linear(c["hidden_size"], llm_width)
        self.encoder = AbstractorEncoder(c)
        self.visual_fc = nn.Linear(c["hidden_size"], llm_width)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, llm_width))

    def forward(self, queries, img, temporal_queries=None):
        """img [B, S, D]; or a clip's [B, T, S, D] with temporal_queries: both sets of queries read all
        frames' tokens, and the output is visual_fc(first) + temporal_visual_fc(second)."""
        h, q = queries, queries.shape[1]
        if temporal_queries is not None:
            h, img = torch.cat([queries, temporal_queries], dim=1), img.reshape(img.shape[0], -1, img.shape[-1])
        for layer in self.encoder.layers:
            h = layer.crossattention(h, img)
        out = self.visual_fc(h[:, :q])
        if temporal_queries is not None:
            out = out + self.temporal_visual_fc(h[:, q:])
        return torch.cat([out, self.vit_eos.expand(out.shape[0], 1, -1)], dim=1)


class OwlOracle(nn.Module):
    def __init__(self, config: dict, video: bool = False):
        super().__init__()
        v, a, t = config["vision_config"], config["visual_abstractor_config"], config["text_config"]
        self.vision_model = VisionModel(v, video)
        self.query_tokens = nn.Parameter(torch.zeros(1, config["num_query_tokens"], a["hidden_size"]))
        if video:
            self.temporal_query_tokens = nn.Parameter(torch.zeros(1, config["num_query_tokens"], a["hidden_size"]))
        self.abstractor = Abstractor(a, t["hidden_size"], video)
        llama_cfg = {k: v for k, v in t.items() if k not in ("model_type", "architectures", "torch_dtype")}
        self.language_model = LlamaForCausalLM(LlamaConfig(**llama_cfg, attn_implementation="eager"))

    @classmethod
    def from_pretrained(cls, directory: str) -> "OwlOracle":
        state = load_file(os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json")) as f:
            model = cls(json.load(f), video="temporal_query_tokens" in state)
        missing, unexpected = model.load_state_dict(state, strict=True)
        assert not missing and not unexpected
        return model.eval()

    def clip_tokens(self, clip_nhwc):
        """One clip [T, H, W, 3] -> its tokens [1, P, D_llm]; one frame is an image."""
        q = self.query_tokens
        if clip_nhwc.shape[0] == 1:
            return self.abstractor(q, self.vision_model(clip_nhwc.permute(0, 3, 1, 2)))
        features = self.vision_model.forward_clip(clip_nhwc.permute(3, 0, 1, 2)[None])
        return self.abstractor(q, features, self.temporal_query_tokens)

    def forward(self, input_ids, pixels_nhwc, num_images, attention_mask, clips=(), num_videos=None):
        """input_ids long[B, T] with -1 (image) and -2 (clip) placeholders; pixels float[M, H, W, 3];
        num_images long[B]; clips: the batch's clips in sample order, each float[T_k, H, W, 3];
        num_videos long[B]."""
        embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        media = {-1: (None, num_images), -2: (None, num_videos)}
        if pixels_nhwc.shape[0]:
            img = self.vision_model(pixels_nhwc.permute(0, 3, 1, 2))
            media[-1] = (self.abstractor(self.query_tokens.expand(img.shape[0], -1, -1), img), num_images)
        if len(clips):
            media[-2] = (torch.cat([self.clip_tokens(c) for c in clips]), num_videos)
        if media[-1][0] is not None or media[-2][0] is not None:
            p = next(m[0] for m in media.values() if m[0] is not None).shape[1]
            rows, first = [], {-1: 0, -2: 0}
            for b in range(input_ids.shape[0]):
                ids, row, k = input_ids[b].tolist(), embeds[b].clone(), {-1: 0, -2: 0}
                t = 0
                while t < len(ids):
                    if ids[t] < 0:  # a run of p placeholders takes the sample's next image or clip
                        kind = ids[t]
                        row[t : t + p] = media[kind][0][first[kind] + k[kind]]
                        k[kind] += 1
                        t += p
                    else:
                        t += 1
                for kind, (_, counts) in media.items():
                    first[kind] += int(counts[b]) if counts is not None else 0
                rows.append(row)
            embeds = torch.stack(rows)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return out.logits
