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


class VisionLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
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
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(c) for _ in range(c["num_hidden_layers"])])


class VisionModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.encoder = VisionEncoder(c)
        self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, pixels_nchw):
        x = self.embeddings(pixels_nchw)
        for layer in self.encoder.layers:
            x = layer(x)
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
    def __init__(self, c, llm_width):
        super().__init__()
        self.encoder = AbstractorEncoder(c)
        self.visual_fc = nn.Linear(c["hidden_size"], llm_width)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, llm_width))

    def forward(self, queries, img):
        h = queries
        for layer in self.encoder.layers:
            h = layer.crossattention(h, img)
        h = self.visual_fc(h)
        return torch.cat([h, self.vit_eos.expand(h.shape[0], 1, -1)], dim=1)


class OwlOracle(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        v, a, t = config["vision_config"], config["visual_abstractor_config"], config["text_config"]
        self.vision_model = VisionModel(v)
        self.query_tokens = nn.Parameter(torch.zeros(1, config["num_query_tokens"], a["hidden_size"]))
        self.abstractor = Abstractor(a, t["hidden_size"])
        llama_cfg = {k: v for k, v in t.items() if k not in ("model_type", "architectures", "torch_dtype")}
        self.language_model = LlamaForCausalLM(LlamaConfig(**llama_cfg, attn_implementation="eager"))

    @classmethod
    def from_pretrained(cls, directory: str) -> "OwlOracle":
        with open(os.path.join(directory, "config.json")) as f:
            model = cls(json.load(f))
        state = load_file(os.path.join(directory, "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=True)
        assert not missing and not unexpected
        return model.eval()

    def forward(self, input_ids, pixels_nhwc, num_images, attention_mask):
        """input_ids long[B, T] with -1 placeholders; pixels float[M, H, W, 3]; num_images long[B]."""
        embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        if pixels_nhwc.shape[0]:
            img = self.vision_model(pixels_nhwc.permute(0, 3, 1, 2))
            tokens = self.abstractor(self.query_tokens.expand(img.shape[0], -1, -1), img)
            p = tokens.shape[1]
            rows, first = [], 0
            for b in range(input_ids.shape[0]):
                ids, row, k = input_ids[b].tolist(), embeds[b].clone(), 0
                t = 0
                while t < len(ids):
                    if ids[t] < 0:  # a run of p placeholders takes the sample's next image
                        row[t : t + p] = tokens[first + k]
                        k += 1
                        t += p
                    else:
                        t += 1
                first += int(num_images[b])
                rows.append(row)
            embeds = torch.stack(rows)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return out.logits
